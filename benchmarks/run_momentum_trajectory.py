"""Side by side: momentum ``second_moment`` by the compiled kernels and by release 0.1.0's Python
loop per step (``momentum_loops.py``), in one process, with their agreement.

    PYTHONPATH=. python benchmarks/run_momentum_trajectory.py [--repeats 3]

Prints, per case (n samples, d parameters, rank-1 factors; k = min(n, d); heavy ball 0.9,
Bernoulli B = 8, lr = half the inverse sharpness; per-sample gradients or not), the median
seconds of each path, their ratio, and the largest relative difference of E||w_t||^2. The load
average is printed before and after (the machine is shared).
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastsgdstab as fs  # noqa: E402
from bench_second_moment import momentum_family  # noqa: E402
from momentum_loops import python_loops  # noqa: E402

CASES = [(200, 40, 500, False), (200, 40, 500, True), (1000, 150, 200, False),
         (1000, 150, 100, True), (2000, 400, 30, False)]


def timed(call, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("load average before:", os.getloadavg())
    print(f"{'n':>5} {'d':>4} {'steps':>5} {'grads':>5} {'kernel s':>9} {'loop s':>9} "
          f"{'ratio':>6} {'max rel diff':>12}")
    for n, d, steps, gradients in CASES:
        family = momentum_family(n, d, gradients)
        lr = 0.5 / family.sharpness()

        def kernel():
            return fs.second_moment(family, lr, 8, steps, momentum=0.9)

        def loop():
            with python_loops():
                return fs.second_moment(family, lr, 8, steps, momentum=0.9)

        kernel(), loop()  # compile, reduce
        t_new, new = timed(kernel, args.repeats)
        t_old, old = timed(loop, args.repeats)
        diff = float(np.max(np.abs(new.mean_sq - old.mean_sq) / np.abs(old.mean_sq)))
        print(f"{n:>5} {d:>4} {steps:>5} {str(gradients):>5} {t_new:9.3f} {t_old:9.3f} "
              f"{t_old / t_new:6.1f} {diff:12.2e}")
    print("load average after:", os.getloadavg())


if __name__ == "__main__":
    main()
