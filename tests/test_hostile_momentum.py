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
from fastsgdstab.moments import critical_batch_size, critical_lr, spectral_radius

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


@pytest.mark.parametrize("seed", range(100))
def test_momentum_brackets_contain_the_high_precision_truth(seed):
    check_case(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 700))
def test_momentum_brackets_contain_the_high_precision_truth_thorough(seed):
    check_case(seed)
