"""Tests of the Monte-Carlo engine (``simulate``) and its kernels.

Statistical tests use fixed seeds, so each is deterministic; their tolerances come from the
estimator's own standard error or from an exact distribution (chi-square), at a level where a
correct implementation would fail with probability below about 1e-6 per check.
"""

import json
import math
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import textwrap
import warnings

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import fastsgdstab
from fastsgdstab import HessianFamily, SimulationResult, second_moment, simulate
from fastsgdstab._statistics import wilson_interval
from fastsgdstab.simulation import SimulationWarning, _check_arguments, _combine, _run_block, _simulate

from kernels_for_tests import batches
from strategies import families

# Chi-square tests reject when the p-value is below this: a correct sampler fails one of them
# with probability 1e-6 per seed; the seeds are fixed, so the suite is deterministic.
P_VALUE_FLOOR = 1e-6
# Estimates are compared with exact values within this many of their standard errors: for an
# (asymptotically) normal estimate a correct engine exceeds 5 SE with probability 5.7e-7.
SE_MULTIPLE = 5.0

# Most cases here use a few runs, for which the sample mean square is (rightly) flagged; the
# tests about that flag capture the warning explicitly with pytest.warns.
pytestmark = pytest.mark.filterwarnings("ignore::fastsgdstab.SimulationWarning")


def random_family(seed=0, n=12, d=4, rank=2):
    rng = np.random.default_rng(seed)
    return HessianFamily(rng.standard_normal((n, d, rank)) / np.sqrt(d))


def chi_square_pvalue(observed, expected):
    observed = np.asarray(observed, dtype=float)
    expected = np.asarray(expected, dtype=float)
    assert np.isclose(observed.sum(), expected.sum())
    statistic = np.sum((observed - expected) ** 2 / expected)
    return stats.chi2.sf(statistic, observed.size - 1)


# ------------------------------------------------------------------------------ sampling
def test_bernoulli_batch_sizes_are_binomial():
    n, batch_size, runs, steps = 40, 6, 200, 500
    counts, indices = batches("bernoulli", n, batch_size, runs, steps)
    counts = counts.ravel()
    pmf = stats.binom.pmf(np.arange(n + 1), n, batch_size / n)
    # pool each tail into its neighbouring bin so every expected count is >= 5 (chi-square
    # validity)
    expected = pmf * counts.size
    observed = np.bincount(counts, minlength=n + 1).astype(float)
    keep = np.nonzero(expected >= 5)[0]
    low, high = keep.min(), keep.max()
    observed = np.concatenate([[observed[: low + 1].sum()], observed[low + 1 : high], [observed[high:].sum()]])
    expected = np.concatenate([[expected[: low + 1].sum()], expected[low + 1 : high], [expected[high:].sum()]])
    assert chi_square_pvalue(observed, expected) > P_VALUE_FLOOR


def test_bernoulli_inclusion_is_uniform_and_indices_distinct():
    n, batch_size, runs, steps = 40, 6, 200, 500
    counts, indices = batches("bernoulli", n, batch_size, runs, steps)
    flat = indices.reshape(-1, n)
    for row, count in zip(flat[:2000], counts.ravel()[:2000]):
        assert np.unique(row[:count]).size == count and np.all(row[count:] == -1)
        assert row[:count].min(initial=0) >= 0 and row[:count].max(initial=0) < n
    inclusion = np.bincount(indices[indices >= 0], minlength=n)
    # each index is included independently in every batch: counts ~ Binomial(N, p), and the n
    # standardised squares sum to a chi-square with n degrees of freedom
    trials, p = counts.size, batch_size / n
    statistic = np.sum((inclusion - trials * p) ** 2 / (trials * p * (1 - p)))
    assert stats.chi2.sf(statistic, n) > P_VALUE_FLOOR


@pytest.mark.parametrize("batch_size", [1.0, 2.0, 3.5])
def test_bernoulli_subsets_have_the_exact_law(batch_size):
    # n = 4: all 16 subsets, P(S) = p^|S| (1 - p)^(4 - |S|); also non-integer B.
    n = 4
    counts, indices = batches("bernoulli", n, batch_size, 100, 400, seed=7)
    code = np.zeros(counts.shape, dtype=np.int64)
    for j in range(n):
        code += np.any(indices == j, axis=2) * (1 << j)
    p = batch_size / n
    sizes = np.array([bin(s).count("1") for s in range(16)])
    expected = p**sizes * (1 - p) ** (n - sizes) * code.size
    assert chi_square_pvalue(np.bincount(code.ravel(), minlength=16), expected) > P_VALUE_FLOOR


def test_bernoulli_full_batch_includes_everything():
    counts, indices = batches("bernoulli", 5, 5.0, 3, 50)
    assert np.all(counts == 5)
    assert np.all(np.sort(indices, axis=2) == np.arange(5))


def test_without_replacement_gives_distinct_uniform_subsets():
    n, batch_size = 30, 7
    counts, indices = batches("without_replacement", n, batch_size, 100, 500)
    assert np.all(counts == batch_size)
    flat = indices.reshape(-1, batch_size)
    assert flat.min() >= 0 and flat.max() < n
    assert np.all(np.diff(np.sort(flat, axis=1), axis=1) > 0)  # distinct
    # inclusion counts: Cov = s n/(n-1) (I - J/n) with s = N p (1-p), so the statistic times
    # (n-1)/n is chi-square with n - 1 degrees of freedom
    inclusion = np.bincount(flat.ravel(), minlength=n)
    trials, p = flat.shape[0], batch_size / n
    statistic = np.sum((inclusion - trials * p) ** 2 / (trials * p * (1 - p))) * (n - 1) / n
    assert stats.chi2.sf(statistic, n - 1) > P_VALUE_FLOOR
    # the whole subset law for n = 5, B = 2: ten subsets, equally likely
    counts, indices = batches("without_replacement", 5, 2, 100, 300, seed=3)
    pairs = np.sort(indices.reshape(-1, 2), axis=1)
    code = pairs[:, 0] * 5 + pairs[:, 1]
    observed = np.bincount(code, minlength=25)[[a * 5 + b for a in range(5) for b in range(a + 1, 5)]]
    assert observed.sum() == code.size
    assert chi_square_pvalue(observed, np.full(10, code.size / 10)) > P_VALUE_FLOOR


def test_with_replacement_draws_independent_uniform_indices():
    counts, indices = batches("with_replacement", 4, 2, 100, 400, seed=5)
    assert np.all(counts == 2)
    code = indices[..., 0] * 4 + indices[..., 1]  # 16 ordered pairs, repeats allowed
    assert np.any(indices[..., 0] == indices[..., 1])
    assert chi_square_pvalue(np.bincount(code.ravel(), minlength=16), np.full(16, code.size / 16)) > P_VALUE_FLOOR


# ------------------------------------------------------------------------------ exactness
@settings(max_examples=15)
@given(family=families(max_n=6, max_d=3, max_rank=2), scheme=st.sampled_from(["bernoulli", "without_replacement", "with_replacement"]),
       batch_size=st.integers(1, 6), lr=st.floats(0.05, 1.5))
def test_trajectories_equal_a_numpy_replay_of_the_same_batches(family, scheme, batch_size, lr):
    # With a fixed w_0 no random numbers go into w_0, so the batches are exactly those
    # sample_batches draws from a fresh stream; replay them with dense numpy algebra.
    batch_size = min(batch_size, family.n)
    runs, steps = 3, 12
    w0 = np.linspace(1.0, 2.0, family.d)
    result = simulate(family, lr, batch_size, steps, runs, seed=11, sampling=scheme, init=w0,
                      record_every=1, progress=False)
    counts, indices = batches(scheme, family.n, batch_size, runs, steps, seed=11)
    dense = family.dense()
    for run in range(runs):
        w = w0.copy()
        expected = [w @ w]
        for t in range(steps):
            chosen = indices[run, t, : counts[run, t]]
            w = w - lr / batch_size * dense[chosen].sum(axis=0) @ w
            expected.append(w @ w)
        with np.errstate(divide="ignore"):
            expected = np.log(np.array(expected))
        scale = np.abs(np.log(np.abs(dense).max() * lr + 2)) * steps + 1
        finite = np.isfinite(expected)
        np.testing.assert_array_equal(np.isfinite(result.log_sq_norm[run]), finite)
        np.testing.assert_allclose(result.log_sq_norm[run][finite], expected[finite], rtol=0, atol=1e-9 * scale)


def test_logs_are_exact_far_beyond_the_floating_point_range():
    # d = 1, every H_i = 1, B = n without replacement: w_t = (1 - lr)^t w_0 exactly.
    family = HessianFamily.from_features(np.ones((5, 1)))
    for lr, steps in [(0.999, 300), (1e10, 300)]:
        result = simulate(family, lr, 5, steps, 2, sampling="without_replacement", init=[1.0], progress=False)
        exact = 2 * result.recorded_steps * math.log(abs(1.0 - lr))
        np.testing.assert_allclose(result.log_sq_norm, np.broadcast_to(exact, (2, steps + 1)), rtol=1e-12)
        assert abs(exact[-1]) > 4000  # far outside the double range (|log| <= 1419 there)


@pytest.mark.parametrize("scheme", ["bernoulli", "without_replacement", "with_replacement"])
@pytest.mark.parametrize("init", [None, "uniform", "vector"])
def test_mean_square_matches_second_moment_below_threshold(scheme, init):
    family = random_family(seed=1)
    lr, batch_size, steps, runs = 0.6 / family.sharpness(), 3, 8, 20000
    if init == "vector":
        init_value = np.array([1.0, -0.5, 2.0, 0.25])
        exact_init = init_value
    elif init == "uniform":
        init_value = "uniform"
        exact_init = np.full((4, 4), 0.25) + np.eye(4) / 12  # E[w w^T], w ~ U[0, 1)^4
    else:
        init_value = exact_init = None
    result = simulate(family, lr, batch_size, steps, runs, seed=2, sampling=scheme, init=init_value, progress=False)
    exact = second_moment(family, lr, batch_size, steps, sampling=scheme, init=exact_init).log_mean_sq
    assert not result.log_mean_sq_untrustworthy.any()
    # log of a sample mean of 20,000 runs with effective sample sizes in the thousands: normal
    # to a good approximation, with standard error log_mean_sq_stderr (delta method); at t = 0
    # with a fixed w_0 the estimate is exact (stderr 0), hence the small absolute slack.
    error = np.abs(result.log_mean_sq - exact)
    assert np.all(error <= SE_MULTIPLE * result.log_mean_sq_stderr + 1e-12), (error, result.log_mean_sq_stderr)
    assert np.all(result.effective_sample_size > 1000)


def test_mean_square_test_would_detect_a_wrong_batch_scale():
    # The comparison above has power: dividing by the realised batch size instead of B (a
    # plausible bug) moves log E||w_t||^2 by many standard errors.
    family = random_family(seed=1)
    lr, steps = 0.6 / family.sharpness(), 8
    result = simulate(family, lr, 3, steps, 20000, seed=2, progress=False)
    wrong = second_moment(family, lr, 2, steps).log_mean_sq
    assert np.any(np.abs(result.log_mean_sq - wrong) > SE_MULTIPLE * result.log_mean_sq_stderr)


def lyapunov_closed_form(n, batch_size, lr, h):
    # d = 1 and every H_i = h: w_{t+1} = (1 - lr h K / B) w_t with K ~ Binomial(n, B / n), so
    # gamma = E log|1 - lr h K / B| (a finite sum; -inf if some K makes the factor 0).
    k = np.arange(n + 1)
    return float(np.sum(stats.binom.pmf(k, n, batch_size / n) * np.log(np.abs(1 - lr * h * k / batch_size))))


@pytest.mark.parametrize("lr", [0.9, 1.3, 1.9])
def test_one_dimensional_lyapunov_exponent_matches_the_binomial_sum(lr):
    n, batch_size, h = 20, 4, 1.5
    assert all(abs(1 - lr * h * k / batch_size) > 1e-3 for k in range(n + 1))
    family = HessianFamily.from_features(np.full((n, 1), math.sqrt(h)))
    result = simulate(family, lr, batch_size, 200, 4000, seed=3, record_every=50, progress=False)
    exact = lyapunov_closed_form(n, batch_size, lr, h)
    # (1/t) sum of t i.i.d. log-factors per run: unbiased for gamma, and the standard error
    # over 4000 runs is that of a mean of i.i.d. terms.
    assert abs(result.lyapunov_exponent - exact) <= SE_MULTIPLE * result.lyapunov_exponent_stderr
    assert result.lyapunov_exponent_stderr < 0.01 * max(abs(exact), 0.1)


def test_lyapunov_without_replacement_is_deterministic_in_one_dimension():
    family = HessianFamily.from_features(np.ones((10, 1)))
    result = simulate(family, 0.3, 4, 50, 5, sampling="without_replacement", progress=False)
    assert result.lyapunov_exponent == pytest.approx(math.log(0.7), rel=1e-12)
    assert result.lyapunov_exponent_stderr < 1e-12


def test_a_run_that_reaches_zero_is_minus_infinity_not_nan():
    # lr h K / B = 1 for K = B: the factor is exactly 0 once K = B happens.
    family = HessianFamily.from_features(np.ones((8, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        result = simulate(family, 1.0, 4, 30, 50, seed=1, progress=False)
    assert not np.any(np.isnan(result.log_sq_norm))
    assert np.any(np.isneginf(result.log_sq_norm[:, -1]))
    assert result.lyapunov_exponent == -math.inf


# ------------------------------------------------------------------------------ divergence
def test_divergence_is_checked_at_every_step():
    # ||w_t||^2 = 2.25^t ||w_0||^2 (d = 1, lr = 2.5, GD): the rule fires first at t = 9, a
    # step that is not recorded with record_every = 4.
    family = HessianFamily.from_features(np.ones((5, 1)))
    result = simulate(family, 2.5, 5, 12, 3, sampling="without_replacement", record_every=4, progress=False)
    assert list(result.recorded_steps) == [0, 4, 8, 12]
    assert np.all(result.first_diverged_step == 9) and result.diverged_fraction == 1.0
    short = simulate(family, 2.5, 5, 8, 3, sampling="without_replacement", progress=False)
    assert not short.diverged.any() and np.all(short.first_diverged_step == -1)


def test_divergence_agrees_with_the_full_trajectory_and_not_only_with_records():
    family = random_family(seed=4, n=10, d=3, rank=1)
    lr = 1.6 / family.sharpness()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        full = simulate(family, lr, 2, 60, 400, seed=9, record_every=1, divergence_factor=50.0, progress=False)
        sparse = simulate(family, lr, 2, 60, 400, seed=9, record_every=7, divergence_factor=50.0, progress=False)
    above = full.log_sq_norm[:, 1:] >= full.log_sq_norm[:, :1] + math.log(50.0)
    np.testing.assert_array_equal(full.diverged, above.any(axis=1))
    first = np.where(above.any(axis=1), above.argmax(axis=1) + 1, -1)
    np.testing.assert_array_equal(full.first_diverged_step, first)
    assert 0 < full.diverged.sum() < 400  # the setting splits the runs: the test has power
    np.testing.assert_array_equal(sparse.first_diverged_step, full.first_diverged_step)
    low, high = full.diverged_fraction_interval
    assert low < full.diverged_fraction < high


def first_crossing(log_sq_norm, factor):
    """The first recorded t >= 1 with log ||w_t||^2 - log ||w_0||^2 >= log(factor), or -1."""
    above = log_sq_norm[:, 1:] - log_sq_norm[:, :1] >= math.log(factor)
    return np.where(above.any(axis=1), above.argmax(axis=1) + 1, -1)


# Curvatures h (d = 1, lr = 1, B = 1): a step multiplies w by 1 - h, so h = 1 - 3e-9 shrinks
# ||w||^2 by 9e-18 and h = 1 + 1 / 3e-9 grows it by 1.1e17 (the same log step, 39.25, either way).
SHRINK, GROW = 1.0 - 3e-9, 1.0 + 1.0 / 3e-9


@pytest.mark.parametrize(
    "curvatures, rank, sampling, factor, low, high",
    [
        # A symmetric random walk of log ||w||^2: a run that takes 6 shrinking steps before a
        # growing one falls below the renormalisation floor (||W||^2 < 1e-100) and can only
        # then climb back to the threshold 1000 ||w_0||^2 (about 1 in 7 runs).
        ([SHRINK, GROW], 1, "with_replacement", 1000.0, 1e-100, None),
        # the same through the rank-r path (batch_rows): each U_i is 1 x 2, h = |U_i|^2
        ([SHRINK, GROW], 2, "with_replacement", 1000.0, 1e-100, None),
        # A divergence factor of 1e155: every run that diverges has crossed the renormalisation
        # ceiling (||W||^2 > 1e100) first.
        ([SHRINK, GROW], 1, "with_replacement", 1e155, None, 1e100),
        # Bernoulli, B = 1 of n = 2: empty batches are identity steps, both samples together grow.
        ([SHRINK, GROW], 1, "bernoulli", 1e155, None, 1e100),
        # The case: the mutant mis-dates 9 of these 200 runs (29, 29, 144 and 200 of 200
        # in the cases above).
        ([0.999, 1001.0], 1, "with_replacement", 1000.0, 1e-100, None),
    ],
)
def test_divergence_step_is_exact_across_renormalisation(curvatures, rank, sampling, factor, low, high):
    # W is renormalised when ||W||^2 leaves [1e-100, 1e100], and the divergence threshold on
    # ||W||^2 must follow the scale: a kernel that forgets to rescale it after a renormalisation
    # mis-dates first_diverged_step, which the exact per-step records expose.
    roots = np.sqrt(np.array(curvatures) / rank)
    family = HessianFamily(np.repeat(roots[:, None, None], rank, axis=2))
    runs, steps = 200, 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        result = simulate(family, 1.0, 1, steps, runs, seed=21, sampling=sampling,
                          record_every=1, divergence_factor=factor, progress=False)
    logs = result.log_sq_norm
    first = first_crossing(logs, factor)
    # no run sits within round-off of the threshold, so the comparison is unambiguous
    assert np.min(np.abs(logs[:, 1:] - logs[:, :1] - math.log(factor))) > 1e-6
    np.testing.assert_array_equal(result.first_diverged_step, first)
    np.testing.assert_array_equal(result.diverged, first >= 0)
    # The case exercises what it claims: runs whose ||W||^2 left [low, high] before they
    # diverged (log ||W_t||^2 = log ||w_t||^2 - log ||w_0||^2 until the first renormalisation).
    relative = logs - logs[:, :1]
    diverged = np.nonzero(first > 0)[0]
    before = [relative[run, 1 : first[run]] for run in diverged]
    renormalised = sum(np.any(r < math.log(low)) if low else np.any(r > math.log(high)) for r in before)
    assert renormalised >= 5, renormalised


def test_wilson_interval_known_values():
    # Wilson 95% for 0/10: (0, 0.2775); for 5/10: (0.2366, 0.7634) (Newcombe 1998, table I style)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)


# ------------------------------------------------------------------------------ mean-square flag
def test_heavy_tails_above_the_threshold_are_flagged():
    # Theorem-2-like coherent family near a small batch: above the mean-square threshold the
    # sample mean rests on a handful of runs by t = 300.
    family = HessianFamily.from_features(np.ones((10, 1)))
    lr = 1.9  # eta* (Bernoulli, B = 1) = 2 / (1 + 1 - 0.1) = 1.05: far above
    with pytest.warns(SimulationWarning, match="untrustworthy"):
        result = simulate(family, lr, 1, 300, 2000, seed=1, record_every=30, progress=False)
    assert result.log_mean_sq_untrustworthy[-1]
    assert not result.log_mean_sq_untrustworthy[0]
    assert result.effective_sample_size[-1] < 30


def test_fixed_start_has_full_effective_sample_size():
    family = random_family()
    result = simulate(family, 0.1, 3, 5, 64, init=np.ones(4), progress=False)
    assert result.effective_sample_size[0] == pytest.approx(64)
    assert result.log_mean_sq_stderr[0] == pytest.approx(0, abs=1e-7)


# ------------------------------------------------------------------------------ reproducibility
def _signature(result):
    return result.log_sq_norm.tobytes() + result.first_diverged_step.tobytes()


@pytest.mark.parametrize("scheme", ["bernoulli", "without_replacement", "with_replacement"])
def test_one_and_two_threads_give_bit_identical_results(scheme):
    family = random_family(seed=3, n=30, d=6, rank=2)
    lr = 1.2 / family.sharpness()
    previous = numba.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 1):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SimulationWarning)
                outputs.append(_signature(simulate(family, lr, 5, 40, 97, seed=5, sampling=scheme, progress=False)))
    finally:
        numba.set_num_threads(previous)
    assert outputs[0] == outputs[1] == outputs[2]


def test_chunking_does_not_change_results():
    family = random_family(seed=3)
    kwargs = dict(seed=8, sampling="bernoulli", init=None, record_every=3, divergence_factor=10.0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        reference = _signature(_simulate(family, 1.0, 3, 50, 20, **kwargs))
        for chunk in (1, 7, 50):
            assert _signature(_simulate(family, 1.0, 3, 50, 20, chunk_steps=chunk, **kwargs)) == reference


# ------------------------------------------------------------------------------ blocks of runs
def _block_arguments(family, lr, batch_size, steps, runs, **kwargs):
    arguments = dict(seed=0, sampling="bernoulli", init="normal", record_every=None,
                     divergence_factor=1000.0, progress=False)
    arguments.update(kwargs)
    return _check_arguments(family, lr, batch_size, steps, runs, arguments["seed"],
                            arguments["sampling"], arguments["init"], arguments["record_every"],
                            arguments["divergence_factor"], arguments["progress"])


@pytest.mark.parametrize("scheme", ["bernoulli", "without_replacement", "with_replacement"])
def test_blocks_of_runs_concatenate_to_simulate_bit_for_bit(scheme):
    family = random_family(seed=5, n=20, d=5, rank=2)
    lr = 1.3 / family.sharpness()
    kwargs = dict(seed=123, sampling=scheme, init="uniform", record_every=4, divergence_factor=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        full = simulate(family, lr, 3, 30, 23, progress=False, **kwargs)
        settings = pickle.loads(pickle.dumps(_block_arguments(family, lr, 3, 30, 23, **kwargs)))
        # computed out of order, each block through a pickle round trip (as a Dask worker would)
        edges = [0, 1, 6, 7, 19, 23]
        blocks = {first: pickle.loads(pickle.dumps(_run_block(settings, first, last, chunk_steps=7)))
                  for first, last in reversed(list(zip(edges[:-1], edges[1:])))}
        combined = _combine(settings, [blocks[first] for first in edges[:-1]], 0.0)
    assert _signature(combined) == _signature(full)
    for name in ("recorded_steps", "diverged", "log_mean_sq", "effective_sample_size"):
        np.testing.assert_array_equal(getattr(combined, name), getattr(full, name))
    assert combined.lyapunov_exponent == full.lyapunov_exponent
    assert (combined.runs, combined.steps_completed, combined.interrupted) == (23, 30, False)
    # a block alone is those rows: the single run 6 is row 6 of the whole simulation
    np.testing.assert_array_equal(blocks[6].log_sq_norm, full.log_sq_norm[6:7])


def test_combine_refuses_blocks_that_do_not_partition_the_runs():
    settings = _block_arguments(random_family(), 0.5, 2, 5, 6)
    a, b = _run_block(settings, 0, 3), _run_block(settings, 3, 6)
    with pytest.raises(ValueError, match="partition"):
        _combine(settings, [b, a], 0.0)
    with pytest.raises(ValueError, match="partition"):
        _combine(settings, [a], 0.0)
    with pytest.raises(ValueError, match="first_run"):
        _run_block(settings, 4, 4)
    with pytest.raises(ValueError, match="first_run"):
        _run_block(settings, 0, 7)


def test_same_seed_repeats_and_different_seeds_differ():
    family = random_family()
    a = simulate(family, 0.5, 3, 20, 10, seed=1, progress=False)
    b = simulate(family, 0.5, 3, 20, 10, seed=1, progress=False)
    c = simulate(family, 0.5, 3, 20, 10, seed=2, progress=False)
    assert _signature(a) == _signature(b)
    assert not np.any(a.log_sq_norm[:, 0] == c.log_sq_norm[:, 0])
    # runs are different streams too
    assert len(np.unique(a.log_sq_norm[:, -1])) == 10
    # a fixed w_0: the batches still differ between seeds
    d = simulate(family, 0.5, 3, 20, 10, seed=1, init=np.ones(4), progress=False)
    e = simulate(family, 0.5, 3, 20, 10, seed=2, init=np.ones(4), progress=False)
    assert not np.array_equal(d.log_sq_norm[:, 1:], e.log_sq_norm[:, 1:])


def test_initial_distributions():
    family = HessianFamily.from_features(np.eye(3))
    uniform = simulate(family, 0.1, 1, 1, 20000, init="uniform", progress=False)
    normal = simulate(family, 0.1, 1, 1, 20000, progress=False)
    # E||w_0||^2 = d / 3 (uniform) and d (normal); both sample means within 5 standard errors
    for result, exact in [(uniform, 1.0), (normal, 3.0)]:
        assert abs(result.log_mean_sq[0] - math.log(exact)) <= SE_MULTIPLE * result.log_mean_sq_stderr[0]
    assert normal.init == "normal" and uniform.init == "uniform"
    assert uniform.log_sq_norm[:, 0].max() < math.log(3.0)  # every coordinate in [0, 1)


# Every kind of argument simulate accepts, in a fresh process: each call compiles only the kernel
# variant of its path (sampling scheme, momentum or not, kind of w_0; a family without gradients
# never the affine kernel), and each variant and each kernel it calls has at most one signature (a
# second one is a second compilation, seconds from an empty cache).
ONE_SIGNATURE_SCRIPT = textwrap.dedent("""
    import json
    import warnings

    import numpy as np

    from fastsgdstab import HessianFamily, simulate
    from fastsgdstab._kernels import rng, sgd

    warnings.simplefilter("ignore")

    def variants():
        return {f"{factory.__name__}{list(key)}": len(kernel.signatures)
                for (factory, key), kernel in sgd._VARIANTS.items()}

    generator = np.random.default_rng(0)
    frozen = np.ones(3)
    frozen.setflags(write=False)
    families = [HessianFamily(generator.standard_normal((6, 3, rank))) for rank in (1, 2)]
    families += [HessianFamily(np.zeros((6, 3, 1))),  # zero rows: passed on unscaled
                 HessianFamily.from_features(np.eye(3) * 1e150)]
    # the first call compiles its own path only
    simulate(families[0], 0.3, 2, 3, 4, sampling="with_replacement", progress=False)
    only = variants()
    for family in families:
        for sampling in ("bernoulli", "without_replacement", "with_replacement", "reshuffle"):
            simulate(family, 0.3, 2, 3, 4, sampling=sampling, progress=False)
            simulate(family, 0.3, 2, 3, 4, sampling=sampling, momentum=0.5, progress=False)
            simulate(family, 0.3, 2, 3, 4, sampling=sampling, momentum=np.float32(0.5),
                     nesterov=np.bool_(True), progress=False)
        simulate(family, 0.3, 2, 3, 4, sampling="reshuffle", drop_last=True, progress=False)
        simulate(family, 0.3, 2.5, 3, 4, init="uniform", record_every=2, progress=False)
        simulate(family, np.float32(0.3), np.int32(2), np.int8(3), np.uint16(4),
                 seed=np.uint64(2**63 - 1), sampling="with_replacement", init=frozen,
                 record_every=np.int64(1), divergence_factor=np.float16(10), progress=False)
        simulate(family, 0.3, 2, 3, 4, init=np.arange(1, 7, dtype=np.int32)[::2],
                 progress=False)
        simulate(family, 1e300, 1, 3, 4, init=[1e-300, 0, 0], progress=False)
    counts = {f"{module.__name__}.{name}": len(kernel.signatures)
              for module in (sgd, rng) for name, kernel in vars(module).items()
              if hasattr(kernel, "signatures")}
    print(json.dumps({"only": only, "variants": variants(), "counts": counts}))
""")


def test_each_simulation_kernel_compiles_once_for_every_family_and_argument():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(pathlib.Path(fastsgdstab.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, "-c", ONE_SIGNATURE_SCRIPT], env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    # sampling with replacement (code 2), no momentum, normal w_0 (code 0): two kernels, no more
    assert report["only"] == {"_make_initialise_runs[0]": 1,
                              "_make_chunk_linear[2, False]": 1}, report
    # every scheme with and without momentum, and every kind of w_0, one signature each; no
    # affine kernel for families without gradients
    expected = {f"_make_chunk_linear[{scheme}, {momentum}]": 1
                for scheme in range(4) for momentum in (False, True)}
    expected.update({f"_make_initialise_runs[{kind}]": 1 for kind in range(3)})
    assert report["variants"] == expected, report
    signatures = report["counts"]
    assert all(count <= 1 for count in signatures.values()), signatures


# ------------------------------------------------------------------------------ result and interrupts
def test_result_fields_and_default_records():
    family = random_family()
    result = simulate(family, 0.5, 2.5, 2500, 8, progress=False)
    assert isinstance(result, SimulationResult)
    assert result.record_every == 3 and result.recorded_steps[-1] == 2500
    assert result.log_sq_norm.shape == (8, result.recorded_steps.size)
    assert result.steps_completed == 2500 and not result.interrupted
    assert (result.lr, result.batch_size, result.steps, result.runs, result.seed) == (0.5, 2.5, 2500, 8, 0)
    with pytest.raises(AttributeError):
        result.lr = 1.0


@pytest.fixture
def sigint_handler(request):
    """SIGINT handled in Python for the test's duration, then the handler found is restored.

    "inherited": whatever handler the suite runs under, except that SIGINT ignored (a suite
    started in the background, ``nohup ... &``) is replaced by Python's default handler;
    "custom": a handler of the test's own, which must survive ``simulate`` untouched.
    """
    found = signal.getsignal(signal.SIGINT)
    calls = []
    if request.param == "custom":
        signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    elif found in (signal.SIG_IGN, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield calls
    finally:
        if found is not None:
            signal.signal(signal.SIGINT, found)


@pytest.mark.parametrize("sigint_handler", ["inherited", "custom"], indirect=True)
def test_ctrl_c_interrupt_between_chunks_returns_the_completed_steps(sigint_handler):
    family = random_family()
    kwargs = dict(seed=4, sampling="with_replacement", init=None, divergence_factor=5.0, progress=False)

    def press_ctrl_c(done):
        if done == 10:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.warns(SimulationWarning, match="interrupted after 10 of 40"):
        partial = _simulate(family, 0.8, 2, 40, 6, record_every=3, chunk_steps=5, on_chunk=press_ctrl_c, **kwargs)
    # simulate puts back the handler it found, and the signal went to simulate, not to it
    assert signal.getsignal(signal.SIGINT) is before
    assert sigint_handler == []
    full = _simulate(family, 0.8, 2, 40, 6, record_every=1, **kwargs)
    assert partial.interrupted and partial.steps_completed == 10
    assert list(partial.recorded_steps) == [0, 3, 6, 9, 10]
    np.testing.assert_allclose(partial.log_sq_norm, full.log_sq_norm[:, [0, 3, 6, 9, 10]], rtol=1e-13)
    expected = np.where((full.first_diverged_step >= 0) & (full.first_diverged_step <= 10), full.first_diverged_step, -1)
    np.testing.assert_array_equal(partial.first_diverged_step, expected)


def test_interrupt_flag_restores_a_handler_python_cannot_name(monkeypatch):
    # signal.signal returns None when the handler it replaces was not installed from Python;
    # simulate must not then leave its own flag handler in place (Ctrl-C would be swallowed for
    # good): it installs the default action.
    real_signal = signal.signal
    previous = signal.getsignal(signal.SIGINT)
    answers = iter([None])

    def signal_reporting_none_once(signum, handler):
        old = real_signal(signum, handler)
        return next(answers, old)

    monkeypatch.setattr(signal, "signal", signal_reporting_none_once)
    try:
        simulate(random_family(), 0.5, 2, 3, 2, progress=False)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    finally:
        real_signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def test_progress_bar_is_shown_when_asked(capsys):
    family = random_family()
    _simulate(family, 0.5, 2, 20, 4, seed=0, sampling="bernoulli", init=None, record_every=None,
              divergence_factor=1000.0, progress=True, chunk_steps=2)
    assert "simulate" in capsys.readouterr().err
    simulate(family, 0.5, 2, 20, 4, progress=False)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.5), TypeError, "steps"),
        (dict(runs=0), ValueError, "runs"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=True), TypeError, "seed"),
        (dict(seed=2**63), ValueError, "seed"),
        (dict(init=np.ones(3)), ValueError, "init"),
        (dict(init=np.ones((4, 4))), ValueError, "init"),
        (dict(init=np.zeros(4)), ValueError, "init"),
        (dict(init="gaussian"), ValueError, "init"),
        (dict(init=[1.0, np.nan, 0.0, 0.0]), ValueError, "init"),
        (dict(batch_size=2.5, sampling="without_replacement"), ValueError, "batch_size"),
        (dict(batch_size=2.5, sampling="with_replacement"), ValueError, "batch_size"),
        (dict(batch_size=0.5), ValueError, "batch_size"),
        (dict(batch_size=13), ValueError, "batch_size"),
        (dict(sampling="shuffle"), ValueError, "sampling"),
        (dict(divergence_factor=1.0), ValueError, "divergence_factor"),
        (dict(divergence_factor=math.nan), ValueError, "divergence_factor"),
        (dict(divergence_factor="big"), TypeError, "divergence_factor"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(record_every=0), ValueError, "record_every"),
        (dict(record_every=11), ValueError, "record_every"),
        (dict(progress="yes"), TypeError, "progress"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, error, match):
    arguments = dict(family=random_family(), lr=0.5, batch_size=2, steps=10, runs=4)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        simulate(**arguments)


def test_family_must_be_a_hessian_family():
    with pytest.raises(TypeError, match="family"):
        simulate(np.ones((3, 2, 1)), 0.5, 1, 10, 4)
