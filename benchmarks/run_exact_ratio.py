"""Time critical_lr against the numpy/scipy baseline in one process and print the ratios.

    python benchmarks/run_exact_ratio.py [--repeats 5]

Prints medians over repeats (after a warm-up call that compiles the kernels), the ratio to each
baseline, the agreement of the answers, and the scale targets' time and peak memory.
"""

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
import fastsgdstab as fs  # noqa: E402
from baselines import critical_lr_numpy_baseline, lognormal_features  # noqa: E402



def median_time(function, repeats):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def speed(repeats):
    x = lognormal_features(5000, 300)
    fs.critical_lr(fs.HessianFamily.from_features(x[:20, :4]), 2)
    ours, eta = median_time(lambda: fs.critical_lr(fs.HessianFamily.from_features(x), 32), repeats)
    base0, eta0 = median_time(lambda: critical_lr_numpy_baseline(x, 32), repeats)
    base1, eta1 = median_time(lambda: critical_lr_numpy_baseline(x, 32, tol=1e-10), repeats)
    print(f"n=5000 d=300 B=32, median of {repeats}:")
    print(f"  fastsgdstab.critical_lr          {ours:7.3f} s   eta* = {eta!r}")
    print(f"  baseline eigsh(tol=0)            {base0:7.3f} s   ratio {base0 / ours:5.2f}x   rel. diff {abs(eta0 / eta - 1):.1e}")
    print(f"  baseline eigsh(tol=1e-10)        {base1:7.3f} s   ratio {base1 / ours:5.2f}x   rel. diff {abs(eta1 / eta - 1):.1e}")


def scale_child(n, d):
    x = lognormal_features(n, d)
    fs.critical_lr(fs.HessianFamily.from_features(x[:20, :4]), 2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    start = time.perf_counter()
    eta = fs.critical_lr(fs.HessianFamily.from_features(x), 32)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"  n={n} d={d}: {elapsed:6.2f} s, peak RSS {peak:.2f} GB (input {x.nbytes / 1e9:.2f} GB, "
          f"RSS before the call {before:.2f} GB), eta* = {eta!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        scale_child(*args.child)
    else:
        speed(args.repeats)
        print("scale targets (fresh process each, so peak memory is the call's own):")
        for n, d in ((10000, 1000), (1000, 100000)):
            subprocess.run([sys.executable, __file__, "--child", str(n), str(d)], check=True)
