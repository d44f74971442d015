"""Tests that kill five realistic bugs every other test let through (issue 17, item 6).

Each expected value comes from an independent computation (a dense map, mpmath, the library's
own public function at another setting), never from the code under test.
"""

import math
import warnings

import numpy as np
import pytest

import fastsgdstab as fs
from fastsgdstab import HessianFamily, simulate
from fastsgdstab._linalg import ConeKrylov
from fastsgdstab.simulation import _check_arguments, _run_block


def test_cone_krylov_add_keeps_images_consistent_in_a_non_empty_basis():
    """``add`` with a known image must project the image as it projects the vector."""
    rng = np.random.default_rng(1)
    k = 4
    A = rng.standard_normal((k, k))

    def apply(X):
        return A @ X @ A.T

    krylov = ConeKrylov(apply, k, capacity=6)
    for _ in range(4):
        Y = rng.standard_normal((k, k))
        Y = Y + Y.T
        assert krylov.add(Y.ravel(), apply(Y).ravel())
    assert krylov.size == 5
    for i in range(krylov.size):
        vector = krylov.unpack(krylov.W[i]).reshape(k, k)
        np.testing.assert_allclose(krylov.unpack(krylov.VW[i]).reshape(k, k), apply(vector),
                                   rtol=1e-10, atol=1e-10 * np.abs(A).max() ** 2)


def test_cone_krylov_lower_bound_with_a_singular_perron_vector():
    """X -> A X A^T with A = [[2, 0], [1, 1/2]]: rho = rho(A)^2 = 4 exactly, Perron vector v v^T
    (rank one, singular). A rank-one Ritz vector u u^T off the Perron direction, with u
    maximising u^T A u (> 2: A is not normal), makes the singular-support branch of the lower
    bound decide; a wrong Schur complement there claims more than 4."""
    A = np.array([[2.0, 0.0], [1.0, 0.5]])

    def apply(X):
        return A @ X @ A.T

    krylov = ConeKrylov(apply, 2, capacity=3)
    u = np.linalg.eigh(0.5 * (A + A.T))[1][:, -1]
    assert (u @ A @ u) ** 2 > 4.3  # the off-Perron direction looks better than the truth
    for vector in (np.outer(u, u), np.outer(u + [0.0, 0.01], u + [0.0, 0.01])):
        bracket = krylov.certify(np.ones((2, 2)), 4.0, vector.ravel(), target_rtol=1e-5)
        assert bracket.lower <= 4.0 <= bracket.upper


def test_blocks_of_reshuffle_runs_are_bit_identical_to_one_simulation():
    """Each run's stream is keyed by its global index, whatever block computes it."""
    rng = np.random.default_rng(7)
    family = HessianFamily.from_features(rng.standard_normal((9, 3)))
    lr = 0.8 / family.sharpness()
    kwargs = dict(seed=11, sampling="reshuffle", record_every=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.SimulationWarning)
        whole = simulate(family, lr, 2, 12, 10, **kwargs)
        settings = _check_arguments(family, lr, 2, 12, 10, **kwargs)
        blocks = [_run_block(settings, a, b) for a, b in ((0, 3), (3, 4), (4, 10))]
    np.testing.assert_array_equal(np.vstack([b.log_sq_norm for b in blocks]), whole.log_sq_norm)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_simulation_at_a_step_beyond_the_float_range(nesterov):
    """lr h = 1e200 on a deterministic scalar family (every batch is H = 1): the simulation's
    log-scaled step (the factor divided out of w) must scale the momentum term too. Reference:
    the scalar recursion in 60-digit mpmath."""
    import mpmath
    mpmath.mp.dps = 60
    family = HessianFamily.from_features([[1.0], [1.0]])
    lr, mu, steps = 1e200, 0.5, 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.SimulationWarning)
        result = simulate(family, lr, 2, steps, 2, sampling="without_replacement", momentum=mu,
                          nesterov=nesterov, init=np.array([1.0]), record_every=1,
                          progress=False)
    eta, m = mpmath.mpf(lr), mpmath.mpf(mu)
    w, previous, v = mpmath.mpf(1), mpmath.mpf(1), mpmath.mpf(0)
    expected = [mpmath.mpf(0)]
    for _ in range(steps):
        if nesterov:  # v = mu v + g, w -= lr (g + mu v), g = h w
            g = w
            v = m * v + g
            w = w - eta * (g + m * v)
        else:  # torch: first step without momentum (w_{-1} = w_0)
            w, previous = w - eta * w + m * (w - previous), w
        expected.append(mpmath.log(w * w))
    np.testing.assert_allclose(result.log_sq_norm[0], [float(e) for e in expected], rtol=1e-12)


def test_sweep_keys_critical_lr_by_momentum():
    """Two settings that differ only in momentum have different critical learning rates."""
    from fastsgdstab._sweep import sweep
    family = HessianFamily.from_features([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    lr = 0.3 / family.sharpness()
    table = sweep({"f": family}, {"lr": [lr], "batch_size": [2], "momentum": [0.0, 0.9]},
                  progress=False)
    values = [float(v) for v in table["critical_lr"]]
    expected = [fs.critical_lr(family, 2, momentum=mu) for mu in (0.0, 0.9)]
    assert values[0] != values[1]
    np.testing.assert_allclose(values, expected, rtol=1e-12)
