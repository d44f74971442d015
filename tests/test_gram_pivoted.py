"""HessianFamily.from_gram's pivoted Cholesky route and its reduction set in H's eigenbasis
(issue 19, item 5), against independent references: the family built from the factors
themselves (HessianFamily(factors): its own eigendecomposition of H), dense Kronecker critical
learning rates (tests/reference.py), and the full eigendecomposition route of from_gram.

``GRAM_PIVOTED_MIN`` is lowered so that small Gram matrices take the route meant for large ones.
"""

import warnings

import numpy as np
import pytest

import fastsgdstab as fs
import fastsgdstab.family as family_module
from fastsgdstab import HessianFamily

import reference as ref


@pytest.fixture
def pivoted(monkeypatch):
    monkeypatch.setattr(family_module, "GRAM_PIVOTED_MIN", 1)


def _factors(seed, n, d, r):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d, r)) * rng.uniform(0.3, 2.0, (n, 1, 1))


def _gram(factors):
    n, d, r = factors.shape
    A = factors.transpose(0, 2, 1).reshape(n * r, d)
    return A @ A.T


@pytest.mark.parametrize("n, d, r", [(30, 7, 2), (25, 11, 1), (12, 5, 3)])
def test_rank_deficient_gram_matches_the_factors(pivoted, n, d, r):
    """d < n r: the factorisation stops at rank d and the family equals the factors' own."""
    factors = _factors(n + d, n, d, r)
    full = HessianFamily(factors)
    small = HessianFamily.from_gram(_gram(factors), r)
    assert small.d == d
    np.testing.assert_allclose(small._reduced.unit_eigenvalues, full._reduced.unit_eigenvalues,
                               rtol=1e-11, atol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.CertificationWarning)
        for batch in (1, 3):
            ours = fs.critical_lr(small, batch, bounds=True)
            theirs = fs.critical_lr(full, batch)
            assert ours.lower <= theirs * (1 + 1e-12) and theirs <= ours.upper * (1 + 1e-12)
        lr = 0.5 * fs.critical_lr(full, 2)
        np.testing.assert_allclose(fs.second_moment(small, lr, 2, 20).log_mean_sq,
                                   fs.second_moment(full, lr, 2, 20).log_mean_sq, rtol=1e-11)


def test_dense_kronecker_reference(pivoted):
    factors = _factors(3, 6, 2, 2)  # n r = 12 > d = 2
    small = HessianFamily.from_gram(_gram(factors), 2)
    hessians = ref.dense_from_factors(factors)
    for sampling in ("bernoulli", "with_replacement"):
        expected = ref.critical_lr(hessians, 2, sampling)
        assert fs.critical_lr(small, 2, sampling=sampling) == pytest.approx(expected, rel=1e-9)


def test_full_rank_gram_falls_back_to_the_eigendecomposition(pivoted, monkeypatch):
    factors = _factors(5, 10, 40, 2)  # n r = 20 < d: full rank, no saving from the pivots
    gram = _gram(factors)
    via_fallback = HessianFamily.from_gram(gram, 2)
    monkeypatch.setattr(family_module, "GRAM_PIVOTED_MIN", 10**9)
    direct = HessianFamily.from_gram(gram, 2)
    assert via_fallback.d == direct.d == 20
    np.testing.assert_array_equal(via_fallback.factors, direct.factors)


def test_discarded_part_is_bounded_and_enters_the_backward_error(pivoted):
    """A rank-4 Gram matrix plus a PSD part of norm 1e-14 of its largest eigenvalue: the pivots
    stop at rank 4, the discarded part enters sample_errors (at least 2 ||U_i|| ||(I - P) U_i||
    for the sample that holds it), and the critical-lr bracket still contains the answer of the
    whole family (factors with the tiny fifth direction kept), computed from its factors."""
    rng = np.random.default_rng(7)
    n, d = 20, 4
    base = rng.standard_normal((n, d, 1))
    tiny = np.zeros((n, 1, 1))
    tiny[3, 0, 0] = 1e-7 * np.sqrt(np.sum(base ** 2) / n)  # ||(I - P) U_3||^2 ~ 1e-14 lambda_1
    factors = np.concatenate([base, tiny], axis=1)
    small = HessianFamily.from_gram(_gram(factors), 1)
    assert small.d == 4
    reduction = small._reduced
    errors = reduction.sample_errors
    e3 = tiny[3, 0, 0] ** 2 / reduction.sharpness
    size3 = float(np.sum(factors[3] ** 2)) / reduction.sharpness
    assert errors[3] >= 2 * np.sqrt(size3 * e3) * 0.9  # S_33 is computed to ~1 %
    # the other discarded rows carry S's rounding only (sqrt(u) ||U_i|| after the square root)
    assert errors[3] == np.max(errors) and errors[3] > 2 * np.median(errors)
    bracket = fs.critical_lr(small, 2, bounds=True)
    truth = fs.critical_lr(HessianFamily(factors), 2)
    assert bracket.lower <= truth <= bracket.upper


def test_gradient_products_on_the_pivoted_route(pivoted):
    rng = np.random.default_rng(11)
    factors = _factors(2, 15, 4, 2)
    n, d, r = factors.shape
    A = factors.transpose(0, 2, 1).reshape(n * r, d)
    gradients = rng.standard_normal((n, d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.NotAMinimumWarning)
        full = HessianFamily(factors, gradients=gradients)
        small = HessianFamily.from_gram(A @ A.T, r, gradient_products=gradients @ A.T)
    lr = 0.3 * fs.critical_lr(full, 2)
    ours = fs.second_moment(small, lr, 2, 15, init="normal")
    theirs = fs.second_moment(full, lr, 2, 15, init="normal")
    # E||w||^2 differs by the flat directions' count (d vs d'); the excess loss does not
    np.testing.assert_allclose(ours.excess_loss, theirs.excess_loss, rtol=1e-10)


@pytest.mark.parametrize("route", ["pivoted", "eigh"])
def test_bad_gram_matrices_are_refused(monkeypatch, route):
    monkeypatch.setattr(family_module, "GRAM_PIVOTED_MIN", 1 if route == "pivoted" else 10**9)
    factors = _factors(1, 10, 3, 1)
    gram = _gram(factors)
    indefinite = gram - 0.5 * np.linalg.eigvalsh(gram)[-1] * np.eye(10)
    with pytest.raises(ValueError, match="positive semi-definite"):
        HessianFamily.from_gram(indefinite)
    skew = gram.copy()
    skew[0, 1] += 1e-3 * np.abs(gram).max()
    with pytest.raises(ValueError, match="symmetric"):
        HessianFamily.from_gram(skew)
    with pytest.raises(ValueError, match="zero"):
        HessianFamily.from_gram(np.zeros((10, 10)))


def test_eigenbasis_reduction_errors_match_the_eigendecomposition_route():
    """The backward error of the reduction set by from_gram (rows taken as exact, no second
    eigh) is of the order of the one _reduce computes on the same rows with its own eigh."""
    factors = _factors(9, 40, 30, 1)
    small = HessianFamily.from_gram(_gram(factors))
    again = family_module._reduce(small._columns(), small.n, small.rank)
    mine = small._reduced
    np.testing.assert_allclose(mine.unit_eigenvalues, again.unit_eigenvalues, rtol=1e-10,
                               atol=1e-13)
    for name in ("mean_error", "relative_mean_error", "relative_noise_error"):
        value, reference_value = getattr(mine, name), getattr(again, name)
        assert 0 < value < 1e-9 and value < 100 * reference_value, name
    assert np.all(mine.sample_errors > 0) and np.max(mine.sample_errors) < 1e-10


# ----------------------------------------------------------------------------- the Cholesky route
# A full-rank Gram matrix G = L L^T: the family's factors are the rows of L (their coordinates in
# the orthonormal basis A L^-T), its sharpness comes from Lanczos and its reduction is left to the
# first engine call. ``GRAM_CHOLESKY_MIN`` is lowered so that small matrices take this route.


@pytest.fixture
def cholesky(monkeypatch):
    monkeypatch.setattr(family_module, "GRAM_CHOLESKY_MIN", 1)
    # blocks of 7 rows for the in-place passes (checks, symmetrising, zeroing, restoring), so that
    # small matrices cross block boundaries as the large ones do
    monkeypatch.setattr(family_module, "_BLOCK", 7)


def _eigh_route(gram, r, monkeypatch):
    monkeypatch.setattr(family_module, "GRAM_CHOLESKY_MIN", 10**9)
    try:
        return HessianFamily.from_gram(gram, r)
    finally:
        monkeypatch.setattr(family_module, "GRAM_CHOLESKY_MIN", 1)


@pytest.mark.parametrize("n, d, r", [(3, 6, 2), (4, 5, 1)])
def test_cholesky_route_against_the_dense_kronecker_reference(cholesky, n, d, r):
    """n r <= d: full rank; critical lr and spectral radius against dense Kronecker operators
    built from the original factors (tests/reference.py), and the bracket contains them."""
    factors = _factors(40 + n, n, d, r)
    small = HessianFamily.from_gram(_gram(factors), r)
    assert small.__dict__.get("_cholesky_rows") and small.d == n * r
    hessians = ref.dense_from_factors(factors)
    mean = hessians.mean(axis=0)
    assert small.sharpness() == pytest.approx(np.linalg.eigvalsh(mean)[-1], rel=1e-13)
    for sampling in ("bernoulli", "with_replacement", "without_replacement"):
        expected = ref.critical_lr(hessians, 2, sampling)
        bracket = fs.critical_lr(small, 2, sampling=sampling, bounds=True)
        assert bracket.value == pytest.approx(expected, rel=1e-9)
        assert bracket.lower <= expected * (1 + 1e-12) and expected <= bracket.upper * (1 + 1e-12)
        lr = 0.8 * expected
        assert fs.spectral_radius(small, lr, 2, sampling=sampling) == pytest.approx(
            ref.spectral_radius(hessians, lr, 2, sampling), rel=1e-9)


@pytest.mark.parametrize("n, d, r", [(40, 300, 3), (50, 1000, 1),
                                     pytest.param(200, 700, 3, marks=pytest.mark.slow)])
def test_cholesky_route_equals_the_eigh_route_and_the_factors(cholesky, monkeypatch, n, d, r):
    """The same family as the eigendecomposition route and as the factors themselves (their
    own eigh of H): L L^T = G to rounding, the same sharpness, critical lr, second moment; the
    reduction is not computed until an engine needs it, and is then the standard one."""
    factors = _factors(n + d + r, n, d, r)
    gram = _gram(factors)
    original = gram.copy()
    ours = HessianFamily.from_gram(gram, r)
    np.testing.assert_array_equal(gram, original)  # the caller's array is left alone
    old = _eigh_route(gram, r, monkeypatch)
    full = HessianFamily(factors)
    rows = ours._columns()
    assert rows.shape == (n * r, n * r) and np.shares_memory(rows, ours.factors)
    assert not np.any(np.triu(rows, 1))  # lower triangular: the Cholesky factor itself
    np.testing.assert_allclose(rows @ rows.T, gram, rtol=0, atol=1e-13 * np.abs(gram).max())
    truth = np.linalg.eigvalsh(gram)[-1] / n
    assert "_reduced" not in ours.__dict__
    assert ours.sharpness() == pytest.approx(truth, rel=1e-13)
    assert ours.sharpness() == pytest.approx(full.sharpness(), rel=1e-13)
    assert "_reduced" not in ours.__dict__  # the sharpness needed no reduction
    for batch in (1, 7):
        expected = fs.critical_lr(full, batch)
        assert fs.critical_lr(old, batch) == pytest.approx(expected, rel=1e-10)
        bracket = fs.critical_lr(ours, batch, bounds=True)
        assert bracket.value == pytest.approx(expected, rel=1e-10)
        assert bracket.lower <= expected * (1 + 1e-12) and expected <= bracket.upper * (1 + 1e-12)
    assert "_reduced" in ours.__dict__
    np.testing.assert_allclose(ours._reduced.unit_eigenvalues, full._reduced.unit_eigenvalues,
                               rtol=1e-9, atol=1e-13)
    assert ours.sharpness() == pytest.approx(ours._reduced.sharpness, rel=1e-13)
    lr = 0.5 * fs.critical_lr(full, 3)  # E||w||^2 counts the flat directions: the same d' = n r
    np.testing.assert_allclose(fs.second_moment(ours, lr, 3, 10).log_mean_sq,
                               fs.second_moment(old, lr, 3, 10).log_mean_sq, rtol=1e-10)


def test_cholesky_route_in_place_and_its_fallback_restores_the_matrix(cholesky, monkeypatch):
    """overwrite=True: a full-rank Gram matrix becomes the factors (shared memory, the same
    family as the copying route); a rank-deficient one breaks down or has a tiny pivot, is
    restored (scaled back, the triangle dpotrf wrote rebuilt) and takes the old routes, with
    the same family as from_gram on a copy."""
    factors = _factors(21, 50, 300, 2)
    gram = _gram(factors)
    copy = HessianFamily.from_gram(gram, 2)
    owned = gram.copy()
    ours = family_module.gram_family(HessianFamily, owned, 2, None, None, overwrite=True)
    assert np.shares_memory(ours.factors, owned)
    np.testing.assert_array_equal(ours.factors, copy.factors)
    assert ours.sharpness() == copy.sharpness()
    low = _gram(_factors(22, 50, 30, 2))  # rank 30 of 100
    reference = _eigh_route(low, 2, monkeypatch)
    for pivoted_min in (1, 10**9):  # the fallback through the pivoted route, then the eigh one
        monkeypatch.setattr(family_module, "GRAM_PIVOTED_MIN", pivoted_min)
        owned = low.copy()
        fallback = family_module.gram_family(HessianFamily, owned, 2, None, None, overwrite=True)
        assert fallback.d == 30 and not fallback.__dict__.get("_cholesky_rows")
        np.testing.assert_allclose(owned, 0.5 * (low + low.T), rtol=0, atol=0)  # restored
        if pivoted_min > 1:
            np.testing.assert_array_equal(fallback.factors, reference.factors)
        assert fallback.sharpness() == pytest.approx(reference.sharpness(), rel=1e-12)


def test_cholesky_route_gradients_population_size_and_pickle(cholesky):
    """gradient_products give the same excess loss as the factors with their gradients; a
    probe's population_size, pickling and preconditioning keep the family's answers."""
    import pickle

    rng = np.random.default_rng(12)
    factors = _factors(3, 30, 200, 2)
    n, d, r = factors.shape
    A = factors.transpose(0, 2, 1).reshape(n * r, d)
    gradients = rng.standard_normal((n, d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.NotAMinimumWarning)
        full = HessianFamily(factors, gradients=gradients)
        small = HessianFamily.from_gram(A @ A.T, r, gradient_products=gradients @ A.T)
    assert small.__dict__.get("_cholesky_rows") and small.gradients.shape == (n, n * r)
    lr = 0.3 * fs.critical_lr(full, 2)
    np.testing.assert_allclose(fs.second_moment(small, lr, 2, 15, init="normal").excess_loss,
                               fs.second_moment(full, lr, 2, 15, init="normal").excess_loss,
                               rtol=1e-10)
    fresh = HessianFamily.from_gram(A @ A.T, r)
    probe = fresh.with_population_size(300)
    assert probe.sharpness() == pytest.approx(full.sharpness(), rel=1e-13)
    assert "_reduced" not in probe.__dict__
    assert fs.critical_lr(probe, 4) == pytest.approx(
        fs.critical_lr(full.with_population_size(300), 4), rel=1e-10)
    again = pickle.loads(pickle.dumps(fresh))
    assert again.sharpness() == fresh.sharpness()
    assert fs.critical_lr(again, 3) == pytest.approx(fs.critical_lr(full, 3), rel=1e-10)
    P = rng.uniform(0.5, 2.0, n * r)
    assert fs.critical_lr(fresh.preconditioned(P), 3) == pytest.approx(
        fs.critical_lr(HessianFamily(fresh.factors).preconditioned(P), 3), rel=1e-12)


def test_cholesky_route_refuses_bad_gram_matrices(cholesky):
    factors = _factors(1, 10, 30, 1)
    gram = _gram(factors)
    indefinite = gram - 0.5 * np.linalg.eigvalsh(gram)[-1] * np.eye(10)
    with pytest.raises(ValueError, match="positive semi-definite"):
        HessianFamily.from_gram(indefinite)
    skew = gram.copy()
    skew[0, 1] += 1e-3 * np.abs(gram).max()
    with pytest.raises(ValueError, match="symmetric"):
        HessianFamily.from_gram(skew)
    with pytest.raises(ValueError, match="symmetric"):  # in place too: refused, not factored
        family_module.gram_family(HessianFamily, skew.copy(), 1, None, None, overwrite=True)
    bad = gram.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"gram must be finite; found nan at index \(3, 4\)"):
        HessianFamily.from_gram(bad)
    with pytest.raises(ValueError, match="gradient_products must have shape"):
        HessianFamily.from_gram(gram, gradient_products=np.zeros((10, 9)))


@pytest.mark.slow
def test_cholesky_route_at_its_default_size(monkeypatch):
    """From GRAM_CHOLESKY_MIN = 2,048 rows without any setting: n r = 2,400 < d, full rank, the
    Cholesky route; the sharpness against numpy's eigvalsh of G / n and the critical lr against
    the eigendecomposition route."""
    assert family_module.GRAM_CHOLESKY_MIN == 2048
    factors = _factors(77, 240, 3000, 10)
    gram = _gram(factors)
    ours = HessianFamily.from_gram(gram, 10)
    assert ours.__dict__.get("_cholesky_rows") and ours.d == 2400
    assert ours.sharpness() == pytest.approx(np.linalg.eigvalsh(gram)[-1] / 240, rel=1e-13)
    old = _eigh_route(gram, 10, monkeypatch)
    bracket = fs.critical_lr(ours, 16, bounds=True)
    expected = fs.critical_lr(old, 16)
    assert bracket.value == pytest.approx(expected, rel=1e-9)
    assert bracket.lower <= expected * (1 + 1e-12) and expected <= bracket.upper * (1 + 1e-12)


def test_cholesky_route_factors_the_symmetric_part(cholesky):
    """An asymmetry below the tolerance (1e-9): the family is that of (G + G^T) / 2, not of one
    triangle of G (dpotrf reads one), in place or not."""
    factors = _factors(31, 30, 200, 2)
    gram = _gram(factors)
    rng = np.random.default_rng(5)
    skew = rng.standard_normal(gram.shape)
    skew = 1e-11 * np.abs(gram).max() * (skew - skew.T)
    bent = gram + skew
    symmetric = 0.5 * (bent + bent.T)
    for overwrite in (False, True):
        family = family_module.gram_family(HessianFamily, bent.copy(), 2, None, None, overwrite)
        rows = family._columns()
        np.testing.assert_allclose(rows @ rows.T, symmetric, rtol=0, atol=1e-14 * np.abs(gram).max())
