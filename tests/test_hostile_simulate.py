"""``simulate`` at scales far from 1: huge and tiny curvatures, learning rates and initial norms.

The dynamics depend on lr and the H_i only through lr H_i (theory page, section "Certified
answers and scale"), so scaling the features by sqrt(c) and dividing lr by c must give the same
trajectories, for every c that keeps the family in floats. A step whose growth passes the float
range (lr lambda_1 ~ 1e154 and beyond) must still give finite, exact logs: in one dimension
w_{t+1} = (1 - (lr / B) sum_{i in batch} h_i) w_t, replayed here from the same batches.
"""

import math
import warnings

import numba
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastsgdstab import HessianFamily, SimulationWarning, simulate

from kernels_for_tests import batches

# Most cases use few runs, for which the sample mean square is (rightly) flagged.
pytestmark = pytest.mark.filterwarnings("ignore::fastsgdstab.SimulationWarning")

SCHEMES = ["bernoulli", "without_replacement", "with_replacement"]
SCALES = [1e-300, 1e-200, 1e-100, 1e-30, 1e30, 1e100, 1e200, 1e300]


def base_factors():
    rng = np.random.default_rng(5)
    return rng.standard_normal((9, 3, 2)) / math.sqrt(3)


def run(family, lr, batch_size, steps, runs, **kwargs):
    kwargs.setdefault("record_every", 1)
    kwargs.setdefault("progress", False)
    return simulate(family, lr, batch_size, steps, runs, seed=17, **kwargs)


def first_crossing(log_sq_norm, factor):
    above = log_sq_norm[:, 1:] - log_sq_norm[:, :1] >= math.log(factor)
    return np.where(above.any(axis=1), above.argmax(axis=1) + 1, -1)


def assert_logs_close(actual, expected, rtol=1e-9):
    """Equal up to rtol relative to the size of the logs (and exactly equal where infinite)."""
    np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(expected))
    finite = np.isfinite(expected)
    scale = max(1.0, float(np.max(np.abs(expected[finite]), initial=0.0)))
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=0, atol=rtol * scale)


# ------------------------------------------------------------------------------ scale invariance
@pytest.fixture(scope="module")
def reference():
    """Unscaled runs of a random rank-2 family near its divergence threshold, for each scheme."""
    family = HessianFamily(base_factors())
    lr = 1.4 / family.sharpness()
    results = {}
    for scheme in SCHEMES:
        results[scheme] = run(family, lr, 2, 60, 64, sampling=scheme, divergence_factor=20.0)
    return lr, results


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_scaled_family_and_learning_rate_give_the_same_runs(reference, scale, scheme):
    lr, results = reference
    expected = results[scheme]
    family = HessianFamily(base_factors() * math.sqrt(scale))
    result = run(family, lr / scale, 2, 60, 64, sampling=scheme, divergence_factor=20.0)
    assert_logs_close(result.log_sq_norm, expected.log_sq_norm)
    # the verdicts do not move (the setting splits the runs, so this has power)
    assert 0 < expected.diverged.sum() < 64
    np.testing.assert_array_equal(result.first_diverged_step, expected.first_diverged_step)
    assert result.lyapunov_exponent == pytest.approx(expected.lyapunov_exponent, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(result.log_mean_sq, expected.log_mean_sq, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm", [5e-324, 1e-300, 1e-200, 1e200, 1e300, 1.7e308])
def test_initial_norm_anywhere_in_the_float_range(norm):
    # ||w_0||^2 is 1e-600 to 3e616, outside the floats: only its log is representable.
    family = HessianFamily(base_factors())
    lr = 1.4 / family.sharpness()
    direction = np.array([0.5, -1.0, 0.25]) if norm > 1e-300 else np.array([1.0, 0.0, 0.0])
    init = direction * norm  # entries exact multiples of the powers of two in direction
    log_norm_sq = 2 * math.log(norm) + math.log(direction @ direction)
    unit = run(family, lr, 2, 40, 8, init=direction, divergence_factor=20.0)
    result = run(family, lr, 2, 40, 8, init=init, divergence_factor=20.0)
    assert np.all(np.isfinite(result.log_sq_norm))
    np.testing.assert_allclose(result.log_sq_norm[:, 0], log_norm_sq, rtol=1e-15)
    assert_logs_close(result.log_sq_norm - (log_norm_sq - math.log(direction @ direction)),
                      unit.log_sq_norm, rtol=1e-12)
    np.testing.assert_array_equal(result.first_diverged_step, unit.first_diverged_step)
    assert 0 < unit.diverged.sum() < 8
    assert math.isfinite(result.lyapunov_exponent)
    assert result.lyapunov_exponent == pytest.approx(unit.lyapunov_exponent, rel=1e-9)
    assert np.all(np.isfinite(result.log_mean_sq))


# ------------------------------------------------------------------------------ one-step overflow
def replay_one_dimensional(curvatures, lr, batch_size, scheme, steps, runs, w0):
    """Exact log w_t^2 in one dimension from the batches the kernel draws (a fixed w_0 uses no
    random numbers, so they are those of kernels_for_tests.batches from fresh streams)."""
    n = len(curvatures)
    counts, indices = batches(scheme, n, batch_size, runs, steps, seed=17)
    logs = np.empty((runs, steps + 1))
    logs[:, 0] = 2 * math.log(abs(w0))
    for r in range(runs):
        for t in range(steps):
            total = sum(curvatures[i] for i in indices[r, t, : counts[r, t]])
            factor = 1.0 - lr / batch_size * total  # |factor| <= 1e300 here: no overflow
            logs[r, t + 1] = logs[r, t] + (2 * math.log(abs(factor)) if factor != 0 else -math.inf)
    return logs


ONE_STEP_CASES = [
    # (curvatures, lr, batch size): lr h beyond the point where ||w||^2 overflows in one step
    ([1e154, 1e160, 0.5], 1.0, 1),
    ([1e300, 1.0, 1e-300], 1.0, 2),
    ([1.0, 2.0, 3.0], 1e154, 1),
    ([1.0, 2.0, 3.0], 1e300 / 6, 2),
    ([1e-150, 3e-150, 5e-151], 1e300, 1),
    ([1.0, 0.25, 1e-10], 1e-300, 1),  # the other end: steps below rounding
]


@pytest.mark.parametrize("case", range(len(ONE_STEP_CASES)))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_steps_beyond_the_float_range_give_exact_logs(case, scheme):
    curvatures, lr, batch_size = ONE_STEP_CASES[case]
    steps, runs, w0, factor = 40, 6, 3.0, 1000.0
    family = HessianFamily.from_features(np.sqrt(np.array(curvatures))[:, None])
    result = run(family, lr, batch_size, steps, runs, sampling=scheme, init=[w0], divergence_factor=factor)
    expected = replay_one_dimensional(curvatures, lr, batch_size, scheme, steps, runs, w0)
    assert not np.any(np.isnan(result.log_sq_norm))
    assert_logs_close(result.log_sq_norm, expected, rtol=1e-12)
    np.testing.assert_array_equal(result.first_diverged_step, first_crossing(expected, factor))
    assert not math.isnan(result.lyapunov_exponent)
    assert not np.any(np.isnan(result.log_mean_sq))
    if np.all(np.isfinite(expected)):
        assert math.isfinite(result.lyapunov_exponent)
        assert np.all(np.isfinite(result.log_mean_sq))


@settings(max_examples=25)
@given(log_lr_h=st.floats(-300, 300).flatmap(
           lambda e: st.tuples(st.just(e), st.floats(max(-300.0, e - 300), min(300.0, e + 300)))),
       scheme=st.sampled_from(SCHEMES))
def test_one_dimensional_growth_at_any_scale(log_lr_h, scheme):
    log_lr_h, log_h = log_lr_h  # lr h = 10^log_lr_h and h = 10^log_h, so lr is in [1e-300, 1e300]
    # Two samples with curvatures h and h / 3: w_{t+1} = (1 - lr sum_batch h_i / B) w_t.
    h = 10.0**log_h
    curvatures = [h, h / 3]
    lr = 10.0**log_lr_h / h
    # Near a factor 0 the log is ill-conditioned (the kernel sees sqrt(h)^2, not h): away from it.
    assume(all(abs(1 - lr * total) > 1e-6 for total in (h, h / 3, h + h / 3)))
    expected = replay_one_dimensional(curvatures, lr, 1, scheme, 12, 3, 1.0)
    family = HessianFamily.from_features(np.sqrt(np.array(curvatures))[:, None])
    result = run(family, lr, 1, 12, 3, sampling=scheme, init=[1.0], divergence_factor=1000.0)
    assert_logs_close(result.log_sq_norm, expected, rtol=1e-12)
    np.testing.assert_array_equal(result.first_diverged_step, first_crossing(expected, 1000.0))


def dense_replay(factors, lr, batch_size, scheme, steps, runs, w0):
    """log ||w_t||^2 by dense algebra with a renormalisation every step (each step's matrix
    I - (lr / B) H_batch has entries up to ~1e300 here, a float)."""
    n = factors.shape[0]
    counts, indices = batches(scheme, n, batch_size, runs, steps, seed=17)
    # H_i = U_i U_i^T formed as (lr / B) U_i U_i^T with the scale applied to a factor first
    root = math.sqrt(lr / batch_size)
    scaled = factors * root
    hessians = np.einsum("idr,ier->ide", scaled, scaled)
    logs = np.empty((runs, steps + 1))
    for r in range(runs):
        w = np.array(w0, dtype=float)
        log_norm = 0.0
        logs[r, 0] = math.log(w @ w)
        for t in range(steps):
            chosen = indices[r, t, : counts[r, t]]
            w = w - hessians[chosen].sum(axis=0) @ w
            size = np.max(np.abs(w))
            w = w / size
            log_norm += 2 * math.log(size)
            logs[r, t + 1] = log_norm + math.log(w @ w)
    return logs


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("feature_scale, lr", [(1e150, 1.0), (1e-100, 1e300), (1.0, 1e200), (1e100, 1e-100)])
def test_multidimensional_runs_with_huge_steps_match_a_renormalised_dense_replay(scheme, feature_scale, lr):
    factors = base_factors() * feature_scale
    w0 = np.array([0.3, -1.0, 2.0])
    result = run(HessianFamily(factors), lr, 2, 25, 4, sampling=scheme, init=w0)
    expected = dense_replay(factors, lr, 2, scheme, 25, 4, w0)
    assert_logs_close(result.log_sq_norm, expected, rtol=1e-9)
    assert math.isfinite(result.lyapunov_exponent)
    assert np.all(np.isfinite(result.log_mean_sq))


def test_huge_steps_are_thread_count_independent():
    family = HessianFamily(base_factors() * 1e100)
    previous = numba.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 1):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SimulationWarning)
                result = simulate(family, 1.0, 2, 30, 33, seed=3, progress=False)
            outputs.append(result.log_sq_norm.tobytes() + result.first_diverged_step.tobytes())
    finally:
        numba.set_num_threads(previous)
    assert outputs[0] == outputs[1] == outputs[2]
    assert np.all(np.isfinite(result.log_sq_norm))
