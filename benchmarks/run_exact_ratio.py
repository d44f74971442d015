"""Time critical_lr against the numpy/scipy baseline in one process and print the ratios.

    python benchmarks/run_exact_ratio.py [--repeats 5]
    python benchmarks/run_exact_ratio.py --dgemm-ratio [--n 200 --rank 10 --d 3000]

Prints medians over repeats (after a warm-up call that compiles the kernels), the ratio to each
baseline, the agreement of the answers, and the scale targets' time and peak memory.

``--dgemm-ratio`` is issue 19's target: on a random family (n samples of rank-r factors in
dimension d; k = min(n r, d) reduced directions) it times, side by side in one process, one
k x k x k dgemm (median of 3, scipy's BLAS, the library the engine calls), ``critical_lr`` plain,
heavy ball 0.9 and Nesterov 0.9 (the family's reduction is done once beforehand and not timed:
it is the family's cost, not the engine's), and prints each time as a multiple of the dgemm,
its operator-product count (load-independent), the time per product in dgemms, whether the
answer is certified, the process's CPU seconds, and the machine load (``os.getloadavg``)
beside every figure.

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


def dgemm_ratio(n, rank, d, batch_size=20, skip_momentum=False):
    import os
    import numpy as np
    from scipy.linalg.blas import dgemm
    from fastsgdstab import _engine

    rng = np.random.default_rng(0)
    family = fs.HessianFamily(rng.standard_normal((n, d, rank)) / np.sqrt(d))
    small = fs.HessianFamily(rng.standard_normal((5, 20, 2)))
    fs.critical_lr(small, 2)
    fs.critical_lr(small, 2, momentum=0.9)
    start = time.perf_counter()
    k = _engine.reduced(family).k
    print(f"n={n} r={rank} d={d}: k={k}; reduction (not timed below) {time.perf_counter() - start:.1f} s, "
          f"load {os.getloadavg()[0]:.1f}")
    counts = {"products": 0, "seconds": 0.0}
    call, error_of = _engine.SandwichOperator.__call__, _engine.SandwichOperator.error_of

    def counted(function):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                counts["products"] += 1
                counts["seconds"] += time.perf_counter() - begin
        return wrapper

    _engine.SandwichOperator.__call__ = counted(call)
    _engine.SandwichOperator.error_of = counted(error_of)
    a = rng.standard_normal((k, k))
    a, b = np.asfortranarray(a), np.asfortranarray(rng.standard_normal((k, k)))

    def one_dgemm():
        times = []
        for _ in range(3):
            begin = time.perf_counter()
            dgemm(1.0, a, b)
            times.append(time.perf_counter() - begin)
        return statistics.median(times)

    cases = [("plain", {})]
    if not skip_momentum:
        cases += [("heavy ball 0.9", {"momentum": 0.9}),
                  ("Nesterov 0.9", {"momentum": 0.9, "nesterov": True})]
    results = []
    for name, options in cases:
        before = one_dgemm()
        counts.update(products=0, seconds=0.0)
        load = os.getloadavg()[0]
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            begin, cpu = time.perf_counter(), os.times()
            bracket = fs.critical_lr(family, batch_size, bounds=True, **options)
            elapsed = time.perf_counter() - begin
            cpu = sum(os.times()[:2]) - sum(cpu[:2])
        after = one_dgemm()
        reference = 0.5 * (before + after)
        per_product = counts["seconds"] / max(counts["products"], 1) / reference
        results.append((name, elapsed))
        print(f"  {name:15s} {elapsed:8.2f} s = {elapsed / reference:7.1f} dgemm ({k}^3 dgemm "
              f"{reference:.3f} s), {counts['products']:3d} products of the noise operator (V_s "
              f"for momentum; the proofs' own enclosures not counted), {per_product:.2f} dgemm "
              f"per product, certified {bracket.certified}{' (warned)' if caught else ''}, "
              f"bracket rel. width {(bracket.upper - bracket.lower) / bracket.value:.1e}, "
              f"CPU {cpu:.1f} s, load {load:.1f}")
    for name, elapsed in results[1:]:
        print(f"  {name}: {elapsed / results[0][1]:.2f}x plain")


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
    parser.add_argument("--dgemm-ratio", action="store_true",
                        help="issue 19's target: critical_lr against one k^3 dgemm")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--d", type=int, default=3000)
    parser.add_argument("--plain-only", action="store_true")
    args = parser.parse_args()
    if args.dgemm_ratio:
        dgemm_ratio(args.n, args.rank, args.d, skip_momentum=args.plain_only)
    elif args.child:
        scale_child(*args.child)
    else:
        speed(args.repeats)
        print("scale targets (fresh process each, so peak memory is the call's own):")
        for n, d in ((10000, 1000), (1000, 100000)):
            subprocess.run([sys.executable, __file__, "--child", str(n), str(d)], check=True)
