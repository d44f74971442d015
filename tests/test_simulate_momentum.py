"""simulate with momentum (heavy ball and Nesterov, torch.optim.SGD's conventions) against an
independent dense reference: every batch of a tiny family enumerated with its probability, the
step as a (2d x 2d) matrix on z = (w, w_prev) or (w, v), and E[z z^T] propagated exactly.

Conventions (torch.optim.SGD, dampening 0): heavy ball ``w_{t+1} = w_t - lr H_B w_t +
mu (w_t - w_{t-1})`` with ``w_{-1} = w_0``; Nesterov ``v_t = mu v_{t-1} + H_B w_t``,
``w_{t+1} = w_t - lr (H_B w_t + mu v_t)`` with ``v_{-1} = 0``; ``H_B = (1/B) sum_batch H_i``.
"""

import itertools
import math
import warnings

import numba
import numpy as np
import pytest

from fastsgdstab import HessianFamily, SimulationWarning, simulate

from kernels_for_tests import batches

SE_MULTIPLE = 5.0


def tiny_family(seed=0, n=4, d=2, rank=1):
    rng = np.random.default_rng(seed)
    return HessianFamily(rng.standard_normal((n, d, rank)) / math.sqrt(d))


def hessians(family):
    factors = np.asarray(family._factors)
    return np.einsum("nij,nkj->nik", factors, factors)


def enumerated_batches(sampling, n, batch_size):
    """``[(probability, multiset of indices)]`` of one step of an i.i.d. scheme."""
    if sampling == "bernoulli":
        p = batch_size / n
        return [(p ** len(subset) * (1 - p) ** (n - len(subset)), subset)
                for size in range(n + 1) for subset in itertools.combinations(range(n), size)]
    if sampling == "without_replacement":
        subsets = list(itertools.combinations(range(n), batch_size))
        return [(1.0 / len(subsets), subset) for subset in subsets]
    sequences = list(itertools.product(range(n), repeat=batch_size))
    return [(1.0 / len(sequences), sequence) for sequence in sequences]


def step_matrix(H_batch, lr, momentum, nesterov):
    """The (2d x 2d) map of one step on z = (w, w_prev) (heavy ball) or (w, v) (Nesterov)."""
    d = H_batch.shape[0]
    I = np.eye(d)
    if nesterov:
        # v' = mu v + H w; w' = w - lr (H w + mu v') = (I - lr (1 + mu) H) w - lr mu^2 v
        return np.block([[I - lr * (1 + momentum) * H_batch, -lr * momentum ** 2 * I],
                         [H_batch, momentum * I]])
    return np.block([[(1 + momentum) * I - lr * H_batch, -momentum * I], [I, np.zeros((d, d))]])


def exact_mean_sq(family, lr, batch_size, sampling, momentum, nesterov, w0, steps):
    """E ||w_t||^2 for t = 0 .. steps, by enumeration."""
    H = hessians(family)
    d = family.d
    maps = [(p, step_matrix(sum((H[i] for i in batch), np.zeros((d, d))) / batch_size, lr,
                            momentum, nesterov))
            for p, batch in enumerated_batches(sampling, family.n, batch_size)]
    z0 = np.concatenate([w0, np.zeros(d) if nesterov else w0])
    S = np.outer(z0, z0)
    out = [np.trace(S[:d, :d])]
    for _ in range(steps):
        S = sum(p * A @ S @ A.T for p, A in maps)
        out.append(np.trace(S[:d, :d]))
    return np.array(out)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("sampling, batch_size", [("bernoulli", 2.0), ("bernoulli", 1.5),
                                                  ("without_replacement", 2),
                                                  ("with_replacement", 2)])
def test_mean_square_matches_enumeration(sampling, batch_size, nesterov):
    family = tiny_family(seed=1, n=4, d=2)
    lr = 0.9 / family.sharpness()
    momentum = 0.6
    w0 = np.array([1.0, -0.5])
    steps = 6
    exact = exact_mean_sq(family, lr, batch_size, sampling, momentum, nesterov, w0, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        result = simulate(family, lr, batch_size, steps, 20_000, seed=3, sampling=sampling,
                          init=w0, record_every=1, momentum=momentum, nesterov=nesterov,
                          progress=False)
    assert result.momentum == momentum and result.nesterov == nesterov
    np.testing.assert_allclose(result.log_mean_sq[0], math.log(exact[0]), rtol=0, atol=1e-12)
    for t in range(1, steps + 1):
        error = abs(result.log_mean_sq[t] - math.log(exact[t]))
        assert error <= SE_MULTIPLE * result.log_mean_sq_stderr[t] + 1e-9, (t, error)


def test_momentum_changes_the_answer_detectably():
    # the reference would notice a simulation that ignored momentum: exact values differ by far
    # more than the simulation's error
    family = tiny_family(seed=1, n=4, d=2)
    lr = 0.9 / family.sharpness()
    w0 = np.array([1.0, -0.5])
    plain = exact_mean_sq(family, lr, 2, "without_replacement", 0.0, False, w0, 6)
    heavy = exact_mean_sq(family, lr, 2, "without_replacement", 0.6, False, w0, 6)
    nesterov = exact_mean_sq(family, lr, 2, "without_replacement", 0.6, True, w0, 6)
    assert abs(math.log(heavy[6] / plain[6])) > 0.2 and abs(math.log(nesterov[6] / heavy[6])) > 0.05


def replay(family, lr, batch_size, sampling, momentum, nesterov, w0, steps, seed):
    """A plain numpy loop over the batches the simulation draws for run 0 (fixed w_0: the
    stream starts at counter 0, as kernels_for_tests replays it)."""
    counts, indices = batches(sampling, family.n, batch_size, 1, steps, seed=seed)
    H = hessians(family)
    w = w0.copy()
    previous = w0.copy()
    velocity = np.zeros_like(w0)
    out = [float(w @ w)]
    for t in range(steps):
        batch = indices[0, t, :counts[0, t]]
        gradient = sum((H[i] @ w for i in batch), np.zeros_like(w)) / batch_size
        if nesterov:
            velocity = momentum * velocity + gradient
            w = w - lr * (gradient + momentum * velocity)
        else:
            w, previous = w - lr * gradient + momentum * (w - previous), w
        out.append(float(w @ w))
    return np.log(out)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("sampling", ["bernoulli", "without_replacement", "with_replacement"])
@pytest.mark.filterwarnings("ignore::fastsgdstab.SimulationWarning")
def test_one_run_matches_a_numpy_loop(sampling, nesterov):
    family = tiny_family(seed=4, n=7, d=3, rank=2)
    lr = 1.1 / family.sharpness()
    w0 = np.array([0.3, -1.0, 2.0])
    expected = replay(family, lr, 3, sampling, 0.8, nesterov, w0, 60, seed=9)
    result = simulate(family, lr, 3, 60, 1, seed=9, sampling=sampling, init=w0, record_every=1,
                      momentum=0.8, nesterov=nesterov, divergence_factor=1e300, progress=False)
    np.testing.assert_allclose(result.log_sq_norm[0], expected, rtol=0, atol=1e-11)


@pytest.mark.filterwarnings("ignore::fastsgdstab.SimulationWarning")
def test_renormalisation_keeps_growth_exact_over_many_orders_of_magnitude():
    # a run that grows by e^2000 is renormalised (w and w_prev together) many times: the log
    # norm still follows the numpy loop, which is rescaled by hand here
    family = tiny_family(seed=4, n=5, d=3)
    lr = 4.0 / family.sharpness()
    w0 = np.array([0.3, -1.0, 2.0])
    steps = 1000
    result = simulate(family, lr, 2, steps, 1, seed=2, sampling="with_replacement", init=w0,
                      record_every=1, momentum=0.9, progress=False)
    counts, indices = batches("with_replacement", family.n, 2, 1, steps, seed=2)
    H = hessians(family)
    w, previous, log_scale, expected = w0.copy(), w0.copy(), 0.0, [math.log(w0 @ w0)]
    for t in range(steps):
        gradient = sum(H[i] @ w for i in indices[0, t, :counts[0, t]]) / 2
        w, previous = w - lr * gradient + 0.9 * (w - previous), w
        size = math.sqrt(w @ w + previous @ previous)
        w, previous, log_scale = w / size, previous / size, log_scale + 2 * math.log(size)
        expected.append(log_scale + math.log(w @ w))
    assert expected[-1] > 1000  # the test exercises renormalisation
    np.testing.assert_allclose(result.log_sq_norm[0], expected, rtol=1e-10, atol=1e-8)


def test_momentum_zero_is_plain_sgd_bit_for_bit():
    family = tiny_family(seed=2, n=9, d=3)
    a = simulate(family, 0.5, 3, 40, 30, seed=1, progress=False)
    b = simulate(family, 0.5, 3, 40, 30, seed=1, momentum=0.0, nesterov=False, progress=False)
    assert a.log_sq_norm.tobytes() == b.log_sq_norm.tobytes()
    c = simulate(family, 0.5, 3, 40, 30, seed=1, momentum=0.3, progress=False)
    assert a.log_sq_norm[:, 1:].tobytes() != c.log_sq_norm[:, 1:].tobytes()


@pytest.mark.parametrize("nesterov", [False, True])
def test_threads_do_not_change_momentum_results(nesterov):
    family = tiny_family(seed=3, n=30, d=6, rank=2)
    lr = 1.2 / family.sharpness()
    previous = numba.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SimulationWarning)
                result = simulate(family, lr, 5, 40, 33, seed=5, momentum=0.9, nesterov=nesterov,
                                  sampling="reshuffle", progress=False)
            outputs.append(result.log_sq_norm.tobytes() + result.first_diverged_step.tobytes())
    finally:
        numba.set_num_threads(previous)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(momentum=1.0), ValueError, "momentum must be in \\[0, 1\\)"),
        (dict(momentum=-0.1), ValueError, "momentum"),
        (dict(momentum=math.nan), ValueError, "momentum"),
        (dict(momentum="high"), TypeError, "momentum"),
        (dict(nesterov=True), ValueError, "Nesterov momentum requires a momentum"),
        (dict(momentum=0.5, nesterov="yes"), TypeError, "nesterov"),
        (dict(drop_last=True), ValueError, "drop_last"),
        (dict(sampling="reshuffle", drop_last=1), TypeError, "drop_last"),
    ],
)
def test_bad_momentum_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        simulate(tiny_family(), 0.5, 2, 10, 4, **kwargs)
