import io
import subprocess
import sys

import numpy as np
import pytest

import fastsgdstab as fs
from fastsgdstab.cli import demo_family, main


def run(argv):
    out = io.StringIO()
    assert main(argv, out=out) == 0
    return out.getvalue()


@pytest.mark.parametrize("key", ["factors", "hessians", "features"])
def test_analyze_prints_the_exact_answers(tmp_path, key):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((6, 3))
    family = fs.HessianFamily.from_features(features)
    array = {"features": features, "factors": family.factors, "hessians": family.dense()}[key]
    path = tmp_path / "family.npz"
    np.savez(path, **{key: array})
    lr = 0.5 / family.sharpness()
    text = run(["analyze", str(path), "--lr", repr(lr), "--batch-size", "2"])
    eta = fs.critical_lr(family, 2)
    rho = fs.spectral_radius(family, lr, 2)
    assert f"{rho:.10g}" in text
    assert f"{eta:.10g}" in text
    assert f"{fs.critical_batch_size(family, lr):.10g}" in text
    assert ("converges in mean square" in text) == (rho < 1)


def test_analyze_reports_divergence_and_sampling(tmp_path):
    path = tmp_path / "f.npz"
    fs.HessianFamily.from_features(np.eye(4)).save(path)
    text = run(["analyze", str(path), "--lr", "50", "--batch-size", "1", "--sampling", "with_replacement"])
    assert "diverges in mean square" in text and "with_replacement" in text


def test_demo_runs_and_reports_the_built_in_problem():
    text = run(["demo"])
    family = demo_family()
    assert f"{fs.critical_lr(family, 8):.10g}" in text


@pytest.mark.parametrize("argv, message", [
    (["analyze", "missing.npz", "--lr", "1", "--batch-size", "2"], "no such file"),
    (["demo", "--lr", "-1"], "--lr must be > 0"),
    (["demo", "--batch-size", "0"], "--batch-size must lie in"),
])
def test_errors_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_sampling_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--sampling", "uniform"])
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "fastsgdstab", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "analyze" in result.stdout


def _map_family_file(tmp_path):
    rng = np.random.default_rng(11)
    family = fs.HessianFamily.from_features(rng.standard_normal((40, 6)) / np.sqrt(np.arange(1, 7)))
    path = tmp_path / "family.npz"
    family.save(path)
    return family, path


def test_map_gives_the_python_api_answers_through_one_basis(tmp_path, monkeypatch, capsys):
    # Issue 19: the command line's map is one stability_map computation (one shared basis for
    # all rows, not one per block of rows), so its answers and its operator products are the
    # Python API's, and it still reports progress per block of rows.
    import fastsgdstab.cli as cli

    family, path = _map_family_file(tmp_path)
    lrs = np.linspace(0.05, 2.0, 7) / family.sharpness()
    batch_sizes = np.geomspace(1, 40, 23)
    expected = fs.stability_map(family, lrs, batch_sizes, progress=False)
    monkeypatch.setattr(cli, "PROGRESS_AFTER_SECONDS", -1.0)  # a line per block, at once
    saved = tmp_path / "map.npz"
    text = run(["map", str(path), "--lrs", ",".join(repr(float(x)) for x in lrs),
                "--batch-sizes", ",".join(repr(float(x)) for x in batch_sizes), "--save", str(saved)])
    with np.load(saved) as data:
        for name in ("spectral_radius", "radius_error", "critical_lr"):
            np.testing.assert_array_equal(data[name], getattr(expected, name))
    assert f"({expected.operator_products} operator products)" in text
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("map: batch sizes")]
    assert len(lines) == cli.MAP_PROGRESS_BLOCKS and f"{batch_sizes.size} of {batch_sizes.size} rows" in lines[-1]


def test_map_builds_one_basis_for_all_blocks(tmp_path, monkeypatch):
    # The basis starts from the identity once: a second start would be a second _MapSolver.
    import fastsgdstab.phase as phase

    family, path = _map_family_file(tmp_path)
    solvers = []
    original = phase._MapSolver.__init__

    def counted(self, *args, **kwargs):
        solvers.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(phase._MapSolver, "__init__", counted)
    run(["map", str(path), "--lrs", "0.1:1:5", "--batch-sizes", "1:40:25:log", "--no-progress"])
    assert len(solvers) == 1
