"""A new user's first hour (issue 18): one family type, honest report lines, simulate's warning
and summary, progress of stability_map, the command line's map and option names, and docs whose
code runs and whose quoted outputs come from the code.

Command-line cases run the real entry point (``python -m fastsgdstab``) in a subprocess.
"""

from __future__ import annotations

import doctest
import io
import math
import os
import pathlib
import re
import subprocess
import sys
import warnings
from contextlib import redirect_stdout
from types import SimpleNamespace

import numpy as np
import pytest

import fastsgdstab as fs
from fastsgdstab import theory
from fastsgdstab.reporting import INCONCLUSIVE, PROVES_CONVERGENCE, PROVES_DIVERGENCE, VERDICTS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(args, cwd, env=None, timeout=600):
    """``python -m fastsgdstab ARGS`` in ``cwd``: (exit code, stdout, stderr)."""
    environment = dict(os.environ, **(env or {}))
    completed = subprocess.run([sys.executable, "-m", "fastsgdstab", *args], cwd=cwd, env=environment,
                               capture_output=True, text=True, timeout=timeout)
    return completed.returncode, completed.stdout, completed.stderr


# ------------------------------------------------------------------ 1. one family type
class Wrapper:
    """A stand-in for torch's ModelFamily: anything with a ``.family`` attribute."""

    def __init__(self, family):
        self.family = family


@pytest.fixture(scope="module")
def small_family():
    return fs.HessianFamily.from_features(np.random.default_rng(3).standard_normal((12, 3)))


CALLS = {
    "critical_lr": lambda f: fs.critical_lr(f, 4),
    "critical_lr (without replacement)": lambda f: fs.critical_lr(f, 4, sampling="without_replacement"),
    "spectral_radius": lambda f: fs.spectral_radius(f, 0.1, 4),
    "critical_batch_size": lambda f: fs.critical_batch_size(f, 0.2),
    "second_moment": lambda f: tuple(fs.second_moment(f, 0.1, 4, 3).log_mean_sq.tolist()),
    "coherence": lambda f: fs.coherence(f).sigma,
    "non_uniformity": lambda f: fs.non_uniformity(f),
    "sample_sharpness": lambda f: tuple(np.ravel(fs.sample_sharpness(f)).tolist()),
    "sharpness": lambda f: fs.sharpness(f),
    "report": lambda f: str(fs.report(f, 0.1, 4)),
    "theorem1": lambda f: theory.theorem1(f, 0.1, 4).lr_threshold,
    "lemma1": lambda f: theory.lemma1(f, 0.1, 4).growth_lower_bound,
    "noise_norm": lambda f: theory.noise_norm(f),
    "rayleigh_bounds": lambda f: theory.rayleigh_bounds(f, 4).best,
    "stability_map": lambda f: tuple(fs.stability_map(f, [0.1, 0.3], [2, 4], progress=False)
                                     .spectral_radius.ravel().tolist()),
    "simulate": lambda f: tuple(fs.simulate(f, 0.1, 4, 5, 40, progress=False).log_sq_norm[:, -1].tolist()),
    "sweep": lambda f: float(fs.sweep([f], {"lr": [0.1], "batch_size": [4]}, progress=False)
                             ["spectral_radius"][0]),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_wrapper_with_a_family_attribute_is_accepted_everywhere(small_family, name):
    call = CALLS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.SimulationWarning)
        assert call(Wrapper(small_family)) == call(small_family)


@pytest.mark.parametrize("value", [Wrapper(3), Wrapper(None), SimpleNamespace(), np.eye(3), "f.npz"])
def test_anything_else_is_refused_naming_what_is_accepted(value):
    with pytest.raises(TypeError, match=r"family must be a HessianFamily .*\.family is one"):
        fs.critical_lr(value, 2)


def test_a_family_property_that_raises_is_not_a_family():
    class Broken:
        @property
        def family(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError, match="family must be a HessianFamily"):
        fs.spectral_radius(Broken(), 0.1, 2)


def test_sweep_labels_and_dict_of_wrappers(small_family):
    table = fs.sweep({"wrapped": Wrapper(small_family)}, {"lr": [0.1], "batch_size": [4]}, progress=False)
    assert table["family"][0] == "wrapped"
    assert float(table["spectral_radius"][0]) == fs.spectral_radius(small_family, 0.1, 4)


def test_family_from_model_result_is_accepted_as_a_family():
    torch = pytest.importorskip("torch")
    from fastsgdstab.torch import family_from_model

    torch.manual_seed(0)
    X = torch.randn(6, 3, dtype=torch.float64)
    model = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():  # an interpolating minimum: targets are the model's own outputs
        Y = model(X).clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = family_from_model(model, X, Y, torch.nn.MSELoss())
    assert not isinstance(result, fs.HessianFamily)
    # MSELoss (no 1/2) on a scalar output: H_i = 2 x_i x_i^T, an independent closed form.
    expected = fs.HessianFamily.from_features(np.sqrt(2.0) * X.numpy())
    assert fs.critical_lr(result, 2) == pytest.approx(fs.critical_lr(expected, 2), rel=1e-9)
    assert fs.report(result, 0.1, 2).spectral_radius == pytest.approx(
        fs.spectral_radius(expected, 0.1, 2), rel=1e-9)
    radius = fs.stability_map(result, [0.1], [2], progress=False).spectral_radius[0, 0]
    assert radius == pytest.approx(fs.spectral_radius(expected, 0.1, 2), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.SimulationWarning)
        assert fs.simulate(result, 0.1, 2, 3, 4, progress=False, init=np.ones(3)).steps_completed == 3


# ------------------------------------------------------------------ 2. one true thing per line
def theorem2_features(n, sigma, sharpness):
    """Theorem 2's family (specification section 6), built here from its definition: sigma
    samples along e_1, the others each along their own axis, all with curvature m."""
    d = n - sigma + 1
    m = n * sharpness / sigma
    features = np.zeros((n, d))
    features[:sigma, 0] = math.sqrt(m)
    for i in range(sigma, n):
        features[i, i - sigma + 1] = math.sqrt(m)
    return fs.HessianFamily.from_features(features)


def closed_forms(n, sigma, sharpness, lr, batch_size):
    """Every condition of the report for Theorem 2's family, from section 6's closed forms."""
    q = n / batch_size - 1.0
    c_kappa = (lr * sharpness) ** 2 * q / sigma           # c = lr^2 q / n^2, kappa = sigma m^2
    contraction = max(abs(1 - lr * sharpness), abs(1 - lr * sharpness / sigma))
    rayleigh15 = 2.0 / (sharpness * (1.0 + q / sigma))      # = the exact eta* (Theorem 2)
    rayleigh16 = (2.0 * n / sigma) / (sharpness * (1.0 + (n - sigma) / sigma**2 + q * n / sigma**2))
    return {
        "(i)": lr * sharpness > 2.0,
        "(ii)": q > 0 and lr > sigma / (sharpness * math.sqrt(q)),
        "(a)": c_kappa > 1.0,
        "(b)": c_kappa <= 1.0 - contraction and contraction < 1.0,
        "(15)": lr > rayleigh15,
        "(16)": lr > rayleigh16,
    }


def verdict_lines(text):
    """``{label: verdict}`` of every condition line of a printed report."""
    found = {}
    for line in text.splitlines():
        hits = [verdict for verdict in VERDICTS if line.rstrip().endswith(verdict)]
        if not hits:
            continue
        assert len(hits) == 1
        label = re.search(r"\((i|ii|a|b|15|16)\)", line).group(0)
        found[label] = hits[0]
    return found


# (n, sigma, sharpness, lr, batch size): between them every condition holds and fails.
SETTINGS = [
    (10, 5, 1.0, 0.1, 5),     # small lr: only Lemma 1 (b) holds
    (10, 5, 1.0, 1.8, 5),     # above eta* = 5/3: Rayleigh (15) only
    (10, 5, 1.0, 2.5, 5),     # Theorem 1 (i), Lemma 1 (a), Rayleigh (15)
    (10, 5, 1.0, 3.0, 5),     # and Rayleigh (16) (its bound is 2.5)
    (10, 1, 1.0, 0.5, 1),     # Theorem 1 (ii) without (i); Lemma 1 (a)
    (10, 5, 2.0, 0.3, 2),     # sharpness 2: nothing holds
    (20, 3, 0.5, 0.6, 7),     # (b) fails through the contraction, nothing proves anything
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_each_report_line_says_what_its_condition_proves(setting):
    n, sigma, sharpness, lr, batch_size = setting
    family = theorem2_features(n, sigma, sharpness)
    text = str(fs.report(family, lr, batch_size))
    expected = closed_forms(n, sigma, sharpness, lr, batch_size)
    found = verdict_lines(text)
    assert set(found) == set(expected)
    for label, holds in expected.items():
        proven = PROVES_CONVERGENCE if label == "(b)" else PROVES_DIVERGENCE
        assert found[label] == (proven if holds else INCONCLUSIVE), (label, text)
    for stale in ["DIVERGES", "CONVERGES", "vacuous", "diverges?", ": yes", ": no"]:
        assert stale not in text
    nothing_proven = not any(expected.values())
    assert ("no bound above proves anything here" in text) == nothing_proven
    # What is proven is true: the exact spectral radius agrees.
    rho = fs.spectral_radius(family, lr, batch_size)
    if any(expected[label] for label in ["(i)", "(ii)", "(a)", "(15)", "(16)"]):
        assert rho > 1
    if expected["(b)"]:
        assert rho < 1


def test_every_branch_is_exercised():
    """The settings above reach both outcomes of every condition."""
    outcomes = {}
    for setting in SETTINGS:
        for label, holds in closed_forms(*setting).items():
            outcomes.setdefault(label, set()).add(holds)
    assert all(values == {True, False} for values in outcomes.values()), outcomes


@pytest.mark.parametrize("sampling", ["without_replacement", "with_replacement"])
def test_other_schemes_show_rayleigh_verdicts_only_and_they_are_true(sampling):
    family = fs.HessianFamily.from_features(np.random.default_rng(5).standard_normal((16, 4)))
    eta = fs.critical_lr(family, 4, sampling=sampling)
    for lr in [0.5 * eta, 3.0 * eta]:
        text = str(fs.report(family, lr, 4, sampling=sampling))
        found = verdict_lines(text)
        assert set(found) == {"(15)", "(16)"}
        if PROVES_DIVERGENCE in found.values():
            assert lr > eta
    assert PROVES_DIVERGENCE in verdict_lines(str(fs.report(family, 3.0 * eta, 4, sampling=sampling))).values()


def test_demo_from_the_issue_no_longer_contradicts_itself(tmp_path):
    code, out, err = run_cli(["demo", "--lr", "1.0", "--batch-size", "2"], tmp_path)
    assert code == 0, err
    assert "(a) c kappa > 1: proves divergence" in out
    assert "nothing either way" not in out and "vacuous" not in out
    for line in out.splitlines():
        assert sum(verdict in line for verdict in VERDICTS) <= 1


# ------------------------------------------------------------------ 3. simulate's warning and summary
def deterministic_family():
    """n = B = 4 orthogonal unit samples: Bernoulli batches take every sample, so each step is
    w <- (1 - lr / 4) w exactly."""
    return fs.HessianFamily.from_features(np.eye(4))


def test_too_few_runs_is_not_blamed_on_rare_runs():
    with pytest.warns(fs.SimulationWarning) as caught:
        result = fs.simulate(deterministic_family(), 1.0, 4, 10, 3, init=np.ones(4), progress=False)
    message = " ".join(str(w.message) for w in caught)
    assert np.allclose(result.effective_sample_size, 3.0)  # every run identical
    assert "too few runs" in message and "rare runs" not in message
    assert "3 of 3 runs" in message


def test_rare_runs_are_named_when_few_runs_carry_the_mean():
    family = fs.HessianFamily.from_features(np.random.default_rng(0).standard_normal((50, 5)))
    eta = fs.critical_lr(family, 1)
    with pytest.warns(fs.SimulationWarning) as caught:
        result = fs.simulate(family, 1.3 * eta, 1, 300, 2000, progress=False)
    message = " ".join(str(w.message) for w in caught)
    assert np.nanmin(result.effective_sample_size) < 0.1 * 2000
    assert "rare runs dominate" in message and "too few runs" not in message


def test_runs_that_reach_zero_are_not_called_rare_or_too_few():
    # lr = 4: w_1 = (1 - 4/4) w_0 = 0 exactly, so the sample mean is 0 from step 1 on.
    with pytest.warns(fs.SimulationWarning) as caught:
        fs.simulate(deterministic_family(), 4.0, 4, 3, 50, progress=False)
    message = " ".join(str(w.message) for w in caught)
    assert "reached exactly 0" in message and "rare runs" not in message and "nan" not in message


def test_the_message_quotes_the_flagged_steps_only():
    # As test_reshuffle's epoch case: 50 identical runs, the flagged steps those where every run is 0.
    with pytest.warns(fs.SimulationWarning) as caught:
        fs.simulate(deterministic_family(), 4.0, 4, 3, 50, init=np.ones(4), progress=False)
    assert "50 of 50 runs" not in " ".join(str(w.message) for w in caught)


def test_no_warning_when_enough_runs_agree():
    with warnings.catch_warnings():
        warnings.simplefilter("error", fs.SimulationWarning)
        fs.simulate(deterministic_family(), 1.0, 4, 10, 40, init=np.ones(4), progress=False)


@pytest.mark.parametrize("lr, diverged", [(1.0, 0), (20.0, 5)])
def test_summary_shows_the_count_of_diverged_runs(lr, diverged):
    # |1 - lr/4|^2 per step: 0.5625 (every run shrinks), 16 (every run passes 1000 at step 3).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.SimulationWarning)
        result = fs.simulate(deterministic_family(), lr, 4, 10, 5, progress=False)
    text = str(result)
    assert f"{diverged} of 5 runs" in text
    assert "of runs" not in text


# ------------------------------------------------------------------ 4. progress of stability_map
class RecordingBar:
    """Stands in for tqdm: records the total and the updates."""

    made = []

    def __init__(self, total, **kwargs):
        self.total, self.updates, self.closed = total, 0, False
        RecordingBar.made.append(self)

    def update(self, count):
        self.updates += count

    def close(self):
        self.closed = True


def test_stability_map_progress(small_family, capsys, monkeypatch):
    plain = fs.stability_map(small_family, [0.1, 0.5], [1, 2, 4], progress=False)
    assert capsys.readouterr().err == ""
    shown = fs.stability_map(small_family, [0.1, 0.5], [1, 2, 4], progress=True)
    assert "stability_map" in capsys.readouterr().err   # the real tqdm, on stderr
    np.testing.assert_array_equal(plain.spectral_radius, shown.spectral_radius)
    fs.stability_map(small_family, [0.1, 0.5], [1, 2, 4])  # None: stderr is not a terminal here
    assert capsys.readouterr().err == ""
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    RecordingBar.made.clear()
    fs.stability_map(small_family, [0.1, 0.5], [4, 1, 2], progress=True)
    fs.stability_map(small_family, [0.1], [1, 2], momentum=0.5, progress=True)
    assert [(bar.total, bar.updates, bar.closed) for bar in RecordingBar.made] == [(3, 3, True), (2, 2, True)]
    with pytest.raises(TypeError, match="progress must be None"):
        fs.stability_map(small_family, [0.1], [1], progress="yes")


# ------------------------------------------------------------------ 7. the command line
@pytest.fixture(scope="module")
def saved_family(tmp_path_factory):
    path = tmp_path_factory.mktemp("family") / "family.npz"
    np.savez(path, features=np.random.default_rng(0).standard_normal((40, 4)))
    return path


def test_map_without_out_writes_nothing(saved_family, tmp_path):
    code, out, err = run_cli(["map", str(saved_family), "--lrs", "0.1:1:4", "--batch-sizes", "1,4",
                              "--no-progress"], tmp_path)
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []
    assert "critical lr" in out and "no image written: add --out map.png" in out


def test_map_refuses_to_overwrite_without_force(saved_family, tmp_path):
    pytest.importorskip("matplotlib")
    image = tmp_path / "map.png"
    image.write_bytes(b"mine")
    args = ["map", str(saved_family), "--lrs", "0.1:1:4", "--batch-sizes", "1,4", "--out", "map.png",
            "--no-progress"]
    code, out, err = run_cli(args, tmp_path)
    assert code == 2 and "--out map.png exists; add --force" in err and out == ""
    assert image.read_bytes() == b"mine"
    code, out, err = run_cli([*args, "--force"], tmp_path)
    assert code == 0, err
    assert image.read_bytes()[:4] == b"\x89PNG"


def test_map_without_matplotlib_prints_the_table_then_the_extra(saved_family, tmp_path):
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    path = os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])
    code, out, err = run_cli(["map", str(saved_family), "--lrs", "0.1:1:4", "--batch-sizes", "1,4",
                              "--out", "map.png", "--no-progress"], tmp_path, env={"PYTHONPATH": path})
    assert code == 1
    assert "critical lr" in out and 'pip install "fastsgdstab[plot]"' in err
    assert not (tmp_path / "map.png").exists()


@pytest.mark.parametrize("args, wrong, meant", [
    (["demo", "--batch_size", "2"], "--batch_size", "--batch-size"),
    (["demo", "--learning-rate", "0.1"], "--learning-rate", "--lr"),
    (["analyze", "family.npz", "--lr", "0.1", "--batch_size", "2"], "--batch_size", "--batch-size"),
    (["map", "family.npz", "--lrs", "0.1", "--batch_sizes", "1"], "--batch_sizes", "--batch-sizes"),
    (["reproduce", "figure1", "--step", "3", "--quik"], "--quik", "--quick"),
])
def test_a_misspelt_option_is_named_with_the_one_meant(tmp_path, args, wrong, meant):
    code, out, err = run_cli(args, tmp_path)
    assert code == 2 and out == ""
    assert f"unknown option {wrong}; did you mean {meant}?" in err
    assert "Traceback" not in err


def test_gitignore_has_the_readme_output_folder():
    assert "figure1/" in (ROOT / ".gitignore").read_text().split()


# ------------------------------------------------------------------ 5, 6. documentation
def code_blocks(path, language):
    text = path.read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def needs(block):
    """Optional packages a block imports (skip it when one is missing)."""
    return [name for name in ("torch", "sklearn", "matplotlib", "pandas", "dask")
            if re.search(rf"^\s*(import|from) {name}\b|import .*\b{name}\b", block, re.M)]


def run_block(block, where, namespace=None):
    """Run a doc's code block (a doctest if it has prompts) in ``namespace`` (a page's blocks
    share one, as its reader's session does); its printed output."""
    namespace = {"__name__": "__docs__"} if namespace is None else namespace
    missing = [name for name in needs(block) if not _importable(name)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    if ">>>" in block:
        test = doctest.DocTestParser().get_doctest(block, namespace, str(where), str(where), 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        output = io.StringIO()
        runner.run(test, out=output.write, clear_globs=False)
        assert runner.failures == 0, output.getvalue()
        namespace.update(test.globs)  # DocTest works on a copy
        return ""
    stdout = io.StringIO()
    with redirect_stdout(stdout), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, str(where), "exec"), namespace)
    return stdout.getvalue()


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def readme_blocks():
    return [pytest.param(i, marks=[pytest.mark.slow] if "torch" in needs(block) else [])
            for i, block in enumerate(code_blocks(ROOT / "README.md", "python"))]


@pytest.mark.parametrize("index", readme_blocks())
def test_readme_python_blocks_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = code_blocks(ROOT / "README.md", "python")[index]
    output = run_block(block, "README.md")
    if index == 0:  # the first snippet prints what it computes
        assert re.search(r"critical lr \d\.\d{4}; at 0.9 of it rho = 0\.\d{4}, stable for batch sizes >= \d+\.\d{4}\n", output)
        assert "SGD stability" in output
    if "escape_test" in block:
        assert "0 of 5 runs escaped" in output and "5 of 5 runs escaped" in output


def test_readme_torch_example_is_complete_and_short():
    block = next(b for b in code_blocks(ROOT / "README.md", "python") if "family_from_model" in b)
    assert "load_digits" in block and "critical_lr(result," in block
    assert len(block.strip().splitlines()) <= 22


def test_getting_started_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = code_blocks(ROOT / "docs" / "getting-started.md", "python")
    assert len(blocks) >= 2
    namespace = {"__name__": "__docs__"}
    for block in blocks:  # in order, in one session, as a reader runs them
        run_block(block, "getting-started.md", namespace)


def test_readme_analyze_example_makes_its_file_and_runs(tmp_path):
    block = next(b for b in code_blocks(ROOT / "README.md", "bash") if "analyze family.npz" in b)
    lines = [line for line in block.splitlines() if line.strip()]
    assert "np.savez('family.npz'" in lines[0] and lines[1].startswith("fastsgdstab analyze family.npz")
    subprocess.run([sys.executable, "-c", re.search(r'python -c "(.*)"', lines[0]).group(1)],
                   cwd=tmp_path, check=True, timeout=120)
    code, out, err = run_cli(lines[1].split()[1:], tmp_path)
    assert code == 0, err
    assert "sampling=without_replacement" in out


def test_readme_points_to_files_that_exist():
    text = (ROOT / "README.md").read_text()
    assert "THEORY.md" not in text and "docs/specification.md" in text
    for target in re.findall(r"\]\(((?:docs/)[^)#]+)\)", text):
        assert (ROOT / target).exists(), target


def test_getting_started_names_the_dependencies_and_the_test_extra():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = (ROOT / "docs" / "getting-started.md").read_text()
    for requirement in project["dependencies"]:
        assert re.match(r"[\w-]+", requirement).group(0) in text
    for name in ["torch", "dask", "pandas", "scikit-learn", "hypothesis", "matplotlib", "mkdocs"]:
        assert name in text


def test_docstrings_say_what_the_code_does():
    from fastsgdstab._config import CERTIFY_RTOL

    tolerance = re.search(r"CERTIFY_RTOL`` = ([0-9.e-]+)", fs.spectral_radius.__doc__).group(1)
    assert float(tolerance) == CERTIFY_RTOL
    assert "integers for" in " ".join(fs.stability_map.__doc__.split())
    assert "fastsgdstab._sweep" not in fs.sweep.__doc__


def tutorial_outputs():
    sys.path.insert(0, str(ROOT / "docs" / "scripts"))
    try:
        import tutorial_outputs as module
    finally:
        sys.path.pop(0)
    return module


def test_quoted_command_outputs_are_what_the_code_prints(capsys):
    assert tutorial_outputs().main(["--check"]) == 0, capsys.readouterr().out


@pytest.mark.slow
def test_map_example_output_is_what_the_code_prints(capsys):
    assert tutorial_outputs().main(["--check", "--slow"]) == 0, capsys.readouterr().out


def test_map_example_table_is_exact():
    """The map tutorial's quoted table, checked cheaply: each row's critical lr is critical_lr's,
    and the stable count is the grid points with lr <= critical lr (stable iff, exactly)."""
    from fastsgdstab.cli import demo_family, parse_grid

    module = tutorial_outputs()
    (path, body), = module.blocks()["map-demo"]
    family = demo_family()
    rows = re.findall(r"^\s+([\d.]+)\s+([\d.]+)$", body, re.M)
    assert len(rows) >= 5
    lrs = parse_grid(module.MAP_ARGS[1])
    batch_sizes = parse_grid(module.MAP_ARGS[3])
    by_text = {f"{b:.6g}": b for b in batch_sizes}   # the table prints 6 significant digits
    for batch_size, critical in rows:
        exact = fs.critical_lr(family, by_text[batch_size])
        assert exact == pytest.approx(float(critical), rel=1e-7)
    stable = sum(int(np.sum(lrs <= fs.critical_lr(family, b))) for b in batch_sizes)
    assert f"stable at {stable} of {lrs.size * batch_sizes.size} grid points" in body
    assert f"{batch_sizes.size} batch sizes x {lrs.size} learning rates" in body
    assert " ".join(module.MAP_ARGS) in (ROOT / "docs" / "tutorials" / "map.md").read_text()


def test_measured_figures_say_when_and_where():
    found = tutorial_outputs().blocks()
    for name in ["reproduce-timing", "map-timing"]:
        for path, body in found[name]:
            assert re.search(r"measured on \d{4}-\d\d-\d\d on a \d+-core machine at load average", body), path
