"""Coherence, sharpness and non-uniformity against dense references and the theory's facts."""

import importlib
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastsgdstab as fs
from fastsgdstab import HessianFamily
from fastsgdstab import non_uniformity, sample_sharpness, sharpness

# The package re-exports the function coherence under the module's name, so the attribute
# The module holding coherence (the function has its own name at the top level).
coherence_module = importlib.import_module("fastsgdstab.geometry")

import reference_theory as ref
from strategies import factor_arrays, random_rotation

EPS = np.finfo(float).eps
FAMILIES = factor_arrays(max_n=12, max_d=6, max_rank=3)


def entry_tolerance_squared(factors) -> float:
    """Round-off allowed in S_ij^2 = tr(H_i H_j).

    Both sides sum at most d^2 (reference) or r^2 k (library) products whose magnitudes add up
    to at most ||H_i||_F ||H_j||_F <= max_i ||H_i||_F^2 (Cauchy-Schwarz); each product and the
    reduction to H's eigenbasis cost a few ulps of that. 64 d^2 ulps of the scale covers it.
    """
    hessians = ref.dense(factors)
    d = factors.shape[1]
    scale = float(np.max(np.sum(hessians**2, axis=(1, 2))))
    return 64 * d * d * EPS * scale


def perron_tolerance(factors, result) -> float:
    """|lambda_S - reference|: ||S - S_ref||_2 <= n max|S_ij - S_ref,ij| and
    |S - S_ref| <= sqrt(|S^2 - S_ref^2|) entrywise; plus the Lanczos residual."""
    n = factors.shape[0]
    return n * math.sqrt(entry_tolerance_squared(factors)) + result.residual


# ----------------------------------------------------------------------------- against references
@given(FAMILIES)
def test_coherence_matrix_matches_dense_reference(factors):
    result = fs.coherence(HessianFamily(factors))
    expected_sq = ref.coherence_matrix_squared(ref.dense(factors))
    np.testing.assert_allclose(result.matrix**2, expected_sq, rtol=0,
                               atol=entry_tolerance_squared(factors))
    np.testing.assert_array_equal(result.matrix, result.matrix.T)
    assert np.all(result.matrix >= 0)


@given(FAMILIES)
def test_sigma_matches_dense_reference_and_is_at_least_one(factors):
    hessians = ref.dense(factors)
    result = fs.coherence(HessianFamily(factors))
    perron = ref.perron_root(ref.coherence_matrix(hessians))
    top_sample = float(np.max(ref.sample_sharpness(hessians)))
    # The theory's fact sigma >= 1, on the reference: lambda_1(S) >= S_ii = ||H_i||_F >= lambda_1(H_i).
    assert perron >= top_sample * (1 - 1e-12)
    tolerance = perron_tolerance(factors, result)
    assert abs(result.lambda_S - perron) <= tolerance
    assert result.max_sample_sharpness == pytest.approx(top_sample, rel=1e-10, abs=1e-12 * perron)
    assert result.sigma >= 1.0
    assert result.sigma == pytest.approx(perron / top_sample, abs=2 * tolerance / top_sample)


@given(FAMILIES)
def test_sample_sharpness_and_non_uniformity_match_dense(factors):
    hessians = ref.dense(factors)
    family = HessianFamily(factors)
    scale = float(np.max(ref.sample_sharpness(hessians)))
    np.testing.assert_allclose(sample_sharpness(family), ref.sample_sharpness(hessians),
                               rtol=0, atol=1e-12 * scale * factors.shape[1])
    assert sharpness(family) == pytest.approx(ref.sharpness(hessians), rel=1e-12)
    # s^2 is an eigenvalue of a difference of matrices of size ~scale^2: compare squares, whose
    # round-off is a few ulps of scale^2 per entry; the sqrt would amplify it near s = 0.
    s = non_uniformity(family)
    assert s**2 == pytest.approx(ref.non_uniformity(hessians) ** 2, abs=64 * factors.shape[1] * EPS * scale**2)


# ----------------------------------------------------------------------------- the theory's facts
@given(FAMILIES)
def test_key_lemma_sharpness_of_sum_below_perron_root(factors):
    # THEORY.md section 5: lambda_1(sum_i H_i) <= lambda_1(S), i.e. n lambda_1(H) / sigma <= max_i lambda_1(H_i).
    family = HessianFamily(factors)
    result = fs.coherence(family)
    total = family.n * family.sharpness()
    assert total <= result.lambda_S * (1 + 1e-10)
    assert family.n * family.sharpness() / result.sigma <= result.max_sample_sharpness * (1 + 1e-10)


@given(factor_arrays(max_n=12, max_d=6, max_rank=1))
def test_rank_one_sigma_at_most_n(factors):
    result = fs.coherence(HessianFamily(factors))
    assert 1.0 <= result.sigma <= factors.shape[0] * (1 + 1e-12)
    # For rank 1 S is |X X^T| entrywise.
    features = factors[:, :, 0]
    np.testing.assert_allclose(result.matrix, np.abs(features @ features.T), rtol=1e-12,
                               atol=1e-12 * float(np.max(np.sum(features**2, axis=1))))


@given(FAMILIES, st.randoms(use_true_random=False), st.floats(1e-3, 1e3))
def test_sigma_invariant_under_permutation_rotation_and_scaling(factors, rnd, scale):
    n, d, r = factors.shape
    rng = np.random.default_rng(rnd.randrange(2**32))
    base = fs.coherence(HessianFamily(factors))
    permuted = factors[rng.permutation(n)]
    # Left rotation: H_i -> Q H_i Q^T. Right rotation of the factors: same H_i.
    rotated = np.einsum("ab,ibr,rs->ias", random_rotation(rng, d), factors, random_rotation(rng, r))
    scaled = factors * math.sqrt(scale)  # H_i -> scale H_i
    tolerance = 2 * perron_tolerance(factors, base) / base.max_sample_sharpness
    for variant in (permuted, rotated, scaled):
        result = fs.coherence(HessianFamily(variant))
        assert result.sigma == pytest.approx(base.sigma, abs=tolerance)
    assert fs.coherence(HessianFamily(scaled)).lambda_S == pytest.approx(
        scale * base.lambda_S, rel=1e-9, abs=scale * perron_tolerance(factors, base))


@pytest.mark.parametrize("n, d", [(2, 1), (5, 3), (12, 6)])
def test_identical_rank_one_samples_have_sigma_n(n, d):
    x = np.random.default_rng(n).standard_normal(d)
    result = fs.coherence(HessianFamily.from_features(np.tile(x, (n, 1))))
    assert result.sigma == pytest.approx(n, rel=1e-12)
    assert result.lambda_S == pytest.approx(n * x @ x, rel=1e-12)


@pytest.mark.parametrize("n, d", [(2, 2), (4, 6), (6, 6)])
def test_orthogonal_rank_one_samples_have_sigma_one(n, d):
    rng = np.random.default_rng(d)
    basis = random_rotation(rng, d)[:, :n].T  # n orthonormal rows
    scales = rng.uniform(0.5, 3.0, size=n)
    result = fs.coherence(HessianFamily.from_features(basis * scales[:, None]))
    assert result.sigma == pytest.approx(1.0, abs=1e-12)
    assert result.max_sample_sharpness == pytest.approx(np.max(scales**2), rel=1e-12)


def test_one_dominant_sample():
    # One sample 1e4 times larger than the rest: sigma ~ 1, the Perron root is its ||H_i||_F.
    rng = np.random.default_rng(3)
    features = rng.standard_normal((10, 4))
    features[0] *= 100.0
    hessians = ref.dense(features[:, :, None])
    result = fs.coherence(HessianFamily.from_features(features))
    assert result.sigma == pytest.approx(ref.sigma(hessians), rel=1e-10)
    assert 1.0 <= result.sigma < 1.01


def test_rank_deficient_and_higher_rank_above_n():
    # Identical rank-2 samples H_i = I_2: S_ij = ||I_2||_F = sqrt 2, sigma = n sqrt 2 > n.
    n = 4
    result = fs.coherence(HessianFamily(np.tile(np.eye(3)[:, :2], (n, 1, 1))))
    assert result.sigma == pytest.approx(n * math.sqrt(2), rel=1e-12)
    # Zero samples and a common null space change nothing.
    factors = np.zeros((5, 4, 2))
    factors[1, :2, 0] = [1.0, 2.0]
    factors[3, :2, 1] = [2.0, -1.0]
    result = fs.coherence(HessianFamily(factors))
    assert result.sigma == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(result.matrix, np.diag([0, 5, 0, 5, 0]), atol=1e-12)


def test_zero_family():
    result = fs.coherence(HessianFamily(np.zeros((3, 2, 1))))
    assert result.lambda_S == 0.0 and math.isnan(result.sigma)
    assert non_uniformity(HessianFamily(np.zeros((3, 2, 1)))) == 0.0


def test_non_uniformity_zero_iff_identical():
    x = np.array([[1.0, 2.0, 0.5]])
    scale = float(x[0] @ x[0])  # lambda_1(H_i)
    # s^2 is round-off of a difference of matrices of size scale^2: a few ulps per entry.
    s = non_uniformity(HessianFamily.from_features(np.repeat(x, 4, axis=0)))
    assert s**2 <= 64 * 3 * EPS * scale**2
    assert non_uniformity(HessianFamily.from_features([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.5, rel=1e-12)


# ----------------------------------------------------------------------------- matrix-free path
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_matrix_free_path_matches_stored_matrix(rank, monkeypatch):
    # Small blocks so that many diagonal and off-diagonal block pairs (and a ragged last block)
    # are exercised, as they are at n = 50,000 with the default block size.
    monkeypatch.setattr(coherence_module, "_BLOCK_ROWS", 30 * rank)
    rng = np.random.default_rng(rank)
    factors = rng.standard_normal((157, 5, rank))
    family = HessianFamily(factors)
    stored = fs.coherence(family)
    free = fs.coherence(family, store_limit=100)
    assert free.matrix is None and stored.matrix is not None
    v = rng.standard_normal(family.n)
    product = coherence_module._coherence_product(family._reduced.rows, family.n, rank)
    np.testing.assert_allclose(product(v), stored.matrix @ v, rtol=1e-12,
                               atol=1e-12 * np.abs(stored.matrix).sum(axis=1).max() * np.abs(v).max())
    exact = float(np.linalg.eigvalsh(stored.matrix)[-1])
    assert abs(free.lambda_S - exact) <= free.residual + 1e-12 * exact
    assert free.sigma == pytest.approx(stored.sigma, rel=1e-9)


# ----------------------------------------------------------------------------- validation
def test_validation():
    family = HessianFamily.from_features([[1.0], [2.0]])
    with pytest.raises(TypeError, match="family"):
        fs.coherence(np.ones((2, 1, 1)))
    with pytest.raises(TypeError, match="store_limit"):
        fs.coherence(family, store_limit=1.5)
    with pytest.raises(ValueError, match="store_limit"):
        fs.coherence(family, store_limit=-1)
    with pytest.raises(TypeError, match="family"):
        non_uniformity([[1.0]])
    with pytest.raises(TypeError, match="family"):
        sharpness(None)
    with pytest.raises(TypeError, match="family"):
        sample_sharpness(np.ones((2, 1, 1)))
