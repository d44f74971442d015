"""Momentum ``second_moment`` as compiled kernels (issue 19, item 4) against independent references.

* The dense (2d)^2 x (2d)^2 Kronecker operator ``E[A_B (x) A_B]`` (``reference.py``, every batch
  enumerated), iterated on the full R^{2d}: no range restriction, no block structure.
* The affine trajectory (per-sample gradients) against the enumerated z -> A_B z + c_B moments
  on R^{2d}, written here from the definitions.
* Release 0.1.0's Python loops (``benchmarks/momentum_loops.py``, numpy blocks per step), where
  the kernels must agree to 1e-12 relative on larger families than the dense references allow.
"""

import importlib.util
import pathlib
import warnings

import numpy as np
import pytest

import fastsgdstab as fs
from fastsgdstab import HessianFamily, moments
from fastsgdstab import NotAMinimumWarning

import reference as ref

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEMES = ("bernoulli", "without_replacement", "with_replacement")


def _loops():
    spec = importlib.util.spec_from_file_location("momentum_loops",
                                                  ROOT / "benchmarks" / "momentum_loops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOOPS = _loops()


def family_with_flat_direction(seed, n=4, d=3, r=2, gradients=False):
    """Rank-r factors with the last coordinate flat (d > k, the null space is tracked apart)."""
    rng = np.random.default_rng(seed)
    factors = np.zeros((n, d, r))
    factors[:, : d - 1, :] = rng.standard_normal((n, d - 1, r)) * rng.uniform(0.5, 1.5, (n, 1, 1))
    if not gradients:
        return factors, None, HessianFamily(factors)
    g = rng.standard_normal((n, d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotAMinimumWarning)
        return factors, g, HessianFamily(factors, gradients=g)


@pytest.mark.parametrize("sampling", SCHEMES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_kernel_matches_dense_kronecker_reference(sampling, nesterov):
    factors, _, family = family_with_flat_direction(3)
    hessians = ref.dense_from_factors(factors)
    lr = 0.7 / family.sharpness()
    w0 = np.array([0.3, -1.2, 0.8])  # a part in the flat direction too
    sigma0 = np.array([[2.0, 0.3, 0.1], [0.3, 1.0, -0.2], [0.1, -0.2, 0.5]])
    for init, kw in ((None, {}), (w0, {"w0": w0}), (sigma0, {"sigma0": sigma0})):
        result = fs.second_moment(family, lr, 2, 30, sampling=sampling, momentum=0.8,
                                  nesterov=nesterov, init="normal" if init is None else init)
        expected = ref.momentum_log_mean_sq(hessians, lr, 2, sampling, 0.8, nesterov, 30, **kw)
        np.testing.assert_allclose(result.mean_sq, np.exp(expected), rtol=1e-12)


def enumerated_affine(factors, gradients, lr, B, sampling, steps, sigma0, mean0, momentum,
                      nesterov):
    """E||w_t||^2 and (1/2) tr(H E[w w^T]) of z' = A_B z + c_B on R^{2d}, every batch enumerated:
    torch's SGD with dampening 0 (heavy ball z = (w_t, w_{t-1}); Nesterov z = (w_t, lr v_{t-1}))."""
    hessians = ref.dense_from_factors(factors)
    H = hessians.mean(axis=0)
    d = H.shape[0]
    batches = [(p, counts @ hessians.reshape(len(factors), -1) / B, counts @ gradients / B)
               for p, counts in ref.batch_distribution(len(factors), B, sampling)]
    if nesterov:
        sigma = np.zeros((2 * d, 2 * d))
        sigma[:d, :d] = sigma0
        mean = np.concatenate([mean0, np.zeros(d)])
    else:
        sigma = np.kron(np.ones((2, 2)), sigma0)
        mean = np.concatenate([mean0, mean0])
    totals, excess = [], []
    for t in range(steps + 1):
        totals.append(np.trace(sigma[:d, :d]))
        excess.append(0.5 * np.trace(H @ sigma[:d, :d]))
        if t == steps:
            break
        new_sigma, new_mean = np.zeros_like(sigma), np.zeros_like(mean)
        for p, flat, g in batches:
            A = ref.momentum_step(flat.reshape(d, d), lr, momentum, nesterov)
            # w' = w - lr (H_B w + g_B) + momentum terms: the gradient enters like H_B w
            c = (np.concatenate([-lr * (1 + momentum) * g, g]) if nesterov
                 else np.concatenate([-lr * g, np.zeros(d)]))
            z = A @ mean
            new_sigma += p * (A @ sigma @ A.T + np.outer(z, c) + np.outer(c, z) + np.outer(c, c))
            new_mean += p * (z + c)
        sigma, mean = new_sigma, new_mean
    return np.array(totals), np.array(excess)


@pytest.mark.parametrize("sampling", SCHEMES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_affine_kernel_matches_enumeration(sampling, nesterov):
    factors, gradients, family = family_with_flat_direction(5, gradients=True)
    lr = 0.3 / family.sharpness()
    w0 = np.array([1.0, -0.5, 2.0])
    for init, sigma0, mean0 in ((w0, np.outer(w0, w0), w0),
                                ("uniform", np.full((3, 3), 0.25) + np.eye(3) / 12, np.full(3, 0.5))):
        result = fs.second_moment(family, lr, 2, 12, sampling=sampling, init=init, momentum=0.7,
                                  nesterov=nesterov)
        totals, excess = enumerated_affine(factors, gradients, lr, 2, sampling, 12, sigma0,
                                           mean0, 0.7, nesterov)
        np.testing.assert_allclose(result.mean_sq, totals, rtol=1e-12)
        np.testing.assert_allclose(result.excess_loss, excess, rtol=1e-12)


def _random(seed, n, d, r, gradients):
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n, d, r)) / np.sqrt(d)
    if not gradients:
        return HessianFamily(factors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotAMinimumWarning)
        return HessianFamily(factors, gradients=0.1 * rng.standard_normal((n, d)))


@pytest.mark.parametrize("gradients", [False, True])
@pytest.mark.parametrize("sampling, nesterov, lr_factor",
                         [("bernoulli", False, 0.5), ("without_replacement", True, 0.9),
                          ("with_replacement", False, 1.6), ("bernoulli", True, 3e9)])
def test_kernels_match_the_python_loops(gradients, sampling, nesterov, lr_factor):
    """k = 14 and 30 (rank 2, a null space), inits of every kind, growing and decaying
    trajectories, and (lr_factor 3e9, no gradients) the huge-lr regime whose scale is carried in
    logs: 1e-12 relative against release 0.1.0's loops."""
    family = _random(11, 15, 30, 2, gradients)
    if gradients and lr_factor > 10:
        lr_factor = 2.0
    lr = lr_factor / family.sharpness()
    rng = np.random.default_rng(2)
    for init in ("normal", "uniform", rng.standard_normal(30)):
        kw = dict(sampling=sampling, init=init, momentum=0.85, nesterov=nesterov)
        new = fs.second_moment(family, lr, 3, 60, **kw)
        with LOOPS.python_loops():
            old = fs.second_moment(family, lr, 3, 60, **kw)
        np.testing.assert_allclose(new.log_mean_sq, old.log_mean_sq, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(new.mean_sq, old.mean_sq, rtol=1e-11)  # exp(log): x 1e2
        if gradients:
            np.testing.assert_allclose(new.excess_loss, old.excess_loss, rtol=1e-12)


@pytest.mark.parametrize("gradients", [False, True])
def test_chunks_carry_the_state(monkeypatch, gradients):
    """Trajectories split into chunks of 1 to 3 steps (Ctrl-C points) equal one long run."""
    family = _random(4, 8, 6, 2, gradients)
    lr = 0.6 / family.sharpness()
    kw = dict(sampling="without_replacement", init="uniform", momentum=0.6)
    whole = fs.second_moment(family, lr, 3, 25, **kw)
    per_step = 4.0 * 16 * 6 * 6
    monkeypatch.setattr(moments, "ITERATION_CHUNK_FLOPS", 2.5 * per_step)
    chunked = fs.second_moment(family, lr, 3, 25, **kw)
    np.testing.assert_array_equal(chunked.log_mean_sq, whole.log_mean_sq)
    if gradients:
        np.testing.assert_array_equal(chunked.excess_loss, whole.excess_loss)


def test_heavy_ball_closed_form_on_one_direction():
    """One direction, identical samples (no noise), curvature h: the deterministic recursion
    w_{t+1} = (1 + mu - lr h) w_t - mu w_{t-1}, w_{-1} = w_0, summed by hand."""
    h, lr, mu = 2.0, 0.3, 0.6
    family = HessianFamily.from_features([[np.sqrt(h)], [np.sqrt(h)]])
    w = [1.0, 1.0 - lr * h]  # the first step has no momentum (w_{-1} = w_0)
    for _ in range(40):
        w.append((1 + mu - lr * h) * w[-1] - mu * w[-2])
    result = fs.second_moment(family, lr, 2, 41, momentum=mu)
    np.testing.assert_allclose(result.mean_sq, np.square(w), rtol=1e-12)
