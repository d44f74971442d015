"""Time simulate against the vectorised numpy baseline in one process and print the figures.

    python benchmarks/run_simulate_ratio.py [--repeats 5] [--long] [--per-core]

The issue's case: n = 1,000 rank-1 samples, d = 64, Bernoulli batches of B = 32, 1,024 runs.
Prints run-steps per second (median over repeats, after a warm-up call that compiles the
kernels), the ratio to the baseline, and GFLOP/s counting 4 B d r flops per run-step (the
batch product: B dot products and B updates of length d). With ``--long``, also runs 1,024 runs
x 100,000 steps with the progress bar and reports its time and peak memory. With
``--per-core``, repeats the table in a child process limited to one thread for both engines
(OPENBLAS_NUM_THREADS=1, NUMBA_NUM_THREADS=1): on small machines OpenBLAS's threads can make the
baseline slower, so the per-core ratio is the one to quote beside the default one.
"""

import argparse
import resource
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import fastsgdstab as fs  # noqa: E402
from baselines import simulate_numpy_baseline  # noqa: E402
from fastsgdstab import SimulationWarning  # noqa: E402

N, D, BATCH, RUNS = 1000, 64, 32, 1024


def median_seconds(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400, help="steps per timed simulate call")
    parser.add_argument("--baseline-steps", type=int, default=20)
    parser.add_argument("--long", action="store_true", help="also run 1,024 runs x 100,000 steps")
    parser.add_argument("--per-core", action="store_true", help="also measure with one thread each")
    args = parser.parse_args()
    warnings.simplefilter("ignore", SimulationWarning)

    rng = np.random.default_rng(0)
    features = rng.standard_normal((N, D)) / np.sqrt(D)
    family = fs.HessianFamily.from_features(features)
    lr = 1.0 / family.sharpness()
    print(f"n={N} d={D} rank=1 B={BATCH} runs={RUNS} lr={lr:.4g}; numba threads "
          f"{numba.get_num_threads()}, numpy {np.__version__}, numba {numba.__version__}")

    start = time.perf_counter()
    fs.simulate(family, lr, BATCH, 1, 2, progress=False)
    print(f"first simulate call (compile or cache load): {time.perf_counter() - start:.2f} s")
    simulate_numpy_baseline(features, lr, BATCH, 2, RUNS)

    flops = 4.0 * BATCH * D * 1
    results = {}
    for sampling in fs.SAMPLING_SCHEMES:
        seconds, _ = median_seconds(
            lambda: fs.simulate(family, lr, BATCH, args.steps, RUNS, seed=1, sampling=sampling,
                                progress=False), args.repeats)
        results[sampling] = RUNS * args.steps / seconds
    seconds, _ = median_seconds(
        lambda: simulate_numpy_baseline(features, lr, BATCH, args.baseline_steps, RUNS), args.repeats)
    baseline = RUNS * args.baseline_steps / seconds
    print(f"{'engine':<34}{'run-steps/s':>14}{'ratio':>9}{'GFLOP/s':>10}")
    print(f"{'numpy baseline (bernoulli)':<34}{baseline:>14.4g}{1.0:>9.1f}"
          f"{baseline * 4.0 * N * D / 1e9:>10.2f}  (dense: 4 n d flops per run-step)")
    for sampling, rate in results.items():
        print(f"{'fastsgdstab ' + sampling:<34}{rate:>14.4g}{rate / baseline:>9.1f}{rate * flops / 1e9:>10.2f}")

    if args.per_core:
        print("\nper core (one BLAS thread, one Numba thread):", flush=True)
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   NUMBA_NUM_THREADS="1")
        subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--steps",
                        str(args.steps), "--baseline-steps", str(args.baseline_steps)], env=env,
                       check=True)

    if args.long:
        steps = 100_000
        print(f"\n{RUNS} runs x {steps} steps (progress bar on stderr):")
        start = time.perf_counter()
        result = fs.simulate(family, lr, BATCH, steps, RUNS, seed=1, progress=True)
        elapsed = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"time {elapsed:.1f} s ({RUNS * steps / elapsed:.4g} run-steps/s); peak RSS "
              f"{peak:.0f} MiB; log_sq_norm {result.log_sq_norm.shape} "
              f"({result.log_sq_norm.nbytes / 2**20:.1f} MiB); lyapunov "
              f"{result.lyapunov_exponent:.5g} +- {result.lyapunov_exponent_stderr:.2g}")


if __name__ == "__main__":
    main()
