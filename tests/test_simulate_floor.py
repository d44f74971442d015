"""``simulate`` on a family with per-sample gradients (specification, section "Non-interpolating
minima: stationary covariance and the loss floor"): the affine iteration ``w <- (I - lr H_B) w -
lr g_B`` and its time-averaged excess loss, against references that share nothing with the
kernel: ``stationary``'s linear solve (checked there against a dense enumeration), the exact
second-moment trajectory with gradients, and a plain numpy Monte Carlo of reshuffled epochs.
Statistical comparisons allow 5 standard errors (fixed seeds: deterministic)."""

import math
import warnings

import numpy as np
import pytest

import fastsgdstab as fs
from fastsgdstab import HessianFamily, SimulationWarning, simulate, stationary
from fastsgdstab import simulation as simulation_module

SCHEMES = ("bernoulli", "without_replacement", "with_replacement")


def gradient_family(seed=0, n=6, d=3, r=2):
    """Factors (n, d, r) and centred gradients in the span of the factor columns (range(H))."""
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n, d, r))
    columns = factors.transpose(0, 2, 1).reshape(n * r, d)
    gradients = rng.standard_normal((n, n * r)) @ columns / n
    gradients -= gradients.mean(axis=0)
    return HessianFamily(factors, gradients=gradients), factors, gradients


def quiet_simulate(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        return simulate(*args, progress=False, **kwargs)


# ------------------------------------------------------------------ the floor
@pytest.mark.parametrize("sampling", SCHEMES)
@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.5, False)])
def test_time_averaged_excess_loss_matches_stationary(sampling, momentum, nesterov):
    family, _, _ = gradient_family(1)
    batch = 2
    lr = 0.4 * fs.critical_lr(family, batch, sampling=sampling, momentum=momentum,
                              nesterov=nesterov)
    result = quiet_simulate(family, lr, batch, 3000, 100, seed=3, sampling=sampling,
                            momentum=momentum, nesterov=nesterov, burn_in=600)
    exact = stationary(family, lr, batch, sampling=sampling, momentum=momentum,
                       nesterov=nesterov).excess_loss
    assert result.burn_in == 600 and not result.diverged.any()
    assert 0 < result.excess_loss_stderr < 0.05 * exact
    assert abs(result.excess_loss - exact) <= 5 * result.excess_loss_stderr, \
        (result.excess_loss, result.excess_loss_stderr, exact)


def test_nesterov_floor_matches_stationary():
    family, _, _ = gradient_family(2, n=5, d=2, r=1)
    lr = 0.5 * fs.critical_lr(family, 2, sampling="bernoulli", momentum=0.6, nesterov=True)
    result = quiet_simulate(family, lr, 2, 3000, 100, seed=5, momentum=0.6, nesterov=True)
    exact = stationary(family, lr, 2, momentum=0.6, nesterov=True).excess_loss
    assert abs(result.excess_loss - exact) <= 5 * result.excess_loss_stderr


def test_one_run_uses_batch_means_over_time():
    family, _, _ = gradient_family(3, n=4, d=2, r=1)
    lr = 0.3 * fs.critical_lr(family, 1, sampling="with_replacement")
    result = quiet_simulate(family, lr, 1, 100_000, 1, seed=2, sampling="with_replacement",
                            record_every=1000)
    exact = stationary(family, lr, 1, sampling="with_replacement").excess_loss
    assert math.isfinite(result.excess_loss_stderr) and result.excess_loss_stderr > 0
    assert abs(result.excess_loss - exact) <= 5 * result.excess_loss_stderr


# ------------------------------------------------------------------ the transient, exactly
@pytest.mark.parametrize("sampling, init", [("bernoulli", "normal"),
                                            ("without_replacement", np.array([1.5, -2.0, 0.5])),
                                            ("with_replacement", "uniform")])
def test_mean_square_trajectory_matches_second_moment(sampling, init):
    # the exact trajectory includes the gradients' term and (non-zero mean) the cross term
    family, _, _ = gradient_family(4)
    lr = 0.6 * fs.critical_lr(family, 2, sampling=sampling)
    steps = 12
    exact = fs.second_moment(family, lr, 2, steps, sampling=sampling, init=init)
    result = quiet_simulate(family, lr, 2, steps, 20_000, seed=7, sampling=sampling, init=init,
                            record_every=1)
    for t in (1, 2, 5, 12):
        error = result.log_mean_sq_stderr[t]
        assert 0 < error < 0.05
        assert abs(result.log_mean_sq[t] - exact.log_mean_sq[t]) <= 5 * error, t
    # w_0 itself is exact for a fixed vector (not rescaled)
    if isinstance(init, np.ndarray):
        assert np.all(result.log_sq_norm[:, 0] == math.log(float(init @ init)))


# ------------------------------------------------------------------ reshuffled epochs
def numpy_reshuffle_floor(factors, gradients, lr, batch_size, steps, burn_in, chains, seed):
    """Reshuffled epochs in plain numpy (a short last batch averaged over its own size)."""
    hessians = np.einsum("idr,ier->ide", factors, factors)
    H = hessians.mean(axis=0)
    n, d = gradients.shape
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((chains, d))
    totals = np.zeros(chains)
    order = None
    per_epoch = -(-n // batch_size)
    for t in range(1, steps + 1):
        position = (t - 1) % per_epoch
        if position == 0:
            order = np.argsort(rng.random((chains, n)), axis=1)
        batch = order[:, position * batch_size:(position + 1) * batch_size]
        H_B = hessians[batch].mean(axis=1)
        g_B = gradients[batch].mean(axis=1)
        w = w - lr * (np.einsum("cij,cj->ci", H_B, w) + g_B)
        if t > burn_in:
            totals += 0.5 * np.einsum("ci,ij,cj->c", w, H, w)
    means = totals / (steps - burn_in)
    return means.mean(), means.std(ddof=1) / math.sqrt(chains)


def test_reshuffle_floor_matches_a_numpy_simulation_with_a_short_last_batch():
    family, factors, gradients = gradient_family(5, n=5, d=3, r=2)
    lr = 0.3 * fs.critical_lr(family, 2, sampling="without_replacement")
    result = quiet_simulate(family, lr, 2, 1500, 200, seed=1, sampling="reshuffle", burn_in=300)
    reference, reference_error = numpy_reshuffle_floor(factors, gradients, lr, 2, 1500, 300,
                                                       200, seed=9)
    assert math.isfinite(result.excess_loss) and result.excess_loss > 0
    error = math.hypot(result.excess_loss_stderr, reference_error)
    assert abs(result.excess_loss - reference) <= 5 * error, (result.excess_loss, reference)
    # reshuffling beats i.i.d. batches here, and the floor is not that of drop_last
    iid = stationary(family, lr, 2, sampling="without_replacement").excess_loss
    assert result.excess_loss < iid
    dropped = quiet_simulate(family, lr, 2, 1500, 200, seed=1, sampling="reshuffle",
                             burn_in=300, drop_last=True)
    assert math.isfinite(dropped.excess_loss) and dropped.excess_loss != result.excess_loss


def test_full_batch_reshuffle_is_deterministic_gradient_descent():
    # B = n: every step is full-batch GD and g_B = mean g = 0: w_t = (I - lr H)^t w_0
    family, factors, _ = gradient_family(6, n=4, d=3, r=1)
    H = np.einsum("idr,ier->de", factors, factors) / 4
    w0 = np.array([1.0, -0.5, 2.0])
    lr = 0.5 / np.linalg.eigvalsh(H)[-1]
    result = quiet_simulate(family, lr, 4, 30, 2, sampling="reshuffle", init=w0,
                            record_every=1, burn_in=20)
    w = w0.copy()
    expected, losses = [math.log(w @ w)], []
    for t in range(1, 31):
        w = w - lr * H @ w
        expected.append(math.log(w @ w))
        if t > 20:
            losses.append(0.5 * w @ H @ w)
    np.testing.assert_allclose(result.log_sq_norm, [expected, expected], rtol=1e-9, atol=1e-12)
    assert result.excess_loss == pytest.approx(np.mean(losses), rel=1e-9, abs=1e-15)


# ------------------------------------------------------------------ divergence, blocks, checks
def test_above_eta_star_is_diverged_and_infinite_never_nan():
    family, _, _ = gradient_family(7)
    lr = 3.0 * fs.critical_lr(family, 2, sampling="bernoulli")
    with pytest.warns(SimulationWarning, match="left the float range"):
        result = simulate(family, lr, 2, 3000, 20, seed=1, progress=False)
    assert result.excess_loss == math.inf and result.excess_loss_stderr == math.inf
    assert result.diverged.all() and result.diverged_fraction == 1.0
    assert not np.isnan(result.log_sq_norm).any()
    assert np.isposinf(result.log_sq_norm[:, -1]).all()
    assert "excess loss" in str(result)


def test_blocks_of_runs_combine_to_the_whole_simulation():
    family, _, _ = gradient_family(8)
    settings = simulation_module._check_arguments(family, 0.1, 2, 200, 10, seed=4,
                                                  sampling="without_replacement",
                                                  momentum=0.3, progress=False)
    whole = simulation_module._combine(settings, [simulation_module._run_block(settings, 0, 10)],
                                       0.0)
    parts = simulation_module._combine(settings, [simulation_module._run_block(settings, 0, 4),
                                                  simulation_module._run_block(settings, 4, 10)],
                                       0.0)
    np.testing.assert_array_equal(whole.log_sq_norm, parts.log_sq_norm)
    assert whole.excess_loss == parts.excess_loss
    assert whole.excess_loss_stderr == parts.excess_loss_stderr


def test_interrupted_before_and_after_the_burn_in():
    family, _, _ = gradient_family(9)
    full = quiet_simulate(family, 0.1, 2, 100, 30, seed=2)
    assert full.burn_in == 25 and full.excess_loss > 0
    stop = {}

    def interrupt(done):
        if done >= stop["at"]:
            import signal
            signal.raise_signal(signal.SIGINT)

    for at, has_estimate in ((10, False), (60, True)):
        stop["at"] = at
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)
            part = simulation_module._simulate(
                family, 0.1, 2, 100, 30, seed=2, sampling="bernoulli", init="normal",
                record_every=None, divergence_factor=1000.0, progress=False, chunk_steps=10,
                on_chunk=interrupt)
        assert part.interrupted and part.steps_completed == at
        assert (part.excess_loss is not None) == has_estimate
        if has_estimate:
            assert math.isfinite(part.excess_loss) and math.isfinite(part.excess_loss_stderr)
            assert not np.isnan(part.log_sq_norm).any()


def test_burn_in_is_checked():
    family, factors, _ = gradient_family(0)
    with pytest.raises(ValueError, match="burn_in must be in"):
        simulate(family, 0.1, 2, 50, 2, burn_in=50, progress=False)
    with pytest.raises(TypeError, match="burn_in"):
        simulate(family, 0.1, 2, 50, 2, burn_in=2.5, progress=False)
    with pytest.raises(ValueError, match="burn_in applies to families with per-sample gradients"):
        simulate(HessianFamily(factors), 0.1, 2, 50, 2, burn_in=5, progress=False)
    plain = quiet_simulate(HessianFamily(factors), 0.1, 2, 5, 3)
    assert plain.excess_loss is None and plain.excess_loss_stderr is None
    assert "excess loss" not in str(plain)


# ------------------------------------------------------------------ no gradients: unchanged path
# log ||w_7||^2 of runs 0-2 (float.hex), recorded on main before the affine path existed
# (commit b462c89), for a family without gradients: that path must keep its bits.
BEFORE = {
    (("sampling", "bernoulli"),):
        ["0x1.259455a901b46p+0", "-0x1.f10134f29bc7fp+0", "-0x1.92d1a86187ca8p+0"],
    (("sampling", "without_replacement"),):
        ["0x1.d64e5192aacb0p-1", "-0x1.953573668ba6fp+1", "-0x1.2c7dd93514dc0p+1"],
    (("sampling", "with_replacement"),):
        ["0x1.d64e5192aacb0p-1", "-0x1.94768aa83aa64p+1", "-0x1.1384684d02bc0p+1"],
    (("sampling", "reshuffle"),):
        ["0x1.bbcebaf7ca542p-1", "-0x1.a71c1a98a797fp+1", "-0x1.98a9a146198a0p-1"],
    (("sampling", "without_replacement"), ("momentum", 0.5)):
        ["0x1.5db99537041e4p+1", "-0x1.2c004ab54a9cep+2", "-0x1.4c6bd8d14f4b0p+1"],
    (("sampling", "bernoulli"), ("momentum", 0.3), ("nesterov", True)):
        ["0x1.7d19badadeabap+0", "0x1.d7c5b8119261fp+0", "0x1.78e921757fec1p+1"],
}


@pytest.mark.parametrize("case", list(BEFORE))
def test_family_without_gradients_keeps_its_bits(case):
    factors = np.random.default_rng(3).standard_normal((5, 3, 2))
    result = quiet_simulate(HessianFamily(factors), 0.3, 2, 7, 3, seed=11, **dict(case))
    # Equal bits on the machine that recorded them; elsewhere the compiler may contract a
    # multiply-add differently (fused on one CPU, not on another), so the check is to 1e-12:
    # still far below any change of the path's arithmetic.
    recorded = np.array([float.fromhex(x) for x in BEFORE[case]])
    np.testing.assert_allclose(result.log_sq_norm[:, -1], recorded, rtol=1e-12, atol=1e-12)
