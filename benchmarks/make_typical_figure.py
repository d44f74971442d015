"""Regenerate docs/images/typical_theorem2.png: the typical (Lyapunov) critical lr beside the
exact mean-square one on the paper's Theorem-2 families (n = 100, lambda_1(H) = 2, Bernoulli
batches, from_features' loss convention).

    python benchmarks/make_typical_figure.py [output.png] [--quick]

Left: ``eta_typ / eta*`` against the batch size for coherence sigma in {5, 20, 50}, with the
95% intervals (``typical_critical_lr``, 64 runs x 1,000 steps per lr). Middle: the same ratio
against heavy-ball momentum (0, 0.5, 0.9; ``eta*`` the exact one with the same momentum) at
sigma = 20 for B = 2, 8, 32. Right: the paper's
figure-1 panel at lr = 0.8 on a coarse grid of cells (sigma, B): filled red/blue is the
simulated majority vote of 10 runs of 1,000 steps (``experiments.figure1``), the line is the
exact mean-square boundary (Theorem 2), and the marks are the typical threshold's verdict
(x: lr above the interval, typical runs grow; o: below it, they shrink; ?: inside it). Prints
the numbers it plots. ``--quick`` computes a few cells only (the test suite runs it so).
"""

import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402

import fastsgdstab as fs  # noqa: E402
from fastsgdstab.experiments import figure1  # noqa: E402
from fastsgdstab.theory import theorem2_family, theorem2_sigma_boundary  # noqa: E402

N, SHARPNESS, LR = 100, 2.0, 0.8
BUDGET = dict(runs=64, steps=1000)
MOMENTUM_SIGMA = 20


def ratios(sigmas, batch_sizes):
    rows = []
    for sigma in sigmas:
        family = theorem2_family(N, sigma, SHARPNESS)
        for B in batch_sizes:
            result = fs.typical_critical_lr(family, B, **BUDGET)
            low, high = result.interval
            rows.append((sigma, B, result.eta_star, result.value, low, high))
            print(f"sigma={sigma:2d} B={B:2d} eta*={result.eta_star:.4f} "
                  f"eta_typ={result.value:.4f} [{low:.4f}, {high:.4f}] "
                  f"ratio={result.value / result.eta_star:.3f}", flush=True)
    return rows


def momentum_rows(sigma, batch_sizes, momenta):
    """``eta_typ / eta*`` against heavy-ball momentum on one Theorem-2 family (Bernoulli)."""
    family = theorem2_family(N, sigma, SHARPNESS)
    rows = []
    for mu in momenta:
        for B in batch_sizes:
            result = fs.typical_critical_lr(family, B, momentum=mu, **BUDGET)
            low, high = result.interval
            rows.append((mu, B, result.eta_star, result.value, low, high))
            print(f"sigma={sigma:2d} B={B:2d} momentum={mu:g} eta*={result.eta_star:.4f} "
                  f"eta_typ={result.value:.4f} [{low:.4f}, {high:.4f}] "
                  f"ratio={result.value / result.eta_star:.3f}", flush=True)
    return rows


def verdicts(sigmas, batch_sizes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vote = figure1(lrs=[LR], samplings=["bernoulli"], sigmas=sigmas, batch_sizes=batch_sizes,
                       runs=10, steps=1000, progress=False)
    cells = []
    for k in range(vote.sigma.size):
        sigma, B = int(vote.sigma[k]), int(vote.batch_size[k])
        result = fs.typical_critical_lr(theorem2_family(N, sigma, SHARPNESS), B, **BUDGET)
        low, high = result.interval
        typical = "diverges" if LR > high else ("converges" if LR < low else "undecided")
        print(f"sigma={sigma:2d} B={B:2d} vote {int(vote.diverged_runs[k]):2d}/10 exact "
              f"{'diverges' if vote.exact_diverges[k] else 'converges'} eta*={result.eta_star:.4f}"
              f" eta_typ={result.value:.4f} [{low:.4f}, {high:.4f}] -> typical {typical}",
              flush=True)
        cells.append((sigma, B, bool(vote.simulated_diverges[k]), bool(vote.exact_diverges[k]),
                      typical))
    agree = [c for c in cells if c[4] != "undecided"]
    same = sum((c[4] == "diverges") == c[2] for c in agree)
    differ = sum(c[2] != c[3] for c in cells)
    print(f"lr = {LR}: {len(cells)} cells; typical verdict decided in {len(agree)}, agreeing with "
          f"the majority vote in {same}; majority vote differs from the exact mean-square "
          f"verdict in {differ}")
    return cells


def draw(rows, cells, path, momentum=None, momentum_sigma=None):
    panels = 3 if momentum else 2
    figure = Figure(figsize=(5.5 * panels, 4.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels)
    left, right = axes[0], axes[-1]
    if momentum:
        middle = axes[1]
        for B in sorted({r[1] for r in momentum}):
            part = [r for r in momentum if r[1] == B]
            mu = np.array([r[0] for r in part])
            star = np.array([r[2] for r in part])
            value = np.array([r[3] for r in part]) / star
            errors = np.array([[r[3] - r[4] for r in part], [r[5] - r[3] for r in part]]) / star
            middle.errorbar(mu, value, yerr=errors, marker="o", capsize=3, label=f"B = {B}",
                            gid=f"momentum-B{B}")
        middle.axhline(1.0, color="grey", lw=0.8, ls="--")
        middle.set_xlabel("heavy-ball momentum mu")
        middle.set_ylabel("typical critical lr / exact eta* (same mu)")
        middle.set_title(f"momentum, sigma = {momentum_sigma}, Bernoulli")
        middle.legend()
    for sigma in sorted({r[0] for r in rows}):
        part = [r for r in rows if r[0] == sigma]
        B = np.array([r[1] for r in part])
        star = np.array([r[2] for r in part])
        value = np.array([r[3] for r in part]) / star
        errors = np.array([[r[3] - r[4] for r in part], [r[5] - r[3] for r in part]]) / star
        left.errorbar(B, value, yerr=errors, marker="o", capsize=3, label=f"sigma = {sigma}",
                      gid=f"sigma-{sigma}")
    left.axhline(1.0, color="grey", lw=0.8, ls="--")
    left.set_xscale("log")
    left.set_xlabel("batch size B")
    left.set_ylabel("typical critical lr / exact eta*")
    left.set_title("Theorem-2 families, n = 100, Bernoulli")
    left.legend()
    for sigma, B, simulated, exact, typical in cells:
        right.scatter([B], [sigma], s=90, marker="s",
                      color="tab:red" if simulated else "tab:blue", alpha=0.5)
        mark = {"diverges": "x", "converges": "o", "undecided": "$?$"}[typical]
        right.scatter([B], [sigma], s=30, marker=mark, color="black",
                      facecolors="none" if mark == "o" else None)
    grid = np.linspace(1, max(c[1] for c in cells), 200)
    boundary = [theorem2_sigma_boundary(LR, SHARPNESS, N, b) for b in grid]
    right.plot(grid, boundary, color="black", lw=1, label="exact mean-square boundary")
    right.set_ylim(0, max(c[0] for c in cells) + 3)
    right.set_xscale("log")
    right.set_xlabel("batch size B")
    right.set_ylabel("coherence sigma")
    right.set_title(f"lr = {LR}: vote (red/blue), typical (x / o / ?)")
    right.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def main(argv):
    quick = "--quick" in argv
    paths = [a for a in argv if not a.startswith("--")]
    path = paths[0] if paths else str(Path(__file__).resolve().parents[1] / "docs" / "images"
                                      / "typical_theorem2.png")
    if quick:
        rows = ratios([50], [1, 8])
        cells = verdicts([10, 50], [1, 8])
        momentum = momentum_rows(MOMENTUM_SIGMA, [8], [0.0, 0.9])
    else:
        rows = ratios([5, 20, 50], [1, 2, 4, 8, 16, 32, 49])
        cells = verdicts(list(range(2, 51, 6)), [1, 2, 4, 8, 16, 32, 48])
        momentum = momentum_rows(MOMENTUM_SIGMA, [2, 8, 32], [0.0, 0.5, 0.9])
    print(draw(rows, cells, path, momentum, MOMENTUM_SIGMA))
    return rows, cells, momentum


if __name__ == "__main__":
    main(sys.argv[1:])
