"""Geometry of a family of per-sample Hessians: coherence, sharpness, non-uniformity.

The coherence matrix ``S_ij = ||H_i^{1/2} H_j^{1/2}||_F = ||U_i^T U_j||_F`` and the coherence
measure ``sigma = lambda_1(S) / max_i lambda_1(H_i)`` of Dexter et al. (specification page, section
"Coherence measure"), the sharpness ``lambda_1(H)`` and Wu, Ma & E's non-uniformity
(section "Other criteria to report beside the exact answer").

S is rotation invariant, so it is computed from the family's reduced factor rows (H's
eigenbasis on its range, k <= min(d, n r) columns) in blocks of Gram products ``A_I A_J^T``
(BLAS-3). Below ``store_limit`` samples S is stored and returned; above it, S is never formed:
each Lanczos product sweeps the upper-triangular blocks of S, recomputing them on the fly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._warnings import warn
from ._kernels.coherence import coherence_block, coherence_block_product
from ._kernels.operators import noise_operator
from ._config import CERTIFY_RTOL, COHERENCE_RTOL
from ._linalg import CertificationWarning, largest_eigenpair
from ._validation import check_positive_int
from ._engine import check_family, reduced as reduced_family
from ._threads import blas_policy, gram_work, operator_work

__all__ = ["Coherence", "coherence", "sample_sharpness", "sharpness", "non_uniformity"]

# Factor rows per Gram block: a (2048 x 2048) float64 block is 32 MB, large enough for BLAS-3 to
# run near peak and small enough that two of them fit any memory budget.
_BLOCK_ROWS = 2048


def _family_work(family, *args, **kwargs) -> int:
    """Work of the reduction and of an operator product (threading policy, ``_threads``)."""
    return operator_work(family)


def coherence_work(family, *args, **kwargs) -> int:
    """Work of the reduction and of one Gram block of ``coherence`` (threading policy; also
    used by theory.theorem1)."""
    return max(operator_work(family), gram_work(family, _BLOCK_ROWS))


DEFAULT_STORE_LIMIT = 4096
"""Largest n for which :func:`coherence` stores S (n^2 float64: 128 MB at 4096)."""


@dataclass(frozen=True)
class Coherence:
    """The coherence of a family of Hessians (see :func:`coherence`).

    Attributes
    ----------
    sigma : float
        ``lambda_S / max_sample_sharpness``; >= 1, and NaN for a family with no curvature.
    lambda_S : float
        Perron root (largest eigenvalue) of S.
    max_sample_sharpness : float
        ``max_i lambda_1(H_i)``.
    matrix : ndarray (n, n) or None
        S itself when n <= the store limit, else None (never formed).
    residual : float
        Lanczos residual of the Perron pair: ``|lambda_S - exact| <= residual``.
    """

    sigma: float
    lambda_S: float
    max_sample_sharpness: float
    matrix: np.ndarray | None
    residual: float


def _sample_gram(rows: np.ndarray, n: int, rank: int) -> np.ndarray:
    """The (n, r, r) matrices ``U_i^T U_i`` (same non-zero spectrum as H_i)."""
    blocks = rows.reshape(n, rank, rows.shape[1])
    return np.matmul(blocks, blocks.transpose(0, 2, 1))


@blas_policy(size_of=_family_work)
def sample_sharpness(family) -> np.ndarray:
    """``lambda_1(H_i)`` for every sample, shape (n,) (``||x_i||^2`` for rank 1).

    Computed as the top eigenvalue of the r x r matrix ``U_i^T U_i`` (same non-zero spectrum as
    ``H_i = U_i U_i^T``), in units of the sharpness (any scale of the loss works).

    Parameters
    ----------
    family : HessianFamily

    Returns
    -------
    ndarray, shape (n,)

    Raises
    ------
    TypeError
        ``family`` is not a HessianFamily.

    Examples
    --------
    >>> from fastsgdstab import HessianFamily
    >>> from fastsgdstab import sample_sharpness
    >>> sample_sharpness(HessianFamily.from_features([[3.0, 4.0], [1.0, 0.0]]))
    array([25.,  1.])
    """
    family = check_family(family)
    reduced = reduced_family(family)
    n, rank = family.n, reduced.rank
    if reduced.k == 0:
        return np.zeros(n)
    rows = reduced.unit_rows
    if rank == 1:
        unit = np.einsum("ij,ij->i", rows, rows)
    else:
        unit = np.linalg.eigvalsh(_sample_gram(rows, n, rank))[:, -1]
    with np.errstate(over="ignore", under="ignore"):
        return unit * reduced.sharpness


def _block_bounds(n: int, rank: int) -> list[tuple[int, int]]:
    per_block = max(1, _BLOCK_ROWS // rank)
    return [(start, min(start + per_block, n)) for start in range(0, n, per_block)]


def _coherence_matrix(rows: np.ndarray, n: int, rank: int) -> np.ndarray:
    """S (n, n) from reduced factor rows (n r, k), computed in symmetric block pairs."""
    S = np.empty((n, n))
    bounds = _block_bounds(n, rank)
    for bi, (i0, i1) in enumerate(bounds):
        A = rows[i0 * rank : i1 * rank]
        for j0, j1 in bounds[bi:]:
            G = A @ rows[j0 * rank : j1 * rank].T
            block = S[i0:i1, j0:j1]
            coherence_block(G, rank, block)
            if j0 != i0:
                S[j0:j1, i0:i1] = block.T
            else:
                # BLAS need not return A A^T exactly symmetric: make S symmetric to the bit.
                block[...] = 0.5 * (block + block.T)
    return S


def _coherence_product(rows: np.ndarray, n: int, rank: int):
    """``v -> S v`` without storing S: one sweep over the upper-triangular blocks per product.

    Each Gram block ``A_I A_J^T`` (J >= I) is computed once per product into a reused buffer
    (BLAS-3) and one fused pass turns it into the S-block and applies it both ways:
    ``y_I += T v_J`` and ``y_J += T^T v_I``. Half the Gram work of a plain row sweep.
    """
    bounds = _block_bounds(n, rank)
    samples = bounds[0][1] - bounds[0][0]
    # One flat buffer, reshaped per block so that a ragged last block is still C-contiguous
    # (BLAS writes it directly; a strided ``out`` would make numpy copy).
    gram_buffer = np.empty((samples * rank) ** 2)

    def apply(v):
        v = np.ascontiguousarray(v, dtype=np.float64).ravel()
        y = np.zeros(n)
        for bi, (i0, i1) in enumerate(bounds):
            A = rows[i0 * rank : i1 * rank]
            for j0, j1 in bounds[bi:]:
                shape = (A.shape[0], (j1 - j0) * rank)
                G = gram_buffer[: shape[0] * shape[1]].reshape(shape)
                np.matmul(A, rows[j0 * rank : j1 * rank].T, out=G)
                coherence_block_product(G, rank, v[j0:j1], v[i0:i1], y[i0:i1], y[j0:j1], j0 == i0)
        return y

    return apply


@blas_policy(size_of=coherence_work)
def coherence(family, *, store_limit: int = DEFAULT_STORE_LIMIT) -> Coherence:
    """Coherence measure ``sigma`` of a family (Dexter et al., section "Coherence measure").

    ``S_ij = ||H_i^{1/2} H_j^{1/2}||_F = sqrt(tr(H_i H_j)) = ||U_i^T U_j||_F`` (n x n, entrywise
    non-negative, usually indefinite) and

        sigma = lambda_1(S) / max_i lambda_1(H_i),

    with ``lambda_1(S)`` the Perron root of S. ``sigma >= 1``; for rank-1 Hessians it lies in
    [1, n]: 1 for mutually orthogonal H_i, n for identical ones. For rank 1 (MSE, scalar output)
    ``S = |X X^T|`` entrywise.

    The Perron root comes from Lanczos started at the non-negative vector ``sqrt(S_ii)`` (S >= 0
    entrywise, so its Perron vector is non-negative and the start overlaps it). For n above ``store_limit`` S is
    never stored: every product recomputes its blocks from the factors (BLAS-3 Gram blocks,
    the upper triangle only), memory O(n k + block^2). Cost O(n^2 k r) per product.

    Parameters
    ----------
    family : HessianFamily
    store_limit : int, default 4096
        Store and return S when ``n <= store_limit``.

    Returns
    -------
    Coherence
        ``sigma``, ``lambda_S``, ``max_sample_sharpness``, ``matrix`` (S or None), ``residual``.
        A family with every H_i = 0 has ``lambda_S = 0`` and ``sigma = nan``.

    Raises
    ------
    TypeError
        ``family`` is not a HessianFamily, or ``store_limit`` is not an integer.

    Examples
    --------
    >>> from fastsgdstab import HessianFamily, coherence
    >>> round(coherence(HessianFamily.from_features([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])).sigma, 12)
    3.0
    >>> result = coherence(HessianFamily.from_features([[1.0, 0.0], [0.0, 2.0]]))
    >>> result.sigma, result.matrix
    (1.0, array([[1., 0.],
           [0., 4.]]))
    """
    family = check_family(family)
    store_limit = check_positive_int(store_limit, "store_limit", minimum=0)
    reduced = reduced_family(family)
    n, rank = family.n, reduced.rank
    if reduced.k == 0:
        matrix = np.zeros((n, n)) if n <= store_limit else None
        return Coherence(math.nan, 0.0, 0.0, matrix, 0.0)
    # Everything in units of the sharpness (S / lambda_1(H)), so any scale of the loss works;
    # sigma is a ratio and does not depend on the unit.
    rows = reduced.unit_rows
    grams = _sample_gram(rows, n, rank)
    max_sample = float(np.max(np.linalg.eigvalsh(grams)[:, -1])) if rank > 1 else float(
        np.max(np.einsum("ij,ij->i", rows, rows)))
    if n <= store_limit:
        unit_matrix = _coherence_matrix(rows, n, rank)

        def apply(v):
            return unit_matrix @ v
    else:
        unit_matrix = None
        apply = _coherence_product(rows, n, rank)
    # Start: sqrt(S_ii) = ||U_i^T U_i||_F^(1/2) (||x_i|| for rank 1). Non-negative and positive
    # on every sample with curvature, where the Perron vector lives, so it overlaps the Perron
    # vector; for incoherent directions (E|x_i . x_j| ~ ||x_i|| ||x_j||) it is close to it, which
    # saves about one product at large n over the all-ones vector.
    start = np.sqrt(np.sqrt(np.sum(grams * grams, axis=(1, 2))))
    bounds = {}

    def accept(pair) -> bool:
        # Certified when the proven Collatz-Wielandt bound is within CERTIFY_RTOL of the Ritz
        # value (a lower bound); otherwise Lanczos continues with a tighter tolerance.
        bounds[pair.products] = upper = _perron_upper_bound(pair, start)
        return upper - pair.value <= CERTIFY_RTOL * abs(pair.value)

    pair = largest_eigenpair(apply, start, dimension=n, rtol=COHERENCE_RTOL, accept=accept)
    upper = bounds.get(pair.products)
    if upper is None:  # ended on an invariant subspace (exact in exact arithmetic)
        upper = _perron_upper_bound(pair, start)
    # The Perron root is at least the largest diagonal entry ||U_i^T U_i||_F >= max_i lambda_1(H_i);
    # clamping removes round-off below that floor (sigma >= 1 exactly, as the theory says).
    unit_lambda = max(float(pair.value), max_sample)
    if not upper - unit_lambda <= CERTIFY_RTOL * unit_lambda:
        warn(
            f"coherence: the Perron root of S is proven only to lie in [{unit_lambda:.12g}, "
            f"{upper:.12g}] (units of the sharpness)", CertificationWarning)
    sharpness = reduced.sharpness
    with np.errstate(over="ignore", under="ignore"):
        lambda_S = unit_lambda * sharpness
        matrix = None
        if unit_matrix is not None:
            matrix = unit_matrix * sharpness
            matrix.setflags(write=False)
        max_sample_sharpness = max_sample * sharpness
    return Coherence(unit_lambda / max_sample, float(lambda_S), float(max_sample_sharpness), matrix,
                     float(pair.residual * sharpness))


def _perron_upper_bound(pair, start: np.ndarray) -> float:
    """A proven upper bound on the Perron root of the entrywise non-negative S (Collatz-Wielandt
    for vectors: ``rho(S) <= max_i (S x)_i / x_i`` for any positive x).

    ``x = v+ + delta s`` with v the Ritz vector (sign-fixed), s the positive start vector and
    ``S v`` from the Lanczos relation; since ``v- <= nu s`` entrywise (``nu = max v-_i / s_i``) and
    S >= 0, ``S x <= S v + (nu + delta) S s``. Samples with no curvature (s_i = 0) have zero
    rows in S and are left out. A few delta are tried; no further product.
    """
    v = pair.vector.ravel()
    image = pair.image.ravel()
    if np.sum(v) < 0:
        v, image = -v, -image
    positive = start > 0
    s, Ss = start[positive], pair.start_image.ravel()[positive]
    v, image = v[positive], image[positive]
    scale = float(np.max(np.abs(v))) or 1.0
    v, image = v / scale, image / scale
    nu = float(np.max(np.maximum(-v, 0.0) / s))
    v_plus = np.maximum(v, 0.0)
    best = math.inf
    for delta in (1e-12, 1e-9, 1e-6, 1e-3, 1.0) :
        weight = delta / float(np.max(s))
        x = v_plus + weight * s
        bound = image + (nu + weight) * Ss
        best = min(best, float(np.max(bound / x)))
    return best * (1.0 + 1e-14 * math.sqrt(s.size))


@blas_policy(size_of=_family_work)
def sharpness(family) -> float:
    """Sharpness ``lambda_1(H)``, the largest eigenvalue of the mean Hessian ``H = (1/n) sum_i H_i``.

    The same as ``family.sharpness()``: exact (an eigensolve of H or of the Gram matrix of the
    factors), ``inf`` if it exceeds the float range.

    Parameters
    ----------
    family : HessianFamily

    Returns
    -------
    float

    Raises
    ------
    TypeError
        ``family`` is not a HessianFamily.

    Examples
    --------
    >>> from fastsgdstab import HessianFamily
    >>> from fastsgdstab import sharpness
    >>> sharpness(HessianFamily.from_features([[2.0, 0.0], [0.0, 1.0]]))
    2.0
    """
    return check_family(family).sharpness()


@blas_policy(size_of=_family_work)
def non_uniformity(family) -> float:
    """Non-uniformity of Wu, Ma & E (2018): ``s = lambda_1((1/n) sum_i H_i^2 - H^2)^(1/2)``.

    ``(1/n) sum_i H_i^2 - H^2`` is the covariance of the random Hessian ``H_i`` (PSD), so s is a
    standard deviation of curvature across samples; 0 iff all H_i are equal. Computed in H's
    eigenbasis as ``N(I) - diag(lam^2)`` with ``N(X) = (1/n) sum_i H_i X H_i`` (a dense k x k
    eigensolve: exact), in units of the sharpness.

    Parameters
    ----------
    family : HessianFamily

    Returns
    -------
    float
        ``s >= 0`` (same units as the sharpness).

    Raises
    ------
    TypeError
        ``family`` is not a HessianFamily.

    Examples
    --------
    >>> from fastsgdstab import HessianFamily
    >>> from fastsgdstab import non_uniformity
    >>> non_uniformity(HessianFamily.from_features([[1.0], [3.0]]))   # H_i = 1, 9: std 4
    4.0
    """
    family = check_family(family)
    reduced = reduced_family(family)
    if reduced.k == 0:
        return 0.0
    # In units of the sharpness (s scales like lambda_1(H)): any scale of the loss works.
    mean_square = np.empty((reduced.k, reduced.k))
    noise_operator(reduced.unit_rows, reduced.rank, np.eye(reduced.k),
                   np.empty(reduced.unit_rows.shape), mean_square)
    variance = mean_square - np.diag(reduced.unit_eigenvalues**2)
    top = float(np.linalg.eigvalsh(0.5 * (variance + variance.T))[-1])
    # The matrix is PSD; a tiny negative top eigenvalue is round-off of an exact 0.
    with np.errstate(over="ignore", under="ignore"):
        return float(math.sqrt(max(top, 0.0)) * reduced.sharpness)
