"""The ``fastsgdstab`` command (also ``python -m fastsgdstab``).

Subcommands:

* ``analyze FILE.npz --lr X --batch-size B [--sampling S]``: the stability report of a saved
  family (arrays ``factors`` (n, d, r), ``hessians`` (n, d, d) or ``features`` (n, d)).
* ``demo [--lr X] [--batch-size B] [--sampling S]``: the same on a built-in problem.
"""

from __future__ import annotations

import argparse
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
    return parser


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
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.exit(2, f"fastsgdstab {args.command}: error: {exc}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
