"""Time simulate against the vectorised numpy baseline in one process and print the figures.

    python benchmarks/run_simulate_ratio.py [--repeats 5] [--long] [--per-core]
    python benchmarks/run_simulate_ratio.py --scale        # per step and fixed cost, n = 1e3 vs 1e6
    python benchmarks/run_simulate_ratio.py --momentum     # momentum vs plain SGD, and reshuffle
    python benchmarks/run_simulate_ratio.py --old PATH     # this checkout vs another, side by side
    python benchmarks/run_simulate_ratio.py --cold-start   # first call in fresh processes

``--scale`` (issue 12): at d = 64, B = 32, 1,024 runs and n = 1e3 and 1e6, for each scheme,
the fixed cost of a call (a 1-step call minus one step) and the cost per step (from a 1-step and
a 100-step call), medians of 3, and the ratio of the per-step costs (target: within 5x; fixed
cost under 100 ms). ``--momentum`` (issue 11): run-steps per second at the issue's case with
heavy ball and Nesterov (mu = 0.9) against plain SGD (target: at least 60%), and reshuffle.
``--old PATH`` times the issue's case for every scheme, and the other sizes of
``THROUGHPUT_CASES``, in child processes alternating between this checkout and the one at PATH
(e.g. the main checkout, or a ``git worktree`` of an older commit), so that both see the same
machine load; it prints the medians and the ratio new / old. ``--cold-start`` times the first
``simulate`` of a fresh process (wall and CPU seconds) with an empty NUMBA_CACHE_DIR, then with
the cache it filled, and with an empty cache for a family with gradients and for momentum 0.9;
with ``--old PATH`` too, both checkouts side by side.

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
    parser.add_argument("--scale", action="store_true", help="per step and fixed cost at n = 1e3, 1e6")
    parser.add_argument("--momentum", action="store_true", help="momentum and reshuffle throughput")
    parser.add_argument("--old", metavar="PATH", help="compare with the checkout at PATH")
    parser.add_argument("--cold-start", action="store_true", help="first call, fresh processes")
    parser.add_argument("--throughput-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore", SimulationWarning)
    if args.scale:
        return scale(args.repeats)
    if args.momentum:
        return momentum(args.repeats, args.steps)
    if args.cold_start:
        return cold_start(args.old, args.repeats)
    if args.old:
        return compare_checkouts(args.old, args.repeats, args.steps)
    if args.throughput_only:
        return print_throughput(args.repeats, args.steps)

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


def _issue_family(n=N, d=D, seed=0):
    rng = np.random.default_rng(seed)
    return fs.HessianFamily.from_features(rng.standard_normal((n, d)) / np.sqrt(d))


def _run_steps_per_second(family, lr, steps, repeats, **kwargs):
    fs.simulate(family, lr, BATCH, 2, RUNS, seed=1, progress=False, **kwargs)  # compile / load
    seconds, _ = median_seconds(
        lambda: fs.simulate(family, lr, BATCH, steps, RUNS, seed=1, progress=False, **kwargs),
        repeats)
    return RUNS * steps / seconds


def scale(repeats):
    print(f"d={D} B={BATCH} runs={RUNS}; numba threads {numba.get_num_threads()}")
    print(f"{'n':>9} {'sampling':<21}{'fixed ms':>10}{'per step ms':>13}")
    per_step = {}
    for n in (1_000, 1_000_000):
        family = _issue_family(n)
        lr = 0.5  # (any stable-looking value: the cost does not depend on it)
        for sampling in fs.SAMPLING_SCHEMES:
            fs.simulate(family, lr, BATCH, 1, 2, sampling=sampling, progress=False)
            one, _ = median_seconds(lambda: fs.simulate(family, lr, BATCH, 1, RUNS, seed=1,
                                                        sampling=sampling, progress=False), 3)
            many, _ = median_seconds(lambda: fs.simulate(family, lr, BATCH, 100, RUNS, seed=1,
                                                         sampling=sampling, progress=False), 3)
            step = (many - one) / 99
            per_step[n, sampling] = step
            print(f"{n:>9} {sampling:<21}{1e3 * (one - step):>10.1f}{1e3 * step:>13.3f}", flush=True)
    for sampling in fs.SAMPLING_SCHEMES:
        print(f"per step n = 1e6 / n = 1e3, {sampling}: "
              f"{per_step[1_000_000, sampling] / per_step[1_000, sampling]:.2f}x")


def momentum(repeats, steps):
    family = _issue_family()
    lr = 1.0 / family.sharpness()
    print(f"n={N} d={D} B={BATCH} runs={RUNS}, {steps} steps per call; numba threads "
          f"{numba.get_num_threads()}")
    cases = [("plain SGD (bernoulli)", {}),
             ("heavy ball mu=0.9", dict(momentum=0.9)),
             ("Nesterov mu=0.9", dict(momentum=0.9, nesterov=True)),
             ("plain SGD (without_replacement)", dict(sampling="without_replacement")),
             ("reshuffle", dict(sampling="reshuffle")),
             ("reshuffle, heavy ball mu=0.9", dict(sampling="reshuffle", momentum=0.9))]
    rates = {}
    # interleaved rounds, so that a change of machine load hits every case alike
    for _ in range(repeats):
        for name, kwargs in cases:
            rates.setdefault(name, []).append(_run_steps_per_second(family, lr, steps, 1, **kwargs))
    plain = statistics.median(rates[cases[0][0]])
    for name, _ in cases:
        rate = statistics.median(rates[name])
        print(f"{name:<34}{rate:>14.4g} run-steps/s{rate / plain:>8.0%} of plain SGD")


# Sizes of the side-by-side throughput table: (label, n, d, rank, batch size, runs, keywords)
THROUGHPUT_CASES = [
    ("n1000_d64_B32_runs1024", 1000, 64, 1, 32, 1024, {}),
    ("n200_d16_B4_runs256", 200, 16, 1, 4, 256, {}),
    ("n1000_d64_r4_B8_runs64", 1000, 64, 4, 8, 64, {}),
    ("momentum0.9_n1000_d64", 1000, 64, 1, 32, 1024, dict(momentum=0.9)),
    ("reshuffle_n1000_d64", 1000, 64, 1, 32, 1024, dict(sampling="reshuffle")),
    ("gradients_n1000_d64", 1000, 64, 1, 32, 1024, dict(gradients=True)),
]


def print_throughput(repeats, steps):
    """Run-steps per second of every scheme at the issue's case, and of the other sizes of
    ``THROUGHPUT_CASES`` (Bernoulli), one ``name rate`` line each."""
    family = _issue_family()
    lr = 1.0 / family.sharpness()
    for sampling in fs.SAMPLING_SCHEMES:
        print(sampling, _run_steps_per_second(family, lr, steps, repeats, sampling=sampling))
    for label, n, d, rank, batch, runs, kwargs in THROUGHPUT_CASES[1:]:
        rng = np.random.default_rng(1)
        factors = rng.standard_normal((n, d, rank)) / np.sqrt(d * rank)
        kwargs = dict(kwargs)
        gradients = None
        if kwargs.pop("gradients", False):  # the affine kernel (a minimum: mean zero)
            gradients = rng.standard_normal((n, d)) / np.sqrt(d)
            gradients -= gradients.mean(axis=0)
        family = fs.HessianFamily(factors, gradients=gradients)
        lr = 1.0 / family.sharpness()
        fs.simulate(family, lr, batch, 2, runs, seed=1, progress=False, **kwargs)
        seconds, _ = median_seconds(lambda: fs.simulate(family, lr, batch, steps, runs, seed=1,
                                                        progress=False, **kwargs), repeats)
        print(label, runs * steps / seconds)


def compare_checkouts(old, repeats, steps):
    """Throughput of this checkout and the one at ``old``, in alternating child processes (both
    see the same machine load), each checkout with its own Numba cache in a temporary directory
    (the other checkout's own ``__pycache__`` is never written)."""
    import tempfile

    here = str(Path(__file__).resolve().parents[1])
    rates = {}
    with tempfile.TemporaryDirectory() as caches:
        for _ in range(repeats):
            for label, path in (("new", here), ("old", str(Path(old).resolve()))):
                env = dict(os.environ, PYTHONPATH=path,
                           NUMBA_CACHE_DIR=os.path.join(caches, label))
                output = subprocess.run([sys.executable, __file__, "--throughput-only",
                                         "--repeats", "1", "--steps", str(steps)], env=env,
                                        check=True, capture_output=True, text=True,
                                        cwd="/").stdout
                for line in output.splitlines():
                    sampling, rate = line.split()
                    rates.setdefault((label, sampling), []).append(float(rate))
    print(f"n={N} d={D} B={BATCH} runs={RUNS}, {steps} steps per call, {repeats} alternating "
          f"rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'case':<30}{'old run-steps/s':>16}{'new run-steps/s':>16}{'new/old':>9}")
    for case in sorted({case for _, case in rates}, key=list(dict.fromkeys(
            case for _, case in rates)).index):
        old_rate = statistics.median(rates["old", case])
        new_rate = statistics.median(rates["new", case])
        print(f"{case:<30}{old_rate:>16.4g}{new_rate:>16.4g}{new_rate / old_rate:>9.2f}")


COLD_SCRIPT = """
import resource, sys, time, warnings
warnings.simplefilter("ignore")
started = time.perf_counter()
import numpy as np
import fastsgdstab as fs
imported = time.perf_counter()
family = fs.HessianFamily.from_features(np.random.default_rng(0).standard_normal((200, 10)))
if sys.argv[1] == "gradients":
    gradients = np.random.default_rng(1).standard_normal((200, 10))
    family = fs.HessianFamily.from_features(family.factors[:, :, 0],
                                            gradients=gradients - gradients.mean(axis=0))
options = dict(momentum=0.9) if sys.argv[1] == "momentum" else {}
cpu = resource.getrusage(resource.RUSAGE_SELF)
begin = time.perf_counter()
fs.simulate(family, 0.1, 8, 100, 64, progress=False, **options)
first = time.perf_counter() - begin
after = resource.getrusage(resource.RUSAGE_SELF)
print(imported - started, first, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime)
"""


def cold_start(old=None, repeats=3):
    """First ``simulate`` in fresh processes (n = 200, d = 10, B = 8, 100 steps, 64 runs): with
    an empty ``NUMBA_CACHE_DIR``, then with the cache it filled, and with an empty cache for a
    family with gradients (the affine kernel) and for momentum 0.9; wall and CPU seconds of the call (import
    excluded), medians. With ``old``, the checkout there in alternation, side by side."""
    import tempfile

    checkouts = [("new", str(Path(__file__).resolve().parents[1]))]
    if old:
        checkouts.append(("old", str(Path(old).resolve())))
    results = {}
    for _ in range(repeats):
        for label, path in checkouts:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, PYTHONPATH=path, NUMBA_CACHE_DIR=cache,
                           PYTHONWARNINGS="ignore")
                for case in ("empty cache", "warm cache", "gradients, empty cache",
                             "momentum, empty cache"):
                    if case.endswith(", empty cache"):
                        with tempfile.TemporaryDirectory() as fresh:
                            env_case = dict(env, NUMBA_CACHE_DIR=fresh)
                            output = subprocess.run(
                                [sys.executable, "-c", COLD_SCRIPT, case.split(",")[0]],
                                env=env_case, check=True, capture_output=True, text=True,
                                cwd="/").stdout
                    else:
                        output = subprocess.run([sys.executable, "-c", COLD_SCRIPT, "plain"],
                                                env=env, check=True, capture_output=True,
                                                text=True, cwd="/").stdout
                    results.setdefault((label, case), []).append(
                        [float(x) for x in output.split()])
    print(f"first simulate in a fresh process, medians of {repeats}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for (label, case), values in results.items():
        imports = statistics.median(v[0] for v in values)
        wall = statistics.median(v[1] for v in values)
        cpu = statistics.median(v[2] for v in values)
        print(f"{label:>4} {case:<24} first simulate {wall:6.2f} s wall, {cpu:6.2f} s CPU "
              f"(import {imports:.2f} s)")


if __name__ == "__main__":
    main()
