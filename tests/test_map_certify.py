"""stability_map certified at every point from the shared basis, at a bounded number of operator
products (issue 19 item 2), and momentum maps sharing work across grid points (item 4).

Checked against references independent of the library: dense Kronecker operators
(tests/reference.py, float64) and 30-digit mpmath operators (tests/mp_reference.py). The
product counts are counts, not times: they are the load-free measure of the map's cost.
"""

from __future__ import annotations

import warnings

import mpmath as mp
import numpy as np
import pytest

import fastsgdstab as fs
import mp_reference as mpref
import reference as ref

SCHEMES = ("bernoulli", "without_replacement", "with_replacement")


def power_law_family(n=60, d=10, seed=0):
    """Least squares with power-law feature scales (the demo family's shape, smaller)."""
    rng = np.random.default_rng(seed)
    return fs.HessianFamily.from_features(rng.standard_normal((n, d)) / np.sqrt(np.arange(1, d + 1)))


def certified_map(family, lrs, batch_sizes, **options):
    """The map, with the promise that no point needed a CertificationWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.CertificationWarning)
        return fs.stability_map(family, lrs, batch_sizes, progress=False, **options)


@pytest.mark.parametrize("sampling", SCHEMES)
def test_every_point_is_bracketed_around_the_dense_reference(sampling):
    family = power_law_family(n=40, d=8, seed=1)
    top = family.sharpness()
    lrs = np.linspace(0.05, 2.3, 9) / top
    batch_sizes = np.array([1.0, 3.0, 9.0, 40.0]) if sampling != "bernoulli" else np.geomspace(1, 40, 4)
    result = certified_map(family, lrs, batch_sizes, sampling=sampling)
    hessians = family.dense()
    rtol = 1e-6
    for i, batch_size in enumerate(batch_sizes):
        eta = ref.critical_lr(hessians, batch_size, sampling)
        assert result.critical_lr[i] == pytest.approx(eta, rel=1e-9)
        for j, lr in enumerate(lrs):
            exact = ref.spectral_radius(hessians, lr, batch_size, sampling)
            slack = 1e-12 * exact  # the float64 reference's own rounding
            low, high = result.radius_lower[i, j], result.radius_upper[i, j]
            assert low - slack <= exact <= high + slack, (i, j, low, exact, high)
            # Certified: the bracket is at most rtol wide, and the value sits inside it.
            assert high - low <= rtol * result.spectral_radius[i, j]
            assert low <= result.spectral_radius[i, j] <= high
            # The verdict agrees with the reference wherever the reference is clear of 1.
            if abs(exact - 1.0) > 1e-9:
                assert bool(result.stable[i, j]) == (exact < 1.0), (i, j, exact)
                assert (high < 1.0) == (exact < 1.0) or (low > 1.0) == (exact > 1.0)


@pytest.mark.parametrize("case", range(3))
def test_map_brackets_hold_in_30_digits_across_rows(case):
    # Several rows share (and restart) the basis: every bracket must hold against mpmath.
    mp.mp.dps = mpref.DIGITS
    rng = np.random.default_rng(500 + case)
    n, d = 7, 4
    factors = rng.standard_normal((n, d, 1)) * rng.uniform(0.2, 3.0, size=(n, 1, 1))
    family = fs.HessianFamily(factors)
    exact_family = mpref.Family(family._factors)
    sampling = SCHEMES[case]
    top = family.sharpness()
    lrs = np.array([0.1, 0.9, 1.7, 2.6]) / top
    batch_sizes = [1.0, 2.0, 5.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.CertificationWarning)  # a wide bracket must still be true
        result = fs.stability_map(family, lrs, batch_sizes, sampling=sampling, progress=False)
    for i, batch_size in enumerate(batch_sizes):
        for j, lr in enumerate(lrs):
            exact = mpref.spectral_radius(exact_family, lr, sampling, batch_size)
            assert mp.mpf(float(result.radius_lower[i, j])) <= exact <= mp.mpf(float(result.radius_upper[i, j])), (
                case, i, j)


def count_every_product(monkeypatch):
    """Counts every application of the noise operator, whoever makes it: the map's shared
    basis (the compiled kernel ``phase.sandwich_operator``), the engine's solves
    (``NoiseProduct.upper``, its proofs' absolute-value products included) and the momentum
    proofs' enclosed products (``MomentumMap.noise``)."""
    import fastsgdstab._engine as engine
    import fastsgdstab.phase as phase
    from fastsgdstab._verified import MomentumMap

    count = [0]
    kernel, upper, noise = phase.sandwich_operator, engine.NoiseProduct.upper, MomentumMap.noise

    def counted_kernel(*args):
        count[0] += 1
        return kernel(*args)

    def counted_upper(self, *args):
        count[0] += 1
        return upper(self, *args)

    def counted_noise(self, Y):
        count[0] += 1
        return noise(self, Y)

    monkeypatch.setattr(phase, "sandwich_operator", counted_kernel)
    monkeypatch.setattr(engine.NoiseProduct, "upper", counted_upper)
    monkeypatch.setattr(MomentumMap, "noise", counted_noise)
    return count


def check_critical_brackets(result, family, sampling="bernoulli", dense=True):
    """Each row's critical lr: a proven bracket at most CERTIFY_RTOL wide holding the dense
    reference (``dense``: small families only) and the value, overlapping the engine's own
    proven bracket and agreeing with its value."""
    hessians = family.dense() if dense else None
    for i, batch_size in enumerate(result.batch_sizes):
        low, high = result.critical_lr_lower[i], result.critical_lr_upper[i]
        assert low <= result.critical_lr[i] <= high
        assert high - low <= 1e-5 * result.critical_lr[i]
        engine = fs.critical_lr(family, batch_size, sampling=sampling, bounds=True)
        assert max(low, engine.lower) <= min(high, engine.upper)
        assert result.critical_lr[i] == pytest.approx(engine.value, rel=1e-9)
        if dense:
            exact = ref.critical_lr(hessians, batch_size, sampling)
            slack = 1e-12 * exact  # the float64 reference's own rounding
            assert low - slack <= exact <= high + slack, (i, low, exact, high)
            assert result.critical_lr[i] == pytest.approx(exact, rel=1e-9)


def test_products_of_a_fixed_map_counted_in_full_stay_under_the_bound(monkeypatch):
    # A 12 x 16 map of a power-law least-squares problem (k = 16), every point and every
    # critical lr certified. The release before the certificates (35d12d8~1) took 163 products
    # of the shared basis for this map, the critical lrs' solves not counted (issue 19's
    # figure), the release of issue 19 536 (and 12 more solves for the critical lrs). The
    # bound is the issue's 1.5 x 163, for every product counted, the critical lrs' included.
    family = power_law_family(n=128, d=16, seed=3)
    lrs = np.linspace(0.02, 2.2, 16) / family.sharpness()
    batch_sizes = np.geomspace(1, 128, 12)
    family.sharpness()
    count = count_every_product(monkeypatch)
    result = certified_map(family, lrs, batch_sizes)
    assert count[0] <= 244
    assert result.operator_products == count[0]  # the field is the full count
    check_critical_brackets(result, family)


@pytest.mark.slow
def test_readme_map_takes_at_most_765_products_counted_in_full(monkeypatch):
    # The map tutorial's 60 x 80 grid of the demo problem (issue 19: 510 products before the
    # certificates, so at most 765 with every point certified), every product counted: the
    # shared basis', any engine fallback's and the 60 critical lrs'.
    from fastsgdstab.cli import demo_family

    family = demo_family()
    family.sharpness()
    count = count_every_product(monkeypatch)
    result = certified_map(family, np.linspace(0.02, 2.2, 80), np.geomspace(1, 512, 60))
    assert count[0] <= 765
    assert result.operator_products == count[0]
    assert np.all(result.radius_upper - result.radius_lower <= 1e-6 * result.spectral_radius)
    check_critical_brackets(result, family, dense=False)  # d = 64: the engine's proof instead


@pytest.mark.parametrize("sampling", SCHEMES)
def test_critical_lr_brackets_hold_in_30_digits(sampling):
    # The map's own proof of each eta* (two certified points of the row) against mpmath.
    mp.mp.dps = mpref.DIGITS
    rng = np.random.default_rng(70 + SCHEMES.index(sampling))
    family = fs.HessianFamily(rng.standard_normal((9, 4, 2)) * rng.uniform(0.3, 2.0, size=(9, 1, 1)))
    exact_family = mpref.Family(family._factors)
    lrs = np.array([0.1, 0.8, 1.6]) / family.sharpness()
    batch_sizes = [1.0, 2.0, 4.0, 9.0]
    result = certified_map(family, lrs, batch_sizes, sampling=sampling)
    for i, batch_size in enumerate(batch_sizes):
        exact = mpref.critical_lr(exact_family, sampling, batch_size)
        low, high = mp.mpf(float(result.critical_lr_lower[i])), mp.mpf(float(result.critical_lr_upper[i]))
        assert low <= exact <= high, (i, low, exact, high)
        assert abs(mp.mpf(float(result.critical_lr[i])) - exact) <= 1e-11 * exact
        assert mp.mpf(float(result.critical_lr[i])) <= exact  # errs on the stable side
        assert result.critical_lr_upper[i] - result.critical_lr_lower[i] <= 1e-5 * result.critical_lr[i]


def test_critical_lr_falls_back_to_the_engine_and_counts_it(monkeypatch):
    # When the basis cannot prove a row's eta*, the engine's solve gives it (its bracket, its
    # products in the field).
    from fastsgdstab.phase import _MapSolver

    family = power_law_family(n=30, d=5, seed=4)
    lrs = np.array([0.3, 1.2]) / family.sharpness()
    batch_sizes = [1.0, 6.0]
    monkeypatch.setattr(_MapSolver, "critical", lambda self, batch_size: None)
    count = count_every_product(monkeypatch)
    result = certified_map(family, lrs, batch_sizes)
    assert result.operator_products == count[0]
    for i, batch_size in enumerate(batch_sizes):
        engine = fs.critical_lr(family, batch_size, bounds=True)
        assert (result.critical_lr[i], result.critical_lr_lower[i], result.critical_lr_upper[i]) == (
            engine.value, engine.lower, engine.upper)


@pytest.mark.parametrize("name", ["ill_conditioned", "decoupled"])
def test_critical_lr_bracket_holds_on_hard_families(name):
    # Directions of tiny curvature keep eigenvalues of Q just below 1 under the root; decoupled
    # samples make the top eigenvector singular. The bracket must hold either way (proven from
    # the basis or by the engine).
    rng = np.random.default_rng(9)
    if name == "ill_conditioned":
        family = fs.HessianFamily.from_features(rng.standard_normal((30, 6)) * np.logspace(0, -4, 6))
    else:
        family = fs.HessianFamily.from_features(np.vstack([np.diag([1.0, 1.0, 0.5, 0.5])] * 3))
    lrs = np.array([0.1, 1.0, 1.9]) / family.sharpness()
    for sampling in SCHEMES:
        batch_sizes = [1.0, 2.5, float(family.n)] if sampling == "bernoulli" else [1, 2, family.n]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fs.CertificationWarning)
            result = fs.stability_map(family, lrs, batch_sizes, sampling=sampling, progress=False)
        check_critical_brackets(result, family, sampling)


def count_products(monkeypatch):
    """Counts every product of V_s: the Krylov basis' and the proofs' enclosed ones."""
    import fastsgdstab._engine as engine
    from fastsgdstab._verified import MomentumMap

    count = [0]
    kernel, noise = engine.NoiseProduct.upper, MomentumMap.noise

    def counted_kernel(self, *args):
        count[0] += 1
        return kernel(self, *args)

    def counted_noise(self, Y):
        count[0] += 1
        return noise(self, Y)

    monkeypatch.setattr(engine.NoiseProduct, "upper", counted_kernel)
    monkeypatch.setattr(MomentumMap, "noise", counted_noise)
    # The gain route's enclosed products (``_verified.NoiseEnclosure``), issue 19.
    from fastsgdstab._verified import NoiseEnclosure
    enclosure = NoiseEnclosure.__call__

    def counted_enclosure(self, Y):
        count[0] += 1
        return enclosure(self, Y)

    monkeypatch.setattr(NoiseEnclosure, "__call__", counted_enclosure)
    return count


def test_momentum_map_brackets_hold_and_share_work(monkeypatch):
    # Each point against the dense momentum reference; and fewer products than the same points
    # through one engine solver as before issue 19 (shared basis only: every proof tries all of
    # its candidates, every root finder starts cold).
    from fastsgdstab._engine import MomentumSolver, radius_tolerance, reduced
    from fastsgdstab.sampling import map_coefficients

    family = power_law_family(n=8, d=5, seed=7)
    hessians = family.dense()
    top = family.sharpness()
    lrs = np.array([0.05, 0.6, 1.5, 3.0]) / top
    batch_sizes = [1.0, 3.0, 8.0]
    count = count_products(monkeypatch)
    result = certified_map(family, lrs, batch_sizes, momentum=0.9)  # every point certified
    shared = count[0]
    tolerance = np.vectorize(radius_tolerance)(result.spectral_radius)
    assert np.all(result.radius_upper - result.radius_lower <= tolerance * result.spectral_radius)
    for i, batch_size in enumerate(batch_sizes):
        for j, lr in enumerate(lrs):
            exact = ref.momentum_spectral_radius(hessians, lr, batch_size, "bernoulli", 0.9, False,
                                                 enumerate_batches=False)
            assert result.radius_lower[i, j] <= exact * (1 + 1e-12)
            assert result.radius_upper[i, j] >= exact * (1 - 1e-12)
            assert result.spectral_radius[i, j] == pytest.approx(exact, rel=1e-6)
    reduction = reduced(family)
    solver = MomentumSolver(reduction, "bernoulli")
    solver.gain_route_enabled = False  # the engine before issue 19: proofs on the full map
    count[0] = 0
    for batch_size in batch_sizes:
        _, b = map_coefficients("bernoulli", family.n, batch_size)
        solver.critical_unit_lr(b, 0.9, False)
        for lr in lrs:
            solver.radius(reduction.unit_lr(float(lr)), b, 0.9, False)
    assert shared < 0.9 * count[0], (shared, count[0])


@pytest.mark.parametrize("factor", [0.999, 1.001])
def test_a_wrong_estimate_of_the_critical_lr_never_gives_a_wrong_bracket(monkeypatch, factor):
    # The basis' estimate only proposes where to look: with both ends on one side of eta*,
    # one end's proof fails and the row gets a true bracket (here the engine's).
    from fastsgdstab.phase import _MapSolver

    pencil = _MapSolver._pencil

    def wrong(self, q):
        x, slope, safe = pencil(self, q)
        return x * factor, slope, safe * factor

    monkeypatch.setattr(_MapSolver, "_pencil", wrong)
    family = power_law_family(n=30, d=5, seed=4)
    result = certified_map(family, np.array([0.3, 1.2]) / family.sharpness(), [1.0, 3.0, 30.0])
    check_critical_brackets(result, family)


def test_ill_conditioned_rows_prove_their_critical_lr_from_the_basis(monkeypatch):
    # Below the root, directions of tiny curvature keep eigenvalues of Q within 1e-8 of 1: the
    # stable end's certification must be that tight (Q's diagonal bounds the margin), or every
    # row would fall back to the engine's solve.
    import fastsgdstab.phase as phase

    engine_calls = []
    original = phase.critical_lr

    def counted(*args, **kwargs):
        engine_calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(phase, "critical_lr", counted)
    rng = np.random.default_rng(0)
    family = fs.HessianFamily.from_features(rng.standard_normal((30, 6)) * np.logspace(0, -4, 6))
    result = certified_map(family, np.array([0.1, 1.0, 1.9]) / family.sharpness(), [1.0, 2.5, 30.0])
    assert engine_calls == []
    check_critical_brackets(result, family)
