"""The exact mean-square engine: second-moment map, spectral radius, critical lr and batch size.

Everything here is exact (up to floating point and a Lanczos residual below 1e-11 relative):
the theory page's sections "The exact second-moment map", "Exact critical learning rate" and
"Exact critical batch size". All work happens in H's eigenbasis on the range of H, with
k = rank(H) <= min(d, n r), through one operator kernel; nothing of size d^2 x d^2 is formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._kernels.operators import sandwich_operator, second_moment_iteration
from ._linalg import largest_eigenpair
from ._validation import as_real_array, check_batch_size, check_finite, check_lr, check_positive_int
from .family import HessianFamily, _Reduced
from .sampling import batch_size_from_noise, check_sampling, map_coefficients

__all__ = [
    "SecondMomentResult",
    "second_moment",
    "spectral_radius",
    "critical_lr",
    "critical_batch_size",
]

# Lanczos stopping tolerance: the eigenvalue's error bound relative to its size.
_RTOL = 1e-12


def _check_family(family) -> HessianFamily:
    if not isinstance(family, HessianFamily):
        raise TypeError(
            f"family must be a HessianFamily (build one with HessianFamily(factors), "
            f".from_features or .from_dense); got {type(family).__name__}"
        )
    return family


@dataclass(frozen=True)
class SecondMomentResult:
    """Exact trajectory of the mean squared norm of linearised SGD.

    Attributes
    ----------
    log_mean_sq : ndarray, shape (steps + 1,)
        ``log E||w_t||^2`` for t = 0..steps (natural log; exact, never overflows).
    lr, batch_size, sampling, steps
        The settings that produced it.
    """

    log_mean_sq: np.ndarray
    lr: float
    batch_size: float
    sampling: str
    steps: int

    @property
    def mean_sq(self) -> np.ndarray:
        """``E||w_t||^2`` itself (may overflow to inf where the log exceeds ~709)."""
        with np.errstate(over="ignore"):
            return np.exp(self.log_mean_sq)

    @property
    def growth_rate(self) -> float:
        """Per-step factor of ``E||w_t||^2`` over the last step (tends to the spectral radius)."""
        if self.steps == 0:
            return math.nan
        return float(np.exp(self.log_mean_sq[-1] - self.log_mean_sq[-2]))


def _outer(eigenvalues: np.ndarray) -> np.ndarray:
    return np.multiply.outer(eigenvalues, eigenvalues)


def _pair_sum(eigenvalues: np.ndarray) -> np.ndarray:
    return np.add.outer(eigenvalues, eigenvalues)


def _map_multiplier(reduced: _Reduced, lr: float, a: float) -> np.ndarray:
    """Entrywise part of Q in H's eigenbasis: (1 - lr lam_j)(1 - lr lam_k) + lr^2 (a - 1) lam_j lam_k."""
    factor = 1.0 - lr * reduced.eigenvalues
    return np.multiply.outer(factor, factor) + lr * lr * (a - 1.0) * _outer(reduced.eigenvalues)


def _top_eigenvalue(reduced: _Reduced, scaling, multiplier, noise_weight, start) -> float:
    rows, rank = reduced.rows, reduced.rank
    work = np.empty(rows.shape)

    def apply(X):
        out = np.empty(X.shape)
        sandwich_operator(rows, rank, X, scaling, multiplier, noise_weight, work, out)
        return out

    k = reduced.k
    return largest_eigenpair(apply, start, dimension=k * (k + 1) // 2, rtol=_RTOL).value


def _initial_state(family: HessianFamily, init):
    """Sigma_0 restricted to the range of H (k x k, eigenbasis) and the trace of the rest.

    Directions in the common null space of the H_i never move, and the cross terms between the
    range and the null space do not enter the trace, so
    E||w_t||^2 = tr(X_t) + tr(P_null Sigma_0 P_null) exactly.
    """
    reduced = family._reduced
    k, d = reduced.k, family.d
    if init is None:
        return np.eye(k), float(d - k)
    array = as_real_array(init, "init")
    check_finite(array, "init")
    basis = family._range_basis()
    if array.shape == (d,):
        inside = basis.T @ array
        rest = array - basis @ inside
        if not np.any(array):
            raise ValueError("init must not be the zero vector (E||w_t||^2 would be 0 for all t)")
        return np.outer(inside, inside), float(rest @ rest)
    if array.shape == (d, d):
        scale = float(np.max(np.abs(array)))
        if np.max(np.abs(array - array.T)) > 1e-10 * scale:
            raise ValueError("init as a matrix is Sigma_0 = E[w_0 w_0^T] and must be symmetric")
        sigma0 = 0.5 * (array + array.T)
        smallest = float(np.linalg.eigvalsh(sigma0)[0])
        if smallest < -1e-10 * scale:
            raise ValueError(
                f"init as a matrix is Sigma_0 = E[w_0 w_0^T] and must be positive semi-definite; "
                f"its smallest eigenvalue is {smallest:.6g}"
            )
        if not np.trace(sigma0) > 0:
            raise ValueError("init must not be the zero matrix (E||w_t||^2 would be 0 for all t)")
        inside = basis.T @ sigma0 @ basis
        return inside, max(float(np.trace(sigma0) - np.trace(inside)), 0.0)
    raise ValueError(
        f"init must be None (w_0 ~ N(0, I)), a vector of shape ({d},) (w_0) or a PSD matrix of "
        f"shape ({d}, {d}) (Sigma_0); got shape {array.shape}"
    )


def second_moment(family, lr, batch_size, steps, *, sampling="bernoulli", init=None) -> SecondMomentResult:
    """Exact ``log E||w_t||^2`` of linearised SGD for t = 0..steps.

    Iterates the second-moment map ``Sigma_{t+1} = Q(Sigma_t)`` with
    ``Q(X) = X - lr (H X + X H) + lr^2 (a H X H + b N(X))``, ``N(X) = (1/n) sum_i H_i X H_i``
    (section "The exact second-moment map"), renormalising every step so that the logs are exact
    however far the iteration grows.

    Parameters
    ----------
    family : HessianFamily
    lr : float
        Learning rate, > 0.
    batch_size : float
        Real number in [1, n] (Bernoulli includes each sample with probability B / n).
    steps : int
        Number of SGD steps, >= 0.
    sampling : {"bernoulli", "without_replacement", "with_replacement"}
    init : None, array (d,) or array (d, d)
        None: ``w_0 ~ N(0, I)`` (Sigma_0 = I); a vector: that ``w_0``; a PSD matrix: Sigma_0.

    Returns
    -------
    SecondMomentResult
        ``log_mean_sq`` has shape (steps + 1,).

    Examples
    --------
    >>> from fastsgdstab import HessianFamily, second_moment
    >>> family = HessianFamily.from_features([[1.0, 0.0], [0.0, 1.0]])
    >>> # lr = 1, one sample per step: each step zeroes the coordinate it draws.
    >>> result = second_moment(family, lr=1.0, batch_size=1, steps=3, sampling="with_replacement")
    >>> result.mean_sq.round(6)
    array([2.  , 1.  , 0.5 , 0.25])
    """
    family = _check_family(family)
    sampling = check_sampling(sampling)
    lr = check_lr(lr)
    batch_size = check_batch_size(batch_size, family.n)
    steps = check_positive_int(steps, "steps", minimum=0)
    inside, rest = _initial_state(family, init)
    reduced = family._reduced
    log_rest = math.log(rest) if rest > 0 else -math.inf
    trace = float(np.trace(inside))
    if reduced.k == 0 or not trace > 0:
        log_mean_sq = np.full(steps + 1, log_rest)
    else:
        a, b = map_coefficients(sampling, family.n, batch_size)
        log_growth = second_moment_iteration(
            reduced.rows, reduced.rank, np.ascontiguousarray(inside / trace),
            _map_multiplier(reduced, lr, a), lr * lr * b, steps,
        )
        log_inside = math.log(trace) + np.concatenate(([0.0], np.cumsum(log_growth)))
        log_mean_sq = np.logaddexp(log_inside, log_rest)
    return SecondMomentResult(log_mean_sq, lr, batch_size, sampling, steps)


def spectral_radius(family, lr, batch_size, *, sampling="bernoulli") -> float:
    """Spectral radius of the second-moment map Q on the range of H.

    ``rho(Q) = lambda_max(Q)`` (Q is self-adjoint and cone-preserving) is the asymptotic
    per-step growth factor of ``E||w_t||^2``: SGD is mean-square stable iff ``rho <= 1`` and
    converges iff ``rho < 1``. Computed by Lanczos on k x k symmetric matrices from the
    identity. A family with no curvature returns 1.0 (nothing moves).

    Examples
    --------
    >>> from fastsgdstab import HessianFamily, spectral_radius
    >>> family = HessianFamily.from_features([[1.0], [1.0]])   # H_1 = H_2 = 1: plain GD
    >>> round(spectral_radius(family, lr=0.5, batch_size=1, sampling="without_replacement"), 12)
    0.25
    """
    family = _check_family(family)
    sampling = check_sampling(sampling)
    lr = check_lr(lr)
    batch_size = check_batch_size(batch_size, family.n)
    reduced = family._reduced
    if reduced.k == 0:
        return 1.0
    a, b = map_coefficients(sampling, family.n, batch_size)
    ones = np.ones((reduced.k, reduced.k))
    return _top_eigenvalue(reduced, ones, _map_multiplier(reduced, lr, a), lr * lr * b, np.eye(reduced.k))


def critical_lr(family, batch_size, *, sampling="bernoulli") -> float:
    """Exact critical learning rate ``eta*``: SGD is mean-square stable iff ``0 < lr <= eta*``.

    ``eta* = 1 / lambda_max(L^{-1/2} D L^{-1/2})`` with ``L(X) = H X + X H`` and
    ``D(X) = a H X H + b N(X)`` (section "Exact critical learning rate"). In H's eigenbasis
    ``L^{-1/2}`` is the entrywise multiplier ``1 / sqrt(lam_j + lam_k)``, so this is one
    matrix-free Lanczos solve: no bisection, no d^2 x d^2 matrix. ``math.inf`` for a family with
    no curvature.

    Examples
    --------
    >>> from fastsgdstab import HessianFamily, critical_lr
    >>> family = HessianFamily.from_features([[1.0], [1.0], [1.0], [1.0]])   # all H_i = 1
    >>> round(critical_lr(family, 2), 12)   # 2 / (1 + 1/B - 1/n)
    1.6
    >>> round(critical_lr(family, 2, sampling="without_replacement"), 12)
    2.0
    """
    family = _check_family(family)
    sampling = check_sampling(sampling)
    batch_size = check_batch_size(batch_size, family.n)
    reduced = family._reduced
    if reduced.k == 0:
        return math.inf
    a, b = map_coefficients(sampling, family.n, batch_size)
    scaling = 1.0 / np.sqrt(_pair_sum(reduced.eigenvalues))
    top = _top_eigenvalue(reduced, scaling, a * _outer(reduced.eigenvalues), b, np.eye(reduced.k))
    return 1.0 / top


def critical_batch_size(family, lr, *, sampling="bernoulli") -> float:
    """Smallest real batch size in [1, n] at which SGD with this ``lr`` is mean-square stable.

    With ``R = L - lr H(x)H`` the batch size enters through one scalar ``q`` (section "Exact
    critical batch size"): stable iff ``q <= q* = 1 / (lr lambda_max(R^{-1/2} V R^{-1/2}))``,
    ``V = N`` (Bernoulli) or ``N - H(x)H``. Every larger batch size is stable too. Returns 1.0
    when every batch size is stable and ``math.inf`` when none is (``lr lambda_1(H) >= 2``, or
    with replacement even B = n is unstable). Round up for an integer batch.

    Examples
    --------
    >>> from fastsgdstab import HessianFamily, critical_batch_size
    >>> family = HessianFamily.from_features([[1.0], [1.0], [1.0], [1.0]])
    >>> round(critical_batch_size(family, lr=1.6), 9)   # inverse of critical_lr's example
    2.0
    >>> critical_batch_size(family, lr=2.5)
    inf
    """
    family = _check_family(family)
    sampling = check_sampling(sampling)
    lr = check_lr(lr)
    reduced = family._reduced
    n = family.n
    if reduced.k == 0:
        return 1.0
    eigenvalues = reduced.eigenvalues
    if lr * eigenvalues[0] >= 2.0:
        return math.inf
    remainder = _pair_sum(eigenvalues) - lr * _outer(eigenvalues)
    scaling = 1.0 / np.sqrt(remainder)
    interaction = 0.0 if sampling == "bernoulli" else -1.0
    # V = N - H(x)H need not be positive, so the start is the identity plus a fixed generic
    # symmetric perturbation: no sign structure guarantees the identity overlaps its top vector.
    rng = np.random.default_rng(12345)
    start = rng.standard_normal((reduced.k, reduced.k))
    start = np.eye(reduced.k) + 0.1 * (start + start.T) / np.sqrt(reduced.k)
    top = _top_eigenvalue(reduced, scaling, interaction * _outer(eigenvalues), 1.0, start)
    if top <= 0.0:
        return 1.0
    critical_noise = 1.0 / (lr * top)
    batch = batch_size_from_noise(sampling, n, critical_noise)
    if batch > n:
        return math.inf
    return max(batch, 1.0)
