"""sweep (issue 13, item 2), run locally: the table's values against the dense Kronecker
references of tests/reference.py, its layout (DataFrame and, without pandas, a structured
array), failures named per row, Ctrl-C keeping the finished rows. The Dask path is tested in
test_distributed.py (equal to these local tables)."""

import inspect
import math
import sys
import warnings

import numpy as np
import pytest

from fastsgdstab import HessianFamily, SimulationWarning, simulate, spectral_radius
from fastsgdstab import _sweep
from fastsgdstab._sweep import sweep

import reference


def _family(seed, n=5, d=3):
    rng = np.random.default_rng(seed)
    return HessianFamily.from_features(rng.standard_normal((n, d)))


def _reference_critical_batch_size(hessians, lr, sampling):
    """Smallest real batch size in [1, n] with reference rho <= 1, by bisection (rho decreases
    as B grows); 1 if B = 1 is stable, inf if B = n is not."""
    n = hessians.shape[0]
    if reference.spectral_radius(hessians, lr, 1.0, sampling) <= 1.0:
        return 1.0
    if reference.spectral_radius(hessians, lr, float(n), sampling) > 1.0:
        return math.inf
    low, high = 1.0, float(n)
    for _ in range(60):
        middle = 0.5 * (low + high)
        if reference.spectral_radius(hessians, lr, middle, sampling) <= 1.0:
            high = middle
        else:
            low = middle
    return high


def test_values_match_the_dense_references():
    families = {"a": _family(1), "b": _family(2)}
    settings = [dict(lr=0.2, batch_size=2.0), dict(lr=0.6, batch_size=1.5),
                dict(lr=0.3, batch_size=3, sampling="without_replacement")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here should warn
        table = sweep(families, settings, progress=False)
    assert len(table) == 6
    for row in range(6):
        family = families[table["family"][row]]
        setting = settings[row % 3]
        hessians = family.dense()
        sampling = setting.get("sampling", "bernoulli")
        rho = reference.spectral_radius(hessians, setting["lr"], setting["batch_size"], sampling)
        assert table["spectral_radius_lower"][row] <= rho * (1 + 1e-12) + 1e-15
        assert table["spectral_radius_upper"][row] >= rho * (1 - 1e-12) - 1e-15
        assert table["spectral_radius"][row] == pytest.approx(rho, rel=1e-9)
        assert table["verdict"][row] == ("converges" if rho < 1 else "diverges")
        eta = reference.critical_lr(hessians, setting["batch_size"], sampling)
        assert table["critical_lr"][row] == pytest.approx(eta, rel=1e-9)
        threshold = _reference_critical_batch_size(hessians, setting["lr"], sampling)
        if sampling == "bernoulli":
            assert table["critical_batch_size"][row] == pytest.approx(threshold, rel=1e-8)
        else:  # the smallest stable integer
            assert table["critical_batch_size"][row] == math.ceil(threshold - 1e-9)
        assert table["error"][row] == "" and table["warning"][row] == ""


def test_grid_order_labels_and_columns(tmp_path):
    path = tmp_path / "saved.npz"
    _family(3).save(path)
    table = sweep([_family(1), str(path)], {"lr": [0.1, 0.2], "batch_size": [1, 4],
                                            "sampling": ["bernoulli"]}, progress=False)
    assert list(table.columns) == ["family", "lr", "batch_size", "sampling", "verdict",
                                   "spectral_radius", "spectral_radius_lower",
                                   "spectral_radius_upper", "critical_lr", "critical_batch_size",
                                   "warning", "error"]
    assert list(table["family"]) == ["0"] * 4 + [str(path)] * 4
    assert list(table["lr"]) == [0.1, 0.1, 0.2, 0.2] * 2  # the last key varies fastest
    assert list(table["batch_size"]) == [1.0, 4.0, 1.0, 4.0] * 2
    # The saved family is the same family: the same numbers.
    again = sweep({"x": _family(3)}, [dict(lr=0.1, batch_size=1)], progress=False)
    assert again["spectral_radius"][0] == table["spectral_radius"][4]


def test_simulation_columns_are_simulates():
    family = _family(4, n=20, d=4)
    lr = 1.2 / family.sharpness()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        table = sweep([family], [dict(lr=lr, batch_size=2)],
                      simulate=dict(steps=200, runs=300, seed=8), progress=False)
        direct = simulate(family, lr, 2, 200, 300, seed=8, progress=False)
    assert table["diverged_fraction"][0] == direct.diverged_fraction
    assert (table["diverged_fraction_low"][0], table["diverged_fraction_high"][0]) == \
        direct.diverged_fraction_interval
    assert table["lyapunov_exponent"][0] == direct.lyapunov_exponent
    assert table["lyapunov_exponent_stderr"][0] == direct.lyapunov_exponent_stderr
    if np.any(direct.log_mean_sq_untrustworthy):  # the row keeps simulate's warning
        assert "untrustworthy" in table["warning"][0]


def test_structured_array_without_pandas(monkeypatch):
    families = {"a": _family(1), "b": _family(2)}
    settings = [dict(lr=0.2, batch_size=2.0, flag=True), dict(lr=5.0, batch_size=9.0, flag=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        frame = sweep(families, settings, progress=False)
        monkeypatch.setitem(sys.modules, "pandas", None)  # "import pandas" raises ImportError
        array = sweep(families, settings, progress=False)
    assert isinstance(array, np.ndarray) and array.dtype.names == tuple(frame.columns)
    assert array.dtype["flag"] == bool and array.dtype["lr"] == np.float64
    for name in frame.columns:
        if array.dtype[name].kind == "U":
            assert array[name].tolist() == frame[name].tolist()
        else:
            np.testing.assert_array_equal(array[name], frame[name].to_numpy(dtype=array.dtype[name]))


def test_failures_are_named_per_row_and_per_task(tmp_path):
    families = {"small": _family(1), "missing": tmp_path / "none.npz", "big": _family(2, n=12)}
    settings = [dict(lr=0.2, batch_size=2), dict(lr=0.2, batch_size=8)]  # 8 > n = 5 for "small"
    with pytest.warns(RuntimeWarning, match="3 of 6 rows failed"):
        table = sweep(families, settings, progress=False)
    errors = list(table["error"])
    assert errors[0] == errors[4] == errors[5] == ""
    assert errors[1].startswith("ValueError: batch_size must lie in [1, n] = [1, 5]; got 8")
    assert errors[2] == errors[3] and errors[2].startswith("FileNotFoundError")
    assert str(tmp_path / "none.npz") in errors[2]
    assert np.isnan(table["spectral_radius"][1]) and table["verdict"][1] == ""
    assert np.isfinite(table["spectral_radius"][[0, 4, 5]]).all()


def test_extra_setting_keys_reach_the_functions_that_take_them():
    from fastsgdstab import critical_batch_size, critical_lr

    family = _family(5)
    setting = dict(lr=0.2, batch_size=2, momentum=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = sweep([family], [setting, dict(lr=0.2, batch_size=2, colour="red")], progress=False)
    assert table["momentum"][0] == 0.5 and table["colour"][1] == "red"
    # a key that no function takes fails its row, and says so
    assert table["error"][1].startswith("TypeError: setting key 'colour' is not a keyword")
    if "momentum" not in inspect.signature(spectral_radius).parameters:
        assert "momentum" in table["error"][0]  # not an option of this version: named, not dropped
        return
    assert table["error"][0] == ""
    assert table["spectral_radius"][0] == spectral_radius(family, 0.2, 2, momentum=0.5)
    assert table["critical_lr"][0] == critical_lr(family, 2, momentum=0.5)
    assert table["critical_batch_size"][0] == critical_batch_size(family, 0.2, momentum=0.5)
    assert table["spectral_radius"][0] != spectral_radius(family, 0.2, 2)


def test_reshuffle_rows_are_simulated_only():
    from fastsgdstab import sampling

    if "reshuffle" not in getattr(sampling, "SIMULATION_SAMPLING_SCHEMES", ()):
        pytest.skip("simulate has no random reshuffling in this version")
    family = _family(6, n=12, d=3)
    setting = dict(lr=0.3, batch_size=5, sampling="reshuffle", drop_last=True)
    with pytest.raises(ValueError, match="no exact answer"):
        sweep([family], [setting])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        table = sweep([family], [setting], simulate=dict(steps=60, runs=50, seed=2), progress=False)
        direct = simulate(family, 0.3, 5, 60, 50, seed=2, sampling="reshuffle", drop_last=True,
                          progress=False)
    assert table["error"][0] == "" and table["verdict"][0] == ""
    assert np.isnan(table["spectral_radius"][0]) and np.isnan(table["critical_lr"][0])
    assert table["lyapunov_exponent"][0] == direct.lyapunov_exponent
    assert table["diverged_fraction"][0] == direct.diverged_fraction


def test_interrupt_keeps_the_finished_rows(monkeypatch):
    calls = []
    original = _sweep.task_rows

    def interrupted_on_the_second_task(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(_sweep, "task_rows", interrupted_on_the_second_task)
    families = [_family(1), _family(2), _family(3)]
    with pytest.warns(RuntimeWarning, match="interrupted: 2 of 6 rows finished"):
        table = sweep(families, [dict(lr=0.1, batch_size=1), dict(lr=0.2, batch_size=1)],
                      progress=False)
    assert list(table["error"]) == ["", ""] + ["not run: interrupted"] * 4
    assert np.isfinite(table["spectral_radius"][:2]).all()
    assert np.isnan(table["spectral_radius"][2:]).all()


def test_progress_bar_on_request(capsys):
    sweep([_family(1)], [dict(lr=0.1, batch_size=1)], progress=True)
    assert "sweep" in capsys.readouterr().err


@pytest.mark.parametrize("families, settings, kwargs, error, match", [
    (42, [dict(lr=0.1, batch_size=1)], {}, TypeError, "families must be a sequence"),
    ([], [dict(lr=0.1, batch_size=1)], {}, ValueError, "at least one family"),
    ([[1.0, 2.0]], [dict(lr=0.1, batch_size=1)], {}, TypeError, "entry '0' is a list"),
    (None, [], {}, ValueError, "at least one setting"),
    (None, [dict(lr=0.1)], {}, ValueError, "batch_size missing"),
    (None, [dict(lr=-1.0, batch_size=1)], {}, ValueError, "lr must be"),
    (None, [dict(lr=0.1, batch_size=1, sampling="shuffle")], {}, ValueError, "sampling"),
    (None, [0.1], {}, TypeError, r"settings\[0\] must be a dict"),
    (None, [dict(lr=0.1, batch_size=1)], dict(simulate=dict(steps=5)), ValueError, "runs missing"),
    (None, [dict(lr=0.1, batch_size=1)], dict(simulate=dict(steps=5, runs=2, lr=1)), ValueError,
     "must not give lr"),
    (None, [dict(lr=0.1, batch_size=1)], dict(progress="yes"), TypeError, "progress"),
    (None, [dict(lr=0.1, batch_size=1)], dict(client="tcp://x:1"), TypeError,
     "dask.distributed.Client"),
])
def test_bad_arguments_are_named(families, settings, kwargs, error, match):
    families = [_family(1)] if families is None else families
    with pytest.raises(error, match=match):
        sweep(families, settings, **kwargs)


def test_duplicate_labels_are_refused(tmp_path):
    path = str(tmp_path / "f.npz")
    _family(1).save(path)
    with pytest.raises(ValueError, match="appears twice"):
        sweep([path, path], [dict(lr=0.1, batch_size=1)])


def test_simulated_excess_loss_column_beside_the_exact_one():
    # A family with per-sample gradients: with simulate, the simulated floor (an estimate with
    # its standard error) sits beside the exact one, and is the only floor of reshuffle rows.
    from fastsgdstab import stationary

    rng = np.random.default_rng(3)
    g = rng.standard_normal((5, 2))
    family = HessianFamily(rng.standard_normal((5, 2, 1)), gradients=g - g.mean(axis=0))
    settings = [dict(lr=0.2, batch_size=2, sampling="without_replacement"),
                dict(lr=0.2, batch_size=2, sampling="reshuffle")]
    table = sweep([family], settings, progress=False,
                  simulate=dict(steps=4000, runs=64, seed=1, init=np.full(2, 1e-150),
                                burn_in=400))
    exact = stationary(family, 0.2, 2, sampling="without_replacement").excess_loss
    assert float(table["excess_loss"][0]) == exact
    simulated = float(table["simulated_excess_loss"][0])
    stderr = float(table["simulated_excess_loss_stderr"][0])
    assert 0 < stderr < 0.05 * simulated
    assert abs(simulated - exact) <= 4.5 * stderr + 0.01 * exact
    # the same numbers as simulate itself (same seed and keywords)
    direct = simulate(family, 0.2, 2, 4000, 64, seed=1, init=np.full(2, 1e-150), burn_in=400,
                      sampling="without_replacement", progress=False)
    assert simulated == direct.excess_loss and stderr == direct.excess_loss_stderr
    # the reshuffle row: no exact floor, the simulated one agrees with stationary's estimate
    assert math.isnan(float(table["excess_loss"][1]))
    estimate = stationary(family, 0.2, 2, sampling="reshuffle")
    shuffled = float(table["simulated_excess_loss"][1])
    error = math.hypot(float(table["simulated_excess_loss_stderr"][1]), estimate.stderr)
    assert abs(shuffled - estimate.excess_loss) <= 4.5 * error + 0.01 * estimate.excess_loss
    # without gradients the columns are absent
    plain = sweep([HessianFamily(family.factors)], settings[:1], progress=False,
                  simulate=dict(steps=50, runs=4))
    assert "simulated_excess_loss" not in plain.columns
