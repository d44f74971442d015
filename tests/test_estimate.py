"""``fastsgdstab.estimate``: the bootstrap over a probe's samples (specification section 17).

References: the documented resampling recomputed here with plain HessianFamily constructions
(no reuse of the reduction), the interval formulas written out independently (Efron &
Tibshirani 1993: percentile, basic, BCa with the delete-one jackknife), and scipy.stats.bootstrap.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import fastsgdstab as fs
from fastsgdstab import HessianFamily
from fastsgdstab.estimation import probe_indices, select_probe

from fastsgdstab import estimation as estimate_module

ROOT = Path(__file__).resolve().parents[1]


def probe_family(n=30, d=5, population=3000, seed=0, rank=1):
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n, d, rank)) * np.exp(0.3 * rng.standard_normal((n, 1, 1)))
    factors *= np.linspace(1.0, 0.4, d)[None, :, None]
    return HessianFamily(factors, population_size=population)


def test_replicates_are_the_documented_resamples():
    # Resample j draws n indices from default_rng(seed).integers(0, n, (resamples, n)); its
    # family keeps population_size. Recomputed here on the full d-dimensional factors.
    family = probe_family()
    result = fs.estimate(fs.critical_lr, family, 8, sampling="without_replacement", resamples=25,
                         seed=3, interval="percentile")
    indices = np.random.default_rng(3).integers(0, family.n, size=(25, family.n))
    for j in (0, 7, 24):
        resampled = HessianFamily(family.factors[indices[j]], population_size=3000)
        expected = fs.critical_lr(resampled, 8, sampling="without_replacement")
        assert result.replicates[j] == pytest.approx(expected, rel=1e-9)
    assert result.value == fs.critical_lr(family, 8, sampling="without_replacement")
    assert result.resamples == 25 and result.level == 0.95 and result.method == "percentile"
    assert result.evaluations == 26 and result.cost.elapsed_seconds > 0
    assert result.bias_corrected == pytest.approx(2 * result.value - result.replicates.mean(), rel=1e-12)
    assert result.standard_error == pytest.approx(np.std(result.replicates, ddof=1), rel=1e-12)


@pytest.mark.parametrize("function, args, kwargs", [
    (fs.critical_lr, (4,), dict(sampling="bernoulli")),
    (fs.spectral_radius, (0.3, 6), dict(sampling="with_replacement")),
    (fs.critical_batch_size, (0.4,), dict(sampling="without_replacement", bounds=True)),
])
def test_reuse_of_the_reduction_gives_the_same_replicates(function, args, kwargs):
    family = probe_family(n=20, d=9, rank=2, seed=1)
    reduced = fs.estimate(function, family, *args, resamples=20, seed=5, interval="percentile", **kwargs)
    full = fs.estimate(function, family, *args, resamples=20, seed=5, interval="percentile",
                       reuse_reduction=False, **kwargs)
    np.testing.assert_allclose(reduced.replicates, full.replicates, rtol=1e-8)
    assert reduced.value == full.value


def test_threads_do_not_change_the_result(monkeypatch):
    family = probe_family(seed=2)
    pooled = fs.estimate(fs.critical_lr, family, 4, resamples=30, seed=1, interval="bca")
    monkeypatch.setattr(estimate_module, "_cores", lambda: 1)
    alone = fs.estimate(fs.critical_lr, family, 4, resamples=30, seed=1, interval="bca")
    np.testing.assert_array_equal(pooled.replicates, alone.replicates)
    assert pooled.interval == alone.interval
    other = fs.estimate(fs.critical_lr, family, 4, resamples=30, seed=2)
    assert not np.array_equal(other.replicates, alone.replicates)


def test_pool_threads_run_one_numba_thread_and_restore_nothing_global(monkeypatch):
    import numba

    monkeypatch.setattr(estimate_module, "_cores", lambda: 2)
    seen = []

    def record(f):
        seen.append(numba.get_num_threads())
        return f.sharpness()

    before = numba.get_num_threads()
    fs.estimate(record, probe_family(n=8, seed=9), resamples=20)
    assert seen[0] == before and set(seen[1:]) == {1}  # the plug-in in the caller's thread
    assert numba.get_num_threads() == before


def _bca_reference(data, statistic, replicates, level):
    """Efron's BCa with the delete-one jackknife, written out (no library code)."""
    theta = statistic(data)
    z0 = stats.norm.ppf((np.sum(replicates < theta) + 0.5 * np.sum(replicates == theta)) / replicates.size)
    jack = np.array([statistic(np.delete(data, i, axis=0)) for i in range(data.shape[0])])
    centred = jack.mean() - jack
    acceleration = np.sum(centred**3) / (6 * np.sum(centred**2) ** 1.5)
    ends = []
    for z in (stats.norm.ppf((1 - level) / 2), stats.norm.ppf((1 + level) / 2)):
        ends.append(stats.norm.cdf(z0 + (z0 + z) / (1 - acceleration * (z0 + z))))
    return ends


def test_intervals_follow_their_formulas():
    # A statistic of the factors themselves (reuse_reduction=False keeps their coordinates):
    # the mean of a skewed sample, n = 60 <= 100 jackknife groups (the delete-one jackknife).
    rng = np.random.default_rng(4)
    data = rng.exponential(size=60)
    family = HessianFamily(np.stack([data, np.ones(60)], axis=1)[:, :, None])

    def mean_of_first(f):
        return float(f.factors[:, 0, 0].mean())

    result = fs.estimate(mean_of_first, family, resamples=400, level=0.9, seed=7,
                         reuse_reduction=False, interval="bca")
    replicates = np.sort(result.replicates)
    assert result.value == pytest.approx(data.mean(), rel=1e-12)
    lower, upper = result.intervals["percentile"]
    assert lower == replicates[math.floor(0.05 * 399)] and upper == replicates[math.ceil(0.95 * 399)]
    assert result.intervals["basic"] == pytest.approx((2 * result.value - upper, 2 * result.value - lower))
    ends = _bca_reference(data, np.mean, result.replicates, 0.9)
    assert result.interval == result.intervals["bca"]
    assert result.interval[0] == replicates[math.floor(ends[0] * 399)]
    assert result.interval[1] == replicates[math.ceil(ends[1] * 399)]
    # and close to scipy's BCa (its own resamples): within the resampling noise
    scipy_bca = stats.bootstrap((data,), np.mean, n_resamples=4000, confidence_level=0.9,
                                method="BCa", random_state=1).confidence_interval
    assert result.interval == pytest.approx((scipy_bca.low, scipy_bca.high), rel=0.06)
    # the skewed statistic moves the BCa interval up relative to the percentile one
    assert result.interval[1] > upper


def test_functions_returning_objects_with_a_value():
    family = probe_family(n=12, seed=3)
    bracket = fs.estimate(fs.critical_lr, family, 4, bounds=True, resamples=20, interval="basic")
    assert bracket.value == fs.critical_lr(family, 4)
    assert bracket.interval == bracket.intervals["basic"] and "bca" not in bracket.intervals
    assert str(bracket).startswith(f"{bracket.value:.6g} (bias-corrected")


def test_estimate_accepts_a_model_family_and_keeps_the_population_size():
    seen = []

    def record(f):
        seen.append(f.population_size)
        return f.sharpness()

    class Wrapped:  # what family_from_model returns: an object with .family
        family = probe_family(n=10, population=777, seed=4)

    fs.estimate(record, Wrapped(), resamples=20, interval="percentile")
    assert set(seen) == {777} and len(seen) == 21


def test_bad_arguments_are_refused_with_clear_errors():
    family = probe_family(n=10, seed=5)
    with pytest.raises(TypeError, match="function must be callable"):
        fs.estimate(3.0, family)
    with pytest.raises(TypeError, match="family must be a HessianFamily"):
        fs.estimate(fs.critical_lr, np.ones((3, 2)), 2)
    with pytest.raises(ValueError, match=r"resamples must be an integer >= 2; got 1"):
        fs.estimate(fs.critical_lr, family, 2, resamples=1)
    with pytest.raises(TypeError, match="resamples must be an integer"):
        fs.estimate(fs.critical_lr, family, 2, resamples=50.0)
    for level in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"level must lie in \(0, 1\)"):
            fs.estimate(fs.critical_lr, family, 2, level=level)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        fs.estimate(fs.critical_lr, family, 2, seed=-1)
    with pytest.raises(ValueError, match="interval must be one of 'percentile', 'basic', 'bca'"):
        fs.estimate(fs.critical_lr, family, 2, interval="studentised")
    with pytest.raises(TypeError, match="function must return a real number"):
        fs.estimate(lambda f: "x", family)
    with pytest.raises(TypeError, match="shape"):
        fs.estimate(lambda f: np.ones(2), family)
    with pytest.raises(ValueError, match="function returned NaN on the plug-in"):
        fs.estimate(lambda f: math.nan, family)
    # the function's own errors come from the plug-in, before any resample
    with pytest.raises(ValueError, match=r"batch_size must lie in \[1, N\] = \[1, 3000\]"):
        fs.estimate(fs.critical_lr, family, 5000)


def test_infinite_replicates_give_no_nan():
    # every resample of identical samples: critical_batch_size is 1 (all stable) or inf
    family = HessianFamily.from_features(np.ones((6, 1)), population_size=60)
    result = fs.estimate(fs.critical_batch_size, family, 2.5, resamples=20)
    assert result.value == math.inf and result.interval == (math.inf, math.inf)
    assert result.bias_corrected == math.inf and result.standard_error == math.inf


def test_probe_indices_and_selection():
    chosen = probe_indices(5, 20, seed=3)
    np.testing.assert_array_equal(chosen, np.sort(np.random.default_rng(3).choice(20, 5, replace=False)))
    assert probe_indices([3, 1], 5).tolist() == [1, 3]
    for bad, error in ((1, r"probe must be an integer in \[2, n\] = \[2, 5\]"),
                       (6, r"\[2, n\] = \[2, 5\]"),
                       ([1], "at least 2 samples"), ([0, 5], r"in \[0, n\) = \[0, 5\); got 5"),
                       ([2, 2], "must be distinct")):
        with pytest.raises(ValueError, match=error):
            probe_indices(bad, 5)
    with pytest.raises(TypeError, match="integer indices"):
        probe_indices([0.5, 1.5], 5)
    inputs, targets = np.arange(20.0).reshape(10, 2), list(range(10))
    x, y, population = select_probe(inputs, targets, [4, 7])
    assert population == 10 and x.tolist() == [[8.0, 9.0], [14.0, 15.0]] and y.tolist() == [4, 7]
    with pytest.raises(ValueError, match="same number of samples"):
        select_probe(inputs, targets[:3], 2)


def test_dask_client_gives_the_local_result():
    distributed = pytest.importorskip("distributed")
    family = probe_family(n=15, seed=6)
    local = fs.estimate(fs.critical_lr, family, 4, resamples=20, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                           dashboard_address=None)
    try:
        with distributed.Client(cluster, set_as_default=False) as client:
            remote = fs.estimate(fs.critical_lr, family, 4, resamples=20, seed=4, client=client)
    finally:
        cluster.close()
    np.testing.assert_array_equal(local.replicates, remote.replicates)
    assert local.interval == remote.interval
    with pytest.raises(TypeError, match="client must be a dask.distributed.Client"):
        fs.estimate(fs.critical_lr, family, 4, client=object())


# ------------------------------------------------------------------------ networks end to end
def test_family_from_model_probe_is_the_subset_with_the_population_size():
    torch = pytest.importorskip("torch")
    from fastsgdstab.torch import family_from_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    X = torch.randn(30, 3, dtype=torch.float64)
    y = model(X).detach()
    result = family_from_model(model, X, y, torch.nn.MSELoss(), probe=8, seed=2)
    chosen = probe_indices(8, 30, seed=2)
    direct = family_from_model(model, X[chosen], y[chosen], torch.nn.MSELoss())
    assert (result.family.n, result.family.population_size) == (8, 30)
    np.testing.assert_allclose(result.family.factors, direct.family.factors, rtol=1e-12)
    indexed = family_from_model(model, X.numpy(), y.numpy(), torch.nn.MSELoss(), probe=[0, 5, 9])
    assert (indexed.family.n, indexed.family.population_size) == (3, 30)
    assert family_from_model(model, X, y, torch.nn.MSELoss()).family.population_size == 30
    with pytest.raises(ValueError, match="probe indices must be distinct"):
        family_from_model(model, X, y, torch.nn.MSELoss(), probe=[1, 1])


def test_three_line_path_for_a_network_with_over_1e5_parameters():
    # An MLP 64-512-192-1 (131,969 parameters) regressing the digit on scikit-learn's digits
    # (N = 1797), a probe of 100 samples: family_from_model -> estimate, end to end.
    torch = pytest.importorskip("torch")
    datasets = pytest.importorskip("sklearn.datasets")
    from fastsgdstab.torch import family_from_model

    inputs, labels = datasets.load_digits(return_X_y=True)
    X = torch.tensor(inputs / 16.0)
    y = torch.tensor(labels / 9.0)[:, None]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Tanh(), torch.nn.Linear(512, 192),
                                torch.nn.Tanh(), torch.nn.Linear(192, 1)).double()
    assert sum(p.numel() for p in model.parameters()) > 100_000
    family = family_from_model(model, X, y, torch.nn.MSELoss(), probe=100, seed=0,
                               check_gauss_newton=False)
    result = fs.estimate(fs.critical_lr, family, 128, sampling="without_replacement")
    assert (family.family.n, family.family.population_size) == (100, 1797)
    assert result.value == fs.critical_lr(family.family, 128, sampling="without_replacement")
    assert result.interval[0] < result.value < result.interval[1]
    assert result.resamples == 200 and result.method == "percentile"
    # the batch law is the training set's: B = 128 of 1797, not of the 100 probe samples
    assert result.value < fs.critical_lr(family.family.with_population_size(128), 128,
                                         sampling="without_replacement")


# ----------------------------------------------------------------------------- coverage study
TABLE_ROW = re.compile(r"^\| (\d+) \| (percentile|basic|bca) \| (\d\.\d\d) \((\d+)/(\d+)\) \| "
                       r"\[(\d\.\d\d), (\d\.\d\d)\] \| (\d+\.\d{3}) \| (\d+\.\d{3}) / (\d+\.\d{3}) \|$")


def _table_rows(text):
    return [TABLE_ROW.match(line) for line in text.splitlines() if line.startswith("| ") and
            not line.startswith("| n ")]


def test_docs_table_has_the_scripts_format():
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_coverage", ROOT / "benchmarks" / "probe_coverage.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    docs = (ROOT / "docs" / "probe.md").read_text()
    assert script.TABLE_HEADER in docs
    rows = _table_rows(docs[docs.index(script.TABLE_HEADER):].split("\n\n")[0])
    assert len(rows) == 9 and all(rows)
    assert {int(r.group(1)) for r in rows} == {100, 300, 1000}
    assert all(int(r.group(5)) == 100 for r in rows)


@pytest.mark.slow
def test_coverage_script_runs(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_coverage.py"), "--population", "400",
                    "--subsets", "4", "--sizes", "40", "80", "--resamples", "40",
                    "--out", str(tmp_path / "coverage"), "--figure", str(tmp_path / "coverage.png")],
                   check=True, capture_output=True, timeout=600)
    table = (tmp_path / "coverage.md").read_text()
    rows = _table_rows(table)
    assert len(rows) == 6 and all(rows)
    assert (tmp_path / "coverage.png").stat().st_size > 1000
    assert (tmp_path / "coverage.json").exists()
