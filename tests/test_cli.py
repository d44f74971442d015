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
