"""The momentum engine's gain route (issue 19: momentum critical_lr within 3x plain, certified).

The proofs work on k x k matrices instead of the full 2k x 2k map: rho(D) < 1 by interval
arithmetic, the Stein gain G enclosed in midpoint-radius arithmetic, one enclosed product of
V_s, a Cholesky-verified Collatz-Wielandt upper bound and a V_s-weighted Rayleigh lower bound
(specification page, section "Momentum"). Every piece is checked here against an independent
slow reference: 40-digit mpmath solves of the 4 x 4 Stein systems, the 40-digit noise operator,
the dense k^2 x k^2 matrix of ``G o V_s``, the dense (2d)^2 momentum operator (``reference``)
and the full-map engine (``gain_route_enabled = False``).
"""

import math
import warnings

import mpmath
import numpy as np
import pytest

import fastsgdstab as fs
from fastsgdstab import HessianFamily
from fastsgdstab._engine import MomentumDynamics, MomentumSolver, momentum_cap, reduced
from fastsgdstab._verified import (CholeskyUpper, NoiseEnclosure, gain_enclosure,
                                   weighted_rayleigh_lower)
from fastsgdstab.moments import critical_lr, spectral_radius
from fastsgdstab.sampling import map_coefficients

import reference as ref

mpmath.mp.dps = 40


def _mp_gain(m, x, mu, nesterov, r):
    """G_jk = e_1^T (r I - M_j (x) M_k)^{-1} (q (x) q), each 4 x 4 system solved in 40 digits."""
    mu, x, r = mpmath.mpf(mu), mpmath.mpf(x), mpmath.mpf(r)

    def matrices(value):
        value = mpmath.mpf(value)
        if nesterov:
            return (mpmath.matrix([[1 - (1 + mu) * x * value, -mu * mu], [x * value, mu]]),
                    [-(1 + mu), mpmath.mpf(1)])
        return mpmath.matrix([[1 + mu - x * value, -mu], [1, 0]]), [mpmath.mpf(-1), mpmath.mpf(0)]

    k = len(m)
    out = np.empty((k, k))
    for j in range(k):
        for l in range(k):
            Mj, q = matrices(m[j])
            Ml, _ = matrices(m[l])
            A = mpmath.matrix(4, 4)
            for a in range(2):
                for b in range(2):
                    for c in range(2):
                        for d in range(2):
                            A[2 * a + b, 2 * c + d] = (r if (a, b) == (c, d) else 0) - Mj[a, c] * Ml[b, d]
            rhs = mpmath.matrix([q[0] * q[0], q[0] * q[1], q[1] * q[0], q[1] * q[1]])
            out[j, l] = float(mpmath.lu_solve(A, rhs)[0])
    return out


@pytest.mark.parametrize("mu,nesterov,fraction,radius_step,flat", [
    (0.9, False, 0.5, 0.0, False), (0.9, True, 0.9, 0.0, False),
    (0.9999999, False, 0.999, 0.0, False),       # momentum near its cap, lr near its cap
    (0.99, True, 0.01, 0.0, True),               # a flat direction (1e-12) and a tiny lr
    (0.3, False, 0.9, 0.3, False), (0.99, True, 0.5, 0.05, True),   # growth factor r != 1
    (1e-7, False, 0.5, 0.0, False),              # momentum 0 in all but name
])
def test_gain_enclosure_contains_the_40_digit_gain(mu, nesterov, fraction, radius_step, flat):
    rng = np.random.default_rng(int(mu * 1000) + int(nesterov))
    m = np.sort(rng.uniform(0.05, 1.0, 4))[::-1]
    m[0] = 1.0
    if flat:
        m[-1] = 1e-12
    x = momentum_cap(mu, nesterov) * fraction
    floor = MomentumDynamics(m, x, mu, nesterov).deterministic_radius()
    r = 1.0 if radius_step == 0.0 else floor + radius_step * (1.0 - floor) + 1e-3
    G, rG = gain_enclosure(m, x, mu, nesterov, r)
    exact = _mp_gain(m, x, mu, nesterov, r)
    assert np.all(np.abs(exact - G) <= rG), np.max(np.abs(exact - G) - rG)
    if mu < 0.999:
        # not vacuous: the enclosure is tight where the problem is well conditioned (with mu
        # within 1e-7 of 1 and the lr at its cap, pairs whose closed form cancels get an
        # infinite radius, and the proofs go to the full map)
        assert np.all(np.isfinite(rG))
        assert np.max(rG / np.abs(exact)) < 1e-6


def _fake_reduction(rows, rank, eigenvalues):
    class Reduction:
        pass
    reduction = Reduction()
    reduction.unit_rows, reduction.rank = rows, rank
    reduction.unit_eigenvalues, reduction.k = eigenvalues, rows.shape[1]
    return reduction


def _mp_noise(rows, rank, Y, interaction):
    """V_s(Y) = N(Y) - c H Y H with H from the same rows, in 40 digits."""
    m, k = rows.shape
    n = m // rank
    R = [mpmath.matrix(rows[i * rank:(i + 1) * rank].T.tolist()) for i in range(n)]
    Ym = mpmath.matrix(Y.tolist())
    N = mpmath.zeros(k, k)
    H = mpmath.zeros(k, k)
    for Ri in R:
        K = Ri * Ri.T
        N += K * Ym * K
        H += K
    N, H = N / n, H / n
    V = N - interaction * (H * Ym * H)
    return np.array(V.tolist(), dtype=float)


@pytest.mark.parametrize("sampling", ["bernoulli", "without_replacement"])
@pytest.mark.parametrize("scale", [1.0, 1e-100, 1e100])
def test_noise_enclosure_contains_the_40_digit_noise(sampling, scale):
    rng = np.random.default_rng(3)
    n, rank, k = 4, 2, 3
    rows = rng.standard_normal((n * rank, k)) * math.sqrt(scale)
    Y = rng.standard_normal((k, k))
    Y = Y + Y.T
    enclosure = NoiseEnclosure(_fake_reduction(rows, rank, np.ones(k)), sampling)
    Z, rZ = enclosure(Y)
    exact = _mp_noise(rows, rank, Y, 0.0 if sampling == "bernoulli" else 1.0)
    assert np.all(np.abs(exact - Z) <= rZ)
    assert np.max(rZ) <= 1e-12 * np.max(np.abs(exact))


def _dense_gain_operator(G, rows, rank, interaction):
    """The k^2 x k^2 matrix of Y -> G o V_s(Y) (columns from unit matrices, float)."""
    k = G.shape[0]
    n = rows.shape[0] // rank
    U = [rows[i * rank:(i + 1) * rank].T for i in range(n)]
    H = sum(u @ u.T for u in U) / n
    columns = []
    for index in range(k * k):
        E = np.zeros(k * k)
        E[index] = 1.0
        E = E.reshape(k, k)
        V = sum(u @ u.T @ E @ u @ u.T for u in U) / n - interaction * H @ E @ H
        columns.append((G * V).ravel())
    return np.array(columns).T


@pytest.mark.parametrize("sampling", ["bernoulli", "with_replacement"])
@pytest.mark.parametrize("mu,nesterov", [(0.9, False), (0.9, True), (0.99, False)])
def test_cholesky_upper_and_rayleigh_lower_bracket_the_dense_perron_root(sampling, mu, nesterov):
    rng = np.random.default_rng(11)
    family = HessianFamily(rng.standard_normal((6, 3, 2)))
    reduction = reduced(family)
    solver = MomentumSolver(reduction, sampling)
    x = 0.4 * momentum_cap(mu, nesterov)
    certificate = solver.gain_certificate(x, mu, nesterov)
    upper = solver.gain_upper(certificate, x, mu, nesterov)
    lower = solver.gain_lower(certificate, x, mu, nesterov)
    G = _mp_gain(reduction.unit_eigenvalues, x, mu, nesterov, 1.0)
    interaction = 0.0 if sampling == "bernoulli" else 1.0
    dense = _dense_gain_operator(G, reduction.unit_rows, reduction.rank, interaction)
    truth = float(np.max(np.linalg.eigvals(dense).real))
    assert lower <= truth * (1 + 1e-13) and truth <= upper * (1 + 1e-13)
    assert upper - lower <= 1e-8 * truth


def test_rayleigh_lower_needs_no_positive_definite_vector_and_upper_rejects_indefinite():
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((8, 3))
    enclosure = NoiseEnclosure(_fake_reduction(rows, 2, np.ones(3)), "bernoulli")
    G = np.full((3, 3), 1.0)
    indefinite = np.diag([1.0, -0.5, 0.2])
    Z, rZ = enclosure(indefinite)
    dense = _dense_gain_operator(G, rows, 2, 0.0)
    truth = float(np.max(np.linalg.eigvals(dense).real))
    assert weighted_rayleigh_lower(indefinite, Z, rZ, G, np.zeros((3, 3))) <= truth
    assert CholeskyUpper(indefinite).x_min == -math.inf
    # an enclosure that is too wide proves nothing: the lower bound falls to 0 or -inf
    assert weighted_rayleigh_lower(np.eye(3), Z, np.full((3, 3), 1e3), G, np.zeros((3, 3))) <= 0.0


def _check_bracket_with_references(family, batch, sampling, mu, nesterov):
    solver_calls = []
    original = MomentumSolver._gain_critical

    def spy(self, *args):
        out = original(self, *args)
        solver_calls.append(out)
        return out

    MomentumSolver._gain_critical = spy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", fs.CertificationWarning)
            bracket = critical_lr(family, batch, sampling=sampling, momentum=mu, nesterov=nesterov,
                                  bounds=True)
    finally:
        MomentumSolver._gain_critical = original
    hessians = family.dense()
    assert bracket.certified and bracket.lower == bracket.value <= bracket.upper
    assert ref.momentum_spectral_radius_mp(hessians, bracket.lower, batch, sampling, mu, nesterov) <= 1
    cap = momentum_cap(mu, nesterov) / family.sharpness()
    if bracket.upper < cap * (1 - 1e-12):
        assert ref.momentum_spectral_radius_mp(hessians, bracket.upper, batch, sampling, mu,
                                               nesterov) >= 1
    return bracket, solver_calls


@pytest.mark.parametrize("mu,nesterov,sampling", [
    (0.9, False, "bernoulli"), (0.9, True, "without_replacement"),
    (0.99, True, "with_replacement"), (0.9999, False, "bernoulli"),
])
def test_gain_route_critical_lr_is_proven_against_the_50_digit_operator(mu, nesterov, sampling):
    rng = np.random.default_rng(17)
    family = HessianFamily(rng.standard_normal((5, 3, 1)) * rng.uniform(0.3, 2.0, (5, 1, 1)))
    batch = 2 if sampling != "bernoulli" else 2.5
    bracket, calls = _check_bracket_with_references(family, batch, sampling, mu, nesterov)
    assert calls and calls[0] is not None  # the gain route proved a certified bracket
    expected = ref.momentum_critical_lr(family.dense(), batch, sampling, mu, nesterov)
    assert bracket.lower <= expected * (1 + 1e-10) and expected * (1 - 1e-10) <= bracket.upper
    if mu < 0.999:  # the gain route alone, tight: the value is accurate
        assert bracket.value == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("exponent", [-150, 150])
def test_gain_route_at_tiny_and_huge_scales(exponent):
    rng = np.random.default_rng(2)
    base = rng.standard_normal((5, 3, 1))
    reference_value = critical_lr(HessianFamily(base), 2, momentum=0.9, nesterov=True)
    value = critical_lr(HessianFamily(base * 10.0 ** (exponent / 2)), 2, momentum=0.9, nesterov=True)
    assert value * 10.0 ** exponent == pytest.approx(reference_value, rel=1e-12)


def test_momentum_zero_limit_and_flat_direction():
    # A direction of curvature 1e-10 of the sharpness: G is huge there (slow modes) and the
    # enclosure must stay finite; tiny momentum agrees with plain SGD.
    rng = np.random.default_rng(4)
    features = rng.standard_normal((6, 3)) * np.array([1.0, 0.5, 1e-5])
    family = HessianFamily.from_features(features)
    plain = critical_lr(family, 2)
    almost = critical_lr(family, 2, momentum=1e-6, bounds=True)
    assert almost.certified
    assert almost.value == pytest.approx(plain, rel=1e-5)
    bracket, _ = _check_bracket_with_references(family, 2, "bernoulli", 0.9, False)


def _larger_family_check(nesterov, radius_too):
    # k = 50 > GAIN_ROUTE_REFINE_MAX_K: the gain route's bracket is final; the engine before
    # issue 19 (proofs on the full 2k x 2k map) confirms each end independently.
    rng = np.random.default_rng(8)
    family = HessianFamily(rng.standard_normal((40, 50, 2)) / math.sqrt(50))
    reduction = reduced(family)
    assert reduction.k == 50
    _, b = map_coefficients("bernoulli", family.n, 4.0)
    solver = MomentumSolver(reduction, "bernoulli")
    bracket = solver.critical_unit_lr(b, 0.9, nesterov)
    assert bracket.certified and solver.gain_route["proven"] == 1
    assert solver.gain_route["fallbacks"] == 0
    assert bracket.upper - bracket.lower <= 1e-5 * bracket.lower
    old = MomentumSolver(reduction, "bernoulli")
    old.gain_route_enabled = False
    m = reduction.unit_eigenvalues
    # stable at the lower end, unstable at the upper end, on the full map (one proof each)
    assert old.proof_bounds(MomentumDynamics(m, bracket.lower * (1 - 1e-6), 0.9, nesterov), b,
                            "upper") <= 1.0
    assert old.proof_bounds(MomentumDynamics(m, bracket.upper * (1 + 1e-6), 0.9, nesterov), b,
                            "lower") > 1.0
    if radius_too:  # the spectral radius by the gain route against the full map's bracket
        fast, _ = solver.radius(0.8 * bracket.lower, b, 0.9, nesterov)
        slow, _ = old.radius(0.8 * bracket.lower, b, 0.9, nesterov)
        assert fast.certified and slow.lower <= fast.value <= slow.upper
        assert fast.lower <= slow.upper and slow.lower <= fast.upper


def test_larger_family_uses_the_gain_route_and_agrees_with_the_full_map():
    _larger_family_check(False, False)


@pytest.mark.slow
@pytest.mark.parametrize("nesterov", [False, True])
def test_larger_family_thorough(nesterov):
    _larger_family_check(nesterov, True)


def test_spectral_radius_by_the_gain_route_contains_the_50_digit_truth():
    rng = np.random.default_rng(23)
    family = HessianFamily(rng.standard_normal((4, 2, 1)) * rng.uniform(0.5, 1.5, (4, 1, 1)))
    for mu, nesterov, fraction in ((0.9, False, 0.3), (0.9, True, 0.6), (0.99, False, 0.9)):
        lr = fraction * momentum_cap(mu, nesterov) / family.sharpness()
        bracket = spectral_radius(family, lr, 2, momentum=mu, nesterov=nesterov, bounds=True)
        truth = ref.momentum_spectral_radius_mp(family.dense(), lr, 2, "bernoulli", mu, nesterov)
        assert bracket.lower <= truth <= bracket.upper


def test_midpoint_radius_arithmetic_encloses_every_point_of_its_operands():
    """Each operation of the gain's enclosure holds for every value inside its operands'
    intervals (corners and random interior points, exact rational arithmetic)."""
    from fractions import Fraction
    from fastsgdstab._verified import _MR
    rng = np.random.default_rng(9)
    a = _MR(rng.uniform(-2, 2, 50), rng.uniform(0, 0.5, 50))
    b = _MR(rng.uniform(0.6, 2, 50) * rng.choice([-1, 1], 50), rng.uniform(0, 0.5, 50))
    for op in ("add", "sub", "mul", "div"):
        result = {"add": a + b, "sub": a - b, "mul": a * b, "div": a / b}[op]
        for i in range(50):
            for s in (-1.0, -0.3, 0.0, 0.7, 1.0):
                for t in (-1.0, 0.5, 1.0):
                    x = Fraction(a.mid[i]) + Fraction(s) * Fraction(a.rad[i])
                    y = Fraction(b.mid[i]) + Fraction(t) * Fraction(b.rad[i])
                    exact = {"add": x + y, "sub": x - y, "mul": x * y, "div": x / y}[op]
                    assert abs(exact - Fraction(result.mid[i])) <= Fraction(result.rad[i]), (op, i)
    outer = a.outer(b)
    x = Fraction(a.mid[3]) - Fraction(a.rad[3])
    y = Fraction(b.mid[7]) + Fraction(b.rad[7])
    assert abs(x * y - Fraction(outer.mid[3, 7])) <= Fraction(outer.rad[3, 7])


def test_cholesky_upper_holds_for_every_map_inside_the_enclosure():
    """With X = diag(1, 1e-3), T(X) = 2 X and an image error of 1e-6 (Frobenius), T(X) may be
    2 X + 1e-6 e_2 e_2^T, whose ratio to X along e_2 is 2 + 1e-3: the bound must cover it."""
    X = np.diag([1.0, 1e-3])
    checker = CholeskyUpper(X)
    assert 0.4e-3 <= checker.x_min <= 1e-3   # proven with a shift of half the estimate
    T = 2.0 * X
    bound = checker.bound(T, 1e-6, 2.0 + 1e-12)
    assert bound >= 2.0 + 1e-3
    assert bound <= 2.0 + 2.5e-3   # and not much more
    assert checker.bound(T, 0.0, 1.9) == math.inf   # 1.9 X - T(X) is not PSD
