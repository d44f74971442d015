"""The exact engine against dense Kronecker references, batch enumeration and closed forms."""

import math

import numpy as np
import pytest
from hypothesis import given, assume
from hypothesis import strategies as st

import fastsgdstab as fs
from fastsgdstab import HessianFamily

import reference as ref
from strategies import batch_size_for, factor_arrays, random_rotation

SCHEMES = fs.SAMPLING_SCHEMES
RTOL = 1e-8  # the accuracy target against the dense reference


def theorem2_hessians(n, sigma, sharpness):
    """THEORY.md section 6: sigma copies of m e_1 e_1^T, then m e_j e_j^T, m = n lam / sigma."""
    d = n - sigma + 1
    m = n * sharpness / sigma
    features = np.zeros((n, d))
    features[:sigma, 0] = math.sqrt(m)
    for i in range(sigma, n):
        features[i, i - sigma + 1] = math.sqrt(m)
    return features


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("n, batch", [(4, 1), (4, 2), (7, 3), (10, 10)])
def test_identical_samples_closed_form(n, batch):
    g = np.diag([3.0, 1.0, 0.5])
    family = HessianFamily.from_dense(np.repeat(g[None], n, axis=0))
    assert fs.critical_lr(family, batch) == pytest.approx(2 / (3.0 * (1 + 1 / batch - 1 / n)), rel=1e-12)
    for scheme in ("without_replacement", "with_replacement"):
        assert fs.critical_lr(family, batch, sampling=scheme) == pytest.approx(2 / 3.0, rel=1e-12)


@pytest.mark.parametrize("n, sigma, batch", [(10, 1, 1), (10, 3, 2), (12, 6, 5), (20, 20, 4), (30, 7, 29)])
def test_theorem2_family_closed_form(n, sigma, batch):
    sharpness = 2.0
    family = HessianFamily.from_features(theorem2_hessians(n, sigma, sharpness))
    assert family.sharpness() == pytest.approx(sharpness, rel=1e-12)
    expected = 2 * sigma / (sharpness * (sigma + n / batch - 1))
    eta = fs.critical_lr(family, batch)
    assert eta == pytest.approx(expected, rel=1e-10)
    assert fs.spectral_radius(family, eta, batch) == pytest.approx(1.0, abs=1e-10)
    # Stability iff eta lam (1 + (n/B - 1)/sigma) <= 2: the batch size at eta is B itself.
    if batch > 1:
        assert fs.critical_batch_size(family, eta) == pytest.approx(batch, rel=1e-8)


def test_one_dimensional_closed_form_spectral_radius():
    # d = 1, H_i = h_i: Q is the scalar E[(1 - lr h_b)^2].
    h = np.array([1.0, 2.0, 4.0])
    family = HessianFamily.from_features(np.sqrt(h)[:, None])
    lr, batch = 0.3, 2
    for scheme in SCHEMES:
        mean, second = ref.kron_moments_enumerated(h[:, None, None], batch, scheme)
        expected = 1 - 2 * lr * mean[0, 0] + lr**2 * second[0, 0]
        assert fs.spectral_radius(family, lr, batch, sampling=scheme) == pytest.approx(expected, rel=1e-12)


def test_no_curvature():
    family = HessianFamily(np.zeros((3, 2, 1)))
    assert fs.critical_lr(family, 2) == math.inf
    assert fs.spectral_radius(family, 1.0, 2) == 1.0
    assert fs.critical_batch_size(family, 1.0) == 1.0
    np.testing.assert_allclose(fs.second_moment(family, 1.0, 2, 4).log_mean_sq, math.log(2))


# ----------------------------------------------------------------------------- references
@pytest.mark.parametrize("scheme", SCHEMES)
def test_formula_coefficients_match_batch_enumeration(scheme):
    """THEORY's (a, b) table equals the enumeration of every batch (checks the reference too)."""
    rng = np.random.default_rng(7)
    hessians = ref.dense_from_factors(rng.standard_normal((5, 3, 2)))
    for batch in (1, 2, 3, 5):
        m1, s1 = ref.kron_moments_enumerated(hessians, batch, scheme)
        m2, s2 = ref.kron_moments_formula(hessians, batch, scheme)
        np.testing.assert_allclose(m1, m2, atol=1e-12)
        np.testing.assert_allclose(s1, s2, atol=1e-11)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_against_enumeration_of_batches(scheme):
    rng = np.random.default_rng(11)
    factors = rng.standard_normal((5, 3, 1))
    family = HessianFamily(factors)
    hessians = family.dense()
    for batch in (1, 2, 4):
        eta = fs.critical_lr(family, batch, sampling=scheme)
        assert eta == pytest.approx(ref.critical_lr(hessians, batch, scheme, enumerate_batches=True), rel=RTOL)
        assert eta == pytest.approx(ref.critical_lr_bisection(hessians, batch, scheme), rel=1e-9)
        for lr in (0.5 * eta, eta, 1.3 * eta):
            assert fs.spectral_radius(family, lr, batch, sampling=scheme) == pytest.approx(
                ref.spectral_radius(hessians, lr, batch, scheme, enumerate_batches=True), rel=RTOL)


@given(factors=factor_arrays(), batch_fraction=st.floats(0, 1), scheme=st.sampled_from(SCHEMES),
       lr_fraction=st.floats(0.05, 1.5))
def test_critical_lr_and_spectral_radius_match_dense_reference(factors, batch_fraction, scheme, lr_fraction):
    family = HessianFamily(factors)
    batch = batch_size_for(scheme, family.n, batch_fraction)
    hessians = family.dense()
    eta = fs.critical_lr(family, batch, sampling=scheme)
    assert eta == pytest.approx(ref.critical_lr(hessians, batch, scheme), rel=RTOL)
    lr = lr_fraction * eta
    assert fs.spectral_radius(family, lr, batch, sampling=scheme) == pytest.approx(
        ref.spectral_radius(hessians, lr, batch, scheme), rel=RTOL)


@given(factors=factor_arrays(), batch_fraction=st.floats(0, 1), scheme=st.sampled_from(SCHEMES))
def test_spectral_radius_is_one_at_critical_lr(factors, batch_fraction, scheme):
    family = HessianFamily(factors)
    batch = batch_size_for(scheme, family.n, batch_fraction)
    eta = fs.critical_lr(family, batch, sampling=scheme)
    assert fs.spectral_radius(family, eta, batch, sampling=scheme) == pytest.approx(1.0, abs=1e-8)
    assert ref.spectral_radius(family.dense(), eta, batch, scheme) == pytest.approx(1.0, abs=1e-8)


@given(factors=factor_arrays(), scheme=st.sampled_from(SCHEMES), lr_fraction=st.floats(0.05, 1.2))
def test_critical_batch_size_consistent_with_spectral_radius(factors, scheme, lr_fraction):
    family = HessianFamily(factors)
    n = family.n
    lr = lr_fraction * 2 / family.sharpness()
    answer = fs.critical_batch_size(family, lr, sampling=scheme)
    batch = fs.critical_batch_size(family, lr, sampling=scheme, bounds=True).value  # real threshold
    rho = lambda b: ref.spectral_radius(family.dense(), lr, b, scheme)  # noqa: E731  (real B)
    if batch == math.inf:
        assert answer == math.inf
        assert lr_fraction >= 1 or rho(n) > 1
        return
    if scheme == "bernoulli":
        assert answer == batch
    else:  # the smallest stable integer
        assert isinstance(answer, int) and answer == max(1, math.ceil(batch - 1e-9 * batch))
        assert fs.spectral_radius(family, lr, answer, sampling=scheme) <= 1 + 1e-9
    assert 1 <= batch <= n
    assert rho(batch) <= 1 + 1e-9  # the critical batch size itself is stable
    assert rho(min(n, batch * (1 + 1e-6))) <= 1 + 1e-9
    if batch > 1:
        assert rho(max(1.0, batch * (1 - 1e-3))) > 1  # and anything clearly smaller is not
        if scheme == "bernoulli":
            assert fs.critical_lr(family, batch, sampling=scheme) == pytest.approx(lr, rel=1e-7)
        else:
            assert ref.critical_lr(family.dense(), batch, scheme) == pytest.approx(lr, rel=1e-7)


@given(factors=factor_arrays(), scheme=st.sampled_from(SCHEMES), fractions=st.lists(st.floats(0, 1), min_size=2, max_size=4))
def test_critical_lr_non_decreasing_in_batch_size(factors, scheme, fractions):
    family = HessianFamily(factors)
    batches = sorted(batch_size_for(scheme, family.n, f) for f in fractions)
    etas = [fs.critical_lr(family, b, sampling=scheme) for b in batches]
    for small, large in zip(etas, etas[1:]):
        assert small <= large * (1 + 1e-9)


@given(factors=factor_arrays(), scheme=st.sampled_from(SCHEMES), seed=st.integers(0, 2**32 - 1),
       scale=st.floats(1e-3, 1e3))
def test_invariances(factors, scheme, seed, scale):
    rng = np.random.default_rng(seed)
    family = HessianFamily(factors)
    n, d, r = factors.shape
    batch = batch_size_for(scheme, n, rng.random())
    eta = fs.critical_lr(family, batch, sampling=scheme)
    permuted = HessianFamily(factors[rng.permutation(n)])
    rotated = HessianFamily(np.einsum("de,ier->idr", random_rotation(rng, d), factors))
    mixed = HessianFamily(factors @ random_rotation(rng, r))  # same H_i, other factors
    scaled = HessianFamily(factors * math.sqrt(scale))
    for other in (permuted, rotated, mixed):
        assert fs.critical_lr(other, batch, sampling=scheme) == pytest.approx(eta, rel=1e-9)
    assert fs.critical_lr(scaled, batch, sampling=scheme) == pytest.approx(eta / scale, rel=1e-9)
    lr = 0.7 * eta
    rho = fs.spectral_radius(family, lr, batch, sampling=scheme)
    assert fs.spectral_radius(rotated, lr, batch, sampling=scheme) == pytest.approx(rho, rel=1e-9)
    assert fs.spectral_radius(scaled, lr / scale, batch, sampling=scheme) == pytest.approx(rho, rel=1e-9)


@given(factors=factor_arrays(max_n=4, max_d=3, max_rank=2), seed=st.integers(0, 2**32 - 1),
       scheme=st.sampled_from(SCHEMES), extra=st.integers(1, 12))
def test_over_parameterised_reduction_changes_no_answer(factors, seed, scheme, extra):
    """Embed the family in d + extra dimensions (so d > n r) by a random isometry."""
    rng = np.random.default_rng(seed)
    n, d, r = factors.shape
    big_d = max(d + extra, n * r + 1)
    isometry = random_rotation(rng, big_d)[:, :d]
    small, big = HessianFamily(factors), HessianFamily(np.einsum("Dd,idr->iDr", isometry, factors))
    assert big.d > big.n * big.rank
    batch = batch_size_for(scheme, n, rng.random())
    eta = fs.critical_lr(small, batch, sampling=scheme)
    assert fs.critical_lr(big, batch, sampling=scheme) == pytest.approx(eta, rel=1e-9)
    assert fs.spectral_radius(big, 0.9 * eta, batch, sampling=scheme) == pytest.approx(
        fs.spectral_radius(small, 0.9 * eta, batch, sampling=scheme), rel=1e-9)
    lr = 0.9 * 2 / small.sharpness()
    b1 = fs.critical_batch_size(small, lr, sampling=scheme)
    b2 = fs.critical_batch_size(big, lr, sampling=scheme)
    assert b1 == b2 or b1 == pytest.approx(b2, rel=1e-7)
    # Sigma_0 = I in d + extra dimensions: the extra directions add big_d - d, constant.
    t_small = fs.second_moment(small, lr, batch, 5, sampling=scheme).mean_sq
    t_big = fs.second_moment(big, lr, batch, 5, sampling=scheme).mean_sq
    np.testing.assert_allclose(t_big, t_small + (big_d - d), rtol=1e-9)
    # And the dense reference on the big family (d^2 x d^2 with d up to 13) agrees.
    if big_d <= 8:
        assert eta == pytest.approx(ref.critical_lr(big.dense(), batch, scheme), rel=RTOL)


# ----------------------------------------------------------------------------- trajectories
@given(factors=factor_arrays(max_d=3), batch_fraction=st.floats(0, 1), scheme=st.sampled_from(SCHEMES),
       lr_fraction=st.floats(0.1, 2.0), init_kind=st.sampled_from(["none", "vector", "matrix"]),
       seed=st.integers(0, 1000))
def test_second_moment_matches_dense_iteration(factors, batch_fraction, scheme, lr_fraction, init_kind, seed):
    family = HessianFamily(factors)
    d = family.d
    batch = batch_size_for(scheme, family.n, batch_fraction)
    lr = lr_fraction * fs.critical_lr(family, batch, sampling=scheme)
    rng = np.random.default_rng(seed)
    init, sigma0 = None, None
    if init_kind == "vector":
        init = rng.standard_normal(d)
        sigma0 = np.outer(init, init)
    elif init_kind == "matrix":
        a = rng.standard_normal((d, d))
        init = sigma0 = a @ a.T
    result = fs.second_moment(family, lr, batch, 12, sampling=scheme, init=init)
    expected = ref.log_mean_sq_trajectory(family.dense(), lr, batch, scheme, 12, sigma0)
    assume(np.all(np.isfinite(expected)))  # the dense iteration can hit exactly 0 (lr = 1/lam)
    np.testing.assert_allclose(result.log_mean_sq, expected, rtol=0, atol=1e-8)


def test_second_moment_never_overflows_and_tends_to_spectral_radius():
    rng = np.random.default_rng(5)
    family = HessianFamily(rng.standard_normal((8, 4, 1)))
    eta = fs.critical_lr(family, 2)
    result = fs.second_moment(family, 3 * eta, 2, 2000)
    assert np.all(np.isfinite(result.log_mean_sq))
    assert result.log_mean_sq[-1] > 1000  # grew by more than e^1000
    assert result.growth_rate == pytest.approx(fs.spectral_radius(family, 3 * eta, 2), rel=1e-9)
    shrinking = fs.second_moment(family, 0.5 * eta, 2, 5000)
    assert np.all(np.isfinite(shrinking.log_mean_sq)) and shrinking.log_mean_sq[-1] < -300


def test_second_moment_null_space_directions_do_not_move():
    # H_i all live in the first two of four coordinates.
    factors = np.zeros((3, 4, 1))
    factors[:, :2, 0] = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    family = HessianFamily(factors)
    w0 = np.array([0.0, 0.0, 3.0, 4.0])
    np.testing.assert_allclose(fs.second_moment(family, 0.5, 1, 6, init=w0).log_mean_sq, math.log(25.0))
    expected = ref.log_mean_sq_trajectory(family.dense(), 0.5, 1, "bernoulli", 6)
    np.testing.assert_allclose(fs.second_moment(family, 0.5, 1, 6).log_mean_sq, expected, atol=1e-10)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def small_family():
    return HessianFamily.from_features([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


@pytest.mark.parametrize("call, error, match", [
    (lambda f: fs.critical_lr(f, 0), ValueError, r"batch_size must lie in \[1, n\] = \[1, 3\]"),
    (lambda f: fs.critical_lr(f, 3.5), ValueError, "batch_size"),
    (lambda f: fs.critical_lr(f, float("nan")), ValueError, "batch_size must be finite"),
    (lambda f: fs.critical_lr(f, "2"), TypeError, "batch_size must be a real number"),
    (lambda f: fs.critical_lr(f, 2, sampling="uniform"), ValueError, "sampling must be one of 'bernoulli'"),
    (lambda f: fs.spectral_radius(f, 0.0, 2), ValueError, "lr must be > 0"),
    (lambda f: fs.spectral_radius(f, -1.0, 2), ValueError, "lr must be > 0"),
    (lambda f: fs.spectral_radius(f, float("inf"), 2), ValueError, "lr must be finite"),
    (lambda f: fs.critical_batch_size(f, 0.0), ValueError, "lr must be > 0"),
    (lambda f: fs.second_moment(f, 0.1, 2, -1), ValueError, "steps must be an integer >= 0"),
    (lambda f: fs.second_moment(f, 0.1, 2, 2.5), TypeError, "steps"),
    (lambda f: fs.second_moment(f, 0.1, 2, 3, init=np.ones(3)), ValueError, r"init must be .normal.*shape \(3,\)"),
    (lambda f: fs.second_moment(f, 0.1, 2, 3, init=np.zeros(2)), ValueError, "zero vector"),
    (lambda f: fs.second_moment(f, 0.1, 2, 3, init=[np.nan, 1.0]), ValueError, "init must be finite"),
    (lambda f: fs.second_moment(f, 0.1, 2, 3, init=np.diag([1.0, -1.0])), ValueError, "positive semi-definite"),
    (lambda f: fs.second_moment(f, 0.1, 2, 3, init=[[1.0, 1.0], [0.0, 1.0]]), ValueError, "symmetric"),
    (lambda f: fs.critical_lr(f.factors, 2), TypeError, "family must be a HessianFamily"),
])
def test_bad_arguments(small_family, call, error, match):
    with pytest.raises(error, match=match):
        call(small_family)


@pytest.mark.parametrize("seed", range(4))
def test_ill_conditioned_families_match_dense_reference(seed):
    """Feature scales spanning 5 decades: H's eigenvalues span about 1e-11, all kept."""
    rng = np.random.default_rng(seed)
    family = HessianFamily.from_features(rng.standard_normal((7, 4)) * np.logspace(0, -5, 4))
    assert family._reduced.k == 4
    for scheme in SCHEMES:
        assert fs.critical_lr(family, 2, sampling=scheme) == pytest.approx(
            ref.critical_lr(family.dense(), 2, scheme), rel=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_larger_families_against_enumeration_and_dense_reference(scheme):
    """n = 8, d = 5, rank 2, every batch enumerated (256 Bernoulli subsets, up to 8^3 ordered
    draws); and n = 40, d = 6 against the dense Kronecker reference."""
    rng = np.random.default_rng(99)
    family = HessianFamily(rng.standard_normal((8, 5, 2)))
    for batch in ((1, 2, 3) if scheme == "with_replacement" else (1, 3, 7)):
        assert fs.critical_lr(family, batch, sampling=scheme) == pytest.approx(
            ref.critical_lr(family.dense(), batch, scheme, enumerate_batches=True), rel=RTOL)
    family = HessianFamily(rng.standard_normal((40, 6, 1)) * rng.lognormal(0, 1, (40, 1, 1)))
    for batch in (1.0, 4.5, 17.0, 40.0):
        eta = fs.critical_lr(family, batch, sampling=scheme)
        assert eta == pytest.approx(ref.critical_lr(family.dense(), batch, scheme), rel=RTOL)
        assert fs.spectral_radius(family, 1.2 * eta, batch, sampling=scheme) == pytest.approx(
            ref.spectral_radius(family.dense(), 1.2 * eta, batch, scheme), rel=RTOL)


def test_init_vocabulary_is_shared_with_simulate():
    # "normal" and "uniform" mean what they mean in simulate: Sigma_0 = I, and
    # Sigma_0 = E[w w^T] for w ~ Uniform[0, 1)^d = 1 1^T / 4 + I / 12.
    family = HessianFamily.from_features(np.random.default_rng(3).standard_normal((7, 3)))
    d = family.d
    normal = fs.second_moment(family, 0.2, 2, 6, init="normal").log_mean_sq
    np.testing.assert_array_equal(normal, fs.second_moment(family, 0.2, 2, 6).log_mean_sq)
    np.testing.assert_allclose(normal, fs.second_moment(family, 0.2, 2, 6, init=np.eye(d)).log_mean_sq,
                               rtol=0, atol=1e-12)
    uniform = fs.second_moment(family, 0.2, 2, 6, init="uniform").log_mean_sq
    sigma0 = np.full((d, d), 0.25) + np.eye(d) / 12
    np.testing.assert_allclose(uniform, ref.log_mean_sq_trajectory(family.dense(), 0.2, 2, "bernoulli", 6, sigma0),
                               rtol=0, atol=1e-10)
    # The simulated E||w_0||^2 of simulate's "uniform" (d / 3) within 5 standard errors.
    runs = 20000
    sample = fs.simulate(family, 0.2, 2, 1, runs, init="uniform", progress=False)
    second = np.exp(sample.log_sq_norm[:, 0])
    assert abs(second.mean() - math.exp(uniform[0])) <= 5 * second.std() / math.sqrt(runs)
    with pytest.raises(ValueError, match="init must be 'normal'"):
        fs.second_moment(family, 0.2, 2, 6, init="gaussian")


@pytest.mark.slow
@pytest.mark.parametrize("n, rank, d", [(100, 10, 1500), (300, 5, 1000)])
def test_k_1000_families_are_certified_by_both_reduction_routes(n, rank, d):
    """Issue 19 item 1 at k = 1,000, both regimes (d > n r: the Gram route; n r > d: the
    covariance route): plain critical_lr is certified (no CertificationWarning, bracket within
    CERTIFY_RTOL, the reduction's proven backward error included), and the same family reduced
    by the other route (another eigendecomposition, other roundings, its own backward error)
    gives a proven bracket that overlaps it."""
    import warnings as warnings_module
    from fastsgdstab import family as family_module
    from fastsgdstab._config import CERTIFY_RTOL
    rng = np.random.default_rng(19)
    factors = rng.standard_normal((n, d, rank)) / np.sqrt(d)
    brackets = []
    for route in ("auto", "covariance" if d > n * rank else "gram"):
        family = HessianFamily(factors)
        family.__dict__["_reduced"] = family_module._reduce(family._columns(), n, rank, route)
        assert family._reduced.k == 1000
        with warnings_module.catch_warnings():
            warnings_module.simplefilter("error", fs.CertificationWarning)
            bracket = fs.critical_lr(family, 20, bounds=True)
        assert bracket.certified
        assert bracket.lower <= bracket.value <= bracket.upper
        assert bracket.upper - bracket.lower <= CERTIFY_RTOL * bracket.value
        brackets.append(bracket)
    assert max(b.lower for b in brackets) <= min(b.upper for b in brackets)
