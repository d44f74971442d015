"""HessianFamily.preconditioned(P) (issue 11, item 4): SGD with a frozen preconditioner,
w <- w - lr P H_B w, against a dense reference built by enumerating every batch (the operator
E[(I - lr P H_B) (x) (I - lr P H_B)] on all d x d matrices, no symmetrisation, no P^{1/2}), and
against a plain Monte-Carlo simulation of the preconditioned recursion."""

import numpy as np
import pytest

from fastsgdstab import critical_lr, second_moment, spectral_radius
from fastsgdstab.family import HessianFamily
from reference import batch_distribution


def _family(seed, n=4, d=3, r=1):
    rng = np.random.default_rng(seed)
    return HessianFamily(rng.normal(size=(n, d, r)))


def _spd(seed, d):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    return A @ A.T + 0.5 * np.eye(d)


def _dense_preconditioned_radius(hessians, P, lr, batch_size, sampling):
    """rho(E[(I - lr P H_B) (x) (I - lr P H_B)]) by enumeration, on every d x d matrix."""
    n, d, _ = hessians.shape
    eye = np.eye(d)
    operator = np.zeros((d * d, d * d))
    for probability, counts in batch_distribution(n, batch_size, sampling):
        step = eye - lr * P @ np.tensordot(counts, hessians, axes=1) / batch_size
        operator += probability * np.kron(step, step)
    return float(np.max(np.abs(np.linalg.eigvals(operator))))


@pytest.mark.parametrize("sampling", ["bernoulli", "without_replacement", "with_replacement"])
@pytest.mark.parametrize("kind", ["diagonal", "matrix"])
def test_radius_matches_enumerated_preconditioned_operator(sampling, kind):
    family = _family(1, n=4, d=3, r=2)
    P = np.array([0.3, 2.0, 1.1]) if kind == "diagonal" else _spd(2, 3)
    P_matrix = np.diag(P) if kind == "diagonal" else P
    pre = family.preconditioned(P)
    hessians = family.dense()
    for lr in (0.2, 0.6):
        lr = lr / pre.sharpness()
        expected = _dense_preconditioned_radius(hessians, P_matrix, lr, 2, sampling)
        assert spectral_radius(pre, lr, 2, sampling=sampling) == pytest.approx(expected, rel=1e-9)
    # the critical lr: the dense radius crosses 1 there
    eta = critical_lr(pre, 2, sampling=sampling)
    assert _dense_preconditioned_radius(hessians, P_matrix, 0.999 * eta, 2, sampling) < 1
    assert _dense_preconditioned_radius(hessians, P_matrix, 1.001 * eta, 2, sampling) > 1


def test_identity_preconditioner_changes_nothing():
    family = _family(3)
    assert np.array_equal(family.preconditioned(np.ones(3)).factors, family.factors)
    np.testing.assert_allclose(family.preconditioned(np.eye(3)).factors, family.factors, atol=1e-15)


def test_scalar_preconditioner_scales_the_critical_lr():
    family = _family(4)
    base = critical_lr(family, 2)
    assert critical_lr(family.preconditioned(np.full(3, 4.0)), 2) == pytest.approx(base / 4, rel=1e-10)


def test_diagonal_vector_equals_diagonal_matrix():
    family = _family(5)
    P = np.array([0.5, 3.0, 1.5])
    np.testing.assert_allclose(family.preconditioned(P).dense(),
                               family.preconditioned(np.diag(P)).dense(), rtol=1e-12, atol=1e-14)


def test_simulation_of_the_preconditioned_recursion():
    """Monte Carlo of w <- w - lr P H_B w (Bernoulli batches): E||P^{-1/2} w_t||^2 from
    w_0 = P^{1/2} u_0, u_0 ~ N(0, I), against the exact second moment of the preconditioned
    family (init 'normal': E[u_0 u_0^T] = I)."""
    family = _family(6, n=5, d=3, r=1)
    P = _spd(7, 3)
    values, vectors = np.linalg.eigh(P)
    root, inv_root = (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T
    pre = family.preconditioned(P)
    lr, B, steps, runs = 0.9 * critical_lr(pre, 2), 2, 6, 40000
    hessians = family.dense()
    rng = np.random.default_rng(8)
    w = rng.normal(size=(runs, 3)) @ root.T
    sq = []
    for _ in range(steps):
        z = rng.random((runs, 5)) < B / 5
        HB = np.einsum("ri,ide->rde", z.astype(float), hessians) / B
        w = w - lr * np.einsum("de,rek,rk->rd", P, HB, w)
        sq.append(np.sum((w @ inv_root.T) ** 2, axis=1))
    exact = second_moment(pre, lr, B, steps).mean_sq[1:]
    for t in range(steps):
        mean, err = sq[t].mean(), sq[t].std() / np.sqrt(runs)
        assert abs(mean - exact[t]) < 5 * err, (t, mean, exact[t], err)


@pytest.mark.parametrize("P, message", [
    (np.array([1.0, 2.0]), "shape"),
    (np.array([1.0, 0.0, 2.0]), "> 0"),
    (np.array([1.0, -1.0, 2.0]), "> 0"),
    (np.array([1.0, np.nan, 2.0]), "finite"),
    (np.array([1.0, np.inf, 2.0]), "finite"),
    (np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), "symmetric"),
    (np.diag([1.0, -1.0, 1.0]), "positive definite"),
    (np.diag([1.0, 0.0, 1.0]), "positive definite"),
    (np.ones((3, 3, 1)), "shape"),
    (np.ones((2, 2)), "shape"),
])
def test_bad_preconditioner(P, message):
    with pytest.raises(ValueError, match=message):
        _family(9).preconditioned(P)


def test_non_numeric_preconditioner():
    with pytest.raises(TypeError, match="P"):
        _family(9).preconditioned(["a", "b", "c"])
