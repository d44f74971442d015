"""Proven Collatz-Wielandt bounds whose proof survives floating point (the momentum engine).

A Collatz-Wielandt bound says, for a linear map T on symmetric matrices that maps the PSD cone
into itself: if ``X`` is positive definite and ``c X - T(X)`` is PSD then ``rho(T) <= c``; if ``X``
is PSD, not zero, and ``T(X) - c X`` is PSD (c >= 0) then ``rho(T) >= c``. Computed naively, both
``T(X)`` and the eigenvalues of the pencil carry rounding errors, and a bound is then a close
estimate, not a proof. Here each step is proven instead (specification page, section
"Certified answers and scale"):

* every product is carried in *midpoint-radius* form: ``(C, R)`` with ``|C_exact - C| <= R``
  entrywise, from the classical bound ``|fl(A B) - A B| <= gamma_n |A| |B|`` (any summation
  order, with or without fused multiply-adds; gamma_n = n u / (1 - n u), u = 2^-53) plus an
  absolute allowance for underflow, and the radii themselves rounded upward by a safety factor;
* PSD-ness of ``c X - T(X)`` is proven by a congruence ``S^T (c X - T(X)) S`` (S from a floating
  eigen-decomposition: any nonsingular S will do, a good one makes the matrix nearly diagonal)
  and Gershgorin's theorem on the exact entries, which the midpoint-radius products enclose.
  That gives the smallest provable c in closed form, row by row, and the final quotients are
  rounded outward (``np.nextafter``).

Nothing here is an estimate: a bound that cannot be proven is returned as ``inf`` (upper) or
``-inf`` (lower), and the caller reports an honest uncertified bracket.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import eigh

from ._linalg import proven_cholesky, top_of_pencil
from ._rounding import UNIT_ROUNDOFF, down, gamma, up

TINY = 2.0 ** -1000  # absolute allowance per operation for underflow (subnormal results)


def safe_radius(radius, n: float, underflow=True):
    """A radius computed in floating point (sums of non-negative terms), rounded upward, plus
    an absolute allowance for underflow: everywhere (True), nowhere (False: additions, which are
    exact in the subnormal range) or where the boolean array ``underflow`` is set (products
    whose operands are not all exact zeros: a structural zero stays an exact zero)."""
    out = radius * (1.0 + gamma(4 * n + 16))
    if underflow is True:
        return out + (n + 4) * TINY
    if underflow is False:
        return out
    return out + np.where(underflow, (n + 4) * TINY, 0.0)


def mr_matmul(A, rA, B, rB):
    """``(C, R)`` enclosing the exact product of the matrices ``A +- rA`` and ``B +- rB`` (a
    radius None is 0): ``|A_ex B_ex - C| <= R`` entrywise. Works on stacks (``@`` semantics)."""
    n = A.shape[-1]
    C = A @ B
    absA, absB = np.abs(A), np.abs(B)
    R = gamma(n + 2) * (absA @ absB)
    if rA is not None:
        R = R + rA @ (absB if rB is None else absB + rB)
    if rB is not None:
        R = R + absA @ rB
    left = (absA > 0.0) if rA is None else (absA + rA > 0.0)
    right = (absB > 0.0) if rB is None else (absB + rB > 0.0)
    # Structural zeros of the product (where no underflow allowance is needed). A factor with
    # no zero entry makes the pattern that of the other's rows or columns: no product needed.
    if left.all():
        pattern = np.broadcast_to(np.any(right, axis=-2, keepdims=True), C.shape)
    elif right.all():
        pattern = np.broadcast_to(np.any(left, axis=-1, keepdims=True), C.shape)
    else:
        pattern = left.astype(np.float64) @ right.astype(np.float64) > 0.0
    return C, safe_radius(R, n, pattern)


def mr_add(A, rA, B, rB, sign: float = 1.0):
    """``A + sign B`` with its radius."""
    C = A + sign * B
    R = UNIT_ROUNDOFF * np.abs(C)
    if rA is not None:
        R = R + rA
    if rB is not None:
        R = R + rB
    return C, safe_radius(R, 2, False)


def mr_scale(c: float, rc: float, A, rA):
    """Scalar ``c +- rc`` times ``A +- rA``."""
    C = c * A
    R = UNIT_ROUNDOFF * np.abs(C) + rc * np.abs(A)
    pattern = np.abs(A) > 0.0
    if rA is not None:
        R = R + (abs(c) + rc) * rA
        pattern = pattern | (rA > 0.0)
    return C, safe_radius(R, 2, pattern if (c != 0.0 or rc != 0.0) else False)


def congruences(X: np.ndarray, TX: np.ndarray):
    """Candidate congruences ``S`` for a positive definite X: ``X^{-1/2}`` rotated to diagonalise
    ``X^{-1/2} T(X) X^{-1/2}`` (floating point; the proof does not rely on their accuracy).
    Returns None when X is not (numerically) positive definite."""
    diagonal = np.diagonal(X)
    if not np.all(diagonal > 0.0):
        return None
    # Jacobi scaling first: a graded X (blocks of very different size, as for a huge lr or a
    # tiny curvature) then has a well-conditioned eigenproblem, and the congruence mixes
    # entries of comparable size only (the proof's error terms stay small).
    jacobi = 1.0 / np.sqrt(diagonal)
    scaled = jacobi[:, None] * X * jacobi[None, :]
    values, vectors = eigh(0.5 * (scaled + scaled.T), check_finite=False)
    if not values[0] > 0.0:
        return None
    S0 = jacobi[:, None] * (vectors / np.sqrt(values))
    A = S0.T @ TX @ S0
    _, rotation = eigh(0.5 * (A + A.T), check_finite=False)
    return S0 @ rotation


def _pencil(S, X, TX, rTX):
    """``(F, rF, G, rG)``: enclosures of ``S^T T(X) S`` and ``S^T X S`` (X exact)."""
    St = np.ascontiguousarray(S.T)
    left, r_left = mr_matmul(St, None, TX, rTX)
    F, rF = mr_matmul(left, r_left, S, None)
    left, r_left = mr_matmul(St, None, X, None)
    G, rG = mr_matmul(left, r_left, S, None)
    return F, rF, G, rG


def upper_bound(X, TX, rTX, S=None) -> float:
    """A proven upper bound of rho(T) from a positive definite X and the enclosure
    ``T(X) in TX +- rTX`` (``inf`` when none can be proven)."""
    if S is None:
        S = congruences(X, TX)
        if S is None:
            return math.inf
    F, rF, G, rG = _pencil(S, X, TX, rTX)
    m = F.shape[0]
    off = ~np.eye(m, dtype=bool)
    # c G - F is diagonally dominant (exact entries) iff, row by row,
    # c (G_ii - sum_j!=i |G_ij| - sum_j rG_ij) >= F_ii + sum_j!=i |F_ij| + sum_j rF_ij.
    numerator = np.diagonal(F) + safe_radius(np.sum(np.where(off, np.abs(F), 0.0) + rF, axis=1), m)
    slack = safe_radius(np.sum(np.where(off, np.abs(G), 0.0) + rG, axis=1), m)
    denominator = np.diagonal(G) - slack
    if not np.all(denominator > 0.0) or not np.all(np.isfinite(numerator)):
        return math.inf
    # Outward rounding of the last operations: the numerator up, the denominator down.
    numerator = numerator + np.abs(numerator) * 4.0 * UNIT_ROUNDOFF + TINY
    denominator = denominator - np.abs(denominator) * 4.0 * UNIT_ROUNDOFF
    if not np.all(denominator > 0.0):
        return math.inf
    return up(float(np.max(numerator / denominator)))


def lower_bound(X, TX, rTX, S=None) -> float:
    """A proven lower bound of rho(T) (>= 0) from a PSD X and the enclosure of ``T(X)``
    (``-inf`` when none can be proven; 0 is always true).

    An X that is exactly zero outside a set of coordinates (a singular Perron vector: samples
    acting on decoupled blocks) is handled on that set: when the enclosure of ``T(X)`` is
    exactly zero outside it too (mid-points and radii: structural zeros), ``T(X) - c X`` is
    zero there and PSD iff its block on the set is."""
    support = np.any(X != 0.0, axis=1)
    if S is None and not np.all(support) and np.any(support):
        outside = ~support
        if np.any(TX[outside] != 0.0) or np.any(rTX[outside] != 0.0):
            return -math.inf
        block = np.ix_(support, support)
        return lower_bound(X[block], TX[block], rTX[block])
    if S is None:
        S = congruences(X, TX)
        if S is None:
            return -math.inf
    F, rF, G, rG = _pencil(S, X, TX, rTX)
    m = F.shape[0]
    off = ~np.eye(m, dtype=bool)
    # S must be nonsingular: S^T X S diagonally dominant with a positive diagonal proves it.
    slack_G = safe_radius(np.sum(np.where(off, np.abs(G), 0.0) + rG, axis=1), m)
    if not np.all(np.diagonal(G) - slack_G > 0.0):
        return -math.inf
    # T(X) - c X diagonally dominant: c (G_ii + sum |G_ij| + rG) <= F_ii - sum |F_ij| - rF.
    numerator = np.diagonal(F) - safe_radius(np.sum(np.where(off, np.abs(F), 0.0) + rF, axis=1), m)
    denominator = np.diagonal(G) + slack_G
    numerator = numerator - np.abs(numerator) * 4.0 * UNIT_ROUNDOFF - TINY
    denominator = denominator + np.abs(denominator) * 4.0 * UNIT_ROUNDOFF + TINY
    value = float(np.min(numerator / denominator))
    if not math.isfinite(value):
        return -math.inf
    return max(down(value), 0.0)


# ----------------------------------------------------------------------------- momentum map
class MomentumMap:
    """The full second-moment map of momentum SGD on symmetric 2k x 2k matrices, evaluated with
    a proven enclosure (specification page, section "Momentum"):

        T(Sigma) = A Sigma A^T + w qq^T (x) V_s(Sigma_11),  A = P (x) I + (q e_1^T) (x) x' H,

    with ``H = (1/n) sum_i U_i^T U_i`` formed from the reduced unit factors themselves (not from
    their eigenvalues, so that T is exactly ``E[A_B Sigma A_B^T]`` of that family and maps the PSD
    cone into itself), ``V_s(Y) = N(Y) - c H Y H`` (c = 0 Bernoulli, 1 otherwise) and
    ``w = x'^2 b``. ``x' = x / scale`` and P / scale as in ``MomentumDynamics`` (a huge x divides
    the whole iteration). Every float input (mu, x, b, the rows) is taken as exact except b,
    whose rounding from the batch size is enclosed. ``Sigma`` is ordered (first block, second
    block) in the reduction's eigenbasis.
    """

    def __init__(self, reduction, sampling: str):
        rows = np.ascontiguousarray(reduction.unit_rows, dtype=np.float64)
        self.rank = reduction.rank
        self.k = rows.shape[1]
        self.n = rows.shape[0] // self.rank
        self.rows = rows
        self.U = rows.reshape(self.n, self.rank, self.k)
        self.Ut = np.ascontiguousarray(np.swapaxes(self.U, 1, 2))
        self.interaction = 0.0 if sampling == "bernoulli" else 1.0
        gram, r_gram = mr_matmul(np.ascontiguousarray(rows.T), None, rows, None)
        self.H, self.rH = mr_scale(1.0 / self.n, UNIT_ROUNDOFF / self.n, gram, r_gram)

    def noise(self, Y):
        """Enclosure of ``V_s(Y)`` for an exact symmetric k x k Y."""
        Z, rZ = mr_matmul(self.U, None, Y, None)                     # (n, r, k): U_i Y
        C, rC = mr_matmul(Z, rZ, self.Ut, None)                      # (n, r, r): U_i Y U_i^T
        B, rB = mr_matmul(C, rC, self.U, None)                       # (n, r, k)
        m = self.n * self.rank
        total, r_total = mr_matmul(np.ascontiguousarray(self.rows.T), None,
                                   B.reshape(m, self.k), rB.reshape(m, self.k))
        N, rN = mr_scale(1.0 / self.n, UNIT_ROUNDOFF / self.n, total, r_total)
        if self.interaction:
            HY, rHY = mr_matmul(self.H, self.rH, Y, None)
            HYH, rHYH = mr_matmul(HY, rHY, self.H, self.rH)
            N, rN = mr_add(N, rN, HYH, rHYH, -1.0)
        return N, rN

    def parts(self, dynamics, Sigma):
        """``(D, rD, E, rE)``: enclosures of the deterministic part ``A Sigma A^T`` and of the
        unweighted noise ``x'^2 qq^T (x) V_s(Sigma_11)`` (T = D + b E)."""
        k = self.k
        mu, s = dynamics.momentum, dynamics.scale
        xs = dynamics.x / s if s != 1.0 else dynamics.x
        r_xs = UNIT_ROUNDOFF * abs(xs) if s != 1.0 else 0.0
        if dynamics.nesterov:
            P = np.array([[1.0, -mu * mu], [0.0, mu]]) / s
            rP = np.array([[1.0, 2.0 * mu * mu], [0.0, mu]]) * (2.0 * UNIT_ROUNDOFF / s)
            q = np.array([-(1.0 + mu), 1.0])
            rq = np.array([UNIT_ROUNDOFF * (1.0 + mu), 0.0])
        else:
            P = np.array([[1.0 + mu, -mu], [1.0, 0.0]]) / s
            rP = np.array([[1.0 + mu, mu], [1.0, 0.0]]) * (2.0 * UNIT_ROUNDOFF / s)
            q = np.array([-1.0, 0.0])
            rq = np.zeros(2)
        K, rK = mr_scale(xs, r_xs, self.H, self.rH)
        eye = np.eye(k)
        A = np.zeros((2 * k, 2 * k))
        rA = np.zeros((2 * k, 2 * k))
        for a in range(2):
            for c in range(2):
                block = P[a, c] * eye
                r_block = (rP[a, c] + UNIT_ROUNDOFF * abs(P[a, c])) * eye
                if c == 0:
                    qK, rqK = mr_scale(q[a], rq[a], K, rK)
                    block, r_block = mr_add(block, r_block, qK, rqK)
                A[a * k:(a + 1) * k, c * k:(c + 1) * k] = block
                rA[a * k:(a + 1) * k, c * k:(c + 1) * k] = r_block
        AS, rAS = mr_matmul(A, rA, Sigma, None)
        D, rD = mr_matmul(AS, rAS, np.ascontiguousarray(A.T), np.ascontiguousarray(rA.T))
        V, rV = self.noise(np.ascontiguousarray(Sigma[:k, :k]))
        E = np.empty((2 * k, 2 * k))
        rE = np.empty((2 * k, 2 * k))
        weight, r_weight = xs * xs, safe_radius(2.0 * abs(xs) * r_xs + r_xs * r_xs + UNIT_ROUNDOFF * xs * xs, 2)
        for a in range(2):
            for c in range(2):
                qq = q[a] * q[c]
                r_qq = safe_radius(abs(q[a]) * rq[c] + rq[a] * abs(q[c]) + rq[a] * rq[c]
                             + UNIT_ROUNDOFF * abs(qq), 2)
                factor = qq * weight
                r_factor = safe_radius(abs(qq) * r_weight + r_qq * (weight + r_weight)
                                 + UNIT_ROUNDOFF * abs(factor), 2)
                block, r_block = mr_scale(factor, r_factor, V, rV)
                E[a * k:(a + 1) * k, c * k:(c + 1) * k] = block
                rE[a * k:(a + 1) * k, c * k:(c + 1) * k] = r_block
        return D, rD, E, rE

    @staticmethod
    def combine(parts, b: float, r_b: float):
        """Enclosure of ``T(Sigma) = D + b E`` from ``parts``."""
        D, rD, E, rE = parts
        bE, rbE = mr_scale(b, r_b, E, rE)
        return mr_add(D, rD, bE, rbE)

    def noise_radius(self, b: float) -> float:
        """Bound on ``|b_exact - b|``: b comes from the batch size by at most three rounded
        operations (``1/B - 1/n``, ``(n - B) / (B (n - 1))`` or ``1/B``)."""
        return 4.0 * UNIT_ROUNDOFF * (abs(b) + 1.0 / self.n)


def stein_blocks(dynamics, r: float) -> np.ndarray:
    """``S[j, k]``: the 2 x 2 solutions of ``r S - M_j S M_k^T = q q^T`` for every pair
    (batched 4 x 4 solves, backward stable; used to build candidate Perron vectors only)."""
    M = dynamics.matrices
    k = M.shape[0]
    kron = np.einsum("jac,kbd->jkabcd", M, M).reshape(k, k, 4, 4)
    system = r * np.eye(4) - kron
    rhs = np.broadcast_to(np.outer(dynamics.q, dynamics.q).ravel(), (k, k, 4))[..., None]
    with np.errstate(all="ignore"):
        try:
            solution = np.linalg.solve(system, rhs)[..., 0]
        except np.linalg.LinAlgError:
            # r is (to rounding) a product of eigenvalues of M_j and M_k for some pair: any
            # finite matrix is still a valid Collatz-Wielandt candidate, so use the
            # pseudo-inverse there (which kernel rounds to exactly singular differs by BLAS).
            solution = (np.linalg.pinv(system) @ rhs)[..., 0]
    return solution.reshape(k, k, 2, 2)


def assemble(W: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """The 2k x 2k symmetric matrix with entry ((a, j), (c, l)) = ``W_jl blocks[j, l][a, c]``."""
    k = W.shape[0]
    full = np.einsum("jl,jlac->ajcl", W, blocks).reshape(2 * k, 2 * k)
    return 0.5 * (full + full.T)


def positive_candidates(Sigma: np.ndarray, deltas=(1e-12, 1e-9, 1e-6, 1e-3)):
    """Positive definite matrices near the PSD part of Sigma (+ delta times its largest
    eigenvalue times I): Collatz-Wielandt vectors."""
    values, vectors = eigh(0.5 * (Sigma + Sigma.T), check_finite=False)
    if -values[0] > values[-1]:
        values = -values
    top = values[-1]
    if not (top > 0.0 and math.isfinite(top)):
        return []
    values = np.maximum(values / top, 0.0)
    out = []
    for delta in deltas:
        X = (vectors * (values + delta)) @ vectors.T
        out.append(0.5 * (X + X.T))
    return out


# ----------------------------------------------------------------------------- interval scalars
def _iv_add(a, b):
    return (down(a[0] + b[0]), up(a[1] + b[1]))


def _iv_mul(a, b):
    products = (a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1])
    return (down(min(products)), up(max(products)))


def _iv(value: float):
    return (float(value), float(value))


def deterministic_radius_bounds(unit_eigenvalues, x: float, momentum: float, nesterov: bool,
                                scale: float = 1.0):
    """Proven ``(lower, upper)`` of ``rho(D) = max_j rho(M_j)^2`` (outward-rounded interval
    arithmetic on trace and determinant of each 2 x 2 ``M_j / scale``). ``rho`` of
    ``l^2 - tau l + delta`` is ``(|tau| + sqrt(tau^2 - 4 delta)) / 2`` (real roots) or
    ``sqrt(delta)`` (complex): increasing in |tau|, and in delta it falls to ``|tau| / 2`` at
    ``delta = tau^2 / 4`` and then rises, so the extremes over a box are at its corners or at that
    point."""
    mu = momentum
    lower_all, upper_all = 0.0, 0.0
    s = (1.0 / scale, 1.0 / scale) if scale == 1.0 else (down(1.0 / scale), up(1.0 / scale))
    xs = _iv(x) if scale == 1.0 else _iv_mul(_iv(x), s)
    for m in np.asarray(unit_eigenvalues, dtype=np.float64):
        xm = _iv_mul(xs, _iv(m))  # x m / scale
        if nesterov:
            # M = [[1 - (1 + mu) x m, -mu^2], [x m, mu]] / scale (x m already divided)
            one_mu = (down(1.0 + mu), up(1.0 + mu))
            a = _iv_add(_iv_mul(s, _iv(1.0)), _iv_mul(_iv_mul(one_mu, xm), _iv(-1.0)))
            d_entry = _iv_mul(_iv(mu), s)
            tau = _iv_add(a, d_entry)
            mu2 = _iv_mul(_iv(mu), _iv(mu))
            delta = _iv_add(_iv_mul(a, d_entry), _iv_mul(_iv_mul(mu2, s), xm))
        else:
            # M = [[1 + mu - x m, -mu], [1, 0]] / scale
            one_mu = _iv_mul((down(1.0 + mu), up(1.0 + mu)), s)
            tau = _iv_add(one_mu, _iv_mul(xm, _iv(-1.0)))
            delta = _iv_mul(_iv_mul(_iv(mu), s), s)
        t_abs = (0.0 if tau[0] <= 0.0 <= tau[1] else min(abs(tau[0]), abs(tau[1])),
                 max(abs(tau[0]), abs(tau[1])))

        def rho(t, dl, direction):
            disc = _iv_add(_iv_mul(_iv(t), _iv(t)), _iv_mul(_iv(-4.0), _iv(dl)))
            rounding = up if direction > 0 else down
            if (disc[1] if direction > 0 else disc[0]) >= 0.0:
                root = math.sqrt(max(disc[1] if direction > 0 else disc[0], 0.0))
                root = rounding(root)
                return rounding(0.5 * rounding(t + root))
            return rounding(math.sqrt(max(dl, 0.0)))

        t2 = _iv_mul(_iv(t_abs[0]), _iv(t_abs[0]))
        d_star = min(max(0.25 * t2[0], delta[0]), delta[1])
        low = min(rho(t_abs[0], d_star, -1), rho(t_abs[0], delta[0], -1),
                  rho(t_abs[0], delta[1], -1))
        high = max(rho(t_abs[1], delta[0], 1), rho(t_abs[1], delta[1], 1))
        lower_all = max(lower_all, down(low * low))
        upper_all = max(upper_all, up(high * high))
    return max(lower_all, 0.0), upper_all


# ----------------------------------------------------------------------------- the gain route
# The momentum map's proofs without the 2k x 2k map (specification page, section "Momentum"):
# for cone-preserving D with rho(D) < r and E = w qq^T (x) V_s(Sigma_11), rho(D + E) <= r iff
# rho(w G_r o V_s) <= 1 (and > r iff > 1), with G_r the Stein gain of D, exact per pair of H's
# eigen-directions. So a proof needs an enclosure of G_r (closed form in midpoint-radius
# arithmetic, O(k^2) elementwise work), one enclosure of V_s(X) (four large BLAS products) and
# k x k Cholesky factorisations: no eigen-decomposition, nothing of size 2k.
_INFLATE = 1.0 + 16.0 * UNIT_ROUNDOFF  # the radius computations' own rounding (a few terms)


class _MR:
    """Arrays in midpoint-radius form: the exact value lies in ``mid +- rad`` (entrywise). Every
    operation adds its own rounding (``u |result|``), inflates the radius for the rounding of
    the radius computation itself and allows for underflow (``TINY``)."""

    __slots__ = ("mid", "rad")

    def __init__(self, mid, rad=0.0):
        self.mid = np.asarray(mid, dtype=np.float64)
        self.rad = np.broadcast_to(np.asarray(rad, dtype=np.float64), self.mid.shape)

    @staticmethod
    def _make(mid, rad):
        return _MR(mid, (rad + UNIT_ROUNDOFF * np.abs(mid)) * _INFLATE + 4.0 * TINY)

    def __add__(self, other):
        other = other if isinstance(other, _MR) else _MR(other)
        return _MR._make(self.mid + other.mid, self.rad + other.rad)

    __radd__ = __add__

    def __neg__(self):
        return _MR(-self.mid, self.rad)

    def __sub__(self, other):
        return self + (-(other if isinstance(other, _MR) else _MR(other)))

    def __rsub__(self, other):
        return _MR(other) - self

    def __mul__(self, other):
        other = other if isinstance(other, _MR) else _MR(other)
        mid = self.mid * other.mid
        rad = (np.abs(self.mid) * other.rad + self.rad * np.abs(other.mid)
               + self.rad * other.rad)
        return _MR._make(mid, rad)

    __rmul__ = __mul__

    def __truediv__(self, other):
        other = other if isinstance(other, _MR) else _MR(other)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            mid = self.mid / other.mid
            margin = down(np.abs(other.mid) - other.rad * _INFLATE)
            rad = np.where(margin > 0.0, (self.rad + np.abs(mid) * other.rad) / margin, np.inf)
        return _MR._make(mid, rad)

    def outer(self, other):
        mid = np.multiply.outer(self.mid, other.mid)
        rad = (np.multiply.outer(np.abs(self.mid), other.rad)
               + np.multiply.outer(self.rad, np.abs(other.mid))
               + np.multiply.outer(self.rad, other.rad))
        return _MR._make(mid, rad)

    @property
    def T(self):
        return _MR(self.mid.T, self.rad.T)


def gain_enclosure(unit_eigenvalues, x: float, momentum: float, nesterov: bool, r: float = 1.0):
    """``(G, rG)`` with ``|G_exact - G| <= rG`` entrywise, ``G_exact`` the Stein gain
    ``G_jk = sum_t r^{-t-1} h_j(t) h_k(t)`` of the unit family's deterministic part at unit lr x
    (``MomentumDynamics.gain``'s closed form, every operation enclosed; the float inputs are
    exact). Valid when every ``rho(M_j)^2 < r`` (the series converges; the caller proves it);
    entries whose denominator cancels to within its radius get an infinite radius."""
    m = np.asarray(unit_eigenvalues, dtype=np.float64)
    mu = _MR(momentum)
    one_mu = _MR(1.0) + mu
    xm = _MR(m) * _MR(float(x))
    sigma = xm                                       # det(I - M_j) = x m_j, both variants
    if nesterov:
        delta = mu * (1.0 - xm)
        M = ((1.0 - one_mu * xm, -(mu * mu)), (xm, mu))
        q = (-one_mu, _MR(1.0))
    else:
        delta = _MR(np.full(m.shape, float(momentum)))
        M = ((one_mu - xm, -mu), (_MR(1.0), _MR(0.0)))
        q = (_MR(-1.0), _MR(0.0))
    tau = 1.0 + delta - sigma
    if r == 1.0:
        root = _MR(1.0)
        rr = _MR(1.0)
    else:
        s = math.sqrt(r)
        root = _MR(s, UNIT_ROUNDOFF * s * _INFLATE)
        rr = _MR(float(r))
        sigma = ((root - 1.0) * (root - delta) + root * sigma) / rr
        delta = delta / rr
        tau = tau / root
    vector = (q[0] * _MR(np.ones(m.shape)), q[1] * _MR(np.ones(m.shape)))
    h = []
    factor = _MR(1.0)
    for t in range(4):
        h.append(vector[0] * factor)
        vector = (M[0][0] * vector[0] + M[0][1] * vector[1],
                  M[1][0] * vector[0] + M[1][1] * vector[1])
        factor = factor / root
    p = [ht.outer(ht) for ht in h]
    tt = tau.outer(tau)
    dd = delta.outer(delta)
    tau2 = tau * tau
    e1 = tt
    e2 = tau2.outer(delta) + delta.outer(tau2) - 2.0 * dd
    e3 = dd * tt
    a1 = 1.0 - e1
    a2 = a1 + e2
    numerator = p[0] * (a2 - e3) + p[1] * a2 + p[2] * a1 + p[3]
    ones = _MR(np.ones(m.shape))
    s_j, s_k = sigma.outer(ones), ones.outer(sigma)
    d_j, d_k = delta.outer(ones), ones.outer(delta)
    denominator = ((1.0 - dd) * (s_j * (1.0 - d_k) + s_k * (1.0 - d_j)) + d_k * s_j * s_j
                   + d_j * s_k * s_k - (1.0 + dd) * s_j * s_k)
    gain = numerator / denominator / rr
    # The exact G is symmetric: both (j, k) and (k, j) enclose it, so their mean does, within
    # the mean of the radii (plus the averaging's rounding).
    mid = 0.5 * (gain.mid + gain.mid.T)
    rad = (0.5 * (gain.rad + gain.rad.T) + UNIT_ROUNDOFF * np.abs(mid)) * _INFLATE + 4.0 * TINY
    rad = np.where(np.isfinite(mid), rad, np.inf)
    return mid, rad


class NoiseEnclosure:
    """Proven entrywise enclosures of ``V_s(Y) = N(Y) - c H Y H`` for exact float symmetric Y
    (``c = 0`` Bernoulli, 1 otherwise), ``N(Y) = (1/n) sum_i R_i R_i^T Y R_i R_i^T`` and
    ``H = (1/n) sum_i R_i R_i^T`` from the reduced unit rows (so that V_s is a covariance and maps
    the PSD cone into itself). Large BLAS products: ``rows Y``, ``rows^T (C R)`` and the same
    with every quantity replaced by its absolute value, which bounds the rounding:
    ``|fl(N) - N| <= gamma(K) N_abs(|Y|)`` entrywise, K the longest chain of operations, for any
    summation order (``_rounding``)."""

    def __init__(self, reduction, sampling: str, full=None):
        rows = np.ascontiguousarray(reduction.unit_rows, dtype=np.float64)
        self.rank = int(reduction.rank)
        self.m, self.k = rows.shape
        self.n = self.m // max(self.rank, 1)
        self.rows = rows
        self.abs_rows = np.abs(rows)
        self.interaction = 0.0 if sampling == "bernoulli" else 1.0
        self._full = full
        self.products = 0

    def _sandwich(self, rows, Y):
        n, r, k = self.n, self.rank, self.k
        W = rows @ Y                                              # (m, k): R_i^T Y
        rows3 = rows.reshape(n, r, k)
        C = np.einsum("iak,ibk->iab", W.reshape(n, r, k), rows3)  # R_i^T Y R_i
        B = np.einsum("iab,ibk->iak", C, rows3).reshape(self.m, k)
        return rows.T @ B

    def __call__(self, Y):
        """``(Z, rZ)``: ``|V_s(Y) - Z| <= rZ`` entrywise (Y exact, symmetric)."""
        from ._rounding import operator_chain
        Y = np.ascontiguousarray(Y, dtype=np.float64)
        self.products += 1
        if self.m == 0 or self.k == 0:
            return np.zeros_like(Y), np.zeros_like(Y)
        N = self._sandwich(self.rows, Y) * (1.0 / self.n)
        N_abs = self._sandwich(self.abs_rows, np.abs(Y)) * (1.0 / self.n)
        g = gamma(operator_chain(self.k, self.m, self.rank) + 4)
        # 1/n is inexact: one more rounding per entry, inside the chain's margin; N_abs's own
        # rounding: the factor (1 + g).
        rN = safe_radius(g * (1.0 + g) * N_abs, operator_chain(self.k, self.m, self.rank))
        if self.interaction:
            if self._full is None:
                self._full = MomentumMap.__new__(MomentumMap)
                gram, r_gram = mr_matmul(np.ascontiguousarray(self.rows.T), None, self.rows, None)
                self._full.H, self._full.rH = mr_scale(1.0 / self.n, UNIT_ROUNDOFF / self.n,
                                                       gram, r_gram)
            H, rH = self._full.H, self._full.rH
            HY, rHY = mr_matmul(H, rH, Y, None)
            HYH, rHYH = mr_matmul(HY, rHY, H, rH)
            N, rN = mr_add(N, rN, HYH, rHYH, -1.0)
        # The exact V_s(Y) is symmetric: the mean of the two enclosures encloses it.
        Z = 0.5 * (N + N.T)
        rZ = safe_radius(0.5 * (rN + rN.T) + UNIT_ROUNDOFF * np.abs(Z), 2)
        return Z, rZ


def gain_image(G, rG, Z, rZ):
    """``(T, rT)`` enclosing ``G_exact o V_s(X)`` from the enclosures of G and of ``V_s(X)``."""
    T = G * Z
    absZ = np.abs(Z) + rZ
    rT = safe_radius(np.abs(G) * rZ + rG * absZ + UNIT_ROUNDOFF * np.abs(T), 2)
    return T, rT


def weighted_rayleigh_lower(X, Z, rZ, G, rG) -> float:
    """A proven lower bound of ``rho(G o V_s)`` (G symmetric PSD, V_s self-adjoint PSD on
    symmetric matrices, both exact) from any exact symmetric X with ``V_s(X)`` in ``Z +- rZ``:
    the Rayleigh quotient ``<V_s X, G o V_s X> / <X, V_s X>``. With ``V_s = R^* R`` the nonzero
    eigenvalues of ``G o V_s`` are those of the symmetric ``R (G o .) R^*``, whose largest is the
    Perron root (an eigenvalue, the map being cone-preserving); the quotient is that symmetric
    matrix's Rayleigh quotient at ``R X``. ``-inf`` when nothing can be proven."""
    size = X.size
    g = gamma(size + 4)
    absZ = np.abs(Z)
    high = absZ + rZ
    # G Z^2 for Z in Z +- rZ and G in G +- rG: at least G Z_c^2 - (|G| (2 |Z_c| rZ + rZ^2)
    # + rG (|Z_c| + rZ)^2) (when |Z| can be anywhere in the box, Z^2 <= high^2).
    core = G * Z * Z
    slack = np.abs(G) * (2.0 * absZ * rZ + rZ * rZ) + rG * high * high
    numerator = float(np.sum(core)) - float(up(np.sum(slack) * (1.0 + g) + g * np.sum(np.abs(core))
                                               * (1.0 + g) + 4.0 * size * TINY))
    inner = X * Z
    denominator = float(np.sum(inner)) + float(up((np.sum(np.abs(X) * rZ) + g * np.sum(np.abs(inner)))
                                                   * (1.0 + g) + 4.0 * size * TINY))
    if not (denominator > 0.0 and math.isfinite(numerator) and math.isfinite(denominator)):
        return -math.inf
    if numerator <= 0.0:
        return 0.0
    # <X, V_s X> >= 0 exactly (V_s PSD): a positive upper bound of it makes the quotient's
    # lower bound numerator / denominator.
    return float(down(down(numerator) / up(denominator)))



class CholeskyUpper:
    """Collatz-Wielandt upper bounds for one exact, symmetric, positive definite X, Cholesky-
    verified (no eigen-decomposition): ``X >= x_min I`` is proven once (a verified Cholesky
    factorisation of ``X - shift I``, ``_linalg._residual_floor``); then for an image enclosure
    ``T(X) in T +- E`` (``||E||_F <= image_error``) and a trial c, a verified factorisation of
    ``fl(c X - T)`` proves ``c X - T(X) >= -tau I >= -(tau / x_min) X``, so ``rho(T) <= c +
    tau / x_min`` for a cone-preserving T. One factorisation per trial c."""

    def __init__(self, X: np.ndarray):
        from scipy.linalg import cho_solve
        from scipy.linalg.lapack import dpotrf
        self.X = X
        self.k = X.shape[0]
        self.x_min = -math.inf
        self.factor = None
        factor, info = dpotrf(X, lower=0, clean=1, overwrite_a=0)
        if info != 0 or not np.all(np.isfinite(np.diagonal(factor))):
            return
        self.factor = factor
        # Smallest eigenvalue of X, estimated by inverse iteration, then proven with a shift.
        v = np.ones(self.k) / math.sqrt(self.k)
        estimate = math.inf
        for _ in range(8):
            w = cho_solve((factor, False), v, check_finite=False)
            norm = float(np.linalg.norm(w))
            if not (norm > 0 and math.isfinite(norm)):
                return
            new, v = 1.0 / norm, w / norm
            if abs(new - estimate) <= 1e-2 * new:
                estimate = new
                break
            estimate = new
        shift = 0.5 * estimate
        for _ in range(3):
            shifted = X - shift * np.eye(self.k)
            proof = proven_cholesky(shifted)
            if proof is not None:
                rounding = UNIT_ROUNDOFF * float(np.max(np.abs(np.diagonal(shifted))))
                self.x_min = float(down(shift - proof[1] - rounding))
                break
            shift *= 0.25
        self.x_norm = float(np.linalg.norm(X))

    def bound(self, T: np.ndarray, image_error: float, c: float) -> float:
        """A proven upper bound of rho(T) from the trial c (``inf`` when ``fl(c X - T)`` is not
        numerically positive definite: the bound at c does not hold)."""
        if not self.x_min > 0.0:
            return math.inf
        proof = proven_cholesky(c * self.X - T)
        if proof is None:
            return math.inf
        g = gamma(4)
        tau = proof[1] + g * (abs(c) * self.x_norm + float(np.linalg.norm(T))) * (1.0 + g) * (
            1.0 + gamma(T.size + 2)) + image_error
        return float(up(up(c) + up(up(tau * (1.0 + 4 * UNIT_ROUNDOFF)) / self.x_min)))

    def excess(self, T: np.ndarray, theta: float) -> float:
        """Estimate (not a proof) of the Collatz-Wielandt bound's excess over theta: the top
        eigenvalue of ``X^{-1/2} (T - theta X) X^{-1/2}`` (a short Lanczos run)."""
        if self.factor is None:
            return math.inf
        difference = T - theta * self.X
        return max(top_of_pencil(self.factor, 0.5 * (difference + difference.T)), 0.0)


def _viv_add(a, b):
    return (down(a[0] + b[0]), up(a[1] + b[1]))


def _viv_mul(a, b):
    products = (a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1])
    low = np.minimum(np.minimum(products[0], products[1]), np.minimum(products[2], products[3]))
    high = np.maximum(np.maximum(products[0], products[1]), np.maximum(products[2], products[3]))
    return (down(low), up(high))


def deterministic_radius_bounds_array(unit_eigenvalues, x: float, momentum: float,
                                      nesterov: bool):
    """:func:`deterministic_radius_bounds` (scale 1) with the same interval arithmetic on all
    eigenvalues at once (numpy arrays instead of a Python loop)."""
    m = np.asarray(unit_eigenvalues, dtype=np.float64)
    if m.size == 0:
        return 0.0, 0.0
    mu = momentum
    one = (np.ones_like(m), np.ones_like(m))

    def const(value):
        return (np.full_like(m, value), np.full_like(m, value))

    xm = _viv_mul(const(x), (m, m))
    if nesterov:
        one_mu = (np.full_like(m, down(1.0 + mu)), np.full_like(m, up(1.0 + mu)))
        a = _viv_add(one, _viv_mul(_viv_mul(one_mu, xm), const(-1.0)))
        d_entry = const(mu)
        tau = _viv_add(a, d_entry)
        mu2 = _viv_mul(const(mu), const(mu))
        delta = _viv_add(_viv_mul(a, d_entry), _viv_mul(mu2, xm))
    else:
        one_mu = (np.full_like(m, down(1.0 + mu)), np.full_like(m, up(1.0 + mu)))
        tau = _viv_add(one_mu, _viv_mul(xm, const(-1.0)))
        delta = _viv_mul(const(mu), one)
    straddles = (tau[0] <= 0.0) & (0.0 <= tau[1])
    t_low = np.where(straddles, 0.0, np.minimum(np.abs(tau[0]), np.abs(tau[1])))
    t_high = np.maximum(np.abs(tau[0]), np.abs(tau[1]))

    def rho(t, dl, direction):
        disc = _viv_add(_viv_mul((t, t), (t, t)), _viv_mul(const(-4.0), (dl, dl)))
        rounding = up if direction > 0 else down
        end = disc[1] if direction > 0 else disc[0]
        root = rounding(np.sqrt(np.maximum(end, 0.0)))
        real = rounding(0.5 * rounding(t + root))
        complex_ = rounding(np.sqrt(np.maximum(dl, 0.0)))
        return np.where(end >= 0.0, real, complex_)

    t2 = _viv_mul((t_low, t_low), (t_low, t_low))
    d_star = np.minimum(np.maximum(0.25 * t2[0], delta[0]), delta[1])
    low = np.minimum(np.minimum(rho(t_low, d_star, -1), rho(t_low, delta[0], -1)),
                     rho(t_low, delta[1], -1))
    high = np.maximum(rho(t_high, delta[0], 1), rho(t_high, delta[1], 1))
    lower_all = float(np.max(down(low * low)))
    upper_all = float(np.max(up(high * high)))
    return max(lower_all, 0.0), upper_all
