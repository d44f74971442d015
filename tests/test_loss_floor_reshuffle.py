"""The reshuffled loss floor (``stationary(..., sampling="reshuffle")``, a Monte-Carlo estimate)
against an independent reference: the exact time-averaged stationary excess loss of reshuffled
epochs by enumeration of every permutation of a tiny training set (n = 4, 5), with the epoch's
affine map written as one dense (D + 1)^2 Kronecker operator (specification page, section
"Random reshuffling": the epoch is the i.i.d. unit)."""

import itertools
import math
import warnings

import numpy as np
import pytest

import fastsgdstab as fs
from fastsgdstab import HessianFamily, NoStationaryStateError, StationaryEstimate, stationary

from reference import momentum_step


def enumerated_reshuffle_floor(hessians, gradients, lr, batch_size, drop_last=False, momentum=0.0,
                               nesterov=False):
    """Exact time-averaged stationary ``(1/2) E w^T H w`` of SGD with reshuffled epochs.

    State z = (w, 1) (momentum: (w_t, w_{t-1} or v_{t-1}, 1)); a step is the affine matrix
    [[A_B, c_B], [0, 1]]; every permutation of the n samples is one epoch (consecutive batches,
    a short last batch averaged over its own size or dropped). The stationary second moment S
    at epoch boundaries solves S = E[M S M^T] with S[-1, -1] = 1 (M the epoch's product), and the
    loss is averaged over the epoch's step positions j, E[P_j S P_j^T] with P_j its first j
    steps (the epoch's permutation is independent of its starting state)."""
    hessians = np.asarray(hessians, float)
    g = np.asarray(gradients, float)
    n, d = g.shape
    H = hessians.mean(axis=0)
    size = d if momentum == 0.0 else 2 * d
    D = size + 1
    steps = n // batch_size if drop_last else -(-n // batch_size)
    prefix = [np.zeros((D * D, D * D)) for _ in range(steps + 1)]
    count = 0
    for perm in itertools.permutations(range(n)):
        count += 1
        P = np.eye(D)
        prefix[0] += np.kron(P, P)
        for j in range(steps):
            idx = list(perm[j * batch_size:(j + 1) * batch_size])
            H_B = hessians[idx].mean(axis=0)
            g_B = g[idx].mean(axis=0)
            A = np.eye(D)
            if momentum == 0.0:
                A[:d, :d] -= lr * H_B
                A[:d, d] = -lr * g_B
            else:
                A[:size, :size] = momentum_step(H_B, lr, momentum, nesterov)
                A[:size, size] = (np.concatenate([-lr * (1 + momentum) * g_B, g_B]) if nesterov
                                  else np.concatenate([-lr * g_B, np.zeros(d)]))
            P = A @ P
            prefix[j + 1] += np.kron(P, P)
    prefix = [p / count for p in prefix]
    T = prefix[steps]
    corner = D * D - 1  # vec index of S[-1, -1]
    keep = np.arange(D * D) != corner
    unit = np.zeros(D * D)
    unit[corner] = 1.0
    s = unit.copy()
    s[keep] = np.linalg.solve(np.eye(keep.sum()) - T[np.ix_(keep, keep)], (T @ unit)[keep])
    total = 0.0
    for j in range(steps):
        S = (prefix[j] @ s).reshape(D, D)
        total += 0.5 * np.trace(H @ S[:d, :d])
    return total / steps


def tiny_family(seed, n, d=2, r=1):
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n, d, r))
    g = rng.standard_normal((n, d))
    g -= g.mean(axis=0)
    hessians = np.einsum("idr,ier->ide", factors, factors)
    return HessianFamily(factors, gradients=g), hessians, g


def close(estimate, exact):
    """Within 4.5 standard errors, plus 1% for the burn-in's heuristic transient bias."""
    return abs(estimate.excess_loss - exact) <= 4.5 * estimate.stderr + 0.01 * exact


def test_reference_against_plain_monte_carlo():
    # The enumeration itself, checked against a direct numpy simulation of reshuffled epochs.
    family, hessians, g = tiny_family(3, 4)
    lr = 0.3 * fs.critical_lr(family, 2, sampling="without_replacement")
    exact = enumerated_reshuffle_floor(hessians, g, lr, 2)
    rng = np.random.default_rng(0)
    runs, epochs = 64, 400
    w = np.zeros((runs, 2))
    H = hessians.mean(axis=0)
    total, counted = 0.0, 0
    for epoch in range(epochs):
        orders = np.argsort(rng.random((runs, 4)), axis=1)
        for j in range(2):
            if epoch >= 50:
                total += 0.5 * np.einsum("ra,ab,rb->", w, H, w)
                counted += runs
            idx = orders[:, 2 * j:2 * j + 2]
            H_B = hessians[idx].mean(axis=1)
            w = w - lr * (np.einsum("rab,rb->ra", H_B, w) + g[idx].mean(axis=1))
    assert total / counted == pytest.approx(exact, rel=0.05)


@pytest.mark.parametrize("n, batch_size, drop_last, fraction", [
    (4, 2, False, 0.05), (4, 1, False, 0.5), (5, 2, False, 0.25), (5, 2, True, 0.5),
    (5, 3, False, 0.8),
])
def test_estimate_against_enumeration(n, batch_size, drop_last, fraction):
    family, hessians, g = tiny_family(10 * n + batch_size, n)
    lr = fraction * fs.critical_lr(family, batch_size, sampling="without_replacement")
    exact = enumerated_reshuffle_floor(hessians, g, lr, batch_size, drop_last)
    result = stationary(family, lr, batch_size, sampling="reshuffle", drop_last=drop_last,
                        estimate_rtol=0.01)
    assert isinstance(result, StationaryEstimate) and result.exact is False
    assert result.relative_stderr <= 0.0125
    assert close(result, exact), (result, exact)


@pytest.mark.parametrize("nesterov", [False, True])
def test_estimate_with_momentum_against_enumeration(nesterov):
    family, hessians, g = tiny_family(7, 4)
    lr = 0.3 * fs.critical_lr(family, 2, sampling="without_replacement", momentum=0.5,
                              nesterov=nesterov)
    exact = enumerated_reshuffle_floor(hessians, g, lr, 2, momentum=0.5, nesterov=nesterov)
    result = stationary(family, lr, 2, sampling="reshuffle", momentum=0.5, nesterov=nesterov)
    assert close(result, exact), (result, exact)


def test_estimate_in_higher_dimension_with_flat_directions_and_mean():
    # d = 3 with rank-2 H (a flat direction the gradients avoid) and a non-zero gradient mean:
    # the floor is measured around the quadratic model's own minimum, as the exact engine does.
    rng = np.random.default_rng(5)
    n = 4
    basis = np.linalg.qr(rng.standard_normal((3, 2)))[0]
    factors = np.einsum("da,iar->idr", basis, rng.standard_normal((n, 2, 1)))
    g = rng.standard_normal((n, 2)) @ basis.T
    g -= g.mean(axis=0)
    hessians = np.einsum("idr,ier->ide", factors, factors)
    shift = 0.3 * (basis @ rng.standard_normal(2))  # a point beside the minimum, in range(H)
    moved = g + np.einsum("ide,e->id", hessians, shift)  # g_i + H_i delta: mean H delta != 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotAMinimumWarning: the point is not a minimum
        family = HessianFamily(factors, gradients=moved)
    # centred: g_i + H_i delta - H_i H^+ H delta = g_i, the gradients at the minimum itself
    centred_g = g
    lr = 0.4 * fs.critical_lr(family, 2, sampling="without_replacement")
    exact = enumerated_reshuffle_floor(hessians, centred_g, lr, 2)
    result = stationary(family, lr, 2, sampling="reshuffle")
    assert close(result, exact), (result, exact)


def test_reshuffled_floor_lies_far_below_iid_at_small_lr():
    family, hessians, g = tiny_family(11, 5)
    lr = 0.05 * fs.critical_lr(family, 1, sampling="without_replacement")
    iid = stationary(family, lr, 1, sampling="without_replacement").excess_loss
    estimate = stationary(family, lr, 1, sampling="reshuffle")
    exact = enumerated_reshuffle_floor(hessians, g, lr, 1)
    assert exact < 0.5 * iid  # the reference says so; the estimate must follow it
    assert estimate.excess_loss + 4 * estimate.stderr < 0.5 * iid


def test_scales_with_gradients_and_is_rotation_invariant():
    family, hessians, g = tiny_family(2, 5, d=3, r=2)
    lr = 0.3 * fs.critical_lr(family, 2, sampling="without_replacement")
    base = stationary(family, lr, 2, sampling="reshuffle", seed=4)
    # the affine iteration from the minimum is linear in g: same seed, same batches, c^2 floor
    scaled = stationary(HessianFamily(family.factors, gradients=3.0 * g), lr, 2,
                        sampling="reshuffle", seed=4)
    assert scaled.excess_loss == pytest.approx(9.0 * base.excess_loss, rel=1e-6)
    rotation = np.linalg.qr(np.random.default_rng(1).standard_normal((3, 3)))[0]
    rotated = HessianFamily(np.einsum("ab,ibr->iar", rotation, family.factors),
                            gradients=g @ rotation.T)
    turned = stationary(rotated, lr, 2, sampling="reshuffle", seed=4)
    assert abs(turned.excess_loss - base.excess_loss) <= 4.5 * math.hypot(turned.stderr,
                                                                          base.stderr)


def test_same_seed_same_estimate_and_str_says_estimate():
    family, _, _ = tiny_family(1, 4)
    first = stationary(family, 0.1, 2, sampling="reshuffle", seed=9)
    again = stationary(family, 0.1, 2, sampling="reshuffle", seed=9)
    assert first == again
    text = str(first)
    assert "estimate" in text and "not a proven bracket" in text and "standard error" in text
    assert not hasattr(first, "lower") and not hasattr(first, "upper")


def test_no_noise_gives_zero_and_divergence_is_reported():
    family, hessians, g = tiny_family(0, 5)
    assert stationary(family, 0.1, 5, sampling="reshuffle").excess_loss == 0.0
    # far above the i.i.d. eta* (but below 2 / lambda_1): the runs blow up
    eta = fs.critical_lr(family, 1, sampling="without_replacement")
    sharpness = np.linalg.eigvalsh(hessians.mean(axis=0))[-1]
    lr = 0.5 * (eta + 2.0 / sharpness)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoStationaryStateError, match="no stationary state"):
            stationary(family, lr, 1, sampling="reshuffle")
    with pytest.raises(NoStationaryStateError, match="does not contract"):
        stationary(family, 2.5 / sharpness, 1, sampling="reshuffle")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(covariance=True), ValueError, "covariance"),
    (dict(estimate_rtol=0.0), ValueError, "estimate_rtol"),
    (dict(estimate_rtol=1.5), ValueError, "estimate_rtol"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), ValueError, "seed"),
    (dict(drop_last="yes"), TypeError, "drop_last"),
    (dict(batch_size=2.5), ValueError, "batch_size"),
    (dict(batch_size=9), ValueError, "batch_size"),
])
def test_bad_arguments(kwargs, error, match):
    family, _, _ = tiny_family(0, 4)
    arguments = dict(batch_size=2)
    arguments.update(kwargs)
    batch_size = arguments.pop("batch_size")
    with pytest.raises(error, match=match):
        stationary(family, 0.1, batch_size, sampling="reshuffle", **arguments)


def test_drop_last_only_with_reshuffle_and_gradients_required():
    family, _, _ = tiny_family(0, 4)
    with pytest.raises(ValueError, match="drop_last"):
        stationary(family, 0.1, 2, sampling="without_replacement", drop_last=True)
    with pytest.raises(ValueError, match="gradients"):
        stationary(HessianFamily(family.factors), 0.1, 2, sampling="reshuffle")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_estimate_against_enumeration_thorough(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(4, 6))
    batch_size = int(rng.integers(1, n))
    drop_last = bool(rng.integers(2))
    fraction = float(rng.uniform(0.02, 0.9))
    family, hessians, g = tiny_family(200 + seed, n, d=int(rng.integers(1, 4)))
    lr = fraction * fs.critical_lr(family, batch_size, sampling="without_replacement")
    exact = enumerated_reshuffle_floor(hessians, g, lr, batch_size, drop_last)
    result = stationary(family, lr, batch_size, sampling="reshuffle", drop_last=drop_last,
                        estimate_rtol=0.005, seed=seed)
    assert close(result, exact), (result, exact)


def test_runs_that_keep_growing_without_overflow_are_reported(monkeypatch):
    # The check behind the overflow one: simulated runs whose log ||w||^2 grows steadily after
    # the burn-in (a slow divergence that stays in the float range) are no stationary state.
    import types

    import fastsgdstab.simulation as simulation

    def growing(family, lr, batch_size, steps, runs, **kwargs):
        records = np.arange(0, steps + 1, kwargs["record_every"])
        log_sq = np.tile(-690.0 + 0.05 * records, (runs, 1)) + np.random.default_rng(0).normal(
            size=(runs, records.size))
        return types.SimpleNamespace(excess_loss=1.0, excess_loss_stderr=0.001,
                                     interrupted=False, log_sq_norm=log_sq)

    family, _, _ = tiny_family(0, 4)
    monkeypatch.setattr(simulation, "simulate", growing)
    with pytest.raises(NoStationaryStateError, match="keeps growing"):
        stationary(family, 0.1, 2, sampling="reshuffle")

    def flat(family, lr, batch_size, steps, runs, **kwargs):
        out = growing(family, lr, batch_size, steps, runs, **kwargs)
        out.log_sq_norm = out.log_sq_norm - 0.05 * np.arange(out.log_sq_norm.shape[1]) \
            * kwargs["record_every"]
        return out

    monkeypatch.setattr(simulation, "simulate", flat)
    assert stationary(family, 0.1, 2, sampling="reshuffle").excess_loss > 0


@pytest.mark.parametrize("n, batch_size", [(4, 2), (4, 1), (5, 1)])
def test_small_lr_limit_against_enumeration(n, batch_size):
    # The exact leading term of the small-lr expansion: the enumerated floor over it -> 1
    # (next order O(lr)). The estimate carries it (its lr^2 scaling makes the value at any lr
    # the one at a tiny lr times (lr / tiny)^2).
    family, hessians, g = tiny_family(40 + n + batch_size, n, d=2, r=2)
    eta = fs.critical_lr(family, batch_size, sampling="without_replacement")
    lr = 0.1 * eta
    estimate = stationary(family, lr, batch_size, sampling="reshuffle", estimate_rtol=0.05)
    ratios = []
    for fraction in (1e-3, 1e-2):
        exact = enumerated_reshuffle_floor(hessians, g, fraction * eta, batch_size)
        limit = estimate.small_lr_limit * (fraction * eta / lr) ** 2
        ratios.append(abs(exact / limit - 1.0))
    assert ratios[0] < 2e-3 and ratios[0] < ratios[1]
    # not defined when an epoch's batches do not use every sample once, nor with momentum
    assert math.isnan(stationary(family, lr, 3, sampling="reshuffle",
                                 estimate_rtol=0.05).small_lr_limit)
    assert math.isnan(stationary(family, lr, batch_size, sampling="reshuffle", momentum=0.5,
                                 estimate_rtol=0.05).small_lr_limit)
