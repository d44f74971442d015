"""Coverage study of ``fastsgdstab.estimate`` (docs/probe.md): probes of a training set small
enough to solve whole.

    python benchmarks/probe_coverage.py [--population 5000] [--subsets 100] [--sizes 100 300 1000]
        [--resamples 200] [--out probe_coverage] [--figure docs/images/probe_coverage.png]

The training set: N samples in d = 10 dimensions, C = 1 (H_i = x_i x_i^T), x_i = s_i g_i with
g_i ~ N(0, diag(1/j)) and a heavy-tailed (log-normal, sigma 0.3: a per-sample curvature
||x_i||^2 spread over two decades) scale s_i. Target: the whole set's exact eta* for SGD without
replacement at B = 32 (the library's loss convention: per-sample loss with Hessian H_i). For each
probe size n, ``subsets`` uniform probes of n samples (population_size = N) each get
``fs.estimate(fs.critical_lr, probe, 32, sampling="without_replacement", interval="bca")``, whose
replicates give the percentile, basic and BCa intervals at once. Written: ``OUT.json`` (every
number), ``OUT.md`` (the table of docs/probe.md) and the figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastsgdstab as fs  # noqa: E402
from fastsgdstab._statistics import wilson_interval  # noqa: E402

BATCH_SIZE, SAMPLING, DIMENSION, SIGMA = 32, "without_replacement", 10, 0.3
METHODS = ("percentile", "basic", "bca")
TABLE_HEADER = ("| n | interval | coverage of the whole-set eta* | Wilson 95% | median width / eta* "
                "| median abs error, plug-in / bias-corrected |")


def training_set(population: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spectrum = 1.0 / np.arange(1, DIMENSION + 1)
    g = rng.standard_normal((population, DIMENSION)) * np.sqrt(spectrum)
    return g * np.exp(SIGMA * rng.standard_normal((population, 1)))


def study(population=5000, subsets=100, sizes=(100, 300, 1000), resamples=200, seed=0, level=0.95):
    features = training_set(population, seed)
    whole = fs.HessianFamily.from_features(features)
    target = fs.critical_lr(whole, BATCH_SIZE, sampling=SAMPLING)
    rng = np.random.default_rng(seed + 1)
    rows = []
    started = time.perf_counter()
    for n in sizes:
        for subset in range(subsets):
            chosen = rng.choice(population, size=n, replace=False)
            probe = fs.HessianFamily.from_features(features[chosen], population_size=population)
            result = fs.estimate(fs.critical_lr, probe, BATCH_SIZE, sampling=SAMPLING,
                                 resamples=resamples, level=level, seed=subset, interval="bca")
            rows.append(dict(n=n, subset=subset, value=result.value,
                             bias_corrected=result.bias_corrected,
                             intervals={m: list(result.intervals[m]) for m in METHODS},
                             seconds=result.cost.elapsed_seconds))
        print(f"n = {n}: {subsets} probes done ({time.perf_counter() - started:.0f} s)", flush=True)
    return dict(population=population, dimension=DIMENSION, sigma=SIGMA, batch_size=BATCH_SIZE,
                sampling=SAMPLING, level=level, resamples=resamples, subsets=subsets,
                sizes=list(sizes), target=target, rows=rows,
                seconds=time.perf_counter() - started)


def summary(data) -> list:
    """Per (n, method): coverage, its Wilson interval, the median relative width, the median
    absolute errors of the plug-in and the bias-corrected values (relative to eta*)."""
    target, out = data["target"], []
    for n in data["sizes"]:
        rows = [row for row in data["rows"] if row["n"] == n]
        plug_in = float(np.median([abs(r["value"] - target) for r in rows])) / target
        corrected = float(np.median([abs(r["bias_corrected"] - target) for r in rows])) / target
        for method in METHODS:
            covered = sum(r["intervals"][method][0] <= target <= r["intervals"][method][1] for r in rows)
            low, high = wilson_interval(covered, len(rows))
            width = float(np.median([r["intervals"][method][1] - r["intervals"][method][0]
                                     for r in rows])) / target
            out.append(dict(n=n, method=method, covered=covered, subsets=len(rows),
                            coverage=covered / len(rows), wilson=(low, high), width=width,
                            plug_in_error=plug_in, corrected_error=corrected))
    return out


def table(data) -> str:
    lines = [f"Training set N = {data['population']:,}, d = {data['dimension']}, C = 1, log-normal "
             f"scale sigma = {data['sigma']}; whole-set eta* = {data['target']:.6g} "
             f"({data['sampling']}, B = {data['batch_size']}); {data['subsets']} probes per n, "
             f"{data['resamples']} resamples, level {data['level']:g}.",
             "", TABLE_HEADER, "|---|---|---|---|---|---|"]
    for row in summary(data):
        lines.append(f"| {row['n']} | {row['method']} | {row['coverage']:.2f} ({row['covered']}/"
                     f"{row['subsets']}) | [{row['wilson'][0]:.2f}, {row['wilson'][1]:.2f}] | "
                     f"{row['width']:.3f} | {row['plug_in_error']:.3f} / {row['corrected_error']:.3f} |")
    return "\n".join(lines) + "\n"


def figure(data, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(data)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for method, marker in zip(METHODS, "osd"):
        mine = [r for r in rows if r["method"] == method]
        sizes = [r["n"] for r in mine]
        left.errorbar(sizes, [r["coverage"] for r in mine],
                      yerr=[[r["coverage"] - r["wilson"][0] for r in mine],
                            [r["wilson"][1] - r["coverage"] for r in mine]],
                      marker=marker, capsize=3, label=method)
        right.plot(sizes, [r["width"] for r in mine], marker=marker, label=method)
    left.axhline(data["level"], color="grey", linestyle="--", linewidth=1)
    left.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    left.set(xscale="log", xlabel="probe size n", ylabel="coverage of the whole-set eta*",
             title=f"{data['subsets']} probes per n")
    right.set(xscale="log", yscale="log", xlabel="probe size n", ylabel="median width / eta*",
              title=f"{100 * data['level']:g}% intervals")
    left.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=5000)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--out", default="probe_coverage",
                        help="OUT.json and OUT.md are written (default: in the working directory)")
    parser.add_argument("--figure", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"
                                                / "probe_coverage.png"))
    args = parser.parse_args(argv)
    data = study(args.population, args.subsets, args.sizes, args.resamples)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(table(data))
    figure(data, args.figure)
    print(table(data))
    print(f"{data['seconds']:.0f} s")


if __name__ == "__main__":
    main()
