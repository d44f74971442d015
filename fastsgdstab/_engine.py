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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np

from ._config import CERTIFY_RTOL, ENGINE_RTOL, HUGE_UNIT_LR, RADIUS_RTOL_FLOOR
from ._kernels.operators import sandwich_operator
from ._linalg import Bracket, CertificationWarning, certified_top_eigenvalue
from .family import HessianFamily

__all__ = ["check_family", "reduced", "range_basis", "factor_rows", "SandwichOperator", "top_eigenvalue",
           "second_moment_multiplier", "second_moment_scale", "radius_tolerance", "pair_sum",
           "pair_product", "safe_upper_value", "Bracket"]


def check_family(family) -> HessianFamily:
    """The family itself, or a TypeError naming what a family is and how to build one."""
    if not isinstance(family, HessianFamily):
        raise TypeError(
            f"family must be a HessianFamily (build one with HessianFamily(factors), "
            f".from_features or .from_dense); got {type(family).__name__}"
        )
    return family


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


class SandwichOperator:
    """``X -> S o (F o Y + beta N(Y))``, ``Y = S o sym(X)``, on k x k matrices of a unit family."""

    def __init__(self, reduction, scaling, multiplier, noise_weight: float):
        self.rows = reduction.unit_rows
        self.rank = reduction.rank
        self.k = reduction.k
        self.scaling = np.ascontiguousarray(scaling, dtype=np.float64)
        self.multiplier = np.ascontiguousarray(multiplier, dtype=np.float64)
        self.noise_weight = float(noise_weight)
        self._work = np.empty(self.rows.shape)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((self.k, self.k))
        sandwich_operator(self.rows, self.rank, np.ascontiguousarray(X, dtype=np.float64),
                          self.scaling, self.multiplier, self.noise_weight, self._work, out)
        return out


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
        warnings.warn(
            f"{what}: the top eigenvalue is proven only to lie in [{bracket.lower:.12g}, "
            f"{bracket.upper:.12g}] (value {bracket.value:.12g}); the bracket is wider than the "
            f"certification tolerance", CertificationWarning, stacklevel=3,
        )
    return bracket


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
        denominator = ((1.0 - dd) * (s_j * (1.0 - d_k) + s_k * (1.0 - d_j)) + d_k * s_j * s_j
                       + d_j * s_k * s_k - (1.0 + dd) * s_j * s_k)
        gain = numerator / denominator / r
        return 0.5 * (gain + gain.T)

    def propagate(self, S11, S12, S22):
        """The deterministic part of one step on the blocks of Sigma = E[z z^T] (S21 = S12^T):
        entry (j, k) of the 2 x 2 block matrix goes to ``M_j Z_jk M_k^T``."""
        M = self.matrices
        S = ((S11, S12), (S12.T, S22))
        out = []
        for a, b in ((0, 0), (0, 1), (1, 1)):
            total = 0.0
            for c in range(2):
                for d in range(2):
                    total = total + M[:, a, c][:, None] * S[c][d] * M[:, b, d][None, :]
            out.append(total)
        return out


def momentum_noise_operator(reduction, sampling: str) -> SandwichOperator:
    """``V_s`` in units: ``N`` (Bernoulli) or ``N - H(x)H`` (the other schemes), so that the noise
    of one step is ``lr^2 b V_s`` (section "Exact critical batch size"'s q and V)."""
    k = reduction.k
    interaction = 0.0 if sampling == "bernoulli" else -1.0
    return SandwichOperator(reduction, np.ones((k, k)),
                            interaction * pair_product(reduction.unit_eigenvalues), 1.0)


class MomentumSolver:
    """Certified Perron roots of ``G o V_s`` for one unit family and scheme, and the two roots
    built on them (critical lr; spectral radius of the full second-moment map).

    One ``ConeKrylov`` basis serves every gain G: across the learning rates of a root finder,
    the growth factors of a spectral radius and the grid points of a stability map, so that
    most steps cost no product of ``V_s`` (the expensive operator).
    """

    def __init__(self, reduction, sampling: str):
        from ._config import MAP_BASIS_BYTES, MOMENTUM_MAX_BASIS
        from ._linalg import ConeKrylov
        self.reduction, self.sampling = reduction, sampling
        k = reduction.k
        self.unit_eigenvalues = reduction.unit_eigenvalues
        capacity = int(min(MOMENTUM_MAX_BASIS, max(8, MAP_BASIS_BYTES // (16.0 * k * k))))
        self.krylov = ConeKrylov(momentum_noise_operator(reduction, sampling), k, capacity=capacity)
        self.uncertified = 0

    @property
    def products(self) -> int:
        return self.krylov.products

    def converge(self, gain):
        from ._config import MOMENTUM_RTOL
        return self.krylov.solve(gain, rtol=MOMENTUM_RTOL)

    def perron(self, gain, *, certify_rtol: float = CERTIFY_RTOL) -> Bracket:
        """Certified ``rho(G o V_s)``: the converged Ritz value in a proven bracket; a bracket
        wider than ``certify_rtol`` first tightens the residual (100x, three times)."""
        from ._config import MOMENTUM_RTOL
        rtol = MOMENTUM_RTOL
        best = None
        for _ in range(4):
            theta, vector, _, residual = self.krylov.solve(gain, rtol=rtol)
            bracket = self.krylov.certify(gain, theta, vector, target_rtol=certify_rtol)
            bracket = replace(bracket, error=float(residual))
            if best is None or bracket.width < best.width:
                best = bracket
            if best.certified:
                break
            rtol *= 1e-2
        return replace(best, products=self.products)

    def _root(self, log_ratio, t0: float, t_min: float, t_max: float):
        """Root in t of ``log_ratio(gain(t)) = 0`` (increasing in t), by Brent's method on the
        projected problem, re-converging the basis at each new root (outer rounds).

        ``log_ratio(t, converge)`` returns the log of the Perron ratio at t (converged or from the
        current basis). Returns ``(t, edge)`` with edge "low" (ratio < 1... below t_min is not
        reached: the ratio is > 1 at t_min... see callers), "high" or None.
        """
        from scipy.optimize import brentq
        from ._config import MOMENTUM_ROOT_ROUNDS, MOMENTUM_ROOT_XTOL
        t = t0
        for _ in range(MOMENTUM_ROOT_ROUNDS):
            value = log_ratio(t, True)
            if value == 0.0:
                return t, None
            step = 0.5
            a = t
            if value > 0:
                while True:
                    b_point = max(a - step, t_min)
                    if log_ratio(b_point, False) < 0:
                        low, high = b_point, a
                        break
                    if b_point == t_min:
                        return t_min, "low"
                    a, step = b_point, step * 2.0
            else:
                while True:
                    b_point = min(a + step, t_max)
                    if log_ratio(b_point, False) > 0:
                        low, high = a, b_point
                        break
                    if b_point == t_max:
                        return t_max, "high"
                    a, step = b_point, step * 2.0
            new = brentq(lambda s: log_ratio(s, False), low, high,
                         xtol=MOMENTUM_ROOT_XTOL * max(1.0, abs(low), abs(high)), rtol=1e-15)
            if abs(new - t) <= 10 * MOMENTUM_ROOT_XTOL * max(1.0, abs(t)):
                return new, None
            t = new
        return t, None

    def critical_unit_lr(self, b: float, momentum: float, nesterov: bool) -> Bracket:
        """``x* = lr* lambda_1``: the smallest x at which mean-square stability is lost, in a
        certified bracket (stable at ``lower`` and unstable at ``upper``, proven)."""
        from ._config import MOMENTUM_BRACKET_STEPS
        cap = momentum_cap(momentum, nesterov)
        if b == 0.0:
            return Bracket(cap, cap, cap)
        m = self.unit_eigenvalues

        # t = logit(x / cap): x in (0, cap) <-> t in R.
        def x_of(t):
            return cap / (1.0 + math.exp(-t))

        def gain_of(x):
            return MomentumDynamics(m, x, momentum, nesterov).gain()

        def ratio(x, converge):
            gain = gain_of(x)
            theta = self.converge(gain)[0] if converge else self.krylov.ritz(gain)[0]
            return x * x * b * theta

        def log_ratio(t, converge):
            value = ratio(x_of(t), converge)
            return math.log(value) if value > 0 else -math.inf

        t, edge = self._root(log_ratio, 0.0, -60.0, 30.0)
        x = x_of(t)
        if edge == "low":  # stable nowhere above x = cap e^-60: not a case the maps produce
            return Bracket(x, 0.0, x, self.products, certified=False)
        for step in MOMENTUM_BRACKET_STEPS:
            x_low = x * (1.0 - step) if edge is None else x_of(t)
            x_high = min(x * (1.0 + step), cap)
            below = self.perron(gain_of(x_low))
            stable = x_low * x_low * b * below.upper <= 1.0
            if x_high >= cap:
                unstable = True  # the deterministic part is unstable from the cap on
            else:
                above = self.perron(gain_of(x_high))
                unstable = x_high * x_high * b * above.lower >= 1.0
            if stable and unstable:
                value = x if edge is None else cap
                certified = (x_high - x_low) <= CERTIFY_RTOL * value
                return Bracket(min(max(value, x_low), x_high), x_low, x_high, self.products,
                               certified=certified)
        self.uncertified += 1
        return Bracket(x, 0.0, cap, self.products, certified=False)

    def radius(self, x: float, b: float, momentum: float, nesterov: bool):
        """``(bracket, log_factor)``: the certified spectral radius of the full second-moment map
        on ``z`` (times ``exp(-log_factor)``, for huge x)."""
        from ._config import MOMENTUM_BRACKET_STEPS
        dynamics = MomentumDynamics(self.unit_eigenvalues, x, momentum, nesterov)
        log_factor = dynamics.log_factor
        floor = dynamics.deterministic_radius()
        weight = (x / dynamics.scale) ** 2 * b
        if weight == 0.0:
            return Bracket(floor, floor, floor), log_factor
        # r = floor + width e^-s for s in R: every r > rho(D). The Perron ratio increases in s.
        width = floor if floor > 1e-3 else 1.0

        def r_of(s):
            return floor + width * math.exp(-s)

        def log_ratio(s, converge):
            gain = dynamics.gain(r_of(s))
            theta = self.converge(gain)[0] if converge else self.krylov.ritz(gain)[0]
            value = weight * theta
            return math.log(value) if value > 0 else -math.inf

        # s from -200 (r = e^200 times rho(D)) to 34.5 (r = rho(D) (1 + 1e-15)).
        s, edge = self._root(log_ratio, 0.0, -200.0, 34.5)
        r = r_of(s)
        if edge == "high":
            # Ratio below 1 as r reaches rho(D): the radius is rho(D) (the noise adds nothing
            # that grows faster than the deterministic part), proven by the upper bound there.
            bracket = self.perron(dynamics.gain(r))
            if weight * bracket.upper <= 1.0:
                return Bracket(floor, floor, r, self.products,
                               certified=(r - floor) <= CERTIFY_RTOL * max(floor, 1e-300)), log_factor
            self.uncertified += 1
            return Bracket(floor, floor, math.inf, self.products, certified=False), log_factor
        for step in MOMENTUM_BRACKET_STEPS:
            r_low = max(r * (1.0 - step), floor + 0.5 * (r - floor))
            r_high = r * (1.0 + step)
            low_bracket = self.perron(dynamics.gain(r_low))
            high_bracket = self.perron(dynamics.gain(r_high))
            if weight * low_bracket.lower >= 1.0 and weight * high_bracket.upper <= 1.0:
                tolerance = radius_tolerance(r)
                return Bracket(r, r_low, r_high, self.products,
                               certified=(r_high - r_low) <= tolerance * r), log_factor
        self.uncertified += 1
        return Bracket(r, floor, math.inf, self.products, certified=False), log_factor
