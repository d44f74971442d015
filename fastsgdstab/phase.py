"""Phase diagrams: the exact spectral radius on a grid of learning rates and batch sizes.

``stability_map`` evaluates the spectral radius of the second-moment map (the specification page,
section "The exact second-moment map") at every (batch size, learning rate) of a grid, and the
exact critical learning rate (section "Exact critical learning rate") of every batch size.

Why not one Lanczos solve per grid point: for a 100 x 100 grid that is 10,000 solves of tens of
operator products each. Instead the whole grid shares one *reduced basis*. In H's eigenbasis
every map of the grid is

    Q(lr, q) X = (1 - lr (lam_j + lam_l) + lr^2 lam_j lam_l) X_jl + lr^2 q V(X),

with ``q`` the batch size's noise scalar and ``V = N`` (Bernoulli) or ``N - H(x)H`` (section
"Exact critical batch size"): only ``V`` is expensive, and it does not depend on the grid point.
So the operator kernel is applied to each basis vector once; each grid point is then a small
dense eigenproblem in the basis (Rayleigh-Ritz), certified by its residual, which costs no
further operator product because ``V`` of every basis vector is stored. Points whose residual is
too large add a Davidson correction (the residual divided by ``theta - diag Q``) to the basis,
so the basis grows only where the grid needs it. Batch sizes are visited in increasing order,
each starting from the previous one's eigenvectors (up to ``MAP_KEEP`` of them); a point that
cannot be certified falls back to the engine's Lanczos solve
(:func:`fastsgdstab.spectral_radius`'s method).

Every point is certified from the shared basis first, at no operator product: the lower end is
the Rayleigh quotient of its Ritz vector recomputed from the stored images, the upper end a
Collatz-Wielandt bound on the Ritz vector's PSD part plus ``delta I``, whose images are the same
combinations of stored images (every rounding bounded, ``_rounding``). That upper bound is
first-order in the Ritz vector's error (about ten times the relative residual), so a point is
accepted when its bracket is ``rtol`` tight, and the search over ``delta`` aims at ``rtol``
itself (issue 19: it aimed at the engine's looser ``CERTIFY_RTOL``, so that most points failed
and cost a product each). Only points that fail add directions to the basis.

Each batch size's critical learning rate comes from the same basis (``_MapSolver.critical``):
``rho(Q(x)) <= 1`` iff ``x <= x*`` without momentum, so two more points of the row, just below
and above the pencil's Ritz estimate of ``x*``, certified as the grid points are, prove a
bracket of ``x*`` (issue 19: a separate ``critical_lr`` solve per row cost 12 products each,
three times the shared basis' own products on the README map). A row the basis cannot prove
gets the engine's solve. ``operator_products`` counts every product.

With momentum (``_map_certify.MapMomentumSolver``) the grid shares the engine's Krylov basis of
``V_s``; each point's root finder starts from the same learning rate's root at the previous
batch size, and each point's proof stops once its bracket is certified.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh

from ._warnings import warn
from ._config import (
    ENGINE_RTOL,
    HUGE_UNIT_LR,
    MAP_BASIS_BYTES,
    MAP_BLOCK,
    MAP_CRITICAL_ATTEMPTS,
    MAP_CRITICAL_DELTA,
    MAP_CRITICAL_RTOL_FLOOR,
    MAP_KEEP,
    MAP_MAX_BASIS,
    MAP_MAX_ROUNDS,
)
from ._engine import (MomentumSolver, SandwichOperator, check_family, check_momentum, reduced,
                      radius_shift,
                      second_moment_multiplier)
from ._kernels.operators import sandwich_operator
from ._map_certify import MapMomentumSolver
from ._linalg import CertificationWarning, certified_top_eigenvalue, certify_top_eigenvalues
from ._progress import ProgressBar, check_progress
from ._rounding import UNIT_ROUNDOFF, gamma, sandwich_error
from ._threads import blas_policy, family_work
# (stability_map calls the shared grid checks by its former private names)
from ._validation import check_batch_sizes, check_lrs, check_real_scalar
from .moments import critical_lr, spectral_radius
from .sampling import check_sampling, map_coefficients

__all__ = ["StabilityMap", "stability_map"]



@dataclass(frozen=True)
class StabilityMap:
    """The exact mean-square phase diagram of a family; see :func:`stability_map`.

    Attributes
    ----------
    lrs : ndarray, shape (m,)
        The learning rates (columns), as given.
    batch_sizes : ndarray, shape (b,)
        The batch sizes (rows), as given.
    spectral_radius : ndarray, shape (b, m)
        ``rho(Q)`` at (batch size, lr): the per-step growth factor of ``E||w_t||^2``. Rows
        follow ``batch_sizes``, columns ``lrs`` (``print`` shows a summary, not the arrays).
    radius_lower, radius_upper : ndarray, shape (b, m)
        A proven bracket around the top eigenvalue at each point (Rayleigh lower bound,
        Collatz-Wielandt upper bound; specification page, section "Certified answers and scale"):
        ``radius_lower <= rho(Q) <= radius_upper``.
    radius_error : ndarray, shape (b, m)
        ``max(upper - value, value - lower)``: a proven bound on the error of each value, at
        most ``rtol`` relative unless a ``CertificationWarning`` said otherwise. The actual
        error is typically far smaller (about residual^2 / gap).
    critical_lr : ndarray, shape (b,)
        ``eta*`` of each batch size (the quantity :func:`fastsgdstab.critical_lr` computes);
        ``inf`` if no curvature. Without momentum it comes from the map's shared basis (see
        :func:`stability_map`): accurate to about 1e-12 relative, moved to the stable side by
        its error estimate, and always inside its proven bracket.
    critical_lr_lower, critical_lr_upper : ndarray, shape (b,), or None
        Without momentum, a proven bracket of each ``eta*`` (``lower`` is proven mean-square
        stable, ``upper`` proven unstable, for the user's family), at most ``CERTIFY_RTOL``
        (1e-5) wide relative, as :func:`fastsgdstab.critical_lr`'s ``bounds=True``. None with
        momentum (use ``critical_lr(..., bounds=True)``) and for maps assembled elsewhere.
    sampling : str
    n : int
        Number of samples of the family: its ``population_size`` N, the set the batches are
        drawn from (the family's own samples unless it is a probe of a larger training set).
    operator_products : int
        Applications of the noise operator for the whole grid, every one counted: the shared
        basis', the critical learning rates', any engine fallback's.
    elapsed_seconds : float
    momentum, nesterov
        The optimiser (``momentum = 0``: plain SGD); with momentum, ``spectral_radius`` is that
        of the second-moment map of ``z = (w_t, w_{t-1})`` (or ``(w_t, v_{t-1})``).
    excess_loss : ndarray, shape (b, m), or None
        With ``stability_map(..., excess_loss=True)`` on a family with per-sample gradients: the
        loss floor at each point (:func:`fastsgdstab.stationary`; ``inf`` where there is no
        stationary state). None otherwise.
    """

    lrs: np.ndarray
    batch_sizes: np.ndarray
    spectral_radius: np.ndarray
    radius_lower: np.ndarray
    radius_upper: np.ndarray
    critical_lr: np.ndarray
    sampling: str
    n: int
    operator_products: int
    elapsed_seconds: float
    momentum: float = 0.0
    nesterov: bool = False
    excess_loss: np.ndarray | None = None  # (b, m) loss floor, with stability_map(excess_loss=True)
    critical_lr_lower: np.ndarray | None = None  # (b,) proven bracket of each critical lr
    critical_lr_upper: np.ndarray | None = None

    def __str__(self) -> str:
        """A short summary; the arrays are fields (``spectral_radius[i, j]`` is at
        ``batch_sizes[i]``, ``lrs[j]``)."""
        b, m = self.spectral_radius.shape
        with np.errstate(invalid="ignore", divide="ignore"):
            width = np.nanmax((self.radius_upper - self.radius_lower)
                              / np.maximum(np.abs(self.spectral_radius), np.finfo(float).tiny))
        order = np.argsort(self.batch_sizes, kind="stable")
        shown = order if order.size <= 6 else np.concatenate([order[:3], order[-3:]])
        critical = ", ".join(f"B={self.batch_sizes[i]:g}: {self.critical_lr[i]:.6g}" for i in shown)
        if order.size > 6:
            critical = critical.replace(f"B={self.batch_sizes[shown[3]]:g}",
                                        f"..., B={self.batch_sizes[shown[3]]:g}", 1)
        return "\n".join([
            f"StabilityMap: {b} batch sizes x {m} learning rates, sampling={self.sampling}, "
            f"n={self.n}{_optimiser(self.momentum, self.nesterov)} (arrays indexed [batch size, lr])",
            f"  spectral radius from {np.min(self.spectral_radius):.6g} to "
            f"{np.max(self.spectral_radius):.6g} (certified brackets, widest {width:.1e} relative)",
            f"  stable at {int(self.stable.sum())} of {self.stable.size} points "
            f"(lr <= critical_lr of its batch size)",
            f"  critical lr: {critical}",
            f"  computed in {self.elapsed_seconds:.2f} s ({self.operator_products} operator products)",
        ])

    @property
    def radius_error(self) -> np.ndarray:
        """Proven bound on the error of each value (see the class notes)."""
        return np.maximum(self.radius_upper - self.spectral_radius,
                          self.spectral_radius - self.radius_lower)

    @property
    def stable(self) -> np.ndarray:
        """Boolean (b, m): mean-square stable, ``lr <= critical_lr`` (exact; no rounding of rho near 1)."""
        return self.lrs[None, :] <= self.critical_lr[:, None]


class _Basis:
    """Orthonormal symmetric k x k matrices (flattened rows of ``W``), their images ``V W`` and
    the projections ``G1 = <w_i, (lam_j + lam_l) o w_j>``, ``G2 = <w_i, lam_j lam_l o w_j>``,
    ``P = <w_i, V w_j>``, so that the projected map is ``I - lr G1 + lr^2 (G2 + q P)``."""

    def __init__(self, reduced, interaction: np.ndarray, capacity: int):
        k = reduced.k
        self.reduced = reduced
        self.interaction = interaction
        self.pair_sum = np.add.outer(reduced.unit_eigenvalues, reduced.unit_eigenvalues).ravel()
        self.pair_product = np.multiply.outer(reduced.unit_eigenvalues, reduced.unit_eigenvalues).ravel()
        self.capacity = capacity
        self.W = np.empty((capacity, k * k))
        self.VW = np.empty((capacity, k * k))
        self.G1 = np.empty((capacity, capacity))
        self.G2 = np.empty((capacity, capacity))
        self.P = np.empty((capacity, capacity))
        self.size = 0
        self.products = 0
        self._ones = np.ones((k, k))
        self._work = np.empty(reduced.unit_rows.shape)
        # V(I), for the certificate's T(I) at every grid point (restarts replace the basis).
        self.identity_image = self._apply_noise(np.eye(k).ravel())
        # Rounding of one product of V per unit norm, and a bound on V's operator norm (_rounding).
        self.rounding = sandwich_error(reduced.unit_rows, reduced.rank, self._ones, interaction, 1.0)
        self.norm_bound = self.rounding / gamma(k + reduced.unit_rows.shape[0] + 2 * reduced.rank + 8) / 1.01

    def _apply_noise(self, vector: np.ndarray) -> np.ndarray:
        k = self.reduced.k
        out = np.empty((k, k))
        sandwich_operator(self.reduced.unit_rows, self.reduced.rank, vector.reshape(k, k), self._ones,
                          self.interaction, 1.0, self._work, out)
        self.products += 1
        return out.ravel()

    def add(self, vectors) -> int:
        """Orthogonalise each vector against the basis (twice) and add what is left; returns the count."""
        added = 0
        for vector in vectors:
            if self.size >= self.capacity:
                break
            k = self.reduced.k
            v = vector.reshape(k, k)
            v = (0.5 * (v + v.T)).ravel()
            original = float(np.linalg.norm(v))
            if original == 0.0:
                continue
            m = self.size
            for _ in range(2):
                if m:
                    v = v - self.W[:m].T @ (self.W[:m] @ v)
            norm = float(np.linalg.norm(v))
            if norm <= 1e-8 * original:
                continue
            v = v / norm
            image = self._apply_noise(v)
            self.W[m] = v
            self.VW[m] = image
            basis = self.W[: m + 1]
            self.G1[m, : m + 1] = self.G1[: m + 1, m] = basis @ (self.pair_sum * v)
            self.G2[m, : m + 1] = self.G2[: m + 1, m] = basis @ (self.pair_product * v)
            # <w_m, V w_j> and <w_j, V w_m> agree in exact arithmetic (V is self-adjoint).
            row = 0.5 * (self.VW[: m + 1] @ v + basis @ image)
            self.P[m, : m + 1] = self.P[: m + 1, m] = row
            self.size = m + 1
            added += 1
        return added

    def restart(self, vectors: np.ndarray, images: np.ndarray, size: int) -> None:
        """Replace the basis by at most ``size`` orthonormal directions spanning ``vectors`` (rows
        in the span of the basis, with their known ``V`` images): no operator product."""
        gram = vectors @ vectors.T
        values, rotation = np.linalg.eigh(0.5 * (gram + gram.T))
        keep = values > 1e-10 * values[-1]
        keep[: max(values.size - size, 0)] = False
        transform = rotation[:, keep] / np.sqrt(values[keep])
        W = transform.T @ vectors
        VW = transform.T @ images
        m = W.shape[0]
        self.W[:m], self.VW[:m] = W, VW
        self.G1[:m, :m] = W @ (self.pair_sum * W).T
        self.G2[:m, :m] = W @ (self.pair_product * W).T
        P = W @ VW.T
        self.P[:m, :m] = 0.5 * (P + P.T)
        self.size = m

    def ritz(self, lrs: np.ndarray, q: float):
        """Top Ritz pair of every lr at noise scalar q: values, residual norms, vectors, images,
        residual vectors and the entrywise part of each map (for the preconditioner)."""
        m = self.size
        G1, G2, P = self.G1[:m, :m], self.G2[:m, :m], self.P[:m, :m]
        coefficients = np.empty((lrs.size, m))
        values = np.empty(lrs.size)
        for index, lr in enumerate(lrs):
            projected = np.eye(m) - lr * G1 + (lr * lr) * (G2 + q * P)
            eigenvalues, eigenvectors = eigh(projected, subset_by_index=[m - 1, m - 1],
                                             check_finite=False)
            if eigenvalues.size == 0:
                # LAPACK's dsyevr occasionally returns no eigenvalue for a subset; take all.
                eigenvalues, eigenvectors = np.linalg.eigh(projected)
            values[index] = eigenvalues[-1]
            coefficients[index] = eigenvectors[:, -1]
        vectors = coefficients @ self.W[:m]
        images = coefficients @ self.VW[:m]
        self.last_coefficients = coefficients
        multiplier = 1.0 - np.outer(lrs, self.pair_sum) + np.outer(lrs * lrs, self.pair_product)
        residuals = multiplier * vectors + (q * lrs * lrs)[:, None] * images - values[:, None] * vectors
        return values, np.linalg.norm(residuals, axis=1), vectors, images, residuals, multiplier


def _certify_points(basis: _Basis, lrs, q, values, vectors, noise_images, multiplier, coefficients,
                    target_rtol=None):
    """Proven ``(lower, upper)`` brackets of the top eigenvalue at each of these grid points.

    ``T(v) = F o v + q lr^2 V(v)`` with ``V(v)`` the same combination of the basis' images as v
    is of the basis, and ``T(I)`` the entrywise part on the diagonal plus ``q lr^2 V(I)``: no
    operator product. The errors of these images are bounded (``_rounding``): each stored image's
    own rounding, the rounding of the combinations, and v's (``_linalg``'s certificate).
    """
    k = basis.reduced.k
    eye = np.eye(k).ravel()
    weight = q * lrs * lrs
    identity_images = multiplier * eye + weight[:, None] * basis.identity_image
    images = multiplier * vectors + weight[:, None] * noise_images
    m = basis.size
    W, VW = basis.W[:m], basis.VW[:m]
    w_norms = np.sqrt(np.einsum("ij,ij->i", W, W))
    image_norms = np.sqrt(np.einsum("ij,ij->i", VW, VW))
    spread = np.abs(coefficients)
    g = gamma(m + 2)
    combination = (basis.rounding * (spread @ w_norms)
                   + g * (spread @ image_norms + basis.norm_bound * (spread @ w_norms)))
    u = 4 * UNIT_ROUNDOFF
    image_errors = (np.abs(weight) * combination
                    + u * (np.linalg.norm(multiplier * vectors, axis=1)
                           + np.abs(weight) * np.linalg.norm(noise_images, axis=1)))
    identity_errors = (np.abs(weight) * basis.rounding * math.sqrt(k)
                       + u * (np.linalg.norm(multiplier * eye, axis=1)
                              + np.abs(weight) * np.linalg.norm(basis.identity_image)))
    low, high = certify_top_eigenvalues(values, vectors.reshape(-1, k, k), images.reshape(-1, k, k),
                                        identity_images.reshape(-1, k, k), image_errors=image_errors,
                                        identity_errors=identity_errors,
                                        **({} if target_rtol is None else {"target_rtol": target_rtol}))
    # The value: the Rayleigh quotient of the Ritz vector from its image (second-order accurate,
    # where the Ritz value carries the rounding of the projected matrices), inside the bracket.
    quotient = np.einsum("ij,ij->i", vectors, images) / np.einsum("ij,ij->i", vectors, vectors)
    return np.clip(quotient, low, high), low, high


def _map_row(basis: _Basis, lrs: np.ndarray, q: float, noise_diagonal: np.ndarray, rtol: float,
             engine_fallback):
    """Spectral radius at every (unit) lr for one noise scalar q: ``(radius, lower, upper, ...)``.

    A point is accepted when its Ritz residual is small AND its proven bracket is at most
    ``rtol`` wide: the residual alone says only that *some* eigenvalue is near (a Ritz value of
    the wrong eigenvalue was accepted that way, up to 7% too low).
    """
    radius = np.full(lrs.size, np.nan)
    lower = np.full(lrs.size, np.nan)
    upper = np.full(lrs.size, np.nan)
    row_vectors = np.zeros((lrs.size, basis.W.shape[1]))
    row_images = np.zeros_like(row_vectors)
    pending = np.arange(lrs.size)
    for _ in range(MAP_MAX_ROUNDS):
        values, residual, vectors, images, residuals, multiplier = basis.ritz(lrs[pending], q)
        row_vectors[pending], row_images[pending] = vectors, images
        scale = np.maximum(np.abs(values), np.finfo(float).tiny)
        done = residual <= rtol * scale
        if np.any(done):
            index = np.flatnonzero(done)
            quotient, low, high = _certify_points(basis, lrs[pending[index]], q, values[index],
                                        vectors[index], images[index], multiplier[index],
                                        basis.last_coefficients[index], target_rtol=rtol)
            proven = high - low <= rtol * scale[index]
            done[index[~proven]] = False
            keep = index[proven]
            radius[pending[keep]] = quotient[proven]
            lower[pending[keep]] = low[proven]
            upper[pending[keep]] = high[proven]
        failing = np.flatnonzero(~done)
        if failing.size == 0:
            break
        chosen_lrs = lrs[pending[failing]]
        pending = pending[failing]
        # Davidson's correction (theta - diag Q)^{-1} r: the entrywise part of Q is exactly
        # diagonal here and V is the perturbation, so this resolves the near-degenerate
        # entrywise eigenvalues that make plain Krylov steps (Lanczos) slow at small lr.
        spread = np.unique(np.linspace(0, failing.size - 1, min(MAP_BLOCK, failing.size)).round().astype(int))
        chosen = failing[spread]
        theta = values[chosen][:, None]
        diagonal = multiplier[chosen] + (q * chosen_lrs[spread] ** 2)[:, None] * noise_diagonal
        denominator = theta - diagonal
        floor = 1e-8 * np.abs(theta)
        denominator = np.where(np.abs(denominator) < floor, np.where(denominator < 0, -floor, floor), denominator)
        corrections = residuals[chosen] / denominator
        if basis.size + chosen.size > basis.capacity:
            basis.restart(row_vectors, row_images, basis.capacity // 2)
        if basis.add(corrections) == 0:
            break
    for index in np.flatnonzero(np.isnan(radius)):
        # Not certified within the round budget: the engine, warm-started from the Ritz vector.
        radius[index], lower[index], upper[index] = engine_fallback(lrs[index], row_vectors[index])
    return radius, lower, upper, row_vectors, row_images


def _optimiser(momentum: float, nesterov: bool) -> str:
    if momentum == 0.0:
        return ""
    return f", {'Nesterov' if nesterov else 'heavy-ball'} momentum {momentum:g}"


_NOT_GIVEN = object()


def check_map_arguments(family, lrs, batch_sizes, sampling, rtol=_NOT_GIVEN, momentum=0.0,
                        nesterov=False):
    """``stability_map``'s arguments checked, in its order: the one check shared by the local
    map, its distributed form and the command line's map in blocks (``rtol`` not given: not
    checked, returned as None)."""
    family = check_family(family)
    sampling = check_sampling(sampling)
    lrs = check_lrs(lrs)
    batch_sizes = check_batch_sizes(batch_sizes, family.population_size, integer=sampling != "bernoulli",
                                    samples=family.n)
    if rtol is _NOT_GIVEN:
        rtol = None
    else:
        rtol = check_real_scalar(rtol, "rtol")
        if not 0 < rtol < 1:
            raise ValueError(f"rtol must lie in (0, 1); got {rtol:g}")
    momentum, nesterov = check_momentum(momentum, nesterov)
    return family, lrs, batch_sizes, sampling, rtol, momentum, nesterov


@blas_policy(size_of=family_work)
def stability_map(family, lrs, batch_sizes, *, sampling="bernoulli", rtol=1e-6, momentum=0.0,
                  nesterov=False, client=None, progress=None, excess_loss=False) -> StabilityMap:
    """Exact mean-square phase diagram: the spectral radius on a (batch size, lr) grid.

    At every grid point, ``rho(Q)`` of the second-moment map
    ``Q(X) = X - lr (H X + X H) + lr^2 (a H X H + b N(X))`` (section "The exact second-moment
    map"), the value :func:`fastsgdstab.spectral_radius` returns; and for every batch size the
    exact critical learning rate (section "Exact critical learning rate"), so that the stable
    region is exactly ``lr <= critical_lr``. The grid shares one reduced basis (see the module
    notes): each grid point is a small dense eigenproblem certified by its residual, and the
    expensive operator is applied once per basis vector, not once per Lanczos step per point.
    Each batch size's critical lr is proven from the same basis (two more certified points of
    the row, around the basis' estimate; see ``StabilityMap.critical_lr_lower``), so the whole
    map, critical lrs included, costs the products of the basis alone (``operator_products``
    counts all of them). The learning rates are for the family's loss convention (per-sample
    loss with Hessian ``H_i``; ``torch.nn.MSELoss`` has no 1/2: twice the curvature, half the lr).

    With momentum (specification page, section "Momentum") each grid point is the spectral
    radius of :func:`fastsgdstab.spectral_radius` with momentum and each row's ``critical_lr``
    that of :func:`fastsgdstab.critical_lr`: per-point certified root finders. The
    shared-basis trick of the plain map does not carry over as it stands (the momentum map is
    not self-adjoint and its radius is a root in a growth factor, not an eigenvalue of a
    projected pencil); what is shared is the Krylov basis of the noise operator ``V_s``, which
    depends on neither the learning rate nor the batch size, so that after the first points
    most steps cost no product of ``V_s``; each point's root finder starts from the root of
    the same learning rate at the previous batch size, and its proof stops once certified.

    Parameters
    ----------
    family : HessianFamily
    lrs : array_like, shape (m,)
        Learning rates, each > 0 (any order).
    batch_sizes : array_like, shape (b,)
        Batch sizes in [1, n] (any order): real numbers for Bernoulli sampling (its nominal
        batch size), integers for "without_replacement" and "with_replacement", which draw
        exactly B samples.
    sampling : {"bernoulli", "without_replacement", "with_replacement"}
    rtol : float, default 1e-6
        A grid point is accepted when the residual of its Ritz pair is at most ``rtol`` times
        the radius: ``radius_error`` is then at most ``rtol`` relative. The eigenvalue error is
        in practice about residual^2 / gap, near 1e-12 (it is the eigenvector that the
        residual measures). With momentum every point is certified to the engine's own
        tolerance instead (see above), and ``rtol`` is not used.
    momentum : float, default 0.0
        torch.optim.SGD's momentum, in [0, 1); 0 is plain SGD (the shared-basis method above).
    nesterov : bool, default False
        Nesterov momentum (requires ``momentum > 0``, as torch does).
    client : dask.distributed.Client, optional
        Compute the map on this Dask cluster, in contiguous blocks of the grid, one local map
        per block (see "Running on a cluster"): every value's proven bracket overlaps the local
        one. Default None: in this process (dask is never imported).
    progress : bool, optional
        A tqdm progress bar over the batch sizes (rows) on stderr. None (default): when stderr
        is a terminal and the map is estimated to take longer than ``PROGRESS_AFTER_SECONDS``
        (2 s), as ``simulate``'s; True: always; False: never. Not shown with ``client`` (the blocks run on the workers).
        A callable instead: called with no argument after each row (batch sizes in increasing
        order), and no bar (the command line's ``map`` reports its progress this way).
    excess_loss : bool, default False
        Also map the loss floor (the family must have per-sample gradients): the field
        ``excess_loss`` then holds :func:`fastsgdstab.stationary`'s excess loss at each point
        (``inf`` where lr is at or above that batch size's critical lr), computed in this
        process, one solve per point (section "Non-interpolating minima: stationary covariance
        and the loss floor").

    Returns
    -------
    StabilityMap
        ``spectral_radius`` and ``radius_error`` of shape (b, m), ``critical_lr`` of shape (b,).

    Raises
    ------
    TypeError, ValueError
        ``family`` is not a HessianFamily; an lr not > 0; a batch size outside [1, n]; an
        unknown ``sampling``; an empty or non-1-d grid; ``rtol`` outside (0, 1).

    Examples
    --------
    >>> import numpy as np
    >>> from fastsgdstab import HessianFamily, spectral_radius, stability_map
    >>> family = HessianFamily.from_features(np.random.default_rng(0).standard_normal((50, 4)))
    >>> result = stability_map(family, lrs=[0.1, 0.5, 1.0], batch_sizes=[1, 5, 50])
    >>> result.spectral_radius.shape, result.critical_lr.round(4).tolist()
    ((3, 3), [0.3341, 0.9955, 1.5198])
    >>> exact = spectral_radius(family, 0.5, 5)
    >>> bool(abs(result.spectral_radius[1, 1] - exact) <= result.radius_error[1, 1])
    True
    >>> result.stable.tolist()   # lr <= critical_lr of each batch size
    [[True, False, False], [True, True, False], [True, True, True]]
    >>> heavy = stability_map(family, lrs=[0.1, 0.5, 1.0], batch_sizes=[1, 50], momentum=0.9)
    >>> exact = spectral_radius(family, 0.1, 1, momentum=0.9)
    >>> bool(abs(heavy.spectral_radius[0, 0] - exact) <= heavy.radius_error[0, 0])
    True
    """
    row_done = None
    if callable(progress):
        row_done, progress = progress, False
    progress = check_progress(progress)
    if excess_loss:  # the loss floor beside the radius (issue 20)
        from dataclasses import replace as _replace

        from .loss_floor import NoStationaryStateError, stationary
        if getattr(family, "gradients", None) is None:
            raise ValueError("excess_loss=True needs a family with per-sample gradients "
                             "(HessianFamily(..., gradients=g))")
        result = stability_map(family, lrs, batch_sizes, sampling=sampling, rtol=rtol,
                               momentum=momentum, nesterov=nesterov, client=client,
                               progress=row_done if row_done is not None else progress)
        floor = np.full(result.spectral_radius.shape, math.inf)
        for row, batch_size in enumerate(result.batch_sizes):
            for column, lr in enumerate(result.lrs):
                try:
                    floor[row, column] = stationary(family, float(lr), float(batch_size),
                                                    sampling=sampling, momentum=momentum,
                                                    nesterov=nesterov).excess_loss
                except NoStationaryStateError:
                    pass
        return _replace(result, excess_loss=floor)
    if client is not None:
        from ._distributed import stability_map as distributed_map

        return distributed_map(client, family, lrs, batch_sizes, sampling=sampling, rtol=rtol,
                               momentum=momentum, nesterov=nesterov)
    started = time.perf_counter()
    family, lrs, batch_sizes, sampling, rtol, momentum, nesterov = check_map_arguments(
        family, lrs, batch_sizes, sampling, rtol, momentum, nesterov)
    if row_done is not None:
        return _stability_map(family, lrs, batch_sizes, sampling, rtol, momentum, nesterov,
                              started, _RowCallback(row_done))
    with ProgressBar(batch_sizes.size, progress, "stability_map", "batch size") as bar:
        return _stability_map(family, lrs, batch_sizes, sampling, rtol, momentum, nesterov,
                              started, bar)


class _RowCallback:
    """A progress "bar" that calls ``callback()`` after each row."""

    def __init__(self, callback):
        self.callback = callback

    def update(self, amount: int = 1) -> None:
        for _ in range(amount):
            self.callback()


def _stability_map(family, lrs, batch_sizes, sampling, rtol, momentum, nesterov, started, bar):
    """The local map on checked arguments, ``bar.update()`` after each row."""
    n = family.population_size  # the batch law's N (n unless the family is a probe)
    reduction = reduced(family)
    shape = (batch_sizes.size, lrs.size)
    radius, lower, upper = np.ones(shape), np.ones(shape), np.ones(shape)
    critical = np.full(batch_sizes.size, math.inf)
    if reduction.k == 0:
        return StabilityMap(lrs, batch_sizes, radius, lower, upper, critical, sampling, n, 0,
                            time.perf_counter() - started, momentum, nesterov)
    if momentum != 0.0:
        return _momentum_map(reduction, lrs, batch_sizes, sampling, n, momentum, nesterov, started,
                             bar)

    # Everything below is in units of the sharpness: x = lr lambda_1(H), unit eigenvalues and
    # rows (specification page, section "Certified answers and scale").
    unit_lrs = np.array([reduction.unit_lr(lr) for lr in lrs])
    lr_order = np.argsort(unit_lrs, kind="stable")
    solver = _MapSolver(reduction, sampling, rtol, n)
    critical_lower, critical_upper = critical.copy(), critical.copy()
    root = reduction.root_sharpness

    def lr_of(x, direction):
        # x / lambda_1 without forming lambda_1, moved two ulps outward (direction -inf, +inf).
        with np.errstate(over="ignore", under="ignore", divide="ignore"):
            value = np.float64(x) / root / root
        return float(np.nextafter(np.nextafter(value, direction), direction))

    for row in np.argsort(batch_sizes, kind="stable"):
        batch_size = float(batch_sizes[row])
        row_radius, row_lower, row_upper = solver.row(batch_size, unit_lrs[lr_order])
        # The critical lr from the same basis (two more certified points), else the engine.
        bracket = solver.critical(batch_size)
        if bracket is None:
            top = critical_lr(family, batch_size, sampling=sampling, bounds=True)
            solver.extra_products += top.products
            critical[row], critical_lower[row], critical_upper[row] = top.value, top.lower, top.upper
        else:
            x, x_lower, x_upper = bracket
            critical_lower[row] = lr_of(x_lower, -math.inf)
            critical_upper[row] = lr_of(x_upper, math.inf)
            critical[row] = min(max(lr_of(x, -math.inf), critical_lower[row]), critical_upper[row])
        # Huge x (beyond HUGE_UNIT_LR) would overflow the projected maps: those points come
        # from the engine, which rescales the map.
        for index in np.flatnonzero(unit_lrs[lr_order] > HUGE_UNIT_LR):
            bracket = spectral_radius(family, float(lrs[lr_order[index]]), batch_size,
                                      sampling=sampling, bounds=True)
            solver.extra_products += bracket.products
            row_radius[index], row_lower[index], row_upper[index] = (
                bracket.value, bracket.lower, bracket.upper)
        radius[row, lr_order] = row_radius
        lower[row, lr_order] = row_lower
        upper[row, lr_order] = row_upper
        bar.update()
    if solver.uncertified:
        warn(
            f"stability_map: at {solver.uncertified} grid point(s) the top eigenvalue is proven "
            f"only within a bracket wider than the certification tolerance (radius_lower and "
            f"radius_upper hold the true brackets)", CertificationWarning)
    return StabilityMap(lrs, batch_sizes, radius, lower, upper, critical, sampling, n,
                        solver.products, time.perf_counter() - started, momentum, nesterov,
                        critical_lr_lower=critical_lower, critical_lr_upper=critical_upper)


def _momentum_map(reduction, lrs, batch_sizes, sampling, n, momentum, nesterov, started,
                  bar=None):
    """The map with momentum: per-point certified roots through one shared ``MomentumSolver``."""
    shape = (batch_sizes.size, lrs.size)
    radius, lower, upper = np.empty(shape), np.empty(shape), np.empty(shape)
    critical = np.empty(batch_sizes.size)
    solver = MapMomentumSolver(reduction, sampling)
    root = reduction.root_sharpness
    uncertified = 0

    def times(value, log_factor):
        if log_factor == 0.0 or value == 0.0:
            return value
        log_value = math.log(abs(value)) + log_factor
        return math.copysign(math.exp(log_value) if log_value < 709.78 else math.inf, value)

    starts = [None] * lrs.size
    with np.errstate(over="ignore", under="ignore"):
        for row in np.argsort(batch_sizes, kind="stable"):
            _, b = map_coefficients(sampling, n, float(batch_sizes[row]))
            top = solver.critical_unit_lr(b, momentum, nesterov)
            uncertified += not top.certified
            critical[row] = float(np.float64(top.value) / root / root)
            for column, lr in enumerate(lrs):
                # Warm start from the same lr at the previous batch size (issue 19 item 4).
                bracket, log_factor, starts[column] = solver.radius_from(
                    reduction.unit_lr(float(lr)), b, momentum, nesterov, starts[column])
                uncertified += not bracket.certified
                radius[row, column] = times(bracket.value, log_factor)
                lower[row, column] = times(bracket.lower, log_factor)
                upper[row, column] = times(bracket.upper, log_factor)
            if bar is not None:
                bar.update()
    if uncertified:
        warn(
            f"stability_map: at {uncertified} grid point(s) or critical learning rate(s) the "
            f"answer is proven only within a bracket wider than the certification tolerance "
            f"(radius_lower and radius_upper hold the true brackets)", CertificationWarning)
    return StabilityMap(lrs, batch_sizes, radius, lower, upper, critical, sampling, n,
                        solver.products, time.perf_counter() - started, momentum, nesterov)


class _MapSolver:
    """The rows of a map, one batch size at a time, through one shared basis (see the module
    notes), with the certified engine for the points the basis cannot certify."""

    def __init__(self, reduction, sampling: str, rtol: float, population_size: int | None = None):
        k = reduction.k
        self.reduction, self.sampling, self.rtol = reduction, sampling, rtol
        self.n = reduction.unit_rows.shape[0] // reduction.rank
        # the batch law's N (a probe's training set); the noise operator's means stay over n
        self.population_size = self.n if population_size is None else int(population_size)
        product = np.multiply.outer(reduction.unit_eigenvalues, reduction.unit_eigenvalues)
        interaction = np.zeros((k, k)) if sampling == "bernoulli" else -product
        capacity = int(min(MAP_MAX_BASIS, k * (k + 1) // 2, MAP_BASIS_BYTES // (16.0 * k * k)))
        # Learning rates per Ritz batch: about six (m, k^2) arrays are alive at once.
        self.chunk = int(max(1, MAP_BASIS_BYTES // (48.0 * k * k)))
        self.basis = _Basis(reduction, interaction, capacity) if capacity >= 8 else None
        if self.basis is not None:
            self.basis.add([np.eye(k).ravel()])
            # Diagonal of V in the entrywise basis, for Davidson's preconditioner:
            # N_(jl),(jl) = (1/n) sum over factor columns u of u_j^2 u_l^2 (exact for rank 1).
            squares = reduction.unit_rows ** 2
            self.noise_diagonal = (squares.T @ squares / self.n + interaction).ravel()
        self.previous = None
        self.uncertified = 0
        self.extra_products = 0

    @property
    def products(self) -> int:
        """Every product of the noise operator: the shared basis', the engine fallbacks' and
        the fallback critical-lr solves' (the full count, issue 19)."""
        return (self.basis.products if self.basis is not None else 0) + self.extra_products

    def critical(self, batch_size: float):
        """Proven bracket ``(value, lower, upper)`` of the unit critical lr ``x* = eta* lambda_1``
        of one batch size from the shared basis, or None when the basis cannot prove one.

        Plain SGD: ``Q(x) - I = x (x D - L)`` with L positive definite, so
        ``lambda_max(Q(x)) <= 1`` iff ``x <= x* = 1 / lambda_max(L^-1/2 D L^-1/2)`` (section
        "Exact critical learning rate"), and ``lambda_max <= rho``. Hence a proven
        ``upper rho(Q(x_lo)) <= 1`` shows ``x_lo <= x*`` and a proven ``lower rho(Q(x_hi)) > 1``
        shows ``x_hi > x*``: two more points of the row, certified from the basis as every grid
        point is (``_map_row``, with the user family's shift ``radius_shift``), at
        ``x_c (1 -+ delta)`` around the pencil's Ritz estimate ``x_c`` (no operator product;
        only the basis' refinement near ``x_c``, shared with the next rows, may cost some).
        The value is the Ritz estimate moved to the stable side by its error estimate
        (``residual^2 / gap``, as the engine's ``safe_upper_value``), inside the bracket."""
        basis = self.basis
        if basis is None:
            return None
        a, b = map_coefficients(self.sampling, self.population_size, batch_size)
        delta = MAP_CRITICAL_DELTA

        def no_engine(x, start):  # an end the basis cannot certify: no proof from it
            return math.nan, -math.inf, math.inf

        for _ in range(MAP_CRITICAL_ATTEMPTS):
            estimate = self._pencil(b)
            if estimate is None:
                return None
            x, slope, _ = estimate
            ends = np.array([x * (1.0 - delta), x * (1.0 + delta)])
            shift = radius_shift(self.reduction, ends, a, b)
            # Each end's radius is about 1 -+ delta * slope; its bracket must clear 1. Below the
            # root, directions of tiny curvature keep eigenvalues of Q just under 1 (its
            # diagonal in the entrywise basis is a lower bound on lambda_max): the margin is the
            # smaller of the two.
            low = ends[0]
            diagonal = (1.0 - low * basis.pair_sum + low * low * basis.pair_product
                        + (b * low * low) * self.noise_diagonal)
            margin = min(delta * slope, 1.0 - float(np.max(diagonal)))
            point_rtol = min(self.rtol, (margin - float(shift[1])) / 3.0)
            if not point_rtol >= MAP_CRITICAL_RTOL_FLOOR:
                return None
            if (basis.capacity >= 2 * MAP_KEEP and basis.size + 4 * MAP_BLOCK > basis.capacity
                    and self.previous is not None):
                # A full basis would restart from the two ends' vectors alone (_map_row), and
                # the next row would start nearly afresh: restart from the row's own first.
                # (A smaller capacity is the whole space of small k: it is never restarted.)
                basis.restart(*self.previous, MAP_KEEP)
            _, lower, upper, *_ = _map_row(basis, ends, b, self.noise_diagonal, point_rtol,
                                           no_engine)
            if upper[0] + shift[0] <= 1.0 and lower[1] - shift[1] > 1.0:
                estimate = self._pencil(b)
                value = ends[0] if estimate is None else float(np.clip(estimate[2], *ends))
                return value, float(ends[0]), float(ends[1])
        return None

    def _pencil(self, q: float):
        """``(x_c, slope, safe)`` from the top Ritz pair of the pencil ``(G2 + q P, G1)`` in the
        basis (``D v = mu L v``, ``x_c = 1 / mu``): ``slope = x_c <v, L v> / <v, v>``, the
        derivative of ``rho(Q(x))`` in ``log x`` at ``x_c``; ``safe = 1 / (mu + err)``, with
        ``err = ||r||^2 / gap`` the Ritz value's error estimate (r the residual of
        ``L^-1/2 D L^-1/2``, from the stored images: no product). None if not positive."""
        basis = self.basis
        m = basis.size
        G1, G2, P = basis.G1[:m, :m], basis.G2[:m, :m], basis.P[:m, :m]
        try:
            values, vectors = eigh(G2 + q * P, G1, check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            return None
        mu = float(values[-1])
        if not (mu > 0 and math.isfinite(mu)):
            return None
        c = vectors[:, -1]
        v = c @ basis.W[:m]
        image = basis.pair_product * v + q * (c @ basis.VW[:m])   # D v
        root_sum = np.sqrt(basis.pair_sum)
        y = root_sum * v                                          # v = L^-1/2 y
        residual = (image - mu * basis.pair_sum * v) / root_sum  # L^-1/2 (D v - mu L v)
        norm = float(np.dot(y, y))
        error = float(np.dot(residual, residual)) / norm
        gap = mu - float(values[-2]) if values.size > 1 else mu
        error = error / max(gap, 1e-3 * mu) + 8.0 * m * UNIT_ROUNDOFF * mu
        slope = float(np.dot(v, basis.pair_sum * v)) / float(np.dot(v, v)) / mu
        return 1.0 / mu, slope, 1.0 / (mu + error)

    def row(self, batch_size: float, sorted_lrs: np.ndarray):
        """``(radius, lower, upper)`` at every (sorted, unit) lr of one batch size; entries with
        ``x > HUGE_UNIT_LR`` are left for the caller."""
        a, b = map_coefficients(self.sampling, self.population_size, batch_size)
        radius, lower, upper = (np.empty(sorted_lrs.size) for _ in range(3))
        usable = np.flatnonzero(sorted_lrs <= HUGE_UNIT_LR)

        def engine(x, start):
            return self.engine_point(a, b, x, start)

        if self.basis is None:
            for index in usable:
                radius[index], lower[index], upper[index] = engine(sorted_lrs[index], None)
            return self._widen(radius, lower, upper, sorted_lrs, usable, a, b)
        if self.previous is not None and self.basis.size > MAP_KEEP:
            # Start each batch size from the previous one's top eigenvectors (compressed).
            self.basis.restart(*self.previous, MAP_KEEP)
        for first in range(0, usable.size, self.chunk):
            part = usable[first:first + self.chunk]
            (radius[part], lower[part], upper[part], *self.previous) = _map_row(
                self.basis, sorted_lrs[part], b, self.noise_diagonal, self.rtol, engine)
        return self._widen(radius, lower, upper, sorted_lrs, usable, a, b)

    def _widen(self, radius, lower, upper, sorted_lrs, usable, a, b):
        """The reduction's own rounding (a family congruent to the user's), as in
        ``spectral_radius``: Q moves by at most ``x dL + x^2 dD`` (Weyl)."""
        shift = radius_shift(self.reduction, sorted_lrs[usable], a, b)
        lower[usable] -= shift
        upper[usable] += shift
        return radius, lower, upper

    def engine_point(self, a: float, b: float, x: float, start):
        """The certified engine at one point, warm-started inside the PSD cone."""
        k = self.reduction.k
        multiplier, weight, log_factor = second_moment_multiplier(
            self.reduction.unit_eigenvalues, x, a, b)
        operator = SandwichOperator(self.reduction, np.ones((k, k)), multiplier, weight)
        bracket = certified_top_eigenvalue(operator, k, rtol=ENGINE_RTOL,
                                           start=None if start is None else _cone_start(start, k),
                                           certify_rtol=self.rtol)
        self.extra_products += operator.products
        if not bracket.certified:
            self.uncertified += 1
        factor = math.exp(log_factor)
        return bracket.value * factor, bracket.lower * factor, bracket.upper * factor


def _cone_start(vector: np.ndarray, k: int) -> np.ndarray:
    """A Ritz vector's PSD part plus some identity: inside the PSD cone, so it overlaps the top
    eigenvector even if the Ritz vector belonged to another eigenvalue."""
    start = vector.reshape(k, k)
    start = 0.5 * (start + start.T)
    values, vectors = np.linalg.eigh(start)
    if -values[0] > values[-1]:
        values = -values
    start = (vectors * np.maximum(values, 0.0)) @ vectors.T
    return start / max(np.max(np.abs(start)), np.finfo(float).tiny) + 0.1 * np.eye(k)
