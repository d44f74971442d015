"""The internal API shared by every exact engine (no leading underscores inside).

* ``check_family`` and ``reduced``: the one input type and its exact reduction to H's range, in
  units of the sharpness (``HessianFamily``'s reduction; see the specification page, section "Certified
  answers and scale"). Every engine works with ``x = lr * lambda_1(H)`` and the unit family, so
  an answer never depends on the units of the loss.
* ``SandwichOperator``: ``X -> S o (F o Y + beta N(Y))`` with ``Y = S o sym(X)`` on k x k
  symmetric matrices (the compiled kernel ``sandwich_operator``), which is each operator the
  engines solve: the second-moment map Q, ``L^{-1/2} D L^{-1/2}`` (critical learning rate) and
  ``R^{-1/2} V R^{-1/2}`` (critical batch size). All three map PSD matrices to PSD matrices
  (the entrywise scalings are PSD kernels, so Schur's theorem applies) and are self-adjoint.
* ``top_eigenvalue``: their certified top eigenvalue (a proven bracket, ``_linalg``), with a
  ``CertificationWarning`` when the bracket is wider than ``CERTIFY_RTOL``.
* ``second_moment_multiplier``: the entrywise part of Q, rescaled by ``1 / x^2`` for huge x so
  that nothing overflows (the radius is then ``x^2`` times the scaled one).
* Momentum (specification page, section "Momentum"): ``check_momentum`` (torch.optim.SGD's
  rules), ``MomentumDynamics`` (the 2 x 2 matrices per eigenvalue and the closed-form Stein
  gain G), ``momentum_noise_operator`` (V_s) and ``MomentumSolver`` (certified Perron roots of
  ``G o V_s`` on a shared non-symmetric Krylov basis, and the root finders for the critical
  lr and the spectral radius of the full map).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ._warnings import warn as warn_caller
from ._config import (CERTIFY_RTOL, ENGINE_RTOL, HUGE_UNIT_LR, MOMENTUM_CRITICAL_BISECTIONS,
                      MOMENTUM_CRITICAL_FIRST_STEP, RADIUS_RTOL_FLOOR)
from ._linalg import Bracket, CertificationWarning, certified_top_eigenvalue
from ._rounding import UNIT_ROUNDOFF, down, gamma, operator_chain, sandwich_error, up
from .family import HessianFamily, family_of
from ._verified import (CholeskyUpper, MomentumMap, NoiseEnclosure, assemble, congruences,
                        deterministic_radius_bounds, deterministic_radius_bounds_array, gain_enclosure, gain_image, lower_bound,
                        positive_candidates, stein_blocks, upper_bound, weighted_rayleigh_lower)

__all__ = ["check_family", "reduced", "range_basis", "factor_rows", "SandwichOperator", "NoiseProduct", "top_eigenvalue",
           "second_moment_multiplier", "second_moment_scale", "radius_tolerance", "pair_sum",
           "pair_product", "safe_upper_value", "widen_radius", "radius_shift", "widen_ratio", "ratio_tolerance", "perturbation_sizes", "ratio_perturbations", "Bracket", "check_momentum", "momentum_cap",
           "MomentumDynamics", "momentum_noise_operator", "MomentumSolver"]


def check_family(family) -> HessianFamily:
    """The family (``family.family`` for a wrapper such as torch's ``ModelFamily``; see
    ``family.family_of``), or a TypeError naming what a family is and how to build one."""
    unwrapped = family_of(family)
    if unwrapped is None:
        raise TypeError(
            f"family must be a HessianFamily (build one with HessianFamily(factors), "
            f".from_features or .from_dense) or an object whose .family is one (what "
            f"fastsgdstab.torch.family_from_model returns); got {type(family).__name__}"
        )
    return unwrapped


def reduced(family: HessianFamily):
    """The family's exact ``Reduction`` (computed once per family, then cached).

    This module is the one place that reads the family's internals; every engine goes through
    ``reduced``, ``range_basis`` and ``factor_rows``.
    """
    return family._reduced


def range_basis(family: HessianFamily) -> np.ndarray:
    """The (d, k) orthonormal eigenvector basis of the range of H, matching ``reduced``."""
    return family._range_basis()


def factor_rows(family: HessianFamily) -> np.ndarray:
    """All factor columns as rows of an (n r, d) array: row ``i r + c`` is ``U_i[:, c]``."""
    return family._columns()


def pair_sum(values: np.ndarray) -> np.ndarray:
    return np.add.outer(values, values)


def pair_product(values: np.ndarray) -> np.ndarray:
    return np.multiply.outer(values, values)


def radius_tolerance(value: float) -> float:
    """Certification tolerance of a spectral radius, relative to the value: ``CERTIFY_RTOL``
    times ``|1 - rho|`` (near 1 the distance to 1 is the quantity that matters: the rate of
    convergence or divergence), floored at ``RADIUS_RTOL_FLOOR``."""
    return CERTIFY_RTOL * max(min(1.0, abs(1.0 - value)), RADIUS_RTOL_FLOOR / CERTIFY_RTOL)


def second_moment_scale(x: float) -> float:
    """Size of the terms that cancel in the second-moment map's entries (units of lambda_1):
    ``(1 + x)^2``, or ``(1 + 1/x)^2`` once the map is divided by ``x^2`` (huge x)."""
    return (1.0 + 1.0 / x) ** 2 if x > HUGE_UNIT_LR else (1.0 + x) ** 2


def second_moment_multiplier(unit_eigenvalues: np.ndarray, x: float, a: float, b: float):
    """``(F, beta, log_factor)`` with ``Q = exp(log_factor) (F o X + beta N(X))`` in unit terms.

    ``F_jl = (1 - x m_j)(1 - x m_l) + x^2 (a - 1) m_j m_l`` and ``beta = x^2 b`` (m the unit
    eigenvalues); for ``x > HUGE_UNIT_LR`` the map is divided by ``x^2`` first (F and beta then
    use ``1/x``), so that no entry overflows however large the learning rate.
    """
    m = unit_eigenvalues
    if x > HUGE_UNIT_LR:
        factor = 1.0 / x - m
        return (np.multiply.outer(factor, factor) + (a - 1.0) * pair_product(m), b,
                2.0 * math.log(x))
    factor = 1.0 - x * m
    return np.multiply.outer(factor, factor) + x * x * (a - 1.0) * pair_product(m), x * x * b, 0.0


NOISE_LOOP_SAMPLES = 512
"""Up to this many samples the noise product's per-sample middle step loops over scipy's BLAS;
beyond, numpy's batched matmul (the loop's Python cost would dominate)."""


class NoiseProduct:
    """``Y -> N(Y) = (1/n) sum_i V_i (V_i^T Y V_i) V_i^T`` as two large BLAS products over all
    samples at once (``rows Y``, then ``rows^T (C V)`` with C block-diagonal) and the compiled
    O(n r^2 k) middle step, with buffers allocated once.

    The second product is symmetric (exactly, before rounding), so only its upper block
    triangle is computed, in column blocks (about (1 + 1/b) / 2 of the work for b blocks), and
    mirrored. Every entry is still a plain sum of products, in some order, so the rounding
    bounds of ``_rounding.sandwich_error`` hold as for any BLAS.
    """

    def __init__(self, rows: np.ndarray, rank: int):
        self.rows = np.ascontiguousarray(rows, dtype=np.float64)
        self.rank = int(rank)
        m, k = self.rows.shape
        self.m, self.k, self.n = m, k, m // max(self.rank, 1)
        self._rows_f = np.asfortranarray(self.rows)
        self._work = np.empty((m, k))
        self._work_t = self._work.T              # (k, m), Fortran order: BLAS writes rows Y here
        self._C = np.empty((self.n, self.rank, self.rank))
        self._middle = np.empty((m, k))
        self._product = np.empty((m, k), order="F")  # C V, (m, k) in Fortran order
        size = max(256, -(-k // 8))
        self._blocks = [(c, min(c + size, k)) for c in range(0, k, size)]

    def upper(self, Y: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The upper triangle of ``out`` <- that of N(Y), for a (k, k) C-ordered Y (``out``, (k, k)
        C-ordered, must not alias Y; its strict lower triangle is left as it was)."""
        from scipy.linalg.blas import dgemm
        if self.m == 0 or self.k == 0:
            out[...] = 0.0
            return out
        # (rows Y)^T = Y^T rows^T: Y.T and rows.T are Fortran-ordered views (no copy).
        dgemm(1.0, Y.T, self.rows.T, c=self._work_t, overwrite_c=1)
        # The middle step (numpy's einsum loops: no compiled kernel, so no compile time on a
        # first call): C_i = sym(V_i^T Y V_i), then (C V)^T written straight into the layout the
        # second product reads.
        n, r, k = self.n, self.rank, self.k
        # Per sample, small BLAS products through scipy's BLAS (the library of the two large
        # products: numpy's matmul would wake numpy's own OpenBLAS threads, which then spin
        # beside scipy's; einsum's loops were ~10x slower), written in place without copies:
        # C_i = (W_i^T)^T V_i^T with W_i^T, V_i^T Fortran views of the C-ordered rows, and
        # (C_i V_i)^T = V_i^T C_i^T into the transposed view of the output's row block.
        # With r = 1 the products are row-wise dot products and scalings (elementwise), and with
        # many samples numpy's batched matmul (the Python loop's per-call cost would dominate).
        work, rows, middle = self._work, self.rows, self._middle
        if r == 1:
            np.einsum("ik,ik->i", work, rows, out=self._C.reshape(n))
            np.multiply(rows, self._C.reshape(n, 1), out=middle)
        else:
            C = self._C
            if n <= NOISE_LOOP_SAMPLES:
                for i in range(n):
                    a, b = i * r, (i + 1) * r
                    C[i] = dgemm(1.0, work[a:b].T, rows[a:b].T, trans_a=1)
            else:
                np.matmul(work.reshape(n, r, k), rows.reshape(n, r, k).transpose(0, 2, 1), out=C)
            C += np.swapaxes(C, 1, 2)
            C *= 0.5
            if n <= NOISE_LOOP_SAMPLES:
                for i in range(n):
                    a, b = i * r, (i + 1) * r
                    dgemm(1.0, rows[a:b].T, C[i], trans_b=1, c=middle[a:b].T, overwrite_c=1)
            else:
                np.matmul(C, rows.reshape(n, r, k), out=middle.reshape(n, r, k))
        product = self._product
        product[...] = middle  # C V, (m, k) in Fortran order
        scale = 1.0 / self.n
        for c0, c1 in self._blocks:
            # (rows[:, :c1]^T (C V)[:, c0:c1])^T, Fortran order: its transpose is C-ordered.
            block = dgemm(scale, product[:, c0:c1], self._rows_f[:, :c1], trans_a=1)
            out[:c1, c0:c1] = block.T
        return out

    def mirror(self, out: np.ndarray) -> np.ndarray:
        """Copy the upper triangle of ``out`` to its lower triangle (block by block)."""
        for c0, c1 in self._blocks:
            out[c0:c1, :c0] = out[:c0, c0:c1].T
            block = out[c0:c1, c0:c1]
            lower = np.tril_indices(c1 - c0, -1)
            block[lower] = block.T[lower]
        return out

    def __call__(self, Y: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out <- N(Y)`` (full, symmetric)."""
        self.upper(Y, out)
        return self.mirror(out)


class SandwichOperator:
    """``X -> S o (F o Y + beta N(Y))``, ``Y = S o sym(X)``, on k x k matrices of a unit family.

    The same map as the compiled kernel ``sandwich_operator`` (which ``phase`` uses), computed
    with :class:`NoiseProduct`: two large BLAS products and preallocated buffers.
    """

    def __init__(self, reduction, scaling, multiplier, noise_weight: float):
        self.rows = reduction.unit_rows
        self.rank = reduction.rank
        self.k = reduction.k
        self.scaling = np.ascontiguousarray(scaling, dtype=np.float64)
        self.multiplier = np.ascontiguousarray(multiplier, dtype=np.float64)
        self.noise_weight = float(noise_weight)
        self._noise = NoiseProduct(self.rows, self.rank)
        self._Y = np.empty((self.k, self.k))
        self._term = np.empty((self.k, self.k))
        # Proven bound on the rounding of one product, per unit Frobenius norm of X (_rounding):
        # the certificates widen their brackets by it, whatever the BLAS.
        self.rounding = sandwich_error(self.rows, self.rank, self.scaling, self.multiplier,
                                       self.noise_weight)
        self._abs = None
        self.products = 0

    def _apply(self, noise, X, scaling, multiplier, noise_weight, out=None, symmetric=False):
        # numpy and BLAS only (no compiled kernel: nothing to compile on a first call).
        k = self.k
        out = np.empty((k, k)) if out is None else out
        X = np.asarray(X, dtype=np.float64).reshape(k, k)
        Y = self._Y
        if symmetric:  # X is exactly symmetric: sym(X) = X exactly (fewer roundings, not more)
            np.multiply(X, scaling, out=Y)
        else:
            np.add(X, X.T, out=Y)
            Y *= 0.5
            Y *= scaling
        noise.upper(Y, out)
        noise.mirror(out)
        out *= noise_weight
        np.multiply(multiplier, Y, out=self._term)
        out += self._term
        out *= scaling
        return out

    def error_of(self, X: np.ndarray) -> float:
        """Proven bound on ``||fl(T(X)) - T(X)||_F`` for this X: ``gamma(K) ||T_abs(|X|)||_F``,
        T_abs the operator with every entry replaced by its absolute value (one more product,
        computed the same way, its own rounding covered by a factor 1 + gamma(K)). Far
        tighter than the normwise ``rounding`` when the scaling spans decades (ill-conditioned
        families: ``1 / sqrt(lam_j + lam_l)``)."""
        if self._abs is None:
            self._abs = (NoiseProduct(np.abs(self.rows), self.rank), np.abs(self.scaling),
                         np.abs(self.multiplier))
        noise, scaling, multiplier = self._abs
        out = self._apply(noise, np.abs(X), scaling, multiplier, abs(self.noise_weight))
        self.products += 1
        g = gamma(operator_chain(self.k, self.rows.shape[0], self.rank))
        return float(up(g * (1.0 + g) * (1.0 + 4 * UNIT_ROUNDOFF) * np.linalg.norm(out)))

    accepts_out = True  # ``certified_top_eigenvalue`` passes a reused output buffer
    accepts_symmetric = True  # ... and says when X is exactly symmetric (an unpacked vector)

    def __call__(self, X: np.ndarray, out: np.ndarray | None = None, *,
                 symmetric: bool = False) -> np.ndarray:
        self.products += 1
        return self._apply(self._noise, X, self.scaling, self.multiplier, self.noise_weight, out,
                           symmetric)


def top_eigenvalue(operator: SandwichOperator, *, what: str, start=None,
                   rtol: float = ENGINE_RTOL, certify_rtol=CERTIFY_RTOL,
                   scale_hint: float = 0.0, warn: bool = True) -> Bracket:
    """Certified top eigenvalue of one of the engine's operators (see ``_linalg``).

    Warns (``CertificationWarning``, naming ``what``) when the proven bracket is wider than
    ``certify_rtol`` (a number, or a function of the value; ``bracket.certified`` is False):
    the bracket is still true and is what the caller reports. ``warn=False`` leaves the
    judgement to a caller whose answer is a function of the eigenvalue (``critical_batch_size``
    judges the batch sizes it brackets).
    """
    bracket = certified_top_eigenvalue(operator, operator.k, rtol=rtol, start=start,
                                       certify_rtol=certify_rtol, scale_hint=scale_hint)
    if warn and not bracket.certified:
        warn_caller(
            f"{what}: the top eigenvalue is proven only to lie in [{bracket.lower:.12g}, "
            f"{bracket.upper:.12g}] (value {bracket.value:.12g}); the bracket is wider than the "
            f"certification tolerance", CertificationWarning)
    return bracket


def perturbation_sizes(reduction, a: float, b: float, interaction: float = 0.0):
    """``(dL, dD)``: bounds on how far the user's family (congruent, on the kept range) moves
    ``L(X) = H X + X H`` and ``D(X) = a H X H + b N(X) + interaction H X H`` from the engine's,
    as operator norms on symmetric matrices (units of lambda_1; ``Reduction`` backward error)."""
    errors = reduction.sample_errors
    if errors is None:
        return 0.0, 0.0
    eps = reduction.mean_error
    rows = reduction.unit_rows
    sizes = np.einsum("ij,ij->i", rows, rows).reshape(errors.size, reduction.rank).sum(axis=1)
    noise = float(np.mean(2.0 * sizes * errors + errors * errors))
    outer = 2.0 * (1.0 + eps) * eps + eps * eps
    return 2.0 * eps, (abs(a) + abs(interaction)) * outer + abs(b) * noise


def radius_shift(reduction, x, a: float, b: float):
    """How far the user's family can move the engine's Q at unit lr x (a number or an array):
    ``x dL + x^2 dD`` in operator norm, so by Weyl its spectral radius too."""
    dL, dD = perturbation_sizes(reduction, a, b)
    return (x * dL + x * x * dD) * (1.0 + 1e-12)


def widen_radius(bracket: Bracket, reduction, x: float, a: float, b: float, log_factor: float) -> Bracket:
    """A spectral-radius bracket of the engine's Q made true for the user's family
    (:func:`radius_shift`, divided by ``x^2`` on the scaled path, where Q is)."""
    shift = radius_shift(reduction, x, a, b)
    if log_factor:
        shift = shift / (x * x)
    return replace(bracket, lower=bracket.lower - shift, upper=bracket.upper + shift)


def widen_ratio(bracket: Bracket, relative_denominator: float, relative_numerator: float,
                factor: tuple[float, float] = (1.0, 1.0)) -> Bracket:
    """A bracket on ``mu = max_Z <Z, A Z> / <Z, W Z>`` (critical lr: A = D, W = L; critical batch
    size: A = V, W = R) made true for the user's family, whose forms satisfy
    ``|<Z, (W_true - W) Z>| <= rd <Z, W Z>`` and ``|<Z, (A_true - A) Z>| <= rn <Z, W Z>`` for every
    Z (relative bounds in H's own metric: ``Reduction``'s relative errors, so that directions of
    tiny curvature are not swamped by rounding of the size of the largest):
    ``(mu - rn) / (1 + rd) <= mu_true <= (mu + rn) / (1 - rd)`` (signs handled); then
    multiplied by ``factor`` (the congruence's ``(1 - beta)^2 .. (1 + beta)^2``, inverted)."""
    rd, rn = relative_denominator, relative_numerator
    if rd == 0.0 and rn == 0.0 and factor == (1.0, 1.0):
        return bracket
    if not rd < 1.0:
        return replace(bracket, lower=-math.inf, upper=math.inf, certified=False)
    low = bracket.lower - rn
    high = bracket.upper + rn
    low = low / (1.0 + rd) if low >= 0 else low / (1.0 - rd)
    high = high / (1.0 - rd) if high >= 0 else high / (1.0 + rd)
    low = low * factor[0] if low >= 0 else low * factor[1]
    high = high * factor[1] if high >= 0 else high * factor[0]
    return replace(bracket, lower=float(np.nextafter(np.nextafter(low, -math.inf), -math.inf)),
                   upper=float(np.nextafter(np.nextafter(high, math.inf), math.inf)))


def ratio_perturbations(reduction, a: float, b: float, interaction: float = 0.0, x: float = 0.0):
    """``(rd, rn, factor)`` for :func:`widen_ratio`: the critical lr's pencil (D, L) with x = 0,
    or the critical batch size's (V, R) at unit lr x < 2 (R >= (1 - x / 2) L, since
    ``lam_j lam_l <= (lam_j + lam_l) / 2`` for unit eigenvalues)."""
    r = reduction.relative_mean_error
    r_noise = reduction.relative_noise_error
    beta = reduction.congruence
    outer = 2.0 * r + r * r
    floor = 1.0 - 0.5 * x
    if not floor > 0:
        return math.inf, math.inf, (1.0, 1.0)
    rd = (r + 0.5 * x * outer) / floor
    rn = 0.5 * ((abs(a) + abs(interaction)) * outer + abs(b) * r_noise) / floor
    if x == 0.0:
        # Critical lr: a congruence P scales <Z, L Z> by at most (1 +- beta)^{-2} and leaves
        # <Z, D Z> unchanged (Z -> P Z P), so mu_user is mu_engine's family's times this.
        factor = (1.0 / (1.0 + beta) ** 2, 1.0 / max(1.0 - beta, 1e-300) ** 2)
    else:
        # Critical batch size: only the L part of R moves, by at most ((1 - beta)^{-2} - 1) L.
        rd += (1.0 / max(1.0 - beta, 1e-300) ** 2 - 1.0) / floor
        factor = (1.0, 1.0)
    return rd * (1 + 1e-12), rn * (1 + 1e-12), factor


def ratio_tolerance(relative_denominator: float, relative_numerator: float,
                    factor: tuple[float, float] = (1.0, 1.0), rtol: float = CERTIFY_RTOL):
    """The engine's certification tolerance (a function of the value mu) that leaves room for
    :func:`widen_ratio`: ``rtol`` minus the relative width the widening adds at mu (about
    ``2 rn / mu + 2 rd`` plus the factor's spread), never below ``rtol / 4``, so that a bracket
    the engine certifies is still within ``rtol`` once widened."""
    rd, rn = relative_denominator, relative_numerator
    spread = factor[1] / factor[0] - 1.0 if factor[0] > 0 else math.inf

    def tolerance(value):
        if not (rd < 1.0 and math.isfinite(spread)) or value == 0:
            return rtol
        added = (2.0 * rn / abs(value) + 2.0 * rd) / (1.0 - rd) + spread
        return max(rtol - 1.01 * added, 0.25 * rtol)
    return tolerance


def safe_upper_value(bracket: Bracket) -> float:
    """The largest value the top eigenvalue can plausibly take: the Ritz value plus its error
    estimate and rounding, never above the proven upper bound. Used where an answer must err on
    the stable side (a critical lr that is never above the true one)."""
    return min(bracket.upper, bracket.value + bracket.error + (bracket.value - bracket.lower))


# ----------------------------------------------------------------------------- momentum
# The specification page, section "Momentum". Everything is in units of the sharpness: with
# K = lr H_batch = x (H_batch / lambda_1), heavy ball is z = (w_t, w_{t-1}) and Nesterov is
# z = (w_t, lr v_{t-1}) (the velocity times lr, a similarity that leaves every spectral radius and
# E||w_t||^2 unchanged), so that z_{t+1} = (P (x) I + (q e_1^T) (x) K) z_t with
#     heavy ball  P = [[1 + mu, -mu], [1, 0]],  q = (-1, 0)
#     Nesterov    P = [[1, -mu^2], [0, mu]],    q = (-(1 + mu), 1).
# In H's eigenbasis each eigenvalue m_j of the unit family has the 2 x 2 matrix
# M_j = P + x m_j q e_1^T, with trace tau_j = 1 + delta_j - sigma_j, determinant delta_j
# (mu for heavy ball, mu (1 - x m_j) for Nesterov) and sigma_j = det(I - M_j) = x m_j for both.


def check_momentum(momentum, nesterov) -> tuple[float, bool]:
    """``(momentum, nesterov)`` checked with torch.optim.SGD's rules, or a clear error."""
    import numbers
    if isinstance(momentum, (bool, np.bool_)) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number in [0, 1); got {momentum!r} of type "
                        f"{type(momentum).__name__}")
    momentum = float(momentum)
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must lie in [0, 1) (0: plain SGD; the heavy-ball and Nesterov "
                         f"iterations are unstable for every lr at momentum >= 1); got {momentum!r}")
    if not isinstance(nesterov, (bool, np.bool_)):
        raise TypeError(f"nesterov must be True or False; got {nesterov!r} of type "
                        f"{type(nesterov).__name__}")
    nesterov = bool(nesterov)
    if nesterov and momentum == 0.0:
        # torch.optim.SGD raises "Nesterov momentum requires a momentum and zero dampening".
        raise ValueError("nesterov=True requires momentum > 0 (as torch.optim.SGD: 'Nesterov "
                         "momentum requires a momentum and zero dampening'); with momentum=0 "
                         "use nesterov=False, which is plain SGD")
    return momentum, nesterov


def momentum_cap(momentum: float, nesterov: bool) -> float:
    """Largest ``lr * lam`` at which the 2 x 2 deterministic matrix stays stable (strictly below):
    ``2 (1 + mu)`` (heavy ball) or ``2 (1 + mu) / (1 + 2 mu)`` (Nesterov)."""
    return 2.0 * (1.0 + momentum) / ((1.0 + 2.0 * momentum) if nesterov else 1.0)


GAIN_ROUTE_STEPS = (1e-10, 0.25 * CERTIFY_RTOL)
"""First and largest relative offsets from a momentum root at which the gain route proves
stability (below) and instability (above); a failed first try moves by its measured excess."""

GAIN_ROUTE_SHIFTS = (1e-9, 1e-7, 1e-5, 1e-3)
"""Multiples of ``tr(X) / k`` added to a Ritz vector X that is not provably positive definite."""

GAIN_ROUTE_TRIES = 3
"""Most gain-route proofs of the stable side per root (each costs one enclosed product)."""

GAIN_ROUTE_TIGHT = 1e-9
"""A gain-route critical-lr bracket at most this wide (relative) is final; a wider one (still
certified) is replaced by the full map's proofs when k <= GAIN_ROUTE_REFINE_MAX_K, where they
are cheap."""

GAIN_ROUTE_REFINE_MAX_K = 48


class MomentumDynamics:
    """The per-eigenvalue 2 x 2 matrices ``M_j`` of one (unit family, x, momentum) setting.

    ``scale`` divides the whole iteration (``M_j / scale``, the noise by ``scale^2``) so that a
    huge ``x`` never overflows (then ``log_factor = 2 log(scale)`` per step is carried in logs).
    """

    def __init__(self, unit_eigenvalues: np.ndarray, x: float, momentum: float, nesterov: bool):
        m = np.asarray(unit_eigenvalues, dtype=np.float64)
        mu = momentum
        self.x, self.momentum, self.nesterov = x, momentum, nesterov
        self.scale = x if x > HUGE_UNIT_LR else 1.0
        s = self.scale
        self.log_factor = 2.0 * math.log(s) if s != 1.0 else 0.0
        if nesterov:
            P = np.array([[1.0, -mu * mu], [0.0, mu]])
            q = np.array([-(1.0 + mu), 1.0])
        else:
            P = np.array([[1.0 + mu, -mu], [1.0, 0.0]])
            q = np.array([-1.0, 0.0])
        matrices = np.empty((m.size, 2, 2))
        matrices[:] = P / s
        # x m_j q e_1^T / s, with x / s formed first (x may be huge, x m_j is then x m_j / x).
        matrices[:, :, 0] += np.outer(m * (x / s), q)
        self.matrices = matrices
        self.q = q
        if s == 1.0:
            # The exact small quantities: sigma = det(I - M) = x m, delta = det M.
            self.sigma = x * m
            self.delta = mu * (1.0 - x * m) if nesterov else np.full(m.size, mu)
            self.trace = 1.0 + self.delta - self.sigma
        else:
            self.trace = matrices[:, 0, 0] + matrices[:, 1, 1]
            self.delta = matrices[:, 0, 0] * matrices[:, 1, 1] - matrices[:, 0, 1] * matrices[:, 1, 0]
            self.sigma = 1.0 - self.trace + self.delta
        # h_j(t) = e_1^T M_j^t q for t = 0..3 (the first terms of the impulse response).
        h = np.empty((4, m.size))
        vector = np.tile(q, (m.size, 1))
        for t in range(4):
            h[t] = vector[:, 0]
            vector = np.einsum("jab,jb->ja", matrices, vector)
        self.impulse = h

    def radii(self) -> np.ndarray:
        """Spectral radius of each ``M_j`` (eigenvalues of ``l^2 - tau l + delta``)."""
        tau, delta = self.trace, self.delta
        disc = tau * tau - 4.0 * delta
        root = np.sqrt(np.abs(disc))
        return np.where(disc < 0.0, np.sqrt(np.abs(delta)), 0.5 * (np.abs(tau) + root))

    def deterministic_radius(self) -> float:
        """``rho(D)`` of the noise-free second-moment map: ``max_j rho(M_j)^2``."""
        return float(np.max(self.radii()) ** 2)

    def gain(self, r: float = 1.0) -> np.ndarray:
        """``G_jk = e_1^T (r I - M_j (x) M_k)^{-1} (q (x) q)``: X[0, 0] of the 2 x 2 Stein equation
        ``r X - M_j X M_k^T = q q^T``, in closed form for all pairs at once.

        ``sum_t h_j(t) h_k(t) r^{-t-1}``, a product of two second-order recurrences, has the
        generating function Num / Den with Den the characteristic polynomial of M_j (x) M_k
        (coefficients from traces and determinants) and Num from the first four products. Den is
        written in the small quantities sigma = det(I - M) and delta, with no cancellation, so the
        entries stay accurate where ``1 - rho(M_j)`` is tiny (small ``x m_j``); a repeated
        eigenvalue of M_j (critical damping) needs no special case.
        """
        root = math.sqrt(r)
        # The pencil for M / sqrt(r): sigma' = det(I - M / sqrt(r)) without cancellation.
        sigma = ((root - 1.0) * (root - self.delta) + root * self.sigma) / r
        delta = self.delta / r
        tau = self.trace / root
        h = self.impulse * (1.0 / root) ** np.arange(4)[:, None]
        p = [np.multiply.outer(h[t], h[t]) for t in range(4)]
        tt = np.multiply.outer(tau, tau)
        dd = np.multiply.outer(delta, delta)
        e1 = tt
        e2 = np.multiply.outer(tau * tau, delta) + np.multiply.outer(delta, tau * tau) - 2.0 * dd
        e3 = dd * tt
        numerator = p[0] * (1.0 - e1 + e2 - e3) + p[1] * (1.0 - e1 + e2) + p[2] * (1.0 - e1) + p[3]
        s_j, s_k = sigma[:, None], sigma[None, :]
        d_j, d_k = delta[:, None], delta[None, :]
        terms = ((1.0 - dd) * (s_j * (1.0 - d_k) + s_k * (1.0 - d_j)), d_k * s_j * s_j,
                 d_j * s_k * s_k, -(1.0 + dd) * s_j * s_k)
        denominator = terms[0] + terms[1] + terms[2] + terms[3]
        size = np.abs(terms[0]) + np.abs(terms[1]) + np.abs(terms[2]) + np.abs(terms[3])
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            gain = numerator / denominator / r
        # The closed form is accurate where its denominator does not cancel (near r = 1, the
        # design point). Where it does (r near a product of eigenvalues of M_j and M_k below 1:
        # a growth factor near rho(D) < 1, identical samples, mu near 1) the pairs concerned
        # are solved as 4 x 4 systems instead (backward stable; their conditioning is the
        # problem's own).
        bad = ~(np.abs(denominator) > 1e-6 * size) | ~np.isfinite(gain)
        if np.any(bad):
            j, k = np.nonzero(bad)
            M = self.matrices
            system = r * np.eye(4) - np.einsum("pac,pbd->pabcd", M[j], M[k]).reshape(j.size, 4, 4)
            rhs = np.broadcast_to(np.outer(self.q, self.q).ravel(), (j.size, 4))[..., None]
            with np.errstate(all="ignore"):
                try:
                    solved = np.linalg.solve(system, rhs)[:, 0, 0]
                    # Keep whichever is more accurate: the closed form's cancellation
                    # (size / |denominator|) against the solve's condition number.
                    closed_error = size[j, k] / np.abs(denominator[j, k])
                    solve_error = np.linalg.cond(system)
                    use = (solve_error < closed_error) | ~np.isfinite(gain[j, k])
                except np.linalg.LinAlgError:
                    # r is such a product to rounding (G is infinite there, or nearly): the
                    # pseudo-inverse keeps G finite; the root finders only need its trend and
                    # every answer is proven on the full map anyway.
                    solved = (np.linalg.pinv(system) @ rhs)[:, 0, 0]
                    use = ~(np.abs(solved) <= np.abs(gain[j, k])) | ~np.isfinite(gain[j, k])
            gain[j[use], k[use]] = solved[use]
        return 0.5 * (gain + gain.T)

    def propagate(self, S11, S12, S22):
        """The deterministic part of one step on the blocks of a symmetric Sigma = E[z z^T]
        (S21 = S12^T): entry (j, k) of the 2 x 2 block matrix goes to ``M_j Z_jk M_k^T``."""
        M = self.matrices
        S = ((S11, S12), (S12.T, S22))
        out = []
        for a, b in ((0, 0), (0, 1), (1, 1)):
            total = 0.0
            for c in range(2):
                for d in range(2):
                    total = total + M[:, a, c][:, None] * S[c][d] * M[:, b, d][None, :]
            out.append(total)
        # The three blocks stand for a symmetric Sigma (S21 = S12^T): on a non-symmetric S11 or
        # S22 they would be a different map, whose antisymmetric part can grow. Rounding makes
        # such a part, so it is projected out every step.
        out[0] = 0.5 * (out[0] + out[0].T)
        out[2] = 0.5 * (out[2] + out[2].T)
        return out


def momentum_noise_operator(reduction, sampling: str) -> SandwichOperator:
    """``V_s`` in units: ``N`` (Bernoulli) or ``N - H(x)H`` (the other schemes), so that the noise
    of one step is ``lr^2 b V_s`` (section "Exact critical batch size"'s q and V)."""
    k = reduction.k
    interaction = 0.0 if sampling == "bernoulli" else -1.0
    return SandwichOperator(reduction, np.ones((k, k)),
                            interaction * pair_product(reduction.unit_eigenvalues), 1.0)


class _LazyEvaluations:
    """``MomentumSolver.evaluations``: an iterable of ``(X, parts)`` filled on demand."""

    def __init__(self, full, dynamics, candidates):
        self.full, self.dynamics = full, dynamics
        self.pending = list(candidates)
        self.done = []

    def __iter__(self):
        index = 0
        while True:
            while index >= len(self.done) and self.pending:
                X = self.pending.pop(0)
                parts = self.full.parts(self.dynamics, X)
                if all(np.all(np.isfinite(part)) for part in parts):
                    self.done.append((X, parts))
            if index >= len(self.done):
                return
            yield self.done[index]
            index += 1


class MomentumSolver:
    """Certified Perron roots of ``G o V_s`` for one unit family and scheme, and the two roots
    built on them (critical lr; spectral radius of the full second-moment map).

    One ``ConeKrylov`` basis serves every gain G: across the learning rates of a root finder,
    the growth factors of a spectral radius and the grid points of a stability map, so that
    most steps cost no product of ``V_s`` (the expensive operator).

    The root finders are safeguarded Newton iterations on ``log(ratio)``, with the derivative of
    the Perron root from its left and right eigenvectors: for ``T = G o V_s`` the left
    eigenvector is ``V_s(r)`` (``V_s(G o V_s(r)) = theta V_s(r)``), known from the basis, so
    ``theta' = <V_s r, G' o V_s r> / <V_s r, r>`` costs no product.
    """

    def __init__(self, reduction, sampling: str):
        from ._config import MAP_BASIS_BYTES, MOMENTUM_MAX_BASIS
        from ._linalg import ConeKrylov
        self.reduction, self.sampling = reduction, sampling
        k = reduction.k
        self.unit_eigenvalues = reduction.unit_eigenvalues
        capacity = int(min(MOMENTUM_MAX_BASIS, max(8, MAP_BASIS_BYTES // (16.0 * k * k))))
        self._full = None
        self._noise_enclosure = None
        self.krylov = ConeKrylov(momentum_noise_operator(reduction, sampling), k, capacity=capacity,
                                 enclosure=lambda Y: self.full.noise(Y))
        self.uncertified = 0
        # False: every proof on the full 2k x 2k map (the engine before issue 19; tests compare).
        self.gain_route_enabled = True
        # What the gain route's proofs did (for benchmarks and tests): proofs attempted, proofs
        # that held, and proofs left to the full 2k x 2k map.
        self.gain_route = {"attempts": 0, "proven": 0, "fallbacks": 0}

    @property
    def full(self) -> MomentumMap:
        """The full 2k x 2k map with proven enclosures (built on first use: the gain route's
        proofs do not need it)."""
        if self._full is None:
            self._full = MomentumMap(self.reduction, self.sampling)
        return self._full

    @property
    def noise_enclosure(self) -> NoiseEnclosure:
        """Proven enclosures of ``V_s(X)`` with H from the unit rows (``_verified``)."""
        if getattr(self, "_noise_enclosure", None) is None:
            self._noise_enclosure = NoiseEnclosure(self.reduction, self.sampling)
        return self._noise_enclosure

    # ------------------------------------------------------------------ the gain route's proofs
    def _weight_bounds(self, x: float, b: float):
        """Proven ``(low, high)`` of the noise weight ``x^2 b_exact`` (x exact; b carries the
        rounding of its formula from the batch size, ``MomentumMap.noise_radius``)."""
        n = max(self.reduction.unit_rows.shape[0] // max(self.reduction.rank, 1), 1)
        r_b = 4.0 * UNIT_ROUNDOFF * (abs(b) + 1.0 / n)
        xx_low, xx_high = down(x * x), up(x * x)
        return float(down(xx_low * down(b - r_b))), float(up(xx_high * up(b + r_b)))

    def gain_certificate(self, x: float, momentum: float, nesterov: bool, r: float = 1.0):
        """``(theta, X, Z, rZ, checker)``: the Perron Ritz pair of ``G_r o V_s`` at unit lr x
        (converged on the shared basis), its vector X (an exact float matrix), a proven
        enclosure ``Z +- rZ`` of ``V_s(X)`` (one enclosed product) and X's Cholesky checker
        (``_verified.CholeskyUpper``). None if the Ritz value is not positive."""
        k = self.reduction.k
        dynamics = MomentumDynamics(self.unit_eigenvalues, x, momentum, nesterov)
        pair = self.converge(dynamics.gain(r))
        theta, vector = pair[0], pair[1]
        if not (theta > 0.0 and math.isfinite(theta)):
            return None
        X = vector.reshape(k, k).copy()
        X = 0.5 * (X + X.T)
        checker = CholeskyUpper(X)
        if not checker.x_min > 0.0:
            # A Ritz vector that is not provably positive definite (eigenvalues near 0 carry its
            # error): shifted by a small multiple of the identity, the smallest that is.
            size = abs(float(np.trace(X))) / k
            for delta in GAIN_ROUTE_SHIFTS:
                shifted = X + (delta * size) * np.eye(k)
                checker = CholeskyUpper(shifted)
                if checker.x_min > 0.0:
                    X = shifted
                    break
        Z, rZ = self.noise_enclosure(X)
        if not (np.all(np.isfinite(Z)) and np.all(np.isfinite(rZ))):
            return None
        return float(theta), X, Z, rZ, checker

    def gain_upper(self, certificate, x: float, momentum: float, nesterov: bool,
                   r: float = 1.0, target: float = math.inf) -> float:
        """A proven upper bound of ``rho(G_r o V_s)`` at unit lr x (Collatz-Wielandt with
        ``certificate``'s X, Cholesky-verified; ``inf`` if X is not provably positive definite).
        With a ``target``, one factorisation tries to prove a bound just below it first. G_r's
        enclosure assumes ``rho(D) < r`` (the caller proves it)."""
        theta, X, Z, rZ, checker = certificate
        if not checker.x_min > 0.0:
            return math.inf
        G, rG = gain_enclosure(self.unit_eigenvalues, x, momentum, nesterov, r)
        if not np.all(np.isfinite(rG)):
            return math.inf
        T, rT = gain_image(G, rG, Z, rZ)
        error = float(up(np.linalg.norm(rT) * (1.0 + gamma(T.size + 2))))
        if not math.isfinite(error):
            return math.inf
        if math.isfinite(target) and target > theta:
            # The slack the proof itself costs (the image's error and the rounding of c X - T,
            # over X's smallest eigenvalue), twice, below the target.
            slack = (error + gamma(X.shape[0] + 8) * (target * checker.x_norm
                                                      + float(np.linalg.norm(T)))) / checker.x_min
            c = target - 2.0 * slack
            self._last_slack = 2.0 * slack
            if not c > theta:
                # Out of reach at this point (the proof's own slack exceeds the margin): the
                # caller moves by the slack, with no factorisation spent here.
                return math.inf
            bound = checker.bound(T, error, c)
            if bound <= target:
                return bound
        excess = checker.excess(T, theta)
        margin = 0.25 * excess + 1e-13 * theta
        for _ in range(4):
            bound = checker.bound(T, error, theta + excess + margin)
            if math.isfinite(bound):
                return bound
            margin *= 8.0
        return math.inf

    def gain_lower(self, certificate, x: float, momentum: float, nesterov: bool,
                   r: float = 1.0) -> float:
        """A proven lower bound of ``rho(G_r o V_s)`` at unit lr x: the V_s-weighted Rayleigh
        quotient of ``certificate``'s X (second order in X's error, so one X serves nearby x)."""
        X, Z, rZ = certificate[1:4]
        G, rG = gain_enclosure(self.unit_eigenvalues, x, momentum, nesterov, r)
        if not np.all(np.isfinite(rG)):
            return -math.inf
        return weighted_rayleigh_lower(X, Z, rZ, G, rG)

    def _gain_radius(self, x: float, b: float, momentum: float, nesterov: bool, value: float,
                     floor_lower: float, floor_upper: float):
        """The spectral radius's bracket by the gain route: ``rho(T) <= r`` at
        ``r = value + gap`` (``rho(D) < r`` and ``w rho(G_r o V_s) <= 1``, proven) and
        ``rho(T) > r`` at ``r = value - gap`` (or ``rho(T) >= rho(D)``), gap a quarter of the
        radius's tolerance. None when the proofs do not certify (the caller falls back)."""
        if not (value > 0.0 and math.isfinite(value)):
            return None
        tolerance = radius_tolerance(value) * value
        gap = 0.25 * tolerance
        r_high = value + gap
        if not floor_upper < r_high:
            return None
        self.gain_route["attempts"] += 1
        certificate = self.gain_certificate(x, momentum, nesterov, r=r_high)
        if certificate is None:
            return None
        w_low, w_high = self._weight_bounds(x, b)
        upper_g = self.gain_upper(certificate, x, momentum, nesterov, r_high)
        if not float(up(w_high * upper_g)) <= 1.0:
            return None
        lower = max(floor_lower, 0.0)
        r_low = value - gap
        if r_low > lower and floor_upper < r_low:
            lower_g = self.gain_lower(certificate, x, momentum, nesterov, r_low)
            if float(down(w_low * lower_g)) > 1.0:
                lower = r_low
        value = min(max(value, lower), r_high)
        if not r_high - lower <= tolerance:
            return None
        self.gain_route["proven"] += 1
        return Bracket(value, lower, r_high, self.products, certified=True)

    def _gain_threshold(self, dynamics, b_max: float):
        """``noise_threshold`` by the gain route: ``theta = rho(G o V_s)`` at r = 1 in a proven
        bracket (Cholesky-verified Collatz-Wielandt above, the weighted Rayleigh quotient below),
        valid once ``rho(D) < 1`` is proven. None when it does not certify."""
        x, momentum, nesterov = dynamics.x, dynamics.momentum, dynamics.nesterov
        if not deterministic_radius_bounds_array(self.unit_eigenvalues, x, momentum, nesterov)[1] < 1.0:
            return None
        self.gain_route["attempts"] += 1
        certificate = self.gain_certificate(x, momentum, nesterov)
        if certificate is None:
            return None
        theta = certificate[0]
        upper = self.gain_upper(certificate, x, momentum, nesterov)
        if not math.isfinite(upper):
            return None
        xx = x * x
        if not theta * xx * b_max > 1.0 + 1e-9:
            # Every batch size is (plausibly) stable: proven at B = 1 when w(b_max) theta <= 1.
            if float(up(self._weight_bounds(x, b_max)[1] * upper)) <= 1.0:
                self.gain_route["proven"] += 1
                return Bracket(theta, 0.0, up(1.0 / (xx * b_max)), self.products, certified=True)
        lower = self.gain_lower(certificate, x, momentum, nesterov)
        lower = max(lower, 0.0)
        value = min(max(theta, lower), upper)
        if not upper - lower <= CERTIFY_RTOL * value:
            return None
        self.gain_route["proven"] += 1
        return Bracket(value, lower, upper, self.products, certified=True)

    def _gain_critical(self, x: float, b: float, momentum: float, nesterov: bool, cap: float,
                       slope: float):
        """The critical lr's bracket by the gain route: stable at ``x (1 - s)`` (``rho(D) < 1``
        and ``w rho(G o V_s) <= 1``, both proven) and unstable at ``x (1 + s')``, s and s' from
        ``GAIN_ROUTE_STEPS``, the second try from the first's measured excess. None when the
        proofs do not hold within ``CERTIFY_RTOL`` (the caller falls back to the full map)."""
        m = self.unit_eigenvalues
        slope = slope if slope > 0 and math.isfinite(slope) else 1.0
        x_low = certificate = None
        step = GAIN_ROUTE_STEPS[0]
        fresh = True
        self._last_slack = math.nan
        for _ in range(GAIN_ROUTE_TRIES):
            point = x * (1.0 - step)
            self.gain_route["attempts"] += 1
            if not deterministic_radius_bounds_array(m, point, momentum, nesterov)[1] < 1.0:
                break
            if fresh:
                # The Perron vector at the trial point itself; a retry further down keeps it
                # (no new enclosed product), and a second retry builds a new one.
                certificate = self.gain_certificate(point, momentum, nesterov)
                if certificate is None:
                    break
            w_high = self._weight_bounds(point, b)[1]
            upper = self.gain_upper(certificate, point, momentum, nesterov,
                                    target=float(down(1.0 / w_high)))
            ratio = float(up(w_high * upper))
            if ratio <= 1.0:
                x_low = point
                break
            if not math.isfinite(ratio):
                slack = getattr(self, "_last_slack", math.nan)
                if upper == math.inf and math.isfinite(slack) and slack > 0.0 and fresh:
                    # Out of reach by the proof's slack: move by it (the same X is kept).
                    ratio = w_high * (certificate[0] + 1.25 * slack)
                elif not fresh:
                    fresh = True
                    continue
                else:
                    break
            # The measured excess (log ratio) is recovered by moving down along the ratio's
            # slope (d log ratio / d log x), with a margin of 4.
            step = max(4.0 * math.log(ratio) / slope, 10.0 * step)
            fresh = not fresh
            if step > GAIN_ROUTE_STEPS[-1]:
                break
        if x_low is None:
            return None
        x_high = None
        # The lower bound's rounding is of the same order as the upper bound's: start where the
        # stable side's proof held.
        step = max(GAIN_ROUTE_STEPS[0], min(step, GAIN_ROUTE_STEPS[-1]))
        for _ in range(2 * GAIN_ROUTE_TRIES):
            point = x * (1.0 + step)
            if point >= cap:
                x_high = cap
                break
            self.gain_route["attempts"] += 1
            low_d, high_d = deterministic_radius_bounds_array(m, point, momentum, nesterov)
            if low_d > 1.0:
                x_high = point
                break
            if high_d < 1.0:
                lower = self.gain_lower(certificate, point, momentum, nesterov)
                ratio = float(down(self._weight_bounds(point, b)[0] * lower))
                if ratio > 1.0:
                    x_high = point
                    break
                if ratio > 0.0 and math.isfinite(ratio):
                    step = max(-4.0 * math.log(ratio) / slope, 10.0 * step)
                else:
                    step *= 10.0
            else:
                step *= 10.0
            if step > GAIN_ROUTE_STEPS[-1]:
                break
        if x_high is None:
            return None
        certified = x_high - x_low <= CERTIFY_RTOL * x_low
        if not certified:
            return None
        self.gain_route["proven"] += 1
        return Bracket(x_low, x_low, x_high, self.products, certified=True)

    def candidates(self, dynamics, r: float, noise: bool = True):
        """Collatz-Wielandt matrices for the full map at the trial growth factor r:
        ``Sigma = (r I - D)^{-1} (qq^T (x) W)`` (blocks from the 2 x 2 Stein equations), W the
        noise image of the Perron vector of ``G_r o V_s`` (scaled to max 1) plus a few multiples
        of I, made positive definite. Floating point: the proofs do not rely on their accuracy."""
        k = self.full.k
        W = None
        if noise:
            try:
                pair = self.converge(dynamics.gain(r))
            except (ArithmeticError, np.linalg.LinAlgError):
                pair = None
            if pair is not None and np.all(np.isfinite(pair[4])):
                W = pair[4].reshape(k, k)
                W = 0.5 * (W + W.T)
                size = float(np.max(np.abs(W)))
                W = W / size if size > 0.0 and math.isfinite(size) else None
        blocks = stein_blocks(dynamics, r)
        if not np.all(np.isfinite(blocks)):
            return []
        eye = np.eye(k)
        weights = [eye] if W is None else [W, W + 1e-6 * eye, eye]
        out = []
        for Wc in weights:
            out.extend(positive_candidates(assemble(Wc, blocks), deltas=(0.0, 1e-10)))
        if W is not None:
            # A singular Perron vector (decoupled blocks of parameters): the candidate on the
            # support of W alone, exactly zero elsewhere (lower bounds; ``lower_bound``).
            Wt = np.where(np.abs(W) > 1e-12, W, 0.0)
            Sigma = assemble(Wt, blocks)
            support = np.any(Sigma != 0.0, axis=1)
            if np.any(support) and not np.all(support):
                block = np.ix_(support, support)
                for X_S in positive_candidates(Sigma[block], deltas=(0.0, 1e-12)):
                    X = np.zeros_like(Sigma)
                    X[block] = X_S
                    out.append(X)
        return out

    def evaluations(self, dynamics, candidates):
        """``(X, parts)`` per candidate, computed when first iterated over and kept: the proven
        enclosures of ``D(X)`` and of the unweighted noise (one product of V_s each), to be
        combined with any b. Lazy, so that a proof that succeeds on the first candidate costs
        one evaluation."""
        return _LazyEvaluations(self.full, dynamics, candidates)

    def bounds_at(self, evaluations, b: float, *, sides=("lower", "upper"),
                  goal_upper: float = -math.inf, goal_lower: float = math.inf,
                  stop_fraction: float = 0.0):
        """Proven ``(lower, upper)`` of the full map's spectral radius at noise weight b from
        ``evaluations`` (``-inf`` / ``inf`` for a side that could not be proven). With
        ``stop_fraction`` > 0 and no goals (a spectral radius), stops once
        ``upper - lower <= stop_fraction * radius_tolerance(upper) * upper``."""
        goals = math.isfinite(goal_upper) or math.isfinite(goal_lower)
        lower, upper = -math.inf, math.inf
        r_b = self.full.noise_radius(b)
        for X, parts in evaluations:
            TX, rTX = self.full.combine(parts, b, r_b)
            if not (np.all(np.isfinite(TX)) and np.all(np.isfinite(rTX))):
                continue
            S = congruences(X, TX)
            if S is None:
                if "lower" in sides:
                    lower = max(lower, lower_bound(X, TX, rTX))
                continue
            if "upper" in sides:
                upper = min(upper, upper_bound(X, TX, rTX, S))
            if "lower" in sides:
                lower = max(lower, lower_bound(X, TX, rTX, S))
            if upper <= goal_upper or lower > goal_lower:
                break
            if math.isfinite(upper) and upper - max(lower, 0.0) <= 1e-13 * upper:
                break
            if (stop_fraction and not goals and tuple(sides) == ("lower", "upper")
                    and math.isfinite(upper)
                    and upper - max(lower, 0.0) <= stop_fraction * radius_tolerance(upper) * upper):
                break
        return lower, upper

    def full_bounds(self, dynamics, b: float, r: float, *, sides=("lower", "upper"),
                    goal_upper: float = -math.inf, goal_lower: float = math.inf):
        """Proven ``(lower, upper)`` of the spectral radius of the full second-moment map (on
        symmetric 2k x 2k matrices, ``T = D + x'^2 b qq^T (x) V_s``) at this setting, from the
        ``candidates`` built at the trial growth factor r, each evaluated with a proven
        enclosure of T (``_verified``): proofs for the floating-point inputs, not estimates."""
        weight = (dynamics.x / dynamics.scale) ** 2 * b
        evaluations = self.evaluations(dynamics, self.candidates(dynamics, r, weight != 0.0))
        return self.bounds_at(evaluations, b, sides=sides, goal_upper=goal_upper,
                              goal_lower=goal_lower)

    def growth_estimate(self, dynamics):
        """``(theta, dlog_theta_dr)`` of ``G_r o V_s`` at r = 1: with them the full map's radius
        at noise weight w is about ``1 - log(w theta) / dlog_theta_dr`` (one Newton step on r,
        accurate when w theta is near 1)."""
        pair = self.converge(dynamics.gain(1.0))
        theta = pair[0]
        if not theta > 0.0:
            return theta, math.nan
        floor = dynamics.deterministic_radius()
        h = 1e-7 * max(1.0 - floor, 1e-9)
        return theta, self._slope(pair, dynamics.gain, 1.0, h) / theta

    def proof_bounds(self, dynamics, b: float, side: str, estimate=None):
        """A proven bound of the full map's radius near 1: ``side`` "upper" (to prove
        stability, radius <= 1) or "lower" (instability, radius > 1). Collatz-Wielandt matrices
        are built at growth factors between 1 and the estimated radius (a matrix built at r = 1
        itself proves only ``radius <= 1 + rounding``)."""
        weight = (dynamics.x / dynamics.scale) ** 2 * b
        theta, slope = self.growth_estimate(dynamics) if estimate is None else estimate
        floor = dynamics.deterministic_radius()
        if theta > 0.0 and weight > 0.0 and math.isfinite(slope) and slope < 0.0:
            r_new = 1.0 - math.log(weight * theta) / slope
        else:  # no noise to speak of: the radius is about rho(D)
            r_new = floor
        if floor < 1.0:
            r_new = max(r_new, floor + 1e-3 * (1.0 - floor))
        best = math.inf if side == "upper" else -math.inf
        for r in (0.5 * (1.0 + r_new), r_new):
            evaluations = self.evaluations(dynamics, self.candidates(dynamics, r, weight != 0.0))
            if side == "upper":
                best = min(best, self.bounds_at(evaluations, b, sides=("upper",),
                                                goal_upper=1.0)[1])
                if best <= 1.0:
                    break
            else:
                best = max(best, self.bounds_at(evaluations, b, sides=("lower",),
                                                goal_lower=1.0)[0])
                if best > 1.0:
                    break
        return best

    def noise_threshold(self, x: float, momentum: float, nesterov: bool, b_max: float):
        """Certified Perron root theta of ``G o V_s`` at ``r = 1`` (the critical batch size's
        eigenvalue, ``b* = 1 / (x^2 theta)``), with the bracket proven on the full map: stable at
        ``b = 1 / (x^2 theta_upper)`` and unstable at ``b = 1 / (x^2 theta_lower)``.
        ``b_max`` is the largest noise weight the scheme has (B = 1): stability there proves
        every batch size stable."""
        dynamics = MomentumDynamics(self.unit_eigenvalues, x, momentum, nesterov)
        if dynamics.scale == 1.0 and self.gain_route_enabled:
            fast = self._gain_threshold(dynamics, b_max)
            if fast is not None:
                return fast
            self.gain_route["fallbacks"] += 1
        estimate = self.perron(dynamics.gain())
        theta = max(estimate.value, 0.0)
        growth = self.growth_estimate(dynamics)
        xx = x * x
        if not theta * xx * b_max > 1.0 + 1e-9:
            # Every batch size is (plausibly) stable: prove it at B = 1.
            if self.proof_bounds(dynamics, b_max, "upper", growth) <= 1.0:
                return Bracket(theta, 0.0, up(1.0 / (xx * b_max)), self.products,
                               certified=True)
        low_step = high_step = MOMENTUM_CRITICAL_FIRST_STEP
        theta_low, theta_high = 0.0, math.inf
        b_star = 1.0 / (xx * theta) if theta > 0.0 else math.inf
        low_done = high_done = False
        for _ in range(14):
            if not math.isfinite(b_star):
                break
            if not low_done:  # stable at b below b*: theta <= 1 / (x^2 b)
                point = b_star * (1.0 - low_step)
                if self.proof_bounds(dynamics, point, "upper", growth) <= 1.0:
                    theta_high, low_done = up(up(1.0 / point) / xx), True
                low_step *= 4.0
            if not high_done:  # unstable above b*: theta >= 1 / (x^2 b)
                point = b_star * (1.0 + high_step)
                if self.proof_bounds(dynamics, point, "lower", growth) > 1.0:
                    theta_low, high_done = down(down(1.0 / point) / xx), True
                high_step *= 4.0
            if low_done and high_done:
                break
        value = min(max(theta, theta_low), theta_high)
        certified = low_done and high_done and theta_high - theta_low <= CERTIFY_RTOL * value
        if not certified:
            self.uncertified += 1
        return Bracket(value, theta_low, theta_high, self.products, certified=bool(certified))

    @property
    def products(self) -> int:
        return self.krylov.products

    def converge(self, gain, rtol: float | None = None):
        from ._config import MOMENTUM_RTOL
        return self.krylov.solve(gain, rtol=MOMENTUM_RTOL if rtol is None else max(rtol, MOMENTUM_RTOL))

    def perron(self, gain, *, certify_rtol: float = CERTIFY_RTOL, upper_goal: float = -math.inf,
               lower_goal: float = math.inf) -> Bracket:
        """Certified ``rho(G o V_s)``: the converged Ritz value in a proven bracket; a bracket
        wider than ``certify_rtol`` (and short of the goals) first tightens the residual (100x,
        twice)."""
        from ._config import MOMENTUM_RTOL
        rtol = MOMENTUM_RTOL
        best = None
        for _ in range(3):
            theta, vector, _, residual, _ = self.krylov.solve(gain, rtol=rtol)
            bracket = self.krylov.certify(gain, theta, vector, target_rtol=certify_rtol,
                                          upper_goal=upper_goal, lower_goal=lower_goal)
            bracket = replace(bracket, error=float(residual))
            if best is None or bracket.width < best.width:
                best = bracket
            if best.certified or best.upper <= upper_goal or best.lower >= lower_goal:
                break
            rtol *= 1e-2
        return replace(best, products=self.products)

    def _slope(self, pair, gain_of, p: float, h: float) -> float:
        """``d theta / d p`` at a converged pair: ``<V r, G' o V r> / <V r, r>`` (G' by central
        differences of the closed form, step h)."""
        _, vector, _, _, noise_image = pair
        derivative = ((gain_of(p + h) - gain_of(p - h)) / (2.0 * h)).ravel()
        denominator = float(noise_image @ vector)
        if not denominator > 0:
            return math.nan
        return float(noise_image @ (derivative * noise_image)) / denominator

    def _newton(self, phi, u0: float, u_min: float, u_max: float):
        """Root of the increasing ``phi(u) -> (value, slope)`` (converged solves) in
        [u_min, u_max]: safeguarded Newton (bisection when a step leaves the bracket). Returns
        ``(u, edge)``, edge "low" (phi > 0 at u_min), "high" (phi < 0 at u_max) or None."""
        from ._config import MOMENTUM_ROOT_ROUNDS, MOMENTUM_ROOT_XTOL
        low, high = u_min, u_max
        low_known = high_known = False
        u = u0
        previous = math.inf
        for _ in range(4 * MOMENTUM_ROOT_ROUNDS):
            # Far from the root the Ritz value need not be accurate: a Newton step needs it to a
            # small fraction of |phi| only (the last steps converge to MOMENTUM_RTOL).
            value, slope = phi(u, min(1e-4, 1e-3 * previous))
            if value == 0.0:
                return u, None
            if abs(value) < 1e-9 and previous < 1e-8 and abs(value) > 0.25 * previous:
                # No longer converging quadratically: the Ritz values' own accuracy (about
                # MOMENTUM_RTOL) is reached, and further steps would only follow their noise.
                return u, None
            previous = abs(value)
            if value < 0:
                low, low_known = u, True
                if u >= u_max:
                    return u_max, "high"
            else:
                high, high_known = u, True
                if u <= u_min:
                    return u_min, "low"
            step = -value / slope if slope > 0 and math.isfinite(slope) else math.nan
            new = u + step
            if not (low < new < high):
                if not high_known:
                    new = min(u + max(2.0, abs(step) if math.isfinite(step) else 0.0), u_max)
                elif not low_known:
                    new = max(u - max(2.0, abs(step) if math.isfinite(step) else 0.0), u_min)
                else:
                    new = 0.5 * (low + high)
            if abs(new - u) <= MOMENTUM_ROOT_XTOL * max(1.0, abs(u)):
                return new, None
            u = new
        return u, None

    def _bracket(self, p, ratio_bounds, slope_log, tolerance, p_floor, p_cap, first_step=None):
        """A proven bracket ``[p_low, p_high]`` around the root p of ``ratio = 1`` (increasing in
        p): ``ratio_bounds(p, side)`` returns a proven upper bound ("upper", at p_low) or lower
        bound ("lower", at p_high) of the ratio. Offsets grow from the expected width until both
        sides are proven. Returns ``(p_low, p_high, proven)``."""
        from ._config import MOMENTUM_BRACKET_STEPS
        slope = slope_log if slope_log > 0 and math.isfinite(slope_log) else 1.0
        low_step = high_step = min(MOMENTUM_BRACKET_STEPS[0] if first_step is None
                                   else first_step, 0.25 * tolerance)
        low_done = high_done = False
        p_low, p_high = p, p
        for _ in range(14):
            if not low_done:
                p_low = max(p * (1.0 - low_step), p_floor)
                bound = ratio_bounds(p_low, "upper")
                if bound <= 1.0:
                    low_done = True
                else:  # move by the overshoot (in log ratio per log p), with margin
                    low_step = min(max(4.0 * low_step, 2.0 * math.log(bound) / slope), 0.5)
            if not high_done:
                p_high = p * (1.0 + high_step)
                if p_high >= p_cap:
                    p_high, high_done = p_cap, True
                else:
                    bound = ratio_bounds(p_high, "lower")
                    if bound > 1.0:
                        high_done = True
                    else:
                        high_step = min(max(4.0 * high_step, -2.0 * math.log(max(bound, 1e-300))
                                            / slope), 1.0)
            if low_done and high_done:
                return p_low, p_high, True, True
        return p_low, p_high, low_done, high_done

    def critical_unit_lr(self, b: float, momentum: float, nesterov: bool) -> Bracket:
        """``x* = lr* lambda_1``: the smallest x at which mean-square stability is lost, in a
        certified bracket (stable at ``lower`` and unstable at ``upper``, proven)."""
        cap = momentum_cap(momentum, nesterov)
        if b == 0.0:
            return Bracket(cap, cap, cap)
        m = self.unit_eigenvalues

        def gain_of(x):
            return MomentumDynamics(m, x, momentum, nesterov).gain()

        # u = logit(x / cap): x in (0, cap) <-> u in R; phi = log(x^2 b theta(x)).
        def x_of(u):
            return cap / (1.0 + math.exp(-u))

        def phi(u, rtol=None):
            x = x_of(u)
            pair = self.converge(gain_of(x), rtol)
            theta = pair[0]
            if not theta > 0:
                return -math.inf, math.nan
            h = 1e-6 * min(x, cap - x)
            dtheta = self._slope(pair, gain_of, x, h)
            return math.log(x * x * b * theta), (2.0 / x + dtheta / theta) * x * (1.0 - x / cap)

        # Up to x = cap (1 - CERTIFY_RTOL / 4): nearer the cap G is too ill-conditioned to certify,
        # and an answer there is the cap to within the tolerance.
        edge_gap = 0.25 * CERTIFY_RTOL
        u, edge = self._newton(phi, 0.0, -60.0, math.log((1.0 - edge_gap) / edge_gap))
        x = x_of(u)
        if edge == "low":  # unstable at every x above cap e^-60: not a case families produce
            self.uncertified += 1
            return Bracket(x, 0.0, x, self.products, certified=False)

        def ratio_bounds(point, side):
            # Proven on the full map (``full_bounds``): an upper bound of its spectral radius
            # at p_low (stable if <= 1), a lower bound at p_high (unstable if > 1).
            return self.proof_bounds(MomentumDynamics(m, point, momentum, nesterov), b, side)

        if edge == "high":
            # Stable up to the cap (the noise never reaches 1 before the deterministic part does).
            stable = ratio_bounds(x, "upper") <= 1.0
            if not stable:
                self.uncertified += 1
            return Bracket(cap, x if stable else 0.0, cap, self.products,
                           certified=stable and cap - x <= CERTIFY_RTOL * cap)
        slope = phi(u)[1] / (1.0 - x / cap)  # d log ratio / d log x
        fast = (self._gain_critical(x, b, momentum, nesterov, cap, slope)
                if self.gain_route_enabled else None)
        if fast is not None and (fast.upper - fast.lower <= GAIN_ROUTE_TIGHT * fast.lower
                                 or self.reduction.k > GAIN_ROUTE_REFINE_MAX_K):
            return fast
        # No gain-route bracket, or a small family whose bracket is certified but wide
        # (curvatures over many decades): the full map's proofs (cheap at small k) too; both
        # brackets are proven, so their intersection is.
        self.gain_route["fallbacks"] += 1
        uncertified = self.uncertified
        full = self._critical_on_full_map(x, b, cap, slope, ratio_bounds)
        if fast is None:
            return full
        lower, upper = max(fast.lower, full.lower), min(fast.upper, full.upper)
        certified = bool(upper - lower <= CERTIFY_RTOL * x)
        if certified:
            self.uncertified = uncertified
        return Bracket(lower, lower, upper, self.products, certified=certified)

    def _critical_on_full_map(self, x, b, cap, slope, ratio_bounds) -> Bracket:
        """The critical lr's bracket from the root x by proofs on the full 2k x 2k map (the
        engine before issue 19): offsets growing from ``MOMENTUM_CRITICAL_FIRST_STEP``, then
        bisection toward x."""
        x_low, x_high, low_done, high_done = self._bracket(
            x, ratio_bounds, slope, CERTIFY_RTOL, 0.0, cap,
            first_step=MOMENTUM_CRITICAL_FIRST_STEP)
        if not (low_done and high_done):
            # The Ritz ratio misled the root finder (an ill-conditioned gain: momentum within
            # ~1e-6 of 1, curvatures over many decades). Bisection on the proofs alone, between
            # a proven-stable lr and a proven-unstable one (or the cap).
            x_low = x_low if low_done else 0.0
            x_high = x_high if high_done else cap
            for _ in range(40 if x_low > 0.0 else 0):
                if x_high - x_low <= 1e-10 * x_high:
                    break
                middle = math.sqrt(x_low * x_high)
                if not x_low < middle < x_high:
                    break
                if ratio_bounds(middle, "upper") <= 1.0:
                    x_low = middle
                elif ratio_bounds(middle, "lower") > 1.0:
                    x_high = middle
                else:
                    break
            certified = x_low > 0.0 and (x_high - x_low) <= CERTIFY_RTOL * x_high
            if not certified:
                self.uncertified += 1
            # Without a proven-stable lr the value is the root finder's estimate (a warning
            # says so): the bracket [0, upper] is all that is proven.
            value = x_low if x_low > 0.0 else min(x, x_high)
            return Bracket(value, x_low, x_high, self.products, certified=certified)
        # Bisection on the proofs themselves (a few steps): each proven midpoint halves the
        # bracket; a midpoint proven neither way ends it.
        # Toward the estimate x (the root of the Ritz ratio): the radius there is 1 to within
        # rounding, so each side halves its distance to x while the proofs still hold.
        low_open = high_open = x_low < x < x_high
        for _ in range(MOMENTUM_CRITICAL_BISECTIONS):
            if low_open:
                point = 0.5 * (x_low + x)
                low_open = point > x_low and ratio_bounds(point, "upper") <= 1.0
                x_low = point if low_open else x_low
            if high_open and x_high < cap:
                point = 0.5 * (x_high + x)
                high_open = point < x_high and ratio_bounds(point, "lower") > 1.0
                x_high = point if high_open else x_high
            if not (low_open or high_open):
                break
        # The value is the proven-stable end (it errs on the stable side, as without momentum).
        return Bracket(x_low, x_low, x_high, self.products,
                       certified=(x_high - x_low) <= CERTIFY_RTOL * x)

    def radius(self, x: float, b: float, momentum: float, nesterov: bool):
        """``(bracket, log_factor)``: the certified spectral radius of the full second-moment map
        on ``z`` (times ``exp(-log_factor)``, for huge x)."""
        dynamics = MomentumDynamics(self.unit_eigenvalues, x, momentum, nesterov)
        log_factor = dynamics.log_factor
        floor = dynamics.deterministic_radius()
        weight = (x / dynamics.scale) ** 2 * b
        # rho(T) >= rho(D) (the noise only adds PSD matrices), proven by interval arithmetic.
        floor_lower, floor_upper = deterministic_radius_bounds(
            self.unit_eigenvalues, x, momentum, nesterov, dynamics.scale)
        if weight == 0.0:
            value = min(max(floor, floor_lower), floor_upper)
            return Bracket(value, floor_lower, floor_upper,
                           certified=floor_upper - floor_lower <= radius_tolerance(value) * value
                           ), log_factor
        # r = floor + width e^-s for s in R: every r > rho(D). The Perron ratio increases in s.
        width = floor if floor > 1e-3 else 1.0

        def r_of(s):
            return floor + width * math.exp(-s)

        def phi(s, rtol=None):
            r = r_of(s)
            pair = self.converge(dynamics.gain(r), rtol)
            theta = pair[0]
            if not theta > 0:
                return -math.inf, math.nan
            dtheta = self._slope(pair, dynamics.gain, r, 1e-6 * (r - floor))
            return math.log(weight * theta), -dtheta / theta * (r - floor)

        # s from -200 (r = e^200 times rho(D)) down to r = rho(D) + a quarter of the radius's
        # tolerance (nearer, G is too ill-conditioned to certify; and rho(D) is then the answer).
        gap = 0.25 * radius_tolerance(floor) * max(floor, 1e-300)
        s_max = -math.log(gap / width) if floor > 0 else 34.5
        s, edge = self._newton(phi, 0.0, -200.0, s_max)
        r = r_of(s)
        if dynamics.scale == 1.0 and self.gain_route_enabled:
            fast = self._gain_radius(x, b, momentum, nesterov, floor if edge == "high" else r,
                                     floor_lower, floor_upper)
            if fast is not None:
                return fast, log_factor
            self.gain_route["fallbacks"] += 1
        # The proof: Collatz-Wielandt bounds on the full map itself (2k x 2k symmetric matrices),
        # from the Perron vector at r, evaluated with a proven enclosure of the floating-point
        # error (``full_bounds``). The root finder above only proposes r.
        lower, upper = self.full_bounds(dynamics, b, r)
        if edge == "high":
            # Ratio below 1 as r reaches rho(D): the radius is rho(D) to within the tolerance
            # (the noise adds nothing that grows faster than the deterministic part).
            value = floor
        else:
            value = r
        lower = max(lower, floor_lower, 0.0)
        if not math.isfinite(upper):
            self.uncertified += 1
            return Bracket(value, lower, math.inf, self.products, certified=False), log_factor
        value = min(max(value, lower), upper)
        certified = upper - lower <= radius_tolerance(value) * value
        if not certified:
            self.uncertified += 1
        return Bracket(value, lower, upper, self.products, certified=certified), log_factor
