"""Hostile tests of the exact engine: certified top eigenvalues, every scale, round trips, Ctrl-C.

Each test here stands for a defect that hostile testing once found (issue 8). Expected values
always come from the dense references of ``reference.py`` or from the library at another scale,
never from numbers copied out of the code under test.
"""

import _thread
import math
import signal
import threading
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsgdstab as fs
from fastsgdstab import HessianFamily
from fastsgdstab._linalg import certify_top_eigenvalue, largest_eigenpair

import reference as ref
from strategies import factor_arrays

SCHEMES = fs.SAMPLING_SCHEMES
# Slack on a proven bracket when it is compared with a dense reference: the reference's own
# rounding (a d^2 x d^2 eigensolve), about 1e-14 relative; 1e-12 leaves a margin.
REFERENCE_SLACK = 1e-12


def random_family(seed, max_n=30, max_d=11, max_rank=2):
    """The construction of the issue's reproducer, at other seeds."""
    rng = np.random.default_rng(seed)
    n, d, r = int(rng.integers(3, max_n)), int(rng.integers(2, max_d + 1)), int(rng.integers(1, max_rank + 1))
    factors = rng.standard_normal((n, d, r)) * rng.uniform(0.2, 2, size=(n, 1, 1))
    return HessianFamily(factors)


def contains(lower, upper, value):
    slack = REFERENCE_SLACK * abs(value)
    return lower - slack <= value <= upper + slack


# ----------------------------------------------------------------------------- item 1: maps
def test_stability_map_reproducer_is_the_top_eigenvalue():
    # The reproducer: stability_map gave 0.99361 (another eigenvalue) at 0.2 lc.
    family = random_family(300)
    hessians = family.dense()
    lc = fs.critical_lr(family, 2.0)
    result = fs.stability_map(family, [0.2 * lc, 0.9 * lc], [2.0])
    for j, lr in enumerate([0.2 * lc, 0.9 * lc]):
        exact = ref.spectral_radius(hessians, lr, 2.0, "bernoulli")
        assert result.spectral_radius[0, j] == pytest.approx(exact, rel=1e-9)
        assert contains(result.radius_lower[0, j], result.radius_upper[0, j], exact)


@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15, 16])
@pytest.mark.parametrize("sampling", SCHEMES)
def test_stability_map_brackets_are_true_on_random_grids(seed, sampling):
    family = random_family(seed, max_n=20, max_d=6)
    hessians = family.dense()
    n = family.n
    lc = fs.critical_lr(family, 1.0, sampling=sampling)
    lrs = np.array([0.05, 0.2, 0.6, 1.0, 1.4, 3.0]) * lc
    batch_sizes = [1.0, max(1.0, n / 3), float(n)]
    if sampling != "bernoulli":
        batch_sizes = [float(round(b)) for b in batch_sizes]
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.CertificationWarning)
        result = fs.stability_map(family, lrs, batch_sizes, sampling=sampling)
    for i, b in enumerate(batch_sizes):
        for j, lr in enumerate(lrs):
            exact = ref.spectral_radius(hessians, lr, b, sampling)
            assert result.spectral_radius[i, j] == pytest.approx(exact, rel=1e-9)
            assert contains(result.radius_lower[i, j], result.radius_upper[i, j], exact)
            assert result.radius_upper[i, j] - result.radius_lower[i, j] <= 1e-6 * exact


@pytest.mark.parametrize("seed", [21, 22, 23])
@pytest.mark.parametrize("sampling", SCHEMES)
def test_every_engine_bracket_contains_the_dense_answer(seed, sampling):
    family = random_family(seed, max_n=12, max_d=5)
    hessians = family.dense()
    batch = 2.0
    eta = ref.critical_lr(hessians, batch, sampling)
    bracket = fs.critical_lr(family, batch, sampling=sampling, bounds=True)
    assert bracket.certified and contains(bracket.lower, bracket.upper, eta)
    assert bracket.value <= eta * (1 + REFERENCE_SLACK)  # errs on the stable side
    for factor in (0.1, 0.7, 1.3):
        rho = ref.spectral_radius(hessians, factor * eta, batch, sampling)
        bracket = fs.spectral_radius(family, factor * eta, batch, sampling=sampling, bounds=True)
        assert bracket.certified and contains(bracket.lower, bracket.upper, rho)
        assert bracket.value == pytest.approx(rho, rel=1e-10)


def test_certificate_refuses_an_eigenvector_that_is_not_the_top_one():
    # THEORY section 10: a Ritz pair of another eigenvalue has a tiny residual, but its
    # Collatz-Wielandt bound is far above the top eigenvalue. Dense Q of a random family.
    family = random_family(7, max_n=10, max_d=4)
    hessians = family.dense()
    mean, second = ref.kron_moments_formula(hessians, 2.0, "bernoulli")
    lr = 0.5 * ref.critical_lr(hessians, 2.0, "bernoulli")
    q = ref.second_moment_operator(mean, second, lr)
    d = hessians.shape[1]
    basis = ref.symmetric_basis(np.eye(d))
    restricted = basis.T @ q @ basis
    values, vectors = np.linalg.eigh(0.5 * (restricted + restricted.T))
    top = values[-1]

    def apply(X):
        return (q @ X.ravel()).reshape(d, d)

    for index in (-2, -3):  # eigenvectors of lower eigenvalues
        vector = (basis @ vectors[:, index]).reshape(d, d)
        bracket = certify_top_eigenvalue(values[index], vector, apply(vector), apply(np.eye(d)))
        assert bracket.upper >= top * (1 - REFERENCE_SLACK)
        assert not bracket.certified
    vector = (basis @ vectors[:, -1]).reshape(d, d)
    bracket = certify_top_eigenvalue(top, vector, apply(vector), apply(np.eye(d)))
    assert bracket.certified and contains(bracket.lower, bracket.upper, top)


# ----------------------------------------------------------------------------- item 2: restarts
def test_lanczos_restarts_continue_from_the_ritz_vector():
    # A spectrum whose top eigenvalue needs well over 8 Krylov vectors, with a memory budget of
    # 8 vectors: the solve must converge through restarts. Restarting from the start vector
    # instead of the Ritz vector (a mutant that survived before) never converges.
    size = 400
    diagonal = np.concatenate(([1.0], 1.0 - 0.02 * np.linspace(1, 50, size - 1) ** 0.5))
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((size, size)))
    matrix = (rotation * diagonal) @ rotation.T
    start = np.ones(size)
    unrestarted = largest_eigenpair(lambda v: matrix @ v, start, rtol=1e-12)
    restarted = largest_eigenpair(lambda v: matrix @ v, start, rtol=1e-12,
                                  memory_bytes=8 * size * 8, max_products=3000)
    assert unrestarted.products > 8  # the budget of 8 vectors really forces restarts
    assert restarted.value == pytest.approx(1.0, abs=1e-10)
    # Restarted Lanczos converges more slowly, but within a bounded factor of the full run.
    assert restarted.products <= 30 * unrestarted.products


# ----------------------------------------------------------------------------- item 4: scale
@settings(max_examples=25)
@given(factors=factor_arrays(max_n=6, max_d=3, max_rank=2), exponent=st.integers(-300, 300),
       sampling=st.sampled_from(SCHEMES))
def test_answers_are_scale_covariant_from_1e_minus_300_to_1e300(factors, exponent, sampling):
    c = 10.0 ** exponent
    family = HessianFamily(factors)
    scaled = HessianFamily(factors * math.sqrt(c))  # H_i -> c H_i
    n = family.n
    batch = 1.0 if sampling != "bernoulli" else 1.5
    eta = fs.critical_lr(family, batch, sampling=sampling)
    assert fs.critical_lr(scaled, batch, sampling=sampling) * c == pytest.approx(eta, rel=1e-12)
    assert scaled.sharpness() / c == pytest.approx(family.sharpness(), rel=1e-12)
    for factor in (0.3, 0.9, 2.5):
        lr = factor * eta
        rho = fs.spectral_radius(family, lr, batch, sampling=sampling)
        assert fs.spectral_radius(scaled, lr / c, batch, sampling=sampling) == pytest.approx(rho, rel=1e-12)
        b = fs.critical_batch_size(family, lr, sampling=sampling)
        b_scaled = fs.critical_batch_size(scaled, lr / c, sampling=sampling)
        assert b_scaled == pytest.approx(b, rel=1e-12) or (math.isinf(b) and math.isinf(b_scaled))
    trajectory = fs.second_moment(family, 0.9 * eta, batch, 20, sampling=sampling).log_mean_sq
    trajectory_scaled = fs.second_moment(scaled, 0.9 * eta / c, batch, 20, sampling=sampling).log_mean_sq
    np.testing.assert_allclose(trajectory_scaled, trajectory, rtol=0, atol=1e-10)
    assert n == scaled.n


@pytest.mark.parametrize("exponent", [-300, -250, -150, 150, 250, 300])
def test_from_dense_at_extreme_scales(exponent):
    family = random_family(5, max_n=8, max_d=4)
    c = 10.0 ** exponent
    scaled = HessianFamily.from_dense(family.dense() * c)
    assert fs.critical_lr(scaled, 2.0) * c == pytest.approx(fs.critical_lr(family, 2.0), rel=1e-10)


def test_factors_near_the_float_limit_keep_their_meaning():
    # Factors of 1e160: H = 2e320 is beyond the float range, so the sharpness is inf; the
    # critical lr (about 5e-321, subnormal) is not "every lr is stable" (inf) as it once was.
    big = HessianFamily.from_features(np.full((4, 2), 1e160))
    unit = HessianFamily.from_features(np.full((4, 2), 1.0))
    assert big.sharpness() == math.inf
    eta = fs.critical_lr(big, 2)
    assert 0 < eta < 1e-300
    assert eta == pytest.approx(fs.critical_lr(unit, 2) * 1e-320, rel=1e-2)  # subnormal precision
    lr = 0.5 * fs.critical_lr(unit, 2)
    assert fs.spectral_radius(big, lr * 1e-320, 2) == pytest.approx(
        fs.spectral_radius(unit, lr, 2), rel=1e-2)


@pytest.mark.parametrize("lr_unit", [1e9, 1e40, 1e80, 1e150])
def test_spectral_radius_for_huge_learning_rates(lr_unit):
    # rho(Q) / lr^2 tends to lambda_max(a H(x)H + b N) as lr grows: every huge lr gives the same
    # limit, computed in logs when (lr lambda_1)^2 would overflow.
    family = random_family(31, max_n=10, max_d=4)
    lr = lr_unit / family.sharpness()
    limit = fs.spectral_radius(family, 1e8 / family.sharpness(), 2) / (1e8 / family.sharpness()) ** 2
    rho = fs.spectral_radius(family, lr, 2)
    expected_log = math.log(limit) + 2 * math.log(lr)
    if expected_log < 709:
        assert rho == pytest.approx(limit * lr * lr, rel=1e-7)
    else:
        assert rho == math.inf  # the true radius exceeds the float range


def test_second_moment_for_huge_learning_rates_stays_finite_and_correct():
    family = random_family(32, max_n=10, max_d=4)
    small = fs.second_moment(family, 1e20, 2, 5).log_mean_sq
    huge = fs.second_moment(family, 1e160, 2, 5).log_mean_sq
    assert np.all(np.isfinite(huge)) and np.all(np.diff(huge) > 0)
    # log E||w_t||^2 grows by 2 log lr + log(limit radius) per step up to O(1/lr) terms.
    shift = 2 * math.log(1e160 / 1e20) * np.arange(6)
    np.testing.assert_allclose(huge - shift, small, rtol=0, atol=1e-9)


@pytest.mark.parametrize("norm", [1e-300, 1e-150, 1e150, 1e200, 1e300])
def test_second_moment_initial_states_of_any_norm(norm):
    family = random_family(33, max_n=10, max_d=5)
    rng = np.random.default_rng(1)
    w = rng.standard_normal(family.d)
    lr = 0.5 * fs.critical_lr(family, 3.0)
    plain = fs.second_moment(family, lr, 3.0, 10, init=w).log_mean_sq
    scaled = fs.second_moment(family, lr, 3.0, 10, init=w * norm).log_mean_sq
    np.testing.assert_allclose(scaled - 2 * math.log(norm), plain, rtol=0, atol=1e-10)
    sigma = np.outer(w, w) + np.eye(family.d)
    plain = fs.second_moment(family, lr, 3.0, 10, init=sigma).log_mean_sq
    scaled = fs.second_moment(family, lr, 3.0, 10, init=sigma * norm).log_mean_sq
    np.testing.assert_allclose(scaled - math.log(norm), plain, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- item 5: round trips
@pytest.mark.parametrize("seed", range(40, 49))
@pytest.mark.parametrize("sampling", SCHEMES)
def test_round_trips_between_critical_lr_and_critical_batch_size(seed, sampling):
    family = random_family(seed, max_n=14, max_d=5)
    n = family.n
    for batch in sorted({1, max(1, n // 2), n}):
        lr = fs.critical_lr(family, batch, sampling=sampling)
        # critical_lr is on the stable side of the boundary: rho <= 1 there, exactly.
        assert fs.spectral_radius(family, lr, batch, sampling=sampling) <= 1.0
        back = fs.critical_batch_size(family, lr, sampling=sampling)
        assert back <= batch  # batch is stable at lr, so the smallest stable batch is not larger
    lr = 0.7 * fs.critical_lr(family, n, sampling=sampling)
    batch = fs.critical_batch_size(family, lr, sampling=sampling)
    if math.isfinite(batch) and batch > 1.0 and sampling == "bernoulli":
        # critical_batch_size is accurate to ~1e-12 (it carries no margin of its own).
        assert fs.spectral_radius(family, lr, batch * (1 + 1e-9), sampling=sampling) <= 1.0
        assert fs.spectral_radius(family, lr, batch * (1 - 1e-6), sampling=sampling) > 1.0
        assert fs.critical_lr(family, batch, sampling=sampling) == pytest.approx(lr, rel=1e-10)


# ----------------------------------------------------------------------------- item 6: Ctrl-C
def test_a_long_second_moment_stops_on_ctrl_c():
    family = random_family(50, max_n=20, max_d=8)
    previous = signal.getsignal(signal.SIGINT)
    # A background job may run with SIGINT ignored: install Python's handler for this test.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    started = time.perf_counter()
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            fs.second_moment(family, 0.1, 2.0, 100_000_000)  # minutes of work if not stopped
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - started < 10.0


def test_a_stalled_lanczos_run_still_gives_a_proven_bracket(monkeypatch):
    # Clustered eigenvalues near 1 (directions of tiny curvature) once made Lanczos exhaust its
    # budget and raise ConvergenceError out of spectral_radius. Force the stall with a budget of
    # 5 products: the answer must still be a true bracket (with a warning if it is wide).
    import fastsgdstab._linalg as linalg

    monkeypatch.setattr(linalg, "LANCZOS_MAX_PRODUCTS", 5)
    monkeypatch.setattr(linalg, "DENSE_DIMENSION", 0)
    rng = np.random.default_rng(12)
    family = HessianFamily.from_features(rng.standard_normal((30, 5)) * np.logspace(0, -3, 5))
    lr = 0.05 * fs.critical_lr(family, 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.CertificationWarning)
        bracket = fs.spectral_radius(family, lr, 3.0, bounds=True)
    exact = ref.spectral_radius(family.dense(), lr, 3.0, "bernoulli")
    assert contains(bracket.lower, bracket.upper, exact)


def test_small_clustered_operators_are_solved_densely():
    # Ill-conditioned H and a small lr: eigenvalues of Q within about 1e-9 of each other near 1.
    rng = np.random.default_rng(13)
    family = HessianFamily.from_features(rng.standard_normal((40, 6)) * np.logspace(0, -4, 6))
    lr = 0.05 * fs.critical_lr(family, 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.CertificationWarning)
        bracket = fs.spectral_radius(family, lr, 4.0, bounds=True)
    exact = ref.spectral_radius(family.dense(), lr, 4.0, "bernoulli")
    assert contains(bracket.lower, bracket.upper, exact)
    assert bracket.value == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n, rank, k", [(7, 3, 5), (9, 1, 6), (600, 2, 7), (700, 1, 4), (520, 3, 5)])
def test_noise_product_every_middle_step_against_the_dense_sum(n, rank, k):
    """Issue 19: the noise product's middle step has three paths (r = 1 elementwise; up to
    NOISE_LOOP_SAMPLES samples a loop over scipy's BLAS; beyond, numpy's batched matmul): each
    against the plain sum (1/n) sum_i V_i (V_i^T Y V_i) V_i^T, for a non-symmetric Y too
    (N symmetrises C_i = sym(V_i^T Y V_i))."""
    from fastsgdstab._engine import NoiseProduct
    rng = np.random.default_rng(n * 100 + rank)
    rows = rng.standard_normal((n * rank, k)) * rng.uniform(0.1, 3, (n * rank, 1))
    for Y in (rng.standard_normal((k, k)), np.eye(k)):
        out = np.full((k, k), np.nan)
        NoiseProduct(rows, rank)(Y, out)
        expected = sum(V.T @ (0.5 * (V @ Y @ V.T + (V @ Y @ V.T).T)) @ V
                       for V in rows.reshape(n, rank, k)) / n
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
