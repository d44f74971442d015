"""The ``fastsgdstab`` command (also ``python -m fastsgdstab``).

Subcommands:

* ``analyze FILE.npz --lr X --batch-size B [--sampling S]``: the stability report of a saved
  family (arrays ``factors`` (n, d, r), ``hessians`` (n, d, d) or ``features`` (n, d)).
* ``demo [--lr X] [--batch-size B] [--sampling S]``: the same on a built-in problem.
* ``reproduce figure1 [--lr ...] [--sampling ...] [--runs 10] [--steps 1000] [--out DIR] [--quick]``:
  the synthetic experiment of Dexter et al. with exact verdicts beside the simulated ones.
* ``map FILE.npz --lrs GRID --batch-sizes GRID [--sampling S] [--out map.png]``: the exact
  phase diagram of a saved family. A GRID is ``0.1,0.2,0.5``, ``START:STOP:COUNT`` (evenly
  spaced, inclusive) or ``START:STOP:COUNT:log`` (geometric), combinable with commas.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from .family import HessianFamily
from .sampling import SAMPLING_SCHEMES


def demo_family() -> HessianFamily:
    """The built-in problem: least squares with n = 512 samples of d = 64 features.

    Features are Gaussian with a power-law covariance (eigenvalues j^-1), a common shape for
    real data and neural tangent features; seeded, so every run shows the same numbers.
    """
    rng = np.random.default_rng(2024)
    n, d = 512, 64
    scales = 1.0 / np.sqrt(np.arange(1, d + 1))
    return HessianFamily.from_features(rng.standard_normal((n, d)) * scales)


def _add_setting_arguments(parser, *, required: bool) -> None:
    parser.add_argument("--lr", type=float, required=required, default=None,
                        help="learning rate (> 0)" + ("" if required else "; default 0.5 / sharpness"))
    parser.add_argument("--batch-size", type=float, required=required, default=None,
                        help="batch size, a real number in [1, n]" + ("" if required else "; default 8"))
    parser.add_argument("--sampling", choices=SAMPLING_SCHEMES, default="bernoulli",
                        help="batch sampling scheme (default: bernoulli, the paper's model)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsgdstab",
        description="Will SGD with this learning rate and batch size stay near the minimum, or blow up?",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    analyze = commands.add_parser("analyze", help="stability report of a saved Hessian family (.npz)")
    analyze.add_argument("file", help=".npz file holding 'factors' (n, d, r), 'hessians' (n, d, d) or 'features' (n, d)")
    _add_setting_arguments(analyze, required=True)
    demo = commands.add_parser("demo", help="stability report of a built-in least-squares problem")
    _add_setting_arguments(demo, required=False)

    reproduce = commands.add_parser(
        "reproduce", help="reproduce an experiment of the paper (figure1: the synthetic experiment)")
    reproduce.add_argument("experiment", choices=["figure1"],
                           help="figure1: n = 100, sigma 1..50, B 1..49, Theorem-2 families")
    reproduce.add_argument("--lr", type=float, nargs="+", default=None, metavar="LR",
                           help="learning rates, one panel each (default: 0.2 0.5 0.8)")
    reproduce.add_argument("--sampling", nargs="+", choices=SAMPLING_SCHEMES, default=None,
                           help="sampling schemes (default: bernoulli without_replacement)")
    reproduce.add_argument("--runs", type=int, default=10, help="runs per cell (default 10)")
    reproduce.add_argument("--steps", type=int, default=1000, help="steps per run (default 1000)")
    reproduce.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    reproduce.add_argument("--out", default="figure1", metavar="DIR",
                           help="output directory for figure1.csv and the PNGs (default ./figure1)")
    reproduce.add_argument("--quick", action="store_true",
                           help="a coarse grid (sigma 1, 8, ..., 50; B 1, 7, ..., 49): seconds, not minutes")
    reproduce.add_argument("--no-plot", action="store_true", help="write the CSV only (no matplotlib needed)")
    reproduce.add_argument("--no-progress", action="store_true", help="no progress bar")

    phase_map = commands.add_parser(
        "map", help="exact phase diagram (spectral radius on an lr x batch-size grid) of a saved family")
    phase_map.add_argument("file", help=".npz file holding 'factors' (n, d, r), 'hessians' (n, d, d) or 'features' (n, d)")
    phase_map.add_argument("--lrs", required=True, metavar="GRID",
                           help="learning rates: 0.1,0.2 or START:STOP:COUNT or START:STOP:COUNT:log")
    phase_map.add_argument("--batch-sizes", required=True, metavar="GRID",
                           help="batch sizes in [1, n], same syntax (e.g. 1:1000:50:log)")
    phase_map.add_argument("--sampling", choices=SAMPLING_SCHEMES, default="bernoulli",
                           help="batch sampling scheme (default: bernoulli, the paper's model)")
    phase_map.add_argument("--out", default="map.png", help="PNG to write (default map.png)")
    phase_map.add_argument("--save", default=None, metavar="FILE.npz",
                           help="also save the grid, spectral radius, error bounds and critical lrs")
    return parser


QUICK_SIGMAS = range(1, 51, 7)
QUICK_BATCH_SIZES = range(1, 50, 6)


def _check_plotting(parser, command: str) -> None:
    from .plotting import PLOT_EXTRA_MESSAGE

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(2, f"fastsgdstab {command}: error: {PLOT_EXTRA_MESSAGE}\n")


def _reproduce(args, parser, out) -> None:
    import csv
    import os

    from .phase import FIGURE1_LRS, FIGURE1_SAMPLINGS, figure1

    if not args.no_plot:
        _check_plotting(parser, "reproduce")
    lrs = tuple(args.lr) if args.lr else FIGURE1_LRS
    samplings = tuple(dict.fromkeys(args.sampling)) if args.sampling else FIGURE1_SAMPLINGS
    for name in ("runs", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be an integer >= 1; got {getattr(args, name)}")
    grid = dict(sigmas=QUICK_SIGMAS, batch_sizes=QUICK_BATCH_SIZES) if args.quick else {}
    result = figure1(lrs, samplings, runs=args.runs, steps=args.steps, seed=args.seed,
                     progress=False if args.no_progress else None, **grid)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "figure1.csv")
    with open(csv_path, "w", newline="") as handle:
        csv.writer(handle).writerows(result.rows())
    print(f"figure 1 (n = {result.n}, lambda_1 = {result.sharpness:g}, {result.runs} runs x "
          f"{result.steps} steps per cell, w_0 ~ Uniform[0, 1)^d; a cell diverges when more than "
          f"half of its runs reach ||w_t||^2 >= 1000 ||w_0||^2)", file=out)
    print(f"{'lr':>5}  {'sampling':<20} {'cells':>5}  {'sim = exact':>11}  {'sim = Theorem 1':>15}", file=out)
    for lr, sampling in result.panels():
        agree_exact, agree_theorem = result.agreement(lr, sampling)
        cells = int(result.panel(lr, sampling).sum())
        print(f"{lr:>5g}  {sampling:<20} {cells:>5}  {100 * agree_exact:>10.1f}%  "
              f"{100 * agree_theorem:>14.1f}%", file=out)
    print(f"wrote {csv_path}", file=out)
    if not args.no_plot:
        from .plotting import plot_figure1_panel

        for lr, sampling in result.panels():
            path = os.path.join(args.out, f"figure1_lr{lr:g}_{sampling}.png")
            plot_figure1_panel(result, lr, sampling, path)
            print(f"wrote {path}", file=out)
    print(f"(computed in {result.elapsed_seconds:.1f} s)", file=out)


def _map(args, parser, out) -> None:
    from .phase import parse_grid, stability_map

    _check_plotting(parser, "map")
    family = HessianFamily.load(args.file)
    lrs = parse_grid(args.lrs, "--lrs")
    batch_sizes = parse_grid(args.batch_sizes, "--batch-sizes")
    result = stability_map(family, lrs, batch_sizes, sampling=args.sampling)
    from .plotting import plot_stability_map

    plot_stability_map(result, args.out)
    print(f"{family!r}, sampling = {args.sampling}: {batch_sizes.size} batch sizes x {lrs.size} "
          f"learning rates in {result.elapsed_seconds:.2f} s ({result.operator_products} operator products)", file=out)
    print(f"spectral radius from {np.min(result.spectral_radius):.6g} to "
          f"{np.max(result.spectral_radius):.6g} (largest error bound "
          f"{np.max(result.radius_error):.2g}); stable at {int(result.stable.sum())} of "
          f"{result.stable.size} grid points", file=out)
    print(f"{'batch size':>12}  {'critical lr':>14}", file=out)
    order = np.argsort(batch_sizes)
    step = max(1, order.size // 10)
    for index in list(order[::step]) + ([order[-1]] if (order.size - 1) % step else []):
        print(f"{batch_sizes[index]:>12.6g}  {result.critical_lr[index]:>14.8g}", file=out)
    if args.save:
        with open(args.save, "wb") as handle:
            np.savez(handle, lrs=result.lrs, batch_sizes=result.batch_sizes,
                     spectral_radius=result.spectral_radius, radius_error=result.radius_error,
                     critical_lr=result.critical_lr)
        print(f"wrote {args.save}", file=out)
    print(f"wrote {args.out}", file=out)


def _print_report(family: HessianFamily, lr: float, batch_size: float, sampling: str, out) -> None:
    from .report import report

    start = time.perf_counter()
    text = str(report(family, lr, batch_size, sampling=sampling))
    print(text, file=out)
    print(f"(computed in {time.perf_counter() - start:.2f} s)", file=out)


def main(argv=None, out=None) -> int:
    out = sys.stdout if out is None else out
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "reproduce":
            _reproduce(args, parser, out)
            return 0
        if args.command == "map":
            _map(args, parser, out)
            return 0
        if args.command == "analyze":
            family = HessianFamily.load(args.file)
            lr, batch_size = args.lr, args.batch_size
        else:
            family = demo_family()
            lr = 0.5 / family.sharpness() if args.lr is None else args.lr
            batch_size = 8.0 if args.batch_size is None else args.batch_size
            print(f"Built-in problem: least squares, n = {family.n} samples, d = {family.d} features "
                  f"(power-law covariance), lr = {lr:.6g}, batch size = {batch_size:g}.\n", file=out)
        _print_report(family, lr, batch_size, args.sampling, out)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        parser.exit(2, f"fastsgdstab {args.command}: error: {exc}\n")
    except BrokenPipeError:
        # The reader went away (``fastsgdstab demo | head``): stop quietly, as Unix tools do.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
