"""simulate(sampling="reshuffle") against exact enumeration of every epoch permutation.

Random reshuffling as ``DataLoader(shuffle=True)``: each epoch a uniform permutation of the n
samples, consecutive batches of B; with ``drop_last=False`` the last short batch (n not a
multiple of B) is a step averaged over its own size, with ``drop_last=True`` it is skipped.
Epochs are independent, so ``E[z z^T]`` after whole epochs is the average over the n!
permutations of the epoch's product of step matrices; inside an epoch, of the partial products.
"""

import itertools
import math
import warnings

import numpy as np
import pytest

import fastsgdstab as fs
from fastsgdstab import HessianFamily, SimulationWarning, simulate
from fastsgdstab.sampling import SAMPLING_SCHEMES, SIMULATION_SAMPLING_SCHEMES, check_sampling

SE_MULTIPLE = 5.0


def tiny_family(seed=0, n=3, d=2):
    rng = np.random.default_rng(seed)
    return HessianFamily(rng.standard_normal((n, d, 1)) / math.sqrt(d))


def epoch_batches(permutation, batch_size, drop_last):
    n = len(permutation)
    starts = range(0, n - batch_size + 1 if drop_last else n, batch_size)
    return [permutation[start:start + batch_size] for start in starts]


def step_matrix(H, batch, lr, momentum, nesterov, divide_by=None):
    """One step on z = w (no momentum), (w, w_prev) (heavy ball) or (w, v) (Nesterov); the
    batch is averaged over its own size (or over ``divide_by``)."""
    d = H.shape[1]
    H_batch = sum(H[i] for i in batch) / (divide_by or len(batch))
    I = np.eye(d)
    if momentum == 0.0:
        return I - lr * H_batch
    if nesterov:
        return np.block([[I - lr * (1 + momentum) * H_batch, -lr * momentum ** 2 * I],
                         [H_batch, momentum * I]])
    return np.block([[(1 + momentum) * I - lr * H_batch, -momentum * I], [I, np.zeros((d, d))]])


def exact_mean_sq(family, lr, batch_size, drop_last, w0, steps, momentum=0.0, nesterov=False,
                  divide_by=None):
    """E ||w_t||^2 for t = 0 .. steps by enumeration of every epoch's permutation."""
    factors = np.asarray(family._factors)
    H = np.einsum("nij,nkj->nik", factors, factors)
    d = family.d
    permutations = list(itertools.permutations(range(family.n)))
    epochs = [[step_matrix(H, batch, lr, momentum, nesterov, divide_by)
               for batch in epoch_batches(list(p), batch_size, drop_last)] for p in permutations]
    per_epoch = len(epochs[0])
    z0 = w0 if momentum == 0.0 else np.concatenate([w0, np.zeros(d) if nesterov else w0])
    S = np.outer(z0, z0)  # E[z z^T] at the start of the current epoch
    out = [np.trace(S[:d, :d])]
    t = 0
    while t < steps:
        partial = [np.eye(len(z0)) for _ in epochs]
        for position in range(per_epoch):
            partial = [A @ P for A, P in zip((epoch[position] for epoch in epochs), partial)]
            mean = sum(P @ S @ P.T for P in partial) / len(partial)
            out.append(np.trace(mean[:d, :d]))
            t += 1
            if t == steps:
                break
        S = mean
    return np.array(out)


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.5, False), (0.5, True)])
@pytest.mark.parametrize("n, batch_size, drop_last", [(3, 2, False), (3, 2, True), (4, 3, False),
                                                      (4, 3, True), (4, 2, False)])
def test_mean_square_matches_enumeration_of_permutations(n, batch_size, drop_last, momentum,
                                                         nesterov):
    family = tiny_family(seed=n, n=n, d=2)
    lr = 1.4 / family.sharpness()
    w0 = np.array([1.0, 0.7])
    per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    steps = 2 * per_epoch + 1  # two epochs and the first step of a third
    exact = exact_mean_sq(family, lr, batch_size, drop_last, w0, steps, momentum, nesterov)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        result = simulate(family, lr, batch_size, steps, 20_000, seed=7, sampling="reshuffle",
                          drop_last=drop_last, init=w0, record_every=1, momentum=momentum,
                          nesterov=nesterov, progress=False)
    assert result.sampling == "reshuffle" and result.drop_last == drop_last
    for t in range(1, steps + 1):
        error = abs(result.log_mean_sq[t] - math.log(exact[t]))
        assert error <= SE_MULTIPLE * result.log_mean_sq_stderr[t] + 1e-9, (t, error)


def test_the_short_batch_averaging_matters_detectably():
    # the reference separates averaging the short batch over its own size from averaging it
    # over B by far more than the simulation's error: the test above would catch the mistake
    family = tiny_family(seed=3, n=3, d=2)
    lr = 1.4 / family.sharpness()
    w0 = np.array([1.0, 0.7])
    own = exact_mean_sq(family, lr, 2, False, w0, 4)
    over_b = exact_mean_sq(family, lr, 2, False, w0, 4, divide_by=2)
    result = simulate(family, lr, 2, 4, 20_000, seed=7, sampling="reshuffle", init=w0,
                      record_every=1, progress=False)
    for t in (2, 4):
        assert abs(math.log(own[t] / over_b[t])) > 4 * SE_MULTIPLE * result.log_mean_sq_stderr[t]


def test_full_batch_epochs_are_gradient_descent():
    family = tiny_family(seed=5, n=4, d=2)
    lr = 0.7 / family.sharpness()
    w0 = np.array([0.5, -2.0])
    result = simulate(family, lr, 4, 5, 3, sampling="reshuffle", init=w0, record_every=1,
                      progress=False)
    factors = np.asarray(family._factors)
    H = np.einsum("nij,nkj->ik", factors, factors) / family.n
    w, expected = w0.copy(), [math.log(w0 @ w0)]
    for _ in range(5):
        w = w - lr * H @ w
        expected.append(math.log(w @ w))
    for run in range(3):
        np.testing.assert_allclose(result.log_sq_norm[run], expected, rtol=0, atol=1e-12)


def test_every_sample_is_used_once_per_epoch():
    # samples with orthogonal directions: after an epoch of lr = B (one-sample steps of size 1
    # project out each sample's coordinate), w is exactly 0 whatever the order, and not before
    n = 5
    family = HessianFamily.from_features(np.eye(n))
    result = simulate(family, 1.0, 1, n, 50, sampling="reshuffle", init=np.ones(n),
                      record_every=1, progress=False)
    assert np.all(np.isneginf(result.log_sq_norm[:, n]))
    np.testing.assert_allclose(result.log_sq_norm[:, n - 1], 0.0, atol=1e-12)  # one left


def test_exact_engine_refuses_reshuffle_and_points_to_simulate():
    assert "reshuffle" not in SAMPLING_SCHEMES and "reshuffle" in SIMULATION_SAMPLING_SCHEMES
    family = tiny_family()
    with pytest.raises(ValueError, match="simulate"):
        check_sampling("reshuffle")
    with pytest.raises(ValueError, match="simulate"):
        fs.second_moment(family, 0.5, 2, 3, sampling="reshuffle")
    with pytest.raises(ValueError, match="simulate"):
        fs.spectral_radius(family, 0.5, 2, sampling="reshuffle")


def test_reshuffle_needs_an_integer_batch_and_memory_for_its_permutations():
    family = tiny_family(n=3)
    with pytest.raises(ValueError, match="batch_size"):
        simulate(family, 0.5, 1.5, 3, 4, sampling="reshuffle")
    big = HessianFamily.from_features(np.ones((10**6, 1)))
    with pytest.raises(ValueError, match="permutation"):
        simulate(big, 0.5, 2, 3, 10**7, sampling="reshuffle", record_every=3)
