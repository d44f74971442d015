"""The monitor's overhead on the docs' example (docs/tracking.md): the training loop of
make_tracking_figure.py (digits MLP, torch.optim.SGD, B = 32) with and without
StabilityMonitor at its default cadence (every 100 steps within a 5% budget), side by side.

    python benchmarks/run_monitor_overhead.py [--steps 2000] [--repeats 5] [--fixed]

Runs alternate (without, with, without, with, ...) after one untimed warm-up run with the
monitor (torch.func's first use and Numba's cache load are not training); the ratio is the
median with-monitor wall time over the median without. ``--fixed`` also times the loop with a
record on every multiple of 100 steps and no budget (the monitor's natural cost at that
cadence). torch runs one intra-op thread in both arms (the loop's own speed on a shared
machine); the load average is printed, as the numbers depend on it.
"""

from __future__ import annotations

import argparse
import os
import statistics

try:
    from make_tracking_figure import STEPS, train
except ImportError:  # imported as benchmarks.run_monitor_overhead
    from .make_tracking_figure import STEPS, train


def measure(steps=STEPS, repeats=5, fixed=False):
    """{"without": [s...], "with": [s...], ("fixed": [s...]), "records": [...], "skipped": [...]}"""
    import torch

    torch.set_num_threads(1)
    train(min(steps, 200), monitor_options={})   # warm-up: torch.func, Numba's cache
    times = {"without": [], "with": [], "records": [], "skipped": []}
    if fixed:
        times["fixed"] = []
    for _ in range(repeats):
        times["without"].append(train(steps)[2])
        _, monitor, seconds = train(steps, monitor_options={})
        times["with"].append(seconds)
        times["records"].append(len(monitor.rows))
        times["skipped"].append(monitor.skipped)
        if fixed:
            times["fixed"].append(train(steps, monitor_options={"every": 100})[2])
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fixed", action="store_true")
    args = parser.parse_args(argv)
    times = measure(args.steps, args.repeats, args.fixed)
    without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
    print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores)")
    print(f"{args.steps} steps, {args.repeats} alternating runs each, medians:")
    print(f"  loop without monitor            {without:8.3f} s   runs {[round(t, 3) for t in times['without']]}")
    print(f"  loop with monitor (default)     {with_:8.3f} s   runs {[round(t, 3) for t in times['with']]}")
    print(f"    records taken {times['records']}, due records skipped by the 5% budget {times['skipped']}")
    print(f"  ratio with / without            {with_ / without:8.3f}")
    if args.fixed:
        fixed = statistics.median(times["fixed"])
        print(f"  loop with monitor, every=100, no budget {fixed:8.3f} s   ratio {fixed / without:.2f}")
    return times


if __name__ == "__main__":
    main()
