"""Random reshuffling against i.i.d. batches without replacement on the paper's Theorem-2 family.

Prints, for learning rates around the exact critical learning rate of i.i.d. sampling without
replacement, the Monte-Carlo divergence fraction (the paper's rule: ||w_t||^2 >= 1000 ||w_0||^2
at some step, with its Wilson 95% interval) and the Lyapunov exponent (typical growth per step,
with its standard error) under both schemes, from the same seeds. The figures in
docs/momentum.md ("Random reshuffling") come from

    python benchmarks/compare_reshuffle.py            # about a minute on 2 cores

Loss convention: the library's, H = (1/n) sum_i H_i and steps of (1/B) sum_batch H_i.
"""

import argparse
import time

import fastsgdstab as fs
from fastsgdstab.theory import theorem2_family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--sigma", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--factors", type=float, nargs="+", default=[0.8, 0.95, 1.05, 1.25, 1.5])
    args = parser.parse_args()
    started = time.perf_counter()
    B = args.batch_size
    print(f"Theorem-2 family, n = {args.n}, sharpness 1, B = {B}; {args.runs} runs x {args.steps} "
          f"steps per cell; eta* = exact critical lr of i.i.d. without replacement")
    print(f"{'sigma':>5} {'eta*':>8} {'lr/eta*':>7} | {'scheme':<19} {'diverged':>8} {'95% interval':>15}"
          f" {'Lyapunov/step':>14} {'+-':>8}")
    for sigma in args.sigma:
        family = theorem2_family(args.n, sigma, sharpness=1.0)
        eta = fs.critical_lr(family, B, sampling="without_replacement")
        for factor in args.factors:
            for scheme in ("without_replacement", "reshuffle"):
                result = fs.simulate(family, factor * eta, B, args.steps, args.runs, seed=1,
                                     sampling=scheme, init="uniform", progress=False)
                low, high = result.diverged_fraction_interval
                print(f"{sigma:>5} {eta:>8.4f} {factor:>7.2f} | {scheme:<19} "
                      f"{result.diverged_fraction:>8.3f} [{low:.3f}, {high:.3f}]"
                      f" {result.lyapunov_exponent:>14.3e} {result.lyapunov_exponent_stderr:>8.1e}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
