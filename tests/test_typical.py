"""typical_critical_lr against exact references: d = 1 by enumerating every batch
(gamma(lr) = E log|1 - lr h_B|), Theorem 2's diagonal families coordinate by coordinate, and the
paper's figure-1 majority vote."""

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fastsgdstab as fs  # noqa: E402
from fastsgdstab.theory import theorem2_family  # noqa: E402
from fastsgdstab.typical import typical_critical_lr  # noqa: E402
from reference_typical import (  # noqa: E402
    batch_distribution,
    exact_exponent,
    exact_mean_square_lr,
    exact_typical_lr,
    theorem2_typical_lr,
)

# d = 1: n = 6 curvatures h_i = x_i^2; B = 2. eta_typ / eta* is 1.7 to 1.9 for the three schemes.
CURVATURES = [0.25, 0.5, 1.0, 1.0, 2.0, 4.0]
SCHEMES = ["bernoulli", "without_replacement", "with_replacement"]


def _family(curvatures=CURVATURES):
    return fs.HessianFamily.from_features(np.sqrt(np.asarray(curvatures))[:, None])


def _exact(sampling, batch_size=2, curvatures=CURVATURES):
    values, probabilities = batch_distribution(curvatures, batch_size, sampling)
    return values, probabilities


def _coverage(sampling, seeds, **budget):
    values, probabilities = _exact(sampling)
    root = exact_typical_lr(values, probabilities)
    covered, widths = 0, []
    for seed in seeds:
        result = typical_critical_lr(_family(), 2, sampling=sampling, seed=seed, **budget)
        low, high = result.interval
        covered += low <= root <= high
        widths.append(result.relative_width)
    return covered, max(widths)


@pytest.mark.parametrize("sampling", SCHEMES)
def test_d1_interval_covers_the_exact_root_five_seeds(sampling):
    # 95% nominal: P(at least 4 of 5 | coverage 0.95) = 0.977; the slow test checks 50 seeds at
    # the default budget (256 runs x 2000 steps); here an eighth of it, to keep the suite fast.
    covered, widest = _coverage(sampling, range(5), runs=64, steps=1000)
    assert covered >= 4
    assert widest < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("sampling", SCHEMES)
def test_d1_interval_covers_the_exact_root_fifty_seeds(sampling):
    # The criterion: at least 90% of 50 seeds at the default budget (256 runs x 2000
    # steps), for each of the three i.i.d. schemes, width under 5%. At a true coverage of 95%,
    # P(at most 44 of 50) = 0.038. Measured (seeds 100-149): see docs/typical.md.
    covered, widest = _coverage(sampling, range(100, 150))
    print(f"{sampling}: {covered}/50 covered, widest relative width {widest:.4f}")
    assert widest < 0.05
    assert covered >= 45


# The interval logic (scan, Brent, the inverted t-test's ends) on exact i.i.d. increments drawn
# by numpy from the enumerated batch law (reference_typical.IIDIncrements): many seeds in
# little time. Settings other than the ones above (n, B, h), and a small budget: the coverage of
# an inverted t-test does not depend on the budget.
IID_SETTINGS = [([0.1, 0.3, 0.5, 2.0, 5.0], 1), ([0.2, 0.4, 0.6, 0.8, 1.0, 3.0, 6.0, 9.0], 3)]


@pytest.mark.parametrize("curvatures,batch_size", IID_SETTINGS)
@pytest.mark.parametrize("sampling", SCHEMES)
def test_interval_logic_covers_on_exact_increments(sampling, curvatures, batch_size):
    from fastsgdstab.typical import _locate
    from reference_typical import IIDIncrements

    values, probabilities = batch_distribution(curvatures, batch_size, sampling)
    root = exact_typical_lr(values, probabilities)
    start = exact_mean_square_lr(values, probabilities)
    covered, z = 0, []
    for seed in range(100):
        exponent = IIDIncrements(values, probabilities, runs=64, steps=300, seed=seed)
        value, (low, high), stderr = _locate(exponent, start, sampling, 0.95)
        assert low <= value <= high and start <= low
        covered += low <= root <= high
        z.append((value - root) / stderr)
    # 95% nominal: P(at most 87 of 100) = 0.0015
    assert covered >= 88, covered
    # the point estimate is unbiased (a coarse root tolerance moved it by a fraction of a
    # standard error); its delta-method standard error is not too large. (It can be too small:
    # with many batch values, log singularities of the sample exponent lie near the root and
    # bend its local slope; the interval does not use it.)
    assert abs(np.mean(z)) < 0.4 and np.std(z) > 0.8, (np.mean(z), np.std(z))


@pytest.mark.parametrize("sampling", SCHEMES)
def test_d1_exponents_match_the_enumerated_expectation(sampling):
    values, probabilities = _exact(sampling)
    result = typical_critical_lr(_family(), 2, sampling=sampling, runs=64, steps=800, seed=3)
    assert result.eta_star == pytest.approx(exact_mean_square_lr(values, probabilities), rel=1e-9)
    # every evaluated lr: the estimate within 5 standard errors of E log|1 - lr h_B| (d = 1 has
    # no burn-in bias: the increments are i.i.d.)
    exact = np.array([exact_exponent(lr, values, probabilities) for lr in result.lrs])
    assert np.all(np.abs(result.lyapunov_exponents - exact) <= 5 * result.lyapunov_exponent_stderr)
    assert result.value >= result.eta_star
    assert result.interval[0] <= result.value <= result.interval[1]
    assert result.level == 0.95
    assert result.cost.simulated_steps == result.lrs.size * 64 * 800
    assert result.cost.simulations == result.lrs.size


def test_reshuffle_d1_equals_without_replacement_per_step():
    # In d = 1 the factors commute, so an epoch of reshuffled batches (B | n) has the exponent of
    # without-replacement batches: the same exact root; eta_star is None, the search starts at
    # the without-replacement eta*.
    values, probabilities = _exact("without_replacement")
    root = exact_typical_lr(values, probabilities)
    result = typical_critical_lr(_family(), 2, sampling="reshuffle", seed=1)
    assert result.eta_star is None and result.ratio is None
    assert result.start_lr == pytest.approx(exact_mean_square_lr(values, probabilities), rel=1e-9)
    low, high = result.interval
    assert low <= root <= high
    assert "no exact mean-square critical lr" in str(result)


def test_typical_equals_eta_star_when_no_rare_batch_carries_the_mean_square():
    # All h_i equal, without replacement: h_B = h, gamma(lr) = log|1 - lr h|, root 2/h = eta*.
    family = _family([2.0] * 4)
    result = typical_critical_lr(family, 2, sampling="without_replacement", runs=16, steps=100)
    assert result.eta_star == pytest.approx(1.0, rel=1e-12)
    assert result.value == pytest.approx(1.0, rel=1e-9)


def test_same_seed_same_numbers_and_no_global_state_changed():
    state = np.random.get_state()[1].copy()
    filters = list(warnings.filters)
    first = typical_critical_lr(_family(), 2, runs=32, steps=200, seed=7)
    second = typical_critical_lr(_family(), 2, runs=32, steps=200, seed=7)
    assert first.value == second.value and first.interval == second.interval
    np.testing.assert_array_equal(first.lyapunov_exponents, second.lyapunov_exponents)
    assert np.array_equal(np.random.get_state()[1], state)
    assert list(warnings.filters) == filters


# Theorem 2's families (n = 100, lambda_1 = 2, the paper's figure 1): exact typical root by
# coordinates. The finite-time estimate is biased where several coordinates have nearly the same
# exponent (the log of their sum grows more slowly than the largest); 1% covers the cells below.
THEOREM2_CELLS = [("bernoulli", 50, 4), ("bernoulli", 30, 2), ("without_replacement", 40, 10),
                  ("without_replacement", 50, 1)]


@pytest.mark.parametrize("sampling,sigma,batch_size", THEOREM2_CELLS)
def test_theorem2_typical_at_least_eta_star_and_near_exact(sampling, sigma, batch_size):
    family = theorem2_family(100, sigma, 2.0)
    result = typical_critical_lr(family, batch_size, sampling=sampling, runs=64, steps=1000)
    exact = theorem2_typical_lr(100, sigma, 2.0, batch_size, sampling)
    assert result.value >= result.eta_star
    assert exact >= result.eta_star * (1 - 1e-9)
    low, high = result.interval
    assert low * 0.99 <= exact <= high * 1.01


def test_theorem2_agrees_with_the_figure1_majority_vote_where_decided():
    # lr = 0.8, the paper's panel; cells whose exact verdict (mean square) diverges. A cell is
    # decided when lr is 5% or more away from the typical interval and the vote is not 5 of 10.
    from fastsgdstab.experiments import figure1

    cells = [(50, 1), (50, 4), (30, 4), (40, 10), (20, 16), (10, 2)]
    decided = 0
    for sigma, batch_size in cells:
        vote = figure1(lrs=[0.8], samplings=["bernoulli"], sigmas=[sigma],
                       batch_sizes=[batch_size], runs=10, steps=1000, progress=False)
        result = typical_critical_lr(theorem2_family(100, sigma, 2.0), batch_size, runs=64,
                                     steps=1000)
        assert result.value >= result.eta_star
        low, high = result.interval
        if 0.8 > 1.05 * high:
            decided += 1
            assert vote.simulated_diverges[0], (sigma, batch_size)
        elif 0.8 < low / 1.05:
            decided += 1
            assert not vote.simulated_diverges[0], (sigma, batch_size)
    assert decided >= 4


def test_momentum_typical_above_its_eta_star():
    rng = np.random.default_rng(0)
    family = fs.HessianFamily.from_features(rng.standard_normal((40, 5)))
    result = typical_critical_lr(family, 4, sampling="without_replacement", momentum=0.9,
                                 runs=64, steps=1000)
    assert result.eta_star == pytest.approx(
        fs.critical_lr(family, 4, sampling="without_replacement", momentum=0.9), rel=1e-12)
    assert result.value >= result.eta_star
    assert "momentum=0.9" in str(result)


def test_no_curvature_has_no_finite_threshold():
    family = fs.HessianFamily.from_features(np.zeros((3, 2)))
    result = typical_critical_lr(family, 1)
    assert math.isinf(result.value) and result.interval == (math.inf, math.inf)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=1.5, sampling="with_replacement"), ValueError, "integer"),
    (dict(sampling="cyclic"), ValueError, "sampling"),
    (dict(runs=1), ValueError, "runs"),
    (dict(runs=2.0), TypeError, "runs"),
    (dict(steps=1), ValueError, "steps"),
    (dict(burn_in=2000), ValueError, "burn_in"),
    (dict(burn_in=-1), ValueError, "burn_in"),
    (dict(burn_in=1.5), TypeError, "burn_in"),
    (dict(level=1.0), ValueError, "level"),
    (dict(level=0), ValueError, "level"),
    (dict(level="high"), TypeError, "level"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(nesterov=True), ValueError, "nesterov"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    arguments = dict(batch_size=2)
    arguments.update(kwargs)
    batch_size = arguments.pop("batch_size")
    with pytest.raises(error, match=match):
        typical_critical_lr(_family(), batch_size, **arguments)


def test_bad_family_is_named():
    with pytest.raises(TypeError, match="family"):
        typical_critical_lr(np.eye(2), 1)


def test_null_space_directions_do_not_hide_the_exponent():
    # The same d = 3 problem embedded in d = 8 by a rotation (five directions no H_i touches):
    # the typical threshold is the same (the estimator works on the range of H; a constant
    # null-space component would flatten the slope to 0 below the threshold).
    rng = np.random.default_rng(1)
    X = rng.standard_normal((6, 3))
    rotation = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    embedded = fs.HessianFamily.from_features(np.hstack([X, np.zeros((6, 5))]) @ rotation)
    small = typical_critical_lr(fs.HessianFamily.from_features(X), 1,
                                sampling="with_replacement", runs=64, steps=1000)
    large = typical_critical_lr(embedded, 1, sampling="with_replacement", runs=64, steps=1000)
    assert large.eta_star == pytest.approx(small.eta_star, rel=1e-9)
    # two independent estimates: the difference within 5 combined delta-method standard errors
    assert abs(large.value - small.value) <= 5 * math.hypot(large.stderr, small.stderr)
    # at eta* (the first lr of both), the exponent itself, not one flattened towards 0 by a
    # constant null-space component: again within 5 combined standard errors
    assert large.lrs[0] == pytest.approx(small.lrs[0], rel=1e-9)
    assert small.lyapunov_exponents[0] < -10 * small.lyapunov_exponent_stderr[0]
    assert abs(large.lyapunov_exponents[0] - small.lyapunov_exponents[0]) <= 5 * math.hypot(
        large.lyapunov_exponent_stderr[0], small.lyapunov_exponent_stderr[0])


def test_report_shows_the_typical_threshold_only_when_asked():
    family = _family()
    plain = fs.report(family, 0.5, 2)
    assert plain.typical is None and "Typical runs" not in str(plain)
    both = fs.report(family, 0.5, 2, sampling="without_replacement", typical=True)
    assert both.typical.eta_star == pytest.approx(both.critical_lr, rel=1e-12)
    assert both.typical.value >= both.critical_lr
    assert "typical critical lr" in str(both)
    with pytest.raises(TypeError, match="typical"):
        fs.report(family, 0.5, 2, typical="yes")


def test_docs_figure_script_runs(tmp_path):
    # docs/images/typical_theorem2.png comes from this script; here on one cell (the full grid
    # takes minutes): the typical verdict agrees with the figure-1 vote and the PNG is written.
    pytest.importorskip("matplotlib")
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import make_typical_figure as script
    finally:
        sys.path.remove(str(root / "benchmarks"))
    rows = script.ratios([50], [8])
    cells = script.verdicts([50], [8])
    path = script.draw(rows, cells, tmp_path / "typical.png")
    assert Path(path).stat().st_size > 1000
    (sigma, batch_size, eta_star, value, low, high), = rows
    assert low <= value <= high and value >= eta_star
    (_, _, simulated, exact, typical), = cells
    assert typical == ("diverges" if simulated else "converges")


# ------------------------------------------------------------------ the typical boundary drawn
def _capture_figures(monkeypatch):
    """Record every Figure the plotting module creates (to read the Axes' data back)."""
    import fastsgdstab.plotting as plotting

    figures = []
    original = plotting._new_figure

    def recording():
        figure = original()
        figures.append(figure)
        return figure

    monkeypatch.setattr(plotting, "_new_figure", recording)
    return figures


def _line(figure, gid):
    (axes,) = [a for a in figure.axes if a.get_lines()]
    lines = [line for line in axes.get_lines() if line.get_gid() == gid]
    assert len(lines) == 1, [line.get_gid() for line in axes.get_lines()]
    return lines[0]


def test_stability_map_draws_the_typical_critical_lr_of_each_batch_size(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from fastsgdstab.plotting import plot_stability_map

    figures = _capture_figures(monkeypatch)
    family = _family()
    batch_sizes = [3, 1, 2]  # not sorted: the plot sorts, the values must follow their rows
    result = fs.stability_map(family, np.linspace(0.5, 2.5, 5), batch_sizes,
                              sampling="without_replacement")
    typical = [typical_critical_lr(family, b, sampling="without_replacement", runs=32,
                                   steps=300, seed=b) for b in batch_sizes]
    plot_stability_map(result, tmp_path / "map.png", typical=typical)
    assert (tmp_path / "map.png").stat().st_size > 1000
    line = _line(figures[-1], "typical-boundary")
    np.testing.assert_array_equal(line.get_ydata(), [1, 2, 3])
    np.testing.assert_array_equal(line.get_xdata(), [typical[1].value, typical[2].value,
                                                     typical[0].value])
    # each drawn value is the typical threshold of its batch size: within reach of the exact
    # root by enumeration (the small budget's interval, widened by 1%)
    for b, x in zip([1, 2, 3], line.get_xdata()):
        root = exact_typical_lr(*_exact("without_replacement", batch_size=b))
        entry = typical[batch_sizes.index(b)]
        assert entry.interval[0] / 1.01 <= root <= entry.interval[1] * 1.01 and x == entry.value
    # floats are accepted; a wrong length, batch size or scheme is named
    plot_stability_map(result, tmp_path / "floats.png", typical=[1.9, 2.0, 2.1])
    np.testing.assert_array_equal(_line(figures[-1], "typical-boundary").get_xdata(),
                                  [2.0, 2.1, 1.9])
    with pytest.raises(ValueError, match="one entry per batch size"):
        plot_stability_map(result, tmp_path / "x.png", typical=typical[:2])
    with pytest.raises(ValueError, match="computed for batch size"):
        plot_stability_map(result, tmp_path / "x.png", typical=typical[::-1])
    other = typical_critical_lr(family, 3, sampling="bernoulli", runs=8, steps=50)
    with pytest.raises(ValueError, match="sampling='bernoulli'"):
        plot_stability_map(result, tmp_path / "x.png", typical=[other] + typical[1:])
    with pytest.raises(ValueError, match="positive lr"):
        plot_stability_map(result, tmp_path / "x.png", typical=[1.0, float("nan"), 1.0])
    with pytest.raises(TypeError, match="typical"):
        plot_stability_map(result, tmp_path / "x.png", typical=2.0)


def test_figure1_panel_draws_the_typical_boundary(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from fastsgdstab.experiments import figure1
    from fastsgdstab.plotting import plot_figure1_panel

    figures = _capture_figures(monkeypatch)
    sigmas, batch_sizes = [10, 30, 50], [1, 8]
    result = figure1(lrs=[0.8], samplings=["bernoulli"], sigmas=sigmas, batch_sizes=batch_sizes,
                     runs=4, steps=200, progress=False, typical=dict(runs=32, steps=400))
    assert result.typical_lr.shape == (6,) and result.typical_interval.shape == (6, 2)
    # one estimate per (sigma, batch size), each >= the cell's exact eta*, near the exact
    # typical root of the Theorem-2 family (coordinates, tests/reference_typical.py)
    for k in range(6):
        sigma, b = int(result.sigma[k]), int(result.batch_size[k])
        assert result.typical_lr[k] >= result.critical_lr[k] * (1 - 1e-9)
        exact = theorem2_typical_lr(100, sigma, 2.0, b, "bernoulli")
        low, high = result.typical_interval[k]
        assert low * 0.97 <= exact <= high * 1.03, (sigma, b, exact, low, high)
    np.testing.assert_array_equal(result.typical_diverges, 0.8 > result.typical_lr)
    plot_figure1_panel(result, 0.8, "bernoulli", tmp_path / "panel.png")
    line = _line(figures[-1], "typical-boundary")
    np.testing.assert_array_equal(line.get_xdata(), batch_sizes)
    drawn = np.asarray(line.get_ydata(), float)
    for b, y in zip(batch_sizes, drawn):
        column = result.batch_size == b
        s = result.sigma[column].astype(float)
        t = result.typical_lr[column]
        change = np.flatnonzero(np.diff(np.sign(t - 0.8)) != 0)
        if change.size == 0:
            assert np.isnan(y)
            continue
        k = change[0]
        # the sigma where the straight line through the two cells' thresholds meets lr = 0.8
        expected = np.interp(0.8, sorted([t[k], t[k + 1]]),
                             [s[k], s[k + 1]] if t[k] < t[k + 1] else [s[k + 1], s[k]])
        assert y == pytest.approx(expected, rel=1e-12)
        assert s[k] <= y <= s[k + 1]
    assert np.isfinite(drawn).any()  # the grid holds a crossing (B = 8: sigma 10 to 30)
    # without typical thresholds nothing is drawn, and asking for them is an error
    plain = figure1(lrs=[0.8], samplings=["bernoulli"], sigmas=[10], batch_sizes=[1], runs=2,
                    steps=50, progress=False)
    assert plain.typical_lr is None and plain.typical_diverges is None
    plot_figure1_panel(plain, 0.8, "bernoulli", tmp_path / "plain.png")
    axes = [a for a in figures[-1].axes if a.get_lines()][0]
    assert all(line.get_gid() != "typical-boundary" for line in axes.get_lines())
    with pytest.raises(ValueError, match="typical=True"):
        plot_figure1_panel(plain, 0.8, "bernoulli", tmp_path / "x.png", typical=True)
    with pytest.raises(ValueError, match="typical"):
        figure1(lrs=[0.8], samplings=["bernoulli"], sigmas=[10], batch_sizes=[1],
                typical=dict(rnus=3))
    with pytest.raises(TypeError, match="typical"):
        figure1(lrs=[0.8], samplings=["bernoulli"], sigmas=[10], batch_sizes=[1], typical="yes")


@pytest.mark.slow
def test_diabetes_script_runs_and_draws_the_typical_threshold(tmp_path):
    # docs/images/typical_diabetes.png and the note's table come from this script (minutes at
    # the full budget); here --quick (tiny budgets), and the drawn threshold is the estimate's.
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import typical_diabetes as script
    finally:
        sys.path.remove(str(root / "benchmarks"))
    result = script.main(["--quick", "--out", "-"])
    typical, eta_star = result["typical"], result["eta_star"]
    assert typical.eta_star == pytest.approx(eta_star, rel=1e-12)
    assert typical.value >= eta_star and typical.momentum == 0.9
    figures = []
    import matplotlib.figure

    original = matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    matplotlib.figure.Figure.savefig = keep
    try:
        script.draw(result, tmp_path / "diabetes.png")
    finally:
        matplotlib.figure.Figure.savefig = original
    assert (tmp_path / "diabetes.png").stat().st_size > 1000
    (line,) = [line for line in figures[0].axes[0].get_lines() if line.get_gid() == "typical"]
    assert line.get_xdata()[0] == pytest.approx(typical.value / eta_star, rel=1e-12)


class _LinearExponent:
    """gamma-hat(lr) = lr - root exactly, with per-run rates spread by a fixed centred vector:
    the standard error is the same at every lr and the interval's ends are known in closed form,
    root -/+ t * stderr."""

    def __init__(self, root, spread, runs=40):
        noise = np.random.default_rng(5).standard_normal(runs)
        self.noise = spread * (noise - noise.mean()) / noise.std(ddof=1)
        self.root, self.runs, self.rates = root, runs, {}

    def per_run(self, lr):
        lr = float(lr)
        if lr not in self.rates:
            self.rates[lr] = (lr - self.root) + self.noise
        return self.rates[lr]

    def __call__(self, lr):
        return float(np.mean(self.per_run(lr)))

    def stderr(self, lr):
        rates = self.per_run(lr)
        return float(np.std(rates, ddof=1)) / math.sqrt(rates.size)


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_interval_ends_are_the_inverted_t_test_moved_outwards(level):
    from scipy.stats import t as student_t

    from fastsgdstab.typical import TYPICAL_END_XTOL, _locate

    exponent = _LinearExponent(root=1.7, spread=0.3)
    stderr = 0.3 / math.sqrt(40)
    half = student_t.ppf(0.5 + level / 2, 39) * stderr
    value, (low, high), delta = _locate(exponent, 1.0, "bernoulli", level)
    assert value == pytest.approx(1.7, rel=1e-4)
    assert delta == pytest.approx(stderr, rel=1e-6)  # slope 1: the delta method is exact here
    tolerance = TYPICAL_END_XTOL * stderr
    # never inside the exact ends, and at most the located tolerance (twice) outside them
    assert 1.7 - half - 2 * tolerance <= low <= 1.7 - half
    assert 1.7 + half <= high <= 1.7 + half + 2 * tolerance
    # the low end never below the start (eta*, where gamma <= 0 by Jensen) for i.i.d. schemes
    close = _LinearExponent(root=1.001, spread=0.3)
    value, (low, high), _ = _locate(close, 1.0, "bernoulli", level)
    assert low == 1.0 and high >= 1.001 + half
