"""A probe subset of a large training set (specification section 17): ``population_size``.

References are independent of the library: dense d^2 x d^2 Kronecker operators built by
enumerating every batch of an explicit population (tests/reference.py), and THEORY section 2's
coefficients written out with N in place of n.
"""

from __future__ import annotations

import itertools
import math
import pickle

import numpy as np
import pytest
import scipy.linalg

import fastsgdstab as fs
from fastsgdstab import HessianFamily

import reference

SCHEMES = ("bernoulli", "without_replacement", "with_replacement")
SE_MULTIPLE = 5.0


def probe_factors(seed, n=3, d=3, r=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d, r)) * rng.uniform(0.3, 2.0, size=(n, 1, 1))


def population_moments_formula(hessians, batch_size, sampling, population):
    """(E[H_b], E[H_b (x) H_b]) for batches from a population of N samples whose per-sample
    mean curvature and noise are the probe's: a H(x)H + b (1/n) sum H_i(x)H_i with THEORY
    section 2's a, b at N (written out here, not taken from the library)."""
    hessians = np.asarray(hessians, dtype=float)
    n = hessians.shape[0]
    B, N = float(batch_size), float(population)
    if sampling == "bernoulli":
        a, b = 1.0, 1.0 / B - 1.0 / N
    elif sampling == "without_replacement":
        b = (N - B) / (B * (N - 1.0))
        a = 1.0 - b
    else:
        a, b = 1.0 - 1.0 / B, 1.0 / B
    mean = hessians.mean(axis=0)
    noise = sum(np.kron(h, h) for h in hessians) / n
    return mean, a * np.kron(mean, mean) + b * noise


def dense_critical_lr(hessians, mean, second):
    d = mean.shape[0]
    eye = np.eye(d)
    lin = reference.restrict(np.kron(mean, eye) + np.kron(eye, mean), hessians)
    quad = reference.restrict(second, hessians)
    mu = scipy.linalg.eigh(0.5 * (quad + quad.T), 0.5 * (lin + lin.T), eigvals_only=True)
    return 1.0 / float(mu[-1])


def dense_radius(hessians, mean, second, lr):
    q = reference.restrict(reference.second_moment_operator(mean, second, lr), hessians)
    return float(np.max(np.abs(np.linalg.eigvalsh(0.5 * (q + q.T)))))


# ----------------------------------------------------------------------------- the attribute
def test_population_size_defaults_to_n_and_is_validated():
    family = HessianFamily(probe_factors(0))
    assert family.population_size == family.n == 3
    assert HessianFamily(probe_factors(0), population_size=3).population_size == 3
    assert HessianFamily(probe_factors(0), population_size=np.int64(10)).population_size == 10
    with pytest.raises(ValueError, match=r"population_size must be an integer >= n = 3.*got 2"):
        HessianFamily(probe_factors(0), population_size=2)
    for bad in (10.0, True, "10", 1e5):
        with pytest.raises(TypeError, match=r"population_size must be an integer >= n = 3"):
            HessianFamily(probe_factors(0), population_size=bad)
    with pytest.raises(TypeError, match="positional"):
        HessianFamily(probe_factors(0), 10)  # keyword only


def test_population_size_is_kept_by_every_transformation(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.standard_normal((4, 3))
    families = [
        HessianFamily(features[:, :, None], population_size=40),
        HessianFamily.from_features(features, population_size=40),
        HessianFamily.from_dense(np.einsum("nd,ne->nde", features, features), population_size=40),
        HessianFamily.from_jacobians(features[:, None, :], population_size=40),
        HessianFamily.from_gram(features @ features.T, population_size=40),
        HessianFamily.from_features(features).with_population_size(40),
    ]
    for family in families:
        assert (family.n, family.population_size) == (4, 40)
        assert family.preconditioned(np.array([1.0, 2.0, 3.0])[: family.d]).population_size == 40
        assert family.preconditioned(np.eye(family.d) * 2.0).population_size == 40
        copy = pickle.loads(pickle.dumps(family))
        assert copy.population_size == 40 and not copy.factors.flags.writeable
        path = tmp_path / "family.npz"
        family.save(path)
        assert HessianFamily.load(path).population_size == 40
        assert "population_size=40" in repr(family)
    # the default is not written (files stay as before) and loads as n
    plain = HessianFamily.from_features(features)
    plain.save(tmp_path / "plain.npz")
    assert set(np.load(tmp_path / "plain.npz").files) == {"factors"}
    assert HessianFamily.load(tmp_path / "plain.npz").population_size == 4
    for bad, error in ((np.int64(3), "population_size must be an integer >= n = 4"),
                       (np.float64(40.0), "must be a single integer"),
                       (np.array([40, 41]), "must be a single integer")):
        np.savez(tmp_path / "bad.npz", features=features, population_size=bad)
        with pytest.raises(ValueError, match=error):
            HessianFamily.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="population_size"):
        HessianFamily.from_features(features, population_size=3)


# ------------------------------------------------------------- coefficients against references
@pytest.mark.parametrize("sampling", SCHEMES)
def test_probe_equals_the_enumerated_population_of_its_copies(sampling):
    # A population of N = 6 samples made of 2 copies of each of 3 probe samples, every batch of
    # it enumerated (n = N for the reference); the probe with population_size=6 must give its
    # spectral radius and critical learning rate.
    factors = probe_factors(2)
    hessians = reference.dense_from_factors(factors)
    population = np.concatenate([hessians, hessians])
    probe = HessianFamily(factors, population_size=6)
    for batch_size in (1, 2, 4, 6):
        if sampling == "with_replacement" and batch_size > 2:
            continue  # 6^B batches
        mean, second = reference.kron_moments_enumerated(population, batch_size, sampling)
        expected = dense_critical_lr(hessians, mean, second)
        assert fs.critical_lr(probe, batch_size, sampling=sampling) == pytest.approx(expected, rel=1e-9)
        lr = 0.8 * expected
        assert fs.spectral_radius(probe, lr, batch_size, sampling=sampling) == pytest.approx(
            dense_radius(hessians, mean, second, lr), rel=1e-9)


@pytest.mark.parametrize("sampling", SCHEMES)
@pytest.mark.parametrize("population", [7, 50, 997])
def test_probe_coefficients_against_the_direct_formula(sampling, population):
    # n = 5 < N, N not a multiple of n: THEORY section 2 with N written out in the test.
    factors = probe_factors(3, n=5, d=3, r=2)
    hessians = reference.dense_from_factors(factors)
    probe = HessianFamily(factors, population_size=population)
    for batch_size in (1, 3, 6, population):
        if batch_size > population:
            continue
        mean, second = population_moments_formula(hessians, batch_size, sampling, population)
        expected = dense_critical_lr(hessians, mean, second)
        assert fs.critical_lr(probe, batch_size, sampling=sampling) == pytest.approx(expected, rel=1e-9)
        lr = 0.9 * expected
        assert fs.spectral_radius(probe, lr, batch_size, sampling=sampling) == pytest.approx(
            dense_radius(hessians, mean, second, lr), rel=1e-9)
        # the critical batch size at this lr is the B whose reference radius is 1
        critical = fs.critical_batch_size(probe, lr, sampling=sampling, bounds=True).value  # real B
        if 1.0 < critical < population:
            mean, second = population_moments_formula(hessians, critical, sampling, population)
            assert dense_radius(hessians, mean, second, lr) == pytest.approx(1.0, abs=1e-8)
        else:
            assert critical <= batch_size
    # the trajectory uses the population's law too
    mean, second = population_moments_formula(hessians, 3, sampling, population)
    lr = 0.5 * dense_critical_lr(hessians, mean, second)
    d = mean.shape[0]
    q = reference.second_moment_operator(mean, second, lr)
    vec, expected = np.eye(d).ravel(), []
    for _ in range(6):
        expected.append(math.log(np.trace(vec.reshape(d, d))))
        vec = q @ vec
    result = fs.second_moment(probe, lr, 3, steps=5, sampling=sampling)
    np.testing.assert_allclose(result.log_mean_sq, expected, rtol=1e-10, atol=1e-12)


def test_explicit_copies_give_the_same_answers_as_the_probe():
    # The family built on all N = m n samples (population_size default N) against the probe of
    # its n distinct samples with population_size=N: the same training set, the same answers.
    rng = np.random.default_rng(4)
    features = rng.standard_normal((6, 4)) * rng.uniform(0.2, 3.0, size=(6, 1))
    whole = HessianFamily.from_features(np.tile(features, (4, 1)))
    probe = HessianFamily.from_features(features, population_size=24)
    assert whole.population_size == 24
    for sampling in SCHEMES:
        for batch_size in (1, 5, 6, 17, 24):
            eta = fs.critical_lr(whole, batch_size, sampling=sampling)
            assert fs.critical_lr(probe, batch_size, sampling=sampling) == pytest.approx(eta, rel=1e-9)
            assert fs.spectral_radius(probe, 0.7 * eta, batch_size, sampling=sampling) == pytest.approx(
                fs.spectral_radius(whole, 0.7 * eta, batch_size, sampling=sampling), rel=1e-9)
        lr = 0.9 * fs.critical_lr(whole, 3, sampling=sampling)
        assert fs.critical_batch_size(probe, lr, sampling=sampling) == pytest.approx(
            fs.critical_batch_size(whole, lr, sampling=sampling), rel=1e-9)
        bounds = fs.theory.rayleigh_bounds(probe, 8, sampling=sampling)
        assert bounds.identity == pytest.approx(
            fs.theory.rayleigh_bounds(whole, 8, sampling=sampling).identity, rel=1e-9)
    lrs, batch_sizes = [0.05, 0.2, 0.4], [1, 7, 24]
    np.testing.assert_allclose(fs.stability_map(probe, lrs, batch_sizes).spectral_radius,
                               fs.stability_map(whole, lrs, batch_sizes).spectral_radius, rtol=1e-8)
    np.testing.assert_allclose(
        fs.stability_map(probe, lrs, batch_sizes, momentum=0.5).spectral_radius,
        fs.stability_map(whole, lrs, batch_sizes, momentum=0.5).spectral_radius, rtol=1e-8)
    assert fs.critical_lr(probe, 5, momentum=0.9) == pytest.approx(
        fs.critical_lr(whole, 5, momentum=0.9), rel=1e-8)
    # the probe alone (population n) is a different training set: the answers differ
    assert fs.critical_lr(probe.with_population_size(6), 5) > 1.01 * fs.critical_lr(probe, 5)


def test_batch_sizes_range_over_the_population():
    probe = HessianFamily(probe_factors(5), population_size=100)
    assert math.isfinite(fs.critical_lr(probe, 100, sampling="without_replacement"))
    with pytest.raises(ValueError, match=r"batch_size must lie in \[1, N\] = \[1, 100\] with N = "
                                         r"population_size.*3 samples are a probe\); got 101"):
        fs.critical_lr(probe, 101)
    with pytest.raises(ValueError, match=r"batch_sizes must all lie in \[1, N\] = \[1, 100\]"):
        fs.stability_map(probe, [0.1], [1, 200])
    with pytest.raises(ValueError, match=r"\[1, N\] = \[1, 99\]"):
        fs.simulate(probe.with_population_size(99), 0.1, 101, steps=2, runs=2, progress=False)
    # the critical batch size lies in [1, N]
    lr = 0.999 * fs.critical_lr(probe, 100, sampling="without_replacement")
    assert 3 < fs.critical_batch_size(probe, lr, sampling="without_replacement") <= 100


def test_paper_theorems_refuse_a_probe_and_report_leaves_them_out():
    probe = HessianFamily(probe_factors(6), population_size=30)
    with pytest.raises(ValueError, match="theorem1 is the paper's bound.*population_size = 30"):
        fs.theory.theorem1(probe, 0.1, 2)
    with pytest.raises(ValueError, match="lemma1 is the paper's bound"):
        fs.theory.lemma1(probe, 0.1, 2)
    result = fs.report(probe, 0.1, 20)
    assert result.theorem1 is None and result.lemma1 is None
    assert result.critical_lr == fs.critical_lr(probe, 20)


# ------------------------------------------------------------------------------- simulation
@pytest.mark.parametrize("sampling", SCHEMES)
def test_simulate_draws_from_the_population(sampling):
    rng = np.random.default_rng(7)
    features = rng.standard_normal((4, 3)) * np.array([1.0, 0.7, 0.4])
    probe = HessianFamily.from_features(features, population_size=16)
    batch_size, steps, runs = 4, 10, 20000
    lr = 0.7 * fs.critical_lr(probe, batch_size, sampling=sampling)
    result = fs.simulate(probe, lr, batch_size, steps, runs, seed=3, sampling=sampling, progress=False)
    exact = fs.second_moment(probe, lr, batch_size, steps, sampling=sampling).log_mean_sq
    assert not result.log_mean_sq_untrustworthy.any()
    error = np.abs(result.log_mean_sq - exact)
    assert np.all(error <= SE_MULTIPLE * result.log_mean_sq_stderr + 1e-12), (error, result.log_mean_sq_stderr)
    if sampling != "with_replacement":
        # power: the probe's own law (N = n = B: gradient descent, no noise) is far off
        wrong = fs.second_moment(probe.with_population_size(4), lr, batch_size, steps,
                                 sampling=sampling).log_mean_sq
        assert np.any(np.abs(result.log_mean_sq - wrong) > SE_MULTIPLE * result.log_mean_sq_stderr)


@pytest.mark.filterwarnings("ignore:the sample mean")
def test_simulate_needs_a_multiple_of_n_except_with_replacement():
    probe = HessianFamily(probe_factors(8), population_size=10)
    for sampling in ("bernoulli", "without_replacement", "reshuffle"):
        with pytest.raises(ValueError, match=r"population_size must be a multiple of n; got 10 = 3 n \+ 1"):
            fs.simulate(probe, 0.1, 2, steps=2, runs=2, sampling=sampling, progress=False)
    result = fs.simulate(probe, 0.1, 10, steps=2, runs=2, sampling="with_replacement", progress=False)
    assert result.steps_completed == 2


def test_with_population_size_keeps_gradients_and_shares_the_reduction():
    rng = np.random.default_rng(3)
    gradients = rng.standard_normal((6, 4))
    family = HessianFamily(rng.standard_normal((6, 4, 2)), gradients=gradients - gradients.mean(0))
    family.sharpness()  # computes and caches the reduction
    probe = family.with_population_size(60)
    assert probe.population_size == 60
    np.testing.assert_array_equal(probe.gradients, family.gradients)
    assert probe._reduced is family._reduced  # shared, not recomputed
    fresh = HessianFamily(family.factors, population_size=60, gradients=family.gradients)
    assert fs.critical_lr(probe, 5) == fs.critical_lr(fresh, 5)
