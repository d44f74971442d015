"""HessianFamily.from_jacobians (issue 10, item 1) and HessianFamily.from_gram (the Gram route in
reduced coordinates): against dense Hessians J_i^T Lambda_i J_i written out with numpy, and the
reduced family against the full one on every spectral answer."""

import numpy as np
import pytest

from fastsgdstab import coherence, critical_batch_size, critical_lr, spectral_radius
from fastsgdstab.family import HessianFamily


def _dense(J, L=None):
    if L is None:
        return np.einsum("icd,ice->ide", J, J)
    return np.einsum("icd,ick,ike->ide", J, L, J)


def _psd(rng, n, C, rank=None):
    A = rng.normal(size=(n, C, rank or C))
    return A @ A.transpose(0, 2, 1)


@pytest.mark.parametrize("C, d", [(1, 5), (3, 7), (4, 3)])
def test_identity_output_hessians(C, d):
    rng = np.random.default_rng(C)
    J = rng.normal(size=(6, C, d))
    family = HessianFamily.from_jacobians(J)
    np.testing.assert_allclose(family.dense(), _dense(J), rtol=1e-12, atol=1e-12)
    assert family.rank == min(C, d)


def test_per_sample_and_shared_output_hessians():
    rng = np.random.default_rng(1)
    J = rng.normal(size=(5, 3, 8))
    L = _psd(rng, 5, 3)
    np.testing.assert_allclose(HessianFamily.from_jacobians(J, L).dense(), _dense(J, L),
                               rtol=1e-11, atol=1e-11)
    shared = _psd(rng, 1, 3)[0]
    np.testing.assert_allclose(HessianFamily.from_jacobians(J, shared).dense(),
                               _dense(J, np.broadcast_to(shared, (5, 3, 3))), rtol=1e-11, atol=1e-11)


def test_cross_entropy_output_hessians_drop_the_null_direction():
    """Lambda = diag(p) - p p^T has rank C - 1: the factors keep C - 1 columns."""
    rng = np.random.default_rng(2)
    n, C, d = 6, 4, 9
    J = rng.normal(size=(n, C, d))
    p = rng.dirichlet(np.ones(C), size=n)
    L = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    family = HessianFamily.from_jacobians(J, L)
    assert family.rank == C - 1
    np.testing.assert_allclose(family.dense(), _dense(J, L), rtol=1e-10, atol=1e-12)


def test_rank_deficient_jacobians_are_compacted():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(5, 2, 6))
    J = np.concatenate([base, base[:, :1] + base[:, 1:]], axis=1)  # third row dependent
    family = HessianFamily.from_jacobians(J)
    assert family.rank == 2
    np.testing.assert_allclose(family.dense(), _dense(J), rtol=1e-10, atol=1e-10)


def test_two_dimensional_jacobians_are_one_output():
    X = np.random.default_rng(4).normal(size=(5, 3))
    np.testing.assert_array_equal(HessianFamily.from_jacobians(X).factors,
                                  HessianFamily.from_features(X).factors)


def test_mse_convention_halves_the_critical_lr():
    """MSELoss on one output has Lambda = 2: the critical lr is half the (1/2)-convention one."""
    X = np.random.default_rng(5).normal(size=(8, 3))
    half = critical_lr(HessianFamily.from_features(X), 2)
    assert critical_lr(HessianFamily.from_jacobians(X, [[2.0]]), 2) == pytest.approx(half / 2, rel=1e-10)


@pytest.mark.parametrize("L, message", [
    (np.diag([1.0, -0.5]), "positive semi-definite.*sample 0"),
    (np.array([[1.0, 0.3], [0.0, 1.0]]), "symmetric"),
    (np.ones((3, 3)), r"shape \(n, C, C\)"),
    (np.ones((4, 2, 2)), r"shape \(n, C, C\)"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), "finite"),
])
def test_bad_output_hessians(L, message):
    J = np.ones((3, 2, 4))
    with pytest.raises(ValueError, match=message):
        HessianFamily.from_jacobians(J, L)


@pytest.mark.parametrize("J, error, message", [
    (np.ones((3, 2, 2, 2)), ValueError, r"shape \(n, C, d\)"),
    (np.ones((1, 2, 3)), ValueError, "at least 2 samples"),
    (np.ones((3, 0, 3)), ValueError, "empty axis"),
    (np.full((3, 2, 3), np.inf), ValueError, "finite"),
    (np.array([["a"]]), TypeError, "jacobians"),
])
def test_bad_jacobians(J, error, message):
    with pytest.raises(error, match=message):
        HessianFamily.from_jacobians(J)


# ----------------------------------------------------------------------------- the Gram route
def _gram(family):
    columns = family.factors.transpose(0, 2, 1).reshape(family.n * family.rank, family.d)
    return columns @ columns.T


@pytest.mark.parametrize("n, d, r", [(6, 40, 2), (5, 30, 1), (8, 5, 3)])
def test_gram_family_gives_the_same_answers(n, d, r):
    rng = np.random.default_rng(n + d + r)
    full = HessianFamily(rng.normal(size=(n, d, r)) * np.linspace(0.2, 2, d)[None, :, None])
    small = HessianFamily.from_gram(_gram(full), outputs_per_sample=r)
    assert small.n == n and small.rank == r and small.d == min(n * r, d)
    # the Gram matrix itself is reproduced (the coordinates are an isometry of the span)
    np.testing.assert_allclose(_gram(small), _gram(full), rtol=1e-10, atol=1e-10)
    assert small.sharpness() == pytest.approx(full.sharpness(), rel=1e-11)
    for sampling in ("bernoulli", "without_replacement", "with_replacement"):
        eta = critical_lr(full, 2, sampling=sampling)
        assert critical_lr(small, 2, sampling=sampling) == pytest.approx(eta, rel=1e-9)
        assert spectral_radius(small, 1.3 * eta, 3, sampling=sampling) == pytest.approx(
            spectral_radius(full, 1.3 * eta, 3, sampling=sampling), rel=1e-9)
    assert critical_batch_size(small, 1.5 * critical_lr(full, n), bounds=True).value == pytest.approx(
        critical_batch_size(full, 1.5 * critical_lr(full, n), bounds=True).value, rel=1e-8)
    assert coherence(small).sigma == pytest.approx(coherence(full).sigma, rel=1e-9)


def test_gram_of_jacobians_matches_from_jacobians():
    rng = np.random.default_rng(11)
    J = rng.normal(size=(5, 3, 50))
    L = _psd(rng, 5, 3)
    full = HessianFamily.from_jacobians(J, L)
    roots = np.linalg.cholesky(L)
    rows = np.einsum("icd,ick->ikd", J, roots).reshape(15, 50)   # rows L_i^T J_i
    small = HessianFamily.from_gram(rows @ rows.T, 3)
    assert critical_lr(small, 2) == pytest.approx(critical_lr(full, 2), rel=1e-9)


@pytest.mark.parametrize("gram, r, error, message", [
    (np.ones((4, 3)), 1, ValueError, "square"),
    (np.eye(4), 3, ValueError, "multiple"),
    (np.eye(2), 2, ValueError, "at least 2 samples"),
    (np.diag([1.0, -1.0, 1.0]), 1, ValueError, "positive semi-definite"),
    (np.array([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]]), 1, ValueError, "symmetric"),
    (np.zeros((3, 3)), 1, ValueError, "zero"),
    (np.full((3, 3), np.nan), 1, ValueError, "finite"),
    (np.eye(3), 0, ValueError, "outputs_per_sample"),
    (np.eye(3), 1.5, TypeError, "outputs_per_sample"),
])
def test_bad_gram(gram, r, error, message):
    with pytest.raises(error, match=message):
        HessianFamily.from_gram(gram, r)
