import numpy as np
import pytest

from fastsgdstab import HessianFamily
from fastsgdstab.family import _reduce


def test_from_features_builds_rank_one_factors():
    x = np.arange(6.0).reshape(3, 2)
    family = HessianFamily.from_features(x)
    assert (family.n, family.d, family.rank) == (3, 2, 1)
    np.testing.assert_allclose(family.dense(), np.einsum("id,ie->ide", x, x))
    np.testing.assert_allclose(family.mean(), x.T @ x / 3)


def test_from_dense_round_trip_and_rank():
    rng = np.random.default_rng(0)
    factors = rng.standard_normal((5, 4, 2))
    hessians = np.einsum("idr,ier->ide", factors, factors)
    family = HessianFamily.from_dense(hessians)
    assert family.rank == 2
    np.testing.assert_allclose(family.dense(), hessians, atol=1e-12)


def test_from_dense_pads_lower_rank_samples():
    hessians = np.array([np.diag([1.0, 2.0, 0.0]), np.diag([0.0, 0.0, 3.0])])
    family = HessianFamily.from_dense(hessians)
    assert family.rank == 2
    np.testing.assert_allclose(family.dense(), hessians, atol=1e-14)


def test_factors_are_a_read_only_copy():
    factors = np.ones((2, 3, 1))
    family = HessianFamily(factors)
    factors[0] = 5.0
    assert np.all(family.factors == 1.0)
    with pytest.raises(ValueError):
        family.factors[0, 0, 0] = 2.0


def test_sharpness_matches_eigvalsh():
    rng = np.random.default_rng(1)
    family = HessianFamily(rng.standard_normal((6, 3, 2)))
    assert family.sharpness() == pytest.approx(np.linalg.eigvalsh(family.mean())[-1], rel=1e-12)


def test_zero_family_is_valid():
    family = HessianFamily(np.zeros((3, 2, 1)))
    assert family.sharpness() == 0.0


@pytest.mark.parametrize("key, array", [
    ("factors", np.arange(12.0).reshape(3, 2, 2)),
    ("features", np.arange(6.0).reshape(3, 2)),
    ("hessians", np.array([np.eye(2), 2 * np.eye(2), np.diag([1.0, 0.0])])),
])
def test_save_load(tmp_path, key, array):
    path = tmp_path / "family.npz"
    np.savez(path, **{key: array})
    family = HessianFamily.load(path)
    expected = {"factors": lambda: np.einsum("idr,ier->ide", array, array),
                "features": lambda: np.einsum("id,ie->ide", array, array),
                "hessians": lambda: array}[key]()
    np.testing.assert_allclose(family.dense(), expected, atol=1e-12)
    family.save(tmp_path / "again.npz")
    np.testing.assert_array_equal(HessianFamily.load(tmp_path / "again.npz").factors, family.factors)


def test_save_writes_exactly_the_given_path(tmp_path):
    family = HessianFamily(np.ones((2, 2, 1)))
    family.save(tmp_path / "family.data")
    np.testing.assert_array_equal(HessianFamily.load(tmp_path / "family.data").factors, family.factors)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        HessianFamily.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", weights=np.ones(3))
    with pytest.raises(ValueError, match="exactly one of"):
        HessianFamily.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("factors, error, match", [
    (np.ones((3, 2)), ValueError, "3 dimensions.*from_features"),
    (np.ones((1, 2, 1)), ValueError, "at least 2 samples"),
    (np.ones((3, 0, 1)), ValueError, "empty axis"),
    (np.ones((3, 2, 0)), ValueError, "empty axis"),
    (np.array([[[np.nan]], [[1.0]]]), ValueError, "finite"),
    (np.array([[[np.inf]], [[1.0]]]), ValueError, "finite"),
    (np.array([[["a"]], [["b"]]]), TypeError, "real numbers"),
    (np.ones((2, 2, 1), dtype=complex), TypeError, "real numbers"),
])
def test_bad_factors(factors, error, match):
    with pytest.raises(error, match=match):
        HessianFamily(factors)


def test_bad_features():
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        HessianFamily.from_features(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="finite"):
        HessianFamily.from_features([[1.0, np.nan], [1.0, 2.0]])


def test_from_dense_rejects_non_symmetric_naming_the_sample():
    hessians = np.array([np.eye(2), [[1.0, 0.5], [0.0, 1.0]]])
    with pytest.raises(ValueError, match="symmetric: sample 1"):
        HessianFamily.from_dense(hessians)


def test_from_dense_rejects_non_psd_naming_sample_and_eigenvalue():
    hessians = np.array([np.eye(2), np.eye(2), np.diag([1.0, -0.25])])
    with pytest.raises(ValueError, match=r"semi-definite: sample 2 has smallest eigenvalue -0\.25"):
        HessianFamily.from_dense(hessians)


def test_from_dense_accepts_round_off_negative_eigenvalues():
    hessians = np.array([np.eye(2), np.diag([1.0, -1e-14])])
    family = HessianFamily.from_dense(hessians)
    np.testing.assert_allclose(family.dense()[1], np.diag([1.0, 0.0]), atol=1e-14)


def test_from_dense_shape_errors():
    with pytest.raises(ValueError, match=r"\(n, d, d\)"):
        HessianFamily.from_dense(np.ones((3, 2, 3)))
    with pytest.raises(ValueError, match="tol"):
        HessianFamily.from_dense(np.ones((3, 2, 2)), tol=-1)


@pytest.mark.parametrize("n, d, r", [(4, 9, 2), (3, 2, 1), (6, 6, 1), (5, 30, 3)])
def test_two_reductions_agree(n, d, r):
    """The covariance and Gram routes give the same spectrum and the same geometry."""
    rng = np.random.default_rng(n * 100 + d)
    factors = rng.standard_normal((n, d, r))
    factors[-1] = factors[0]  # a duplicate sample: rank deficiency for the Gram route
    columns = np.ascontiguousarray(factors.transpose(0, 2, 1)).reshape(n * r, d)
    a = _reduce(columns, n, r, "covariance")
    b = _reduce(columns, n, r, "gram")
    assert a.k == b.k == np.linalg.matrix_rank(columns)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-10)
    # Rows are coordinates in an eigenbasis fixed up to signs: the Gram matrices agree.
    np.testing.assert_allclose(a.rows @ a.rows.T, columns @ columns.T, atol=1e-10)
    np.testing.assert_allclose(b.rows @ b.rows.T, columns @ columns.T, atol=1e-10)
    np.testing.assert_allclose(a.rows.T @ a.rows / n, np.diag(a.eigenvalues), atol=1e-10)
    np.testing.assert_allclose(b.rows.T @ b.rows / n, np.diag(b.eigenvalues), atol=1e-10)


def test_range_basis_is_the_eigenbasis():
    rng = np.random.default_rng(3)
    for d in (3, 20):  # covariance route and Gram route
        family = HessianFamily(rng.standard_normal((4, d, 1)))
        basis = family._range_basis()
        np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-10)
        np.testing.assert_allclose(basis.T @ family.mean() @ basis,
                                   np.diag(family._reduced.eigenvalues), atol=1e-10)


def test_an_unpickled_family_keeps_read_only_factors():
    import pickle

    family = HessianFamily.from_features(np.random.default_rng(3).standard_normal((6, 3)))
    family.sharpness()  # a cached reduction travels with it
    copy = pickle.loads(pickle.dumps(family))
    assert not copy.factors.flags.writeable
    np.testing.assert_array_equal(copy.factors, family.factors)
    assert copy.sharpness() == family.sharpness()
    with pytest.raises(ValueError):
        copy.factors[0, 0, 0] = 1.0
