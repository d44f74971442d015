"""The monitor's overhead on the docs' example (docs/tracking.md): the training loop of
make_tracking_figure.py (digits MLP, torch.optim.SGD, B = 32) with and without
StabilityMonitor at its default cadence (every 100 steps within a 5% budget), side by side.

    python benchmarks/run_monitor_overhead.py [--steps 2000] [--repeats 5] [--fixed]

Runs alternate (without, with, without, with, ...) after one untimed warm-up run with the
monitor (torch.func's first use and Numba's cache load are not training); the ratio is the
median with-monitor wall time over the median without. ``--fixed`` also times the loop with a
record on every multiple of 100 steps and no budget (the monitor's natural cost at that
cadence: its mean seconds per record, and the default cadence's first-record estimate beside
it). torch runs one intra-op thread in both arms (the loop's own speed on a shared machine);
the load average before and after is printed, as the numbers depend on it, and the process CPU
times too (less sensitive to the load than wall times).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

try:
    from make_tracking_figure import STEPS, train
except ImportError:  # imported as benchmarks.run_monitor_overhead
    from .make_tracking_figure import STEPS, train


def measure(steps=STEPS, repeats=5, fixed=False):
    """{"without": [s...], "with": [s...], ("fixed": [s...]), "records": [...], "skipped": [...]}"""
    import torch

    import time

    torch.set_num_threads(1)
    train(min(steps, 200), monitor_options={"every": 100})   # warm-up: torch.func, Numba's cache
    times = {"without": [], "with": [], "records": [], "skipped": [], "estimate": [],
             "cpu_without": [], "cpu_with": []}
    if fixed:
        times.update(fixed=[], per_record=[])
    for _ in range(repeats):
        cpu = time.process_time()
        times["without"].append(train(steps)[2])
        times["cpu_without"].append(time.process_time() - cpu)
        cpu = time.process_time()
        _, monitor, seconds = train(steps, monitor_options={})
        times["cpu_with"].append(time.process_time() - cpu)
        times["with"].append(seconds)
        times["records"].append(len(monitor.rows))
        times["skipped"].append(monitor.skipped)
        times["estimate"].append(monitor.expected if not monitor.rows else math.nan)
        times.setdefault("monitor_seconds", []).append(monitor.seconds)
        start = time.perf_counter()   # the bookkeeping of step() itself, on 2,000 more calls
        for step in range(steps, 2 * steps):
            monitor.step(step)
        times.setdefault("calls", []).append(time.perf_counter() - start)
        if fixed:
            _, monitor, seconds = train(steps, monitor_options={"every": 100})
            times["fixed"].append(seconds)
            times["per_record"].append(monitor.seconds / len(monitor.rows))
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fixed", action="store_true")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    times = measure(args.steps, args.repeats, args.fixed)
    without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
    print(f"load average before {load:.1f}, after {os.getloadavg()[0]:.1f} (2 cores)")
    print(f"{args.steps} steps, {args.repeats} alternating runs each, medians:")
    print(f"  loop without monitor            {without:8.3f} s   runs {[round(t, 3) for t in times['without']]}")
    print(f"  loop with monitor (default)     {with_:8.3f} s   runs {[round(t, 3) for t in times['with']]}")
    print(f"    records taken {times['records']}, due records skipped by the 5% budget {times['skipped']}, "
          f"the monitor's own seconds {[round(t, 4) for t in times['monitor_seconds']]}")
    print(f"  ratio with / without            {with_ / without:8.3f}")
    print(f"    {args.steps} more calls of monitor.step() alone (no record due within the budget): "
          f"{statistics.median(times['calls']) * 1e3:.2f} ms")
    cpu_without, cpu_with = statistics.median(times["cpu_without"]), statistics.median(times["cpu_with"])
    print(f"  process CPU time without / with {cpu_without:.3f} s / {cpu_with:.3f} s: ratio "
          f"{cpu_with / cpu_without:.3f}")
    if args.fixed:
        fixed = statistics.median(times["fixed"])
        print(f"  loop with monitor, every=100, no budget {fixed:8.3f} s   ratio {fixed / without:.2f}")
        per_record = statistics.median(times["per_record"])
        estimate = [e for e in times["estimate"] if not math.isnan(e)]
        print(f"    seconds per record {per_record:.3f} (median of the runs' means); the default "
              f"cadence's first-record estimate {statistics.median(estimate) if estimate else math.nan:.3f} s")
        print(f"    the default cadence can afford 10 records in a loop of about "
              f"{10 * per_record / 0.05:.0f} s ({10 * per_record / 0.05 / without * args.steps:.0f} "
              f"steps of this one)")
    return times


if __name__ == "__main__":
    main()
