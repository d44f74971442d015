"""The ``reproduce figure1`` and ``map`` commands end to end, their CSV, PNGs and errors."""

import csv
import io
import sys
import warnings

import numpy as np
import pytest
from matplotlib.image import imread

import fastsgdstab as fs
from fastsgdstab.cli import QUICK_BATCH_SIZES, QUICK_SIGMAS, main
from fastsgdstab.experiments import FIGURE1_LRS, FIGURE1_SAMPLINGS
from fastsgdstab.phase import stability_map
from fastsgdstab.theory import theorem2_family

N, SHARPNESS = 100, 2.0


def run(argv):
    out = io.StringIO()
    assert main(argv, out=out) == 0
    return out.getvalue()


def read_png(path):
    image = imread(path)
    assert image.shape == (480, 640, 4)  # figsize 6.4 x 4.8 in at 100 dpi, RGBA
    return image


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("figure1")
    text = run(["reproduce", "figure1", "--quick", "--out", str(out), "--no-progress"])
    with open(out / "figure1.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return out, text, rows


def test_quick_writes_one_row_per_cell(quick):
    _, _, rows = quick
    cells = len(FIGURE1_LRS) * len(FIGURE1_SAMPLINGS) * len(QUICK_SIGMAS) * len(QUICK_BATCH_SIZES)
    assert len(rows) == cells
    assert list(rows[0]) == ["lr", "sampling", "batch_size", "sigma", "diverged_runs", "runs",
                             "simulated", "exact", "theorem1", "critical_lr"]
    keys = {(r["lr"], r["sampling"], r["batch_size"], r["sigma"]) for r in rows}
    assert len(keys) == cells
    assert {float(r["lr"]) for r in rows} == set(FIGURE1_LRS)
    assert {r["sampling"] for r in rows} == set(FIGURE1_SAMPLINGS)


def test_exact_and_theorem_columns_match_the_closed_forms(quick):
    # THEORY section 6, evaluated here in floating point: a margin within 1e-9 is a tie
    # (rho = 1 exactly; Theorem 1's condition is strict), which must not read "diverges".
    _, _, rows = quick
    seen = set()
    for row in rows:
        lr, sampling = float(row["lr"]), row["sampling"]
        B, sigma = int(row["batch_size"]), int(row["sigma"])
        theorem_margin = (lr * SHARPNESS) ** 2 * (N / B - 1) - sigma ** 2
        expected = lr * SHARPNESS > 2 or theorem_margin > 1e-9
        assert row["theorem1"] == ("diverges" if expected else "inconclusive")
        if sampling == "bernoulli":
            margin = lr * SHARPNESS * (1 + (N / B - 1) / sigma) - 2
            eta = 2 * sigma / (SHARPNESS * (sigma + N / B - 1))
        else:
            # The construction is diagonal: coordinate 0 (sigma samples) and the others (one
            # sample each) are each a scalar recursion; see test_phase for the derivation.
            p = (N - B) / (B * (N - 1))
            eta = min(2 / (SHARPNESS * (1 + p * (N / sigma - 1))), 2 * sigma * B / (N * SHARPNESS))
            margin = lr / eta - 1
        assert float(row["critical_lr"]) == pytest.approx(eta, rel=1e-10)
        assert row["exact"] == ("diverges" if margin > 1e-9 else "stable")
        seen.add(row["exact"])
    assert seen == {"diverges", "stable"}


def test_simulated_column_is_the_majority_rule_and_reproducible(quick):
    _, _, rows = quick
    for row in rows:
        majority = 2 * int(row["diverged_runs"]) > int(row["runs"])
        assert row["simulated"] == ("diverges" if majority else "converges")
    # Cell index i (order: lr, sampling, sigma, batch size) used seed i: rerun two cells.
    for index in [0, len(rows) - 1]:
        row = rows[index]
        family = theorem2_family(N, int(row["sigma"]), SHARPNESS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fs.simulate(family, float(row["lr"]), int(row["batch_size"]), 1000, 10,
                                 seed=index, sampling=row["sampling"], init="uniform",
                                 record_every=1000, progress=False)
        assert int(result.diverged.sum()) == int(row["diverged_runs"])


def test_agreement_rates_are_printed_and_correct(quick):
    _, text, rows = quick
    for lr in FIGURE1_LRS:
        for sampling in FIGURE1_SAMPLINGS:
            panel = [r for r in rows if float(r["lr"]) == lr and r["sampling"] == sampling]
            agree = np.mean([(r["simulated"] == "diverges") == (r["exact"] == "diverges") for r in panel])
            line = next(l for l in text.splitlines() if l.split()[:2] == [f"{lr:g}", sampling])
            assert f"{100 * agree:.1f}%" in line


def test_one_png_per_panel(quick):
    out, _, _ = quick
    for lr in FIGURE1_LRS:
        for sampling in FIGURE1_SAMPLINGS:
            image = read_png(out / f"figure1_lr{lr:g}_{sampling}.png")
            rgb = image[..., :3].reshape(-1, 3)
            assert rgb.std() > 0.05
            # Some red (divergent) and some blue (convergent) markers are drawn.
            assert np.any((rgb[:, 0] > 0.7) & (rgb[:, 1] < 0.3) & (rgb[:, 2] < 0.3))
            assert np.any((rgb[:, 2] > 0.6) & (rgb[:, 0] < 0.3))


def test_reproduce_options_select_panels(tmp_path):
    text = run(["reproduce", "figure1", "--quick", "--lr", "0.5", "--sampling", "bernoulli",
                "--runs", "3", "--steps", "50", "--out", str(tmp_path), "--no-plot"])
    with open(tmp_path / "figure1.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["lr"], r["sampling"], r["runs"]) for r in rows} == {("0.5", "bernoulli", "3")}
    assert not list(tmp_path.glob("*.png")) and "bernoulli" in text


def test_map_command_writes_the_phase_diagram(tmp_path):
    family = fs.HessianFamily.from_features(np.random.default_rng(0).standard_normal((40, 5)))
    family.save(tmp_path / "family.npz")
    top = family.sharpness()
    text = run(["map", str(tmp_path / "family.npz"), "--lrs", f"{0.1 / top}:{2.5 / top}:12",
                "--batch-sizes", "1,2:40:6:log", "--out", str(tmp_path / "map.png"),
                "--save", str(tmp_path / "map.npz")])
    read_png(tmp_path / "map.png")
    saved = np.load(tmp_path / "map.npz")
    assert saved["spectral_radius"].shape == (7, 12)
    direct = stability_map(family, saved["lrs"], saved["batch_sizes"])
    assert np.allclose(saved["spectral_radius"], direct.spectral_radius, rtol=1e-9)
    assert np.allclose(saved["critical_lr"], [fs.critical_lr(family, b) for b in saved["batch_sizes"]], rtol=1e-12)
    assert "critical lr" in text and "wrote" in text


@pytest.mark.parametrize("argv, message", [
    (["map", "missing.npz", "--lrs", "0.1", "--batch-sizes", "1"], "no such file"),
    (["reproduce", "figure1", "--quick", "--runs", "0", "--no-plot"], "--runs must be"),
    (["reproduce", "figure1", "--lr", "-0.5", "--no-plot"], "lrs must all be > 0"),
])
def test_command_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_grid_names_the_option(tmp_path, capsys):
    fs.HessianFamily.from_features(np.eye(3)).save(tmp_path / "f.npz")
    with pytest.raises(SystemExit) as info:
        main(["map", str(tmp_path / "f.npz"), "--lrs", "0.1:1", "--batch-sizes", "1", "--out", str(tmp_path / "m.png")])
    assert info.value.code == 2 and "--lrs: cannot read '0.1:1'" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    # A None entry in sys.modules makes the import raise ImportError, as if not installed.
    for name in [n for n in list(sys.modules) if n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    from fastsgdstab.plotting import plot_stability_map

    family = fs.HessianFamily.from_features(np.eye(3))
    with pytest.raises(ImportError, match=r'pip install "fastsgdstab\[plot\]"'):
        plot_stability_map(stability_map(family, [0.1], [1]), tmp_path / "m.png")
    family.save(tmp_path / "f.npz")
    # The table is printed all the same; the figure asked for is not written: exit code 1.
    code = main(["map", str(tmp_path / "f.npz"), "--lrs", "0.1", "--batch-sizes", "1", "--out", str(tmp_path / "m.png")])
    captured = capsys.readouterr()
    assert code == 1 and 'fastsgdstab[plot]' in captured.err and "critical lr" in captured.out
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("grid, name", [
    (dict(lrs=[0.5, 0.5]), "lrs"),
    (dict(samplings=["bernoulli", "bernoulli"]), "samplings"),
    (dict(sigmas=[3, 3.0]), "sigmas"),
    (dict(batch_sizes=[2, 1, 2]), "batch_sizes"),
])
def test_figure1_rejects_repeated_grid_values(grid, name):
    # A repeated value would run its cells twice; it is refused before any computing.
    from fastsgdstab.experiments import figure1

    arguments = dict(lrs=[0.5], samplings=["bernoulli"], sigmas=[3], batch_sizes=[2], runs=1, steps=1)
    arguments.update(grid)
    with pytest.raises(ValueError, match=f"{name} must not repeat a value"):
        figure1(**arguments)
