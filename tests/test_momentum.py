"""Momentum in the exact engine (issue 11, items 1 and 5) against dense (2d)^2 references.

Every expected value comes from ``reference.py`` (the (2d)^2 x (2d)^2 operator E[A_B (x) A_B]
summed over every batch, or formed from E[H_B (x) H_B] for a real batch size of the schemes
that draw exactly B samples), from closed forms derived by hand here, or from the library at
another scale or rotation: never from numbers copied out of the code under test.
"""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsgdstab as fs
from fastsgdstab import HessianFamily
from fastsgdstab.moments import critical_batch_size, critical_lr, second_moment, spectral_radius

import reference as ref
from strategies import batch_size_for, factor_arrays, random_rotation

SCHEMES = ("bernoulli", "without_replacement", "with_replacement")
VARIANTS = [(0.5, False), (0.9, False), (0.5, True), (0.9, True)]
# The engine's answers are Ritz values with residual <= 1e-11 relative (MOMENTUM_RTOL) and roots
# found to about 1e-10; the dense references are exact up to their own eigensolve (~1e-13).
RTOL = 1e-8


def random_family(seed, n=5, d=3, r=1):
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n, d, r)) * rng.uniform(0.3, 2.0, size=(n, 1, 1))
    return HessianFamily(factors)


def contains(bracket, value, slack=1e-12):
    return bracket.lower - slack * abs(value) <= value <= bracket.upper + slack * abs(value)


def strict():
    """Warnings as errors: an uncertified answer must not pass silently."""
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    warnings.simplefilter("error", fs.CertificationWarning)
    return catcher


# ----------------------------------------------------------------------------- reference agreement
@pytest.mark.parametrize("sampling", SCHEMES)
@pytest.mark.parametrize("momentum, nesterov", VARIANTS)
def test_spectral_radius_matches_dense_reference(sampling, momentum, nesterov):
    family = random_family(3)
    hessians = family.dense()
    lam = family.sharpness()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.CertificationWarning)
        for unit_lr in (0.05, 0.4, 1.5):
            lr = unit_lr / lam
            exact = ref.momentum_spectral_radius(hessians, lr, 2, sampling, momentum, nesterov)
            bracket = spectral_radius(family, lr, 2, sampling=sampling, momentum=momentum,
                                      nesterov=nesterov, bounds=True)
            assert bracket.value == pytest.approx(exact, rel=RTOL)
            assert contains(bracket, exact)


@pytest.mark.parametrize("sampling", SCHEMES)
@pytest.mark.parametrize("momentum, nesterov", VARIANTS)
def test_critical_lr_matches_dense_bisection(sampling, momentum, nesterov):
    family = random_family(4, n=4, d=3, r=2)
    hessians = family.dense()
    expected = ref.momentum_critical_lr(hessians, 2, sampling, momentum, nesterov)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.CertificationWarning)
        bracket = critical_lr(family, 2, sampling=sampling, momentum=momentum, nesterov=nesterov,
                              bounds=True)
    assert bracket.value == pytest.approx(expected, rel=1e-9)
    assert bracket.lower <= bracket.value <= bracket.upper
    # The bracket is proven: stable at its lower end, unstable at its upper end (dense check).
    below = ref.momentum_spectral_radius(hessians, bracket.lower, 2, sampling, momentum, nesterov)
    above = ref.momentum_spectral_radius(hessians, bracket.upper, 2, sampling, momentum, nesterov)
    assert below <= 1 + 1e-12 and above >= 1 - 1e-12


@pytest.mark.parametrize("sampling", SCHEMES)
@pytest.mark.parametrize("momentum, nesterov", [(0.5, False), (0.9, True)])
def test_critical_batch_size_matches_reference_on_both_sides(sampling, momentum, nesterov):
    family = random_family(5, n=6, d=3)
    hessians = family.dense()
    # Between the critical lrs of B = 1 and B = n: the threshold lies strictly inside [1, n].
    lr = 0.5 * sum(critical_lr(family, b, sampling=sampling, momentum=momentum, nesterov=nesterov)
                   for b in (1, family.n))
    bracket = critical_batch_size(family, lr, sampling=sampling, momentum=momentum,
                                  nesterov=nesterov, bounds=True)
    threshold = bracket.value
    assert 1 < threshold < family.n
    enumerate_batches = sampling == "bernoulli"  # a real B: the formula reference otherwise
    radius = lambda b: ref.momentum_spectral_radius(hessians, lr, b, sampling, momentum, nesterov,
                                                    enumerate_batches)
    assert radius(threshold * (1 - 1e-6)) > 1.0
    assert radius(threshold * (1 + 1e-6)) < 1.0
    integer = critical_batch_size(family, lr, sampling=sampling, momentum=momentum,
                                  nesterov=nesterov)
    if sampling != "bernoulli":
        # The integer answer against the enumerated reference: stable there, unstable one below.
        assert ref.momentum_spectral_radius(hessians, lr, integer, sampling, momentum, nesterov) < 1
        if integer > 1:
            assert ref.momentum_spectral_radius(hessians, lr, integer - 1, sampling, momentum,
                                                nesterov) > 1


@pytest.mark.parametrize("sampling", SCHEMES)
@pytest.mark.parametrize("momentum, nesterov", VARIANTS)
def test_trajectory_matches_dense_reference(sampling, momentum, nesterov):
    family = random_family(6, n=4, d=3)
    hessians = family.dense()
    lr = 0.8 / family.sharpness()
    result = second_moment(family, lr, 2, 25, sampling=sampling, momentum=momentum,
                           nesterov=nesterov)
    expected = ref.momentum_log_mean_sq(hessians, lr, 2, sampling, momentum, nesterov, 25)
    np.testing.assert_allclose(result.log_mean_sq, expected, rtol=0, atol=1e-10)
    assert result.momentum == momentum and result.nesterov == nesterov


@pytest.mark.parametrize("sampling, momentum, nesterov",
                         [("bernoulli", 0.5, False), ("with_replacement", 0.9, True)])
def test_trajectory_growth_tends_to_the_spectral_radius(sampling, momentum, nesterov):
    family = random_family(6, n=4, d=3)
    lr = 0.8 / family.sharpness()
    long = second_moment(family, lr, 2, 3000, sampling=sampling, momentum=momentum,
                         nesterov=nesterov)
    assert long.growth_rate == pytest.approx(
        spectral_radius(family, lr, 2, sampling=sampling, momentum=momentum, nesterov=nesterov),
        rel=1e-6)


def test_trajectory_from_vector_and_matrix_and_null_space():
    # d = 3 with a common null direction (e_3): it never moves and adds ||w_0 . e_3||^2.
    features = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 2.0, 0.0]])
    family = HessianFamily.from_features(features)
    hessians = family.dense()
    w0 = np.array([0.3, -1.0, 2.0])
    for momentum, nesterov in VARIANTS:
        result = second_moment(family, 0.4, 2, 15, momentum=momentum, nesterov=nesterov, init=w0)
        expected = ref.momentum_log_mean_sq(hessians, 0.4, 2, "bernoulli", momentum, nesterov, 15,
                                            w0=w0)
        np.testing.assert_allclose(result.log_mean_sq, expected, atol=1e-10)
        sigma0 = np.array([[1.0, 0.2, 0.0], [0.2, 2.0, 0.1], [0.0, 0.1, 0.5]])
        result = second_moment(family, 0.4, 2, 15, momentum=momentum, nesterov=nesterov,
                               init=sigma0)
        expected = ref.momentum_log_mean_sq(hessians, 0.4, 2, "bernoulli", momentum, nesterov, 15,
                                            sigma0=sigma0)
        np.testing.assert_allclose(result.log_mean_sq, expected, atol=1e-10)


def test_first_step_has_no_momentum():
    # torch: the first step is plain SGD (w_{-1} = w_0, v_{-1} = 0), for both variants;
    # Nesterov's first step is lr (1 + mu) H_B w_0 (buf = g_0, g + mu buf).
    family = HessianFamily.from_features([[1.0], [1.0]])
    for momentum in (0.5, 0.9):
        heavy = second_moment(family, 0.25, 2, 1, momentum=momentum).mean_sq
        assert heavy[1] == pytest.approx((1 - 0.25) ** 2, rel=1e-14)
        nesterov = second_moment(family, 0.25, 2, 1, momentum=momentum, nesterov=True).mean_sq
        assert nesterov[1] == pytest.approx((1 - 0.25 * (1 + momentum)) ** 2, rel=1e-14)


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("momentum, nesterov", VARIANTS)
def test_identical_samples_give_the_deterministic_caps(momentum, nesterov):
    # All H_i equal: no noise beyond Bernoulli's random batch size, so without and with
    # replacement the only limit is the 2 x 2 matrix of the top eigenvalue.
    g = np.diag([3.0, 1.0])
    family = HessianFamily.from_dense(np.repeat(g[None], 5, axis=0))
    cap = 2 * (1 + momentum) / ((1 + 2 * momentum) if nesterov else 1)
    for sampling in ("without_replacement", "with_replacement"):
        bracket = critical_lr(family, 2, sampling=sampling, momentum=momentum, nesterov=nesterov,
                              bounds=True)
        assert bracket.value == pytest.approx(cap / 3.0, rel=1e-9)
        assert bracket.lower <= cap / 3.0 <= bracket.upper
        # every batch size is stable below the cap, none above it
        assert critical_batch_size(family, 0.99 * cap / 3.0, sampling=sampling,
                                   momentum=momentum, nesterov=nesterov) == 1
        assert critical_batch_size(family, 1.01 * cap / 3.0, sampling=sampling,
                                   momentum=momentum, nesterov=nesterov) == math.inf
    # Bernoulli: its random batch size adds noise, so it is strictly less stable than the cap.
    assert critical_lr(family, 2, momentum=momentum, nesterov=nesterov) < cap / 3.0


@pytest.mark.parametrize("momentum, nesterov", VARIANTS)
def test_no_noise_radius_is_the_deterministic_radius(momentum, nesterov):
    # B = n without replacement: gradient descent with momentum; rho = max_j |eig(M_j)|^2 of
    # the 2 x 2 matrices, computed here from numpy's eigenvalues of the matrices themselves.
    family = random_family(8)
    lam = np.linalg.eigvalsh(family.dense().mean(axis=0))
    lr = 0.7 / lam[-1]
    radii = []
    for value in lam[lam > 1e-12]:
        if nesterov:
            M = np.array([[1 - lr * (1 + momentum) * value, -lr * momentum**2], [value, momentum]])
        else:
            M = np.array([[1 + momentum - lr * value, -momentum], [1.0, 0.0]])
        radii.append(np.max(np.abs(np.linalg.eigvals(M))) ** 2)
    assert spectral_radius(family, lr, family.n, sampling="without_replacement", momentum=momentum,
                           nesterov=nesterov) == pytest.approx(max(radii), rel=1e-12)


# ----------------------------------------------------------------------------- mu = 0 is plain SGD
@pytest.mark.parametrize("sampling", SCHEMES)
def test_zero_momentum_is_plain_sgd_bit_for_bit(sampling):
    family = random_family(9, n=7, d=4, r=2)
    batch = batch_size_for(sampling, family.n, 0.4)
    lr = 0.6 / family.sharpness()
    assert spectral_radius(family, lr, batch, sampling=sampling, momentum=0.0) == \
        spectral_radius(family, lr, batch, sampling=sampling)
    assert critical_lr(family, batch, sampling=sampling, momentum=0) == \
        critical_lr(family, batch, sampling=sampling)
    assert critical_batch_size(family, lr, sampling=sampling, momentum=0.0, bounds=True) == \
        critical_batch_size(family, lr, sampling=sampling, bounds=True)
    np.testing.assert_array_equal(
        second_moment(family, lr, batch, 30, sampling=sampling, momentum=0.0).log_mean_sq,
        second_moment(family, lr, batch, 30, sampling=sampling).log_mean_sq)


def test_small_momentum_tends_to_plain_sgd():
    family = random_family(10)
    plain = critical_lr(family, 2)
    assert critical_lr(family, 2, momentum=1e-7) == pytest.approx(plain, rel=1e-5)


# ----------------------------------------------------------------------------- properties
@given(factors=factor_arrays(max_n=5, max_d=3, max_rank=2),
       momentum=st.sampled_from([0.3, 0.6, 0.9, 0.99]), nesterov=st.booleans(),
       sampling=st.sampled_from(SCHEMES), fraction=st.floats(0.0, 0.6))
@settings(max_examples=12)
def test_radius_is_one_at_the_critical_lr(factors, momentum, nesterov, sampling, fraction):
    family = HessianFamily(factors)
    batch = batch_size_for(sampling, family.n, fraction)
    bracket = critical_lr(family, batch, sampling=sampling, momentum=momentum, nesterov=nesterov,
                          bounds=True)
    hessians = family.dense()
    enumerate_batches = True
    below = ref.momentum_spectral_radius(hessians, bracket.lower, batch, sampling, momentum,
                                         nesterov, enumerate_batches)
    above = ref.momentum_spectral_radius(hessians, bracket.upper, batch, sampling, momentum,
                                         nesterov, enumerate_batches)
    assert below <= 1 + 1e-9
    assert above >= 1 - 1e-9
    assert spectral_radius(family, bracket.value, batch, sampling=sampling, momentum=momentum,
                           nesterov=nesterov) == pytest.approx(1.0, abs=1e-7)


@given(factors=factor_arrays(max_n=6, max_d=3, max_rank=2), nesterov=st.booleans(),
       scale_exponent=st.sampled_from([-200, -40, 0, 40, 200]))
@settings(max_examples=8)
def test_scaling_and_rotation_invariance(factors, nesterov, scale_exponent):
    rng = np.random.default_rng(0)
    family = HessianFamily(factors)
    d = factors.shape[1]
    rotation = random_rotation(rng, d)
    c = 10.0 ** scale_exponent
    scaled = HessianFamily(np.einsum("de,ner->ndr", rotation, factors) * math.sqrt(c))
    base = critical_lr(family, 2, sampling="with_replacement", momentum=0.7, nesterov=nesterov)
    assert critical_lr(scaled, 2, sampling="with_replacement", momentum=0.7,
                       nesterov=nesterov) * c == pytest.approx(base, rel=1e-9)
    lr = 0.5 * base
    radius = spectral_radius(family, lr, 2, sampling="with_replacement", momentum=0.7,
                             nesterov=nesterov)
    assert spectral_radius(scaled, lr / c, 2, sampling="with_replacement", momentum=0.7,
                           nesterov=nesterov) == pytest.approx(radius, rel=1e-9)


@pytest.mark.parametrize("exponent", [-200, -100, 100, 200])
def test_hostile_scales(exponent):
    base = random_family(12, n=6, d=3)
    c = 10.0 ** exponent
    family = HessianFamily(np.asarray(base.factors) * math.sqrt(c))
    for momentum, nesterov in [(0.9, False), (0.9, True)]:
        eta = critical_lr(base, 3, momentum=momentum, nesterov=nesterov)
        assert critical_lr(family, 3, momentum=momentum, nesterov=nesterov) * c == \
            pytest.approx(eta, rel=1e-9)
        assert critical_batch_size(family, 0.5 * eta / c, momentum=momentum, nesterov=nesterov) \
            == pytest.approx(critical_batch_size(base, 0.5 * eta, momentum=momentum,
                                                 nesterov=nesterov), rel=1e-8)
        log_sq = second_moment(family, 0.5 * eta / c, 3, 20, momentum=momentum,
                               nesterov=nesterov).log_mean_sq
        np.testing.assert_allclose(log_sq, second_moment(base, 0.5 * eta, 3, 20, momentum=momentum,
                                                         nesterov=nesterov).log_mean_sq, atol=1e-9)


def test_huge_learning_rate_does_not_overflow():
    family = random_family(13)
    for lr in (1e10, 1e100):
        radius = spectral_radius(family, lr / family.sharpness(), 2, momentum=0.9)
        assert math.isfinite(radius) and radius > 1
        result = second_moment(family, lr / family.sharpness(), 2, 5, momentum=0.9)
        assert np.all(np.isfinite(result.log_mean_sq[1:]))


@given(factors=factor_arrays(max_n=6, max_d=3, max_rank=1), momentum=st.sampled_from([0.5, 0.9]),
       nesterov=st.booleans(), sampling=st.sampled_from(SCHEMES))
@settings(max_examples=8)
def test_critical_batch_size_consistent_with_spectral_radius(factors, momentum, nesterov,
                                                               sampling):
    family = HessianFamily(factors)
    lr = 0.6 * critical_lr(family, 1, sampling=sampling, momentum=momentum, nesterov=nesterov)
    bracket = critical_batch_size(family, lr, sampling=sampling, momentum=momentum,
                                  nesterov=nesterov, bounds=True)
    threshold = bracket.value
    if threshold <= 1.0 or not math.isfinite(threshold):
        return
    integer = sampling != "bernoulli"
    above = math.ceil(threshold * (1 + 1e-6)) if integer else min(family.n, threshold * (1 + 1e-6))
    below = math.floor(threshold * (1 - 1e-6)) if integer else threshold * (1 - 1e-6)
    if above <= family.n:
        assert spectral_radius(family, lr, above, sampling=sampling, momentum=momentum,
                               nesterov=nesterov) <= 1 + 1e-9
    if below >= 1:
        assert spectral_radius(family, lr, below, sampling=sampling, momentum=momentum,
                               nesterov=nesterov) >= 1 - 1e-9


# ----------------------------------------------------------------------------- arguments
def test_momentum_arguments_are_checked():
    family = random_family(14)
    for bad in (-0.1, 1.0, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="momentum"):
            critical_lr(family, 2, momentum=bad)
    for bad in ("0.9", None, True, [0.9]):
        with pytest.raises(TypeError, match="momentum"):
            spectral_radius(family, 0.1, 2, momentum=bad)
    with pytest.raises(TypeError, match="nesterov"):
        second_moment(family, 0.1, 2, 3, momentum=0.9, nesterov="yes")
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        critical_batch_size(family, 0.1, momentum=0.0, nesterov=True)


# ----------------------------------------------------------------------------- map and report
@pytest.mark.parametrize("sampling", [
    "bernoulli",
    pytest.param("without_replacement", marks=pytest.mark.slow),
    pytest.param("with_replacement", marks=pytest.mark.slow)])
def test_stability_map_with_momentum_matches_reference(sampling):
    from fastsgdstab.phase import stability_map
    family = random_family(15, n=5, d=3)
    hessians = family.dense()
    lam = family.sharpness()
    lrs = np.array([0.05, 0.5, 2.5]) / lam
    batch_sizes = [1.0, 3.0]
    result = stability_map(family, lrs, batch_sizes, sampling=sampling, momentum=0.8,
                           nesterov=sampling == "with_replacement")
    nesterov = sampling == "with_replacement"
    assert result.momentum == 0.8 and result.nesterov == nesterov
    for i, b in enumerate(batch_sizes):
        assert result.critical_lr[i] == pytest.approx(
            ref.momentum_critical_lr(hessians, b, sampling, 0.8, nesterov), rel=1e-9)
        for j, lr in enumerate(lrs):
            exact = ref.momentum_spectral_radius(hessians, lr, b, sampling, 0.8, nesterov)
            assert result.spectral_radius[i, j] == pytest.approx(exact, rel=RTOL)
            assert result.radius_lower[i, j] <= exact * (1 + 1e-12)
            assert result.radius_upper[i, j] >= exact * (1 - 1e-12)
    assert "momentum 0.8" in str(result)


def test_report_with_momentum():
    from fastsgdstab.reporting import report
    family = random_family(16, n=5, d=3)
    lr = 0.3 / family.sharpness()
    result = report(family, lr, 2, momentum=0.9, nesterov=True)
    hessians = family.dense()
    assert result.spectral_radius == pytest.approx(
        ref.momentum_spectral_radius(hessians, lr, 2, "bernoulli", 0.9, True), rel=RTOL)
    assert result.critical_lr == pytest.approx(
        ref.momentum_critical_lr(hessians, 2, "bernoulli", 0.9, True), rel=1e-9)
    assert result.theorem1 is None and result.lemma1 is None and result.rayleigh is None
    text = str(result)
    assert "momentum=0.9, nesterov" in text and "plain SGD only" in text
    plain = report(family, lr, 2)
    assert plain.momentum == 0.0 and plain.rayleigh is not None
