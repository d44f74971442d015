"""BLAS threads on a shared machine: each case timed with the process's default BLAS threads,
with one BLAS thread (threadpoolctl) and under the library's policy (fastsgdstab._threads),
side by side, quiet and with busy background processes (issue 12, item 2).

    python benchmarks/run_threading.py [--busy 2] [--repeats 3] [--cases operator,critical_lr,map,demo]

``--busy N`` starts N ``python -c "while True: pass"`` processes for the measurement (and stops
them after); ``--busy 0`` measures the quiet machine. Reported: the median of ``--repeats``
timings per mode, the modes interleaved so that a change of load hits all of them, and the
ratios default / one and policy / one (target: policy within 1.5x of one thread when busy).
The library's public entry points carry the policy once the lead applies it; until then the
"policy" mode wraps each call in ``limited_blas`` with the size the entry point would use.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

import fastsgdstab as fs
from fastsgdstab import _engine
from fastsgdstab._threads import limited_blas, operator_work


def _features_family(n, d, seed=0):
    return fs.HessianFamily.from_features(np.random.default_rng(seed).standard_normal((n, d)))


def _operator_case(n, d, products=20):
    family = _features_family(n, d)
    reduction = _engine.reduced(family)
    k = reduction.k
    multiplier, weight, _ = _engine.second_moment_multiplier(reduction.unit_eigenvalues, 0.5, 1.0, 0.01)
    operator = _engine.SandwichOperator(reduction, np.ones((k, k)), multiplier, weight)
    X = np.eye(k)
    operator(X)

    def run():
        for _ in range(products):
            operator(X)

    return f"operator n={n} d={d} x{products}", family, run


def _critical_lr_case(n, d):
    family = _features_family(n, d)
    _engine.reduced(family)
    return f"critical_lr n={n} d={d}", family, lambda: fs.critical_lr(family, 32)


def _map_case():
    # README: features (1000, 50); fastsgdstab map FILE.npz --lrs 0.01:1:100 --batch-sizes 1:64:64
    from fastsgdstab.cli import parse_grid

    family = _features_family(1000, 50)
    _engine.reduced(family)
    lrs, batch_sizes = parse_grid("0.01:1:100"), parse_grid("1:64:64")
    return "README map 1000x50, 64 x 100", family, lambda: fs.stability_map(family, lrs, batch_sizes)


def _demo_case():
    from fastsgdstab.cli import demo_family, main

    family = demo_family()

    def run():
        main(["demo"], out=io.StringIO())

    return "fastsgdstab demo (in process)", family, run


CASES = {
    "operator": lambda: [_operator_case(5000, d) for d in (16, 64, 128, 300)],
    "critical_lr": lambda: [_critical_lr_case(1000, 50), _critical_lr_case(5000, 300)],
    "map": lambda: [_map_case()],
    "demo": lambda: [_demo_case()],
}


def _timed(run, mode, family) -> float:
    if mode == "default":
        context = contextlib.nullcontext()
    elif mode == "one":
        context = threadpool_limits(1, user_api="blas")
    else:
        context = limited_blas(operator_work(family))
    with context:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start


@contextlib.contextmanager
def busy_processes(count: int):
    processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0)
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="operator,critical_lr,map,demo")
    parser.add_argument("--modes", default="default,one,policy")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    cases = [case for name in args.cases.split(",") for case in CASES[name]()]
    for _, family, run in cases:  # compile and warm up outside the measurement
        with threadpool_limits(1, user_api="blas"):
            run()
    print(f"{args.busy} busy background processes, median of {args.repeats}; seconds")
    print(f"{'case':<34}" + "".join(f"{mode:>10}" for mode in modes) + "  default/one  policy/one")
    with busy_processes(args.busy):
        for name, family, run in cases:
            times = {mode: [] for mode in modes}
            for _ in range(args.repeats):
                for mode in modes:
                    times[mode].append(_timed(run, mode, family))
            medians = {mode: statistics.median(values) for mode, values in times.items()}
            line = f"{name:<34}" + "".join(f"{medians[mode]:>10.4f}" for mode in modes)
            if "one" in medians:
                for mode in ("default", "policy"):
                    if mode in medians:
                        line += f"  {medians[mode] / medians['one']:>10.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
