"""Hostile checks of every certified momentum bracket against a high-precision reference.

Issue 17, items 2-5: random and degenerate families (identical and nearly identical samples,
decoupled blocks, curvatures spread over nine decades, momentum up to 1 - 1e-7, both
variants, all three schemes). Each bracket the library returns (``spectral_radius`` and
``critical_lr`` with ``bounds=True``, ``critical_batch_size`` with ``bounds=True``), certified or
not, must contain the truth: the spectral radius of the dense (2d)^2 operator of the
specification's section "Momentum", formed and solved in 50-digit mpmath arithmetic from the
float Hessians (``reference.momentum_spectral_radius_mp``). No slack is allowed: a bracket end
is a proof, not an estimate.
"""

import math
import warnings

import numpy as np
import pytest

import fastsgdstab as fs
from fastsgdstab import HessianFamily
from fastsgdstab.moments import critical_batch_size, critical_lr, second_moment, spectral_radius

import reference as ref

SCHEMES = ("bernoulli", "without_replacement", "with_replacement")


def _family(rng, kind):
    """A family whose H has full rank (the reference works on the whole space)."""
    if kind == "identical":
        n, d = int(rng.integers(2, 5)), 1
        eps = float(rng.choice([0.0, 1e-12, 1e-8, 1e-5, 1e-4]))
        features = np.ones((n, d)) * float(rng.uniform(0.5, 2.0))
        features[-1] *= 1.0 + eps
        return HessianFamily.from_features(features)
    if kind == "decoupled":  # samples on separate coordinates: singular Perron vectors
        d = 2
        n = int(rng.integers(2, 5))
        features = np.zeros((n, d))
        for i in range(n):
            features[i, i % d] = float(rng.uniform(0.3, 2.0))
        return HessianFamily.from_features(features)
    if kind == "spread":  # curvatures over many decades
        d = 2
        n = int(rng.integers(2, 5))
        features = rng.standard_normal((n, d)) * np.array([1.0, 10.0 ** -float(rng.uniform(2, 4.5))])
        return HessianFamily.from_features(features)
    n, d, r = int(rng.integers(2, 6)), int(rng.choice([1, 2, 2])), int(rng.choice([1, 1, 2]))
    factors = rng.standard_normal((n, d, r)) * rng.uniform(0.3, 2.0, size=(n, 1, 1))
    return HessianFamily(factors)


def _case(seed):
    rng = np.random.default_rng(seed)
    kind = ("random", "identical", "decoupled", "spread")[seed % 4]
    while True:
        family = _family(rng, kind)
        eigenvalues = np.linalg.eigvalsh(family.dense().mean(axis=0))
        if eigenvalues[0] > 1e-12 * eigenvalues[-1]:
            break
    momentum = float(rng.choice([0.3, 0.9, 0.99, 0.9999, 0.9999999]))
    nesterov = bool(rng.integers(2))
    sampling = SCHEMES[int(rng.integers(3))]
    n = family.n
    batch = int(rng.integers(1, n + 1)) if sampling != "bernoulli" else float(rng.uniform(1, n))
    cap = 2 * (1 + momentum) / ((1 + 2 * momentum) if nesterov else 1.0)
    unit_lr = cap * float(rng.choice([0.05, 0.5, 0.9, 0.999, rng.uniform(0.01, 1.0)]))
    return family, momentum, nesterov, sampling, batch, unit_lr / family.sharpness(), kind


def _radius(family, lr, batch, sampling, momentum, nesterov):
    return ref.momentum_spectral_radius_mp(family.dense(), lr, batch, sampling, momentum, nesterov)


def check_case(seed):
    family, momentum, nesterov, sampling, batch, lr, kind = _case(seed)
    where = (f"seed {seed} ({kind}), n={family.n}, mu={momentum}, nesterov={nesterov}, "
             f"{sampling}, B={batch}, lr={lr!r}")
    settings = dict(sampling=sampling, momentum=momentum, nesterov=nesterov)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.simplefilter("ignore", fs.CertificationWarning)
        radius = spectral_radius(family, lr, batch, bounds=True, **settings)
        truth = _radius(family, lr, batch, sampling, momentum, nesterov)
        # The reference is exact to about 1e-48 (50 digits): a radius that is exactly a float
        # (mu itself, without noise) may sit that far outside.
        slack = 1e-40 * abs(truth)
        assert radius.lower - slack <= truth <= radius.upper + slack, (where, radius, truth)
        eta = critical_lr(family, batch, bounds=True, **settings)
        assert eta.lower <= eta.value <= eta.upper, (where, eta)
        if eta.lower > 0:
            assert _radius(family, eta.lower, batch, sampling, momentum, nesterov) <= 1, (where, eta)
        cap = 2 * (1 + momentum) / ((1 + 2 * momentum) if nesterov else 1.0) / family.sharpness()
        if eta.upper < cap * (1 - 1e-12):
            assert _radius(family, eta.upper, batch, sampling, momentum, nesterov) >= 1, (where, eta)
        size = critical_batch_size(family, lr, bounds=True, **settings)
        if math.isfinite(size.upper) and size.upper <= family.n:
            assert _radius(family, lr, size.upper, sampling, momentum, nesterov) <= 1, (where, size)
        if size.lower > 1 and math.isfinite(size.lower):
            assert _radius(family, lr, size.lower, sampling, momentum, nesterov) >= 1, (where, size)
    return radius, eta, size


# 203: a noise-free setting at the deterministic cap, where the lr conversion's rounding and
# the sharpness's own error once put the proven-stable end 1.5e-15 past the cap.
@pytest.mark.parametrize("seed", [*range(24), 203])
def test_momentum_brackets_contain_the_high_precision_truth(seed):
    check_case(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [seed for seed in range(100, 700) if seed != 203])
def test_momentum_brackets_contain_the_high_precision_truth_thorough(seed):
    check_case(seed)


# ----------------------------------------------------------------------------- the issue's cases
def _strict_runtime():
    catcher = warnings.catch_warnings()
    catcher.__enter__()
    warnings.simplefilter("error", RuntimeWarning)
    warnings.simplefilter("ignore", fs.CertificationWarning)
    return catcher


@pytest.mark.parametrize("eps", [0.0, 1e-5, 1e-4])
@pytest.mark.parametrize("lr", [2.0, 3.0, 3.5, 3.9])
@pytest.mark.parametrize("momentum", [0.99, 0.9999, 0.9999999])
def test_nearly_identical_samples_do_not_crash_and_are_true(eps, lr, momentum):
    """Item 2 (LinAlgError in the gain) and item 3 (a false certificate): features
    [1, 1, 1 + eps], with replacement, B = 1. Identical samples give exactly mu."""
    family = HessianFamily.from_features([[1.0], [1.0], [1.0 + eps]])
    catcher = _strict_runtime()
    try:
        bracket = spectral_radius(family, lr, 1, sampling="with_replacement", momentum=momentum,
                                  bounds=True)
    finally:
        catcher.__exit__(None, None, None)
    truth = ref.momentum_spectral_radius_mp(family.dense(), lr, 1, "with_replacement", momentum,
                                            False, digits=60)
    slack = 1e-40 * abs(truth)
    assert bracket.lower - slack <= truth <= bracket.upper + slack, (bracket, truth)
    if eps == 0.0:
        assert bracket.lower <= momentum <= bracket.upper


def test_issue_false_certificate_case():
    family = HessianFamily.from_features([[1.0], [1.0], [1.0001]])
    bracket = spectral_radius(family, 3.5, 1, sampling="with_replacement", momentum=0.99,
                              bounds=True)
    truth = ref.momentum_spectral_radius_mp(family.dense(), 3.5, 1, "with_replacement", 0.99,
                                            False, digits=60)
    assert bracket.certified and bracket.lower <= truth <= bracket.upper
    assert float(truth) == pytest.approx(0.9900001284077, abs=1e-13)


def test_beyond_the_float_range():
    """Item 4: growth, not convergence, at lr 1.7e308; no LinAlgError; no RuntimeWarning."""
    family = HessianFamily.from_features([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    catcher = _strict_runtime()
    try:
        log = second_moment(family, 1.7e308, 2, 2, momentum=0.5).log_mean_sq
        assert np.all(np.isfinite(log)) and log[1] > log[0] + 1000 and log[2] > log[1] + 1000
        # the same growth per step as at 1e300, plus 2 log(1.7e308 / 1e300) exactly
        other = second_moment(family, 1e300, 2, 2, momentum=0.5).log_mean_sq
        np.testing.assert_allclose(np.diff(log) - np.diff(other),
                                   2 * math.log(1.7e308 / 1e300), rtol=1e-9)
        assert spectral_radius(family, 1.7e308, 2, momentum=0.5) == math.inf
        for lr in (1e-310, 1e-300, 1e-250, 1e-200, 1e-170, 1e-100):
            assert critical_batch_size(family, lr, momentum=0.9) == 1.0
            bracket = spectral_radius(family, lr, 1, momentum=0.9, bounds=True)
            assert bracket.lower <= 1.0 <= bracket.upper + 1e-15
    finally:
        catcher.__exit__(None, None, None)


@pytest.mark.parametrize("exponent", [-300, -100, 0, 100, 300])
def test_momentum_scale_covariance(exponent):
    base = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])[:, :, None]
    family = HessianFamily(base * math.sqrt(10.0 ** exponent))
    reference = critical_lr(HessianFamily(base), 1, momentum=0.9, sampling="with_replacement")
    value = critical_lr(family, 1, momentum=0.9, sampling="with_replacement")
    assert value * 10.0 ** exponent == pytest.approx(reference, rel=1e-12)


def test_critical_lr_errs_on_the_stable_side_and_is_accurate():
    """Item 5: curvatures over nine decades, mu = 0.99, Nesterov, with replacement, B = 1."""
    rng = np.random.default_rng(5)
    rotation, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    curvatures = np.array([0.69, 0.05, 1e-5, 1.8e-9])
    family = HessianFamily.from_features(rng.standard_normal((6, 4)) * np.sqrt(curvatures)
                                         @ rotation.T)
    settings = dict(sampling="with_replacement", momentum=0.99, nesterov=True)
    bracket = critical_lr(family, 1, bounds=True, **settings)
    assert bracket.certified and bracket.value == bracket.lower
    assert (bracket.upper - bracket.lower) <= 1e-9 * bracket.value
    below = ref.momentum_spectral_radius_mp(family.dense(), bracket.lower, 1, "with_replacement",
                                            0.99, True)
    above = ref.momentum_spectral_radius_mp(family.dense(), bracket.upper, 1, "with_replacement",
                                            0.99, True)
    assert below <= 1 < above
    assert spectral_radius(family, bracket.value, 1, bounds=True, **settings).upper <= 1.0


def test_proofs_use_the_whole_enclosure():
    """The Collatz-Wielandt tests must hold for every map inside the enclosure of T(X): with
    X = I and T(X) = I +- 0.1 entrywise, T(X) may be [[1.1, 0.1], [0.1, 1.1]] (top eigenvalue
    1.2) or [[0.9, -0.1], [-0.1, 0.9]] (bottom 0.8)."""
    from fastsgdstab._verified import lower_bound, upper_bound
    X, TX, radius = np.eye(2), np.eye(2), np.full((2, 2), 0.1)
    assert upper_bound(X, TX, radius) >= 1.2
    assert lower_bound(X, TX, radius) <= 0.8
    # With a congruence S that is far from diagonalising (signs of S^T X S and S^T T(X) S
    # off the diagonal opposite), the claims must still be exact: c X - T(X) PSD for the upper
    # bound, T(X) - c X PSD for the lower one (X = I: the eigenvalues of T(X), 0.6 and 1.4).
    S = np.array([[1.0, 0.3], [0.0, 1.0]])
    TX2 = np.array([[1.0, -0.4], [-0.4, 1.0]])
    assert lower_bound(X, TX2, np.zeros((2, 2)), S) <= 0.6
    assert upper_bound(X, TX2, np.zeros((2, 2)), S) >= 1.4
    assert upper_bound(X, TX, np.zeros((2, 2))) == pytest.approx(1.0, abs=1e-14)
    assert lower_bound(X, TX, np.zeros((2, 2))) == pytest.approx(1.0, abs=1e-14)


def test_singular_stein_system_is_not_a_crash():
    """A growth factor exactly at a product of eigenvalues (some BLAS kernels round onto it)."""
    from fastsgdstab._engine import MomentumDynamics
    from fastsgdstab._verified import stein_blocks
    dynamics = MomentumDynamics(np.array([1.0]), 3.5, 0.99, False)
    blocks = stein_blocks(dynamics, 0.99)  # |eigenvalue|^2 = mu exactly: singular system
    assert np.all(np.isfinite(blocks))


def test_midpoint_radius_products_enclose_every_product_inside():
    """Every product of matrices inside ``A +- rA`` and ``B +- rB`` lies in ``C +- R``."""
    from fastsgdstab._verified import mr_add, mr_matmul, mr_scale
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    rA, rB = 0.1 * rng.random((3, 4)), 0.1 * rng.random((4, 2))
    C, R = mr_matmul(A, rA, B, rB)
    S, rS = mr_add(A, rA, A, rA, -1.0)
    P, rP = mr_scale(2.0, 0.5, A, rA)
    for _ in range(200):
        a = A + rA * rng.uniform(-1, 1, A.shape)
        b = B + rB * rng.uniform(-1, 1, B.shape)
        assert np.all(np.abs(a @ b - C) <= R)
        assert np.all(np.abs((a - (A + rA * rng.uniform(-1, 1, A.shape))) - S) <= rS)
        assert np.all(np.abs(rng.uniform(1.5, 2.5) * a - P) <= rP)
