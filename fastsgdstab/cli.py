"""The ``fastsgdstab`` command (also ``python -m fastsgdstab``).

Subcommands:

* ``analyze FILE.npz --lr X --batch-size B [--sampling S]``: the stability report of a saved
  family (arrays ``factors`` (n, d, r), ``hessians`` (n, d, d) or ``features`` (n, d)).
* ``demo [--lr X] [--batch-size B] [--sampling S]``: the same on a built-in problem.
* ``reproduce figure1 [--lr ...] [--sampling ...] [--runs 10] [--steps 1000] [--out DIR] [--quick]``:
  the synthetic experiment of Dexter et al. with exact verdicts beside the simulated ones.
* ``map FILE.npz --lrs GRID --batch-sizes GRID [--sampling S] [--out map.png] [--force]``: the
  exact phase diagram of a saved family, printed as a table of critical learning rates; with
  ``--out`` also drawn (matplotlib). A GRID is ``0.1,0.2,0.5``, ``START:STOP:COUNT`` (evenly
  spaced, inclusive) or ``START:STOP:COUNT:log`` (geometric), combinable with commas. ``map``
  writes no file unasked (no ``--out``, no ``--save``: the table only) and never overwrites an
  existing file without ``--force``. Without matplotlib, ``map --out`` still prints the table,
  then says how to get the figure and exits with code 1 (the figure asked for was not written).
* ``warmup``: compile every Numba kernel into the disk cache once (after install, in CI), so
  that the first call of a later process compiles nothing.

Long commands show progress on stderr: a tqdm bar when stderr is a terminal; otherwise
``reproduce`` prints a line per panel and ``map`` a line per block of batch sizes once the run
has taken longer than ``PROGRESS_AFTER_SECONDS`` (``--no-progress``: neither).

Bad input (an unreadable or wrong file, an output path that cannot be written, a grid or run
count beyond the limits below, a value the library rejects, an unknown option, which is named
with the nearest known one) is reported on one line, ``fastsgdstab COMMAND: error: ...``, with
exit code 2, and is checked before any computing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from ._validation import check_batch_size, check_lr
from .family import HessianFamily
from ._config import PROGRESS_AFTER_SECONDS
from ._threads import limited_blas, operator_work
from .sampling import SAMPLING_SCHEMES

# Limits on what the command line accepts. They reject typos and hostile input before anything
# is allocated or computed; the Python API has no such limits.
#
# Values per --lrs or --batch-sizes grid of ``map``. A grid is materialised as float64 before
# anything else happens ("0.1:1:1000000000" would be 8 GB), and each value is a row or column
# of the map: 100,000 is already far more than a 640 x 480 PNG can show.
MAX_GRID_VALUES = 100_000
# Grid points (lrs x batch sizes) of ``map``: the result holds three float64 arrays of that
# size and every point costs at least one small dense eigensolve; a million points is 24 MB
# and a long run already.
MAX_MAP_POINTS = 1_000_000
# ``reproduce``: runs per cell and steps per run. Each cell keeps a (runs, d) array of iterates
# (d <= n = 100: 100,000 runs is 80 MB), and the full grid has 14,700 cells with the default
# panels, so 10^7 steps per run (the paper uses 10 runs of 1000 steps) is already days of computing.
MAX_RUNS = 100_000
MAX_STEPS = 10_000_000
# Seeds of ``simulate`` lie in [0, 2**63); cell i of ``figure1`` uses seed + i.
_SEED_END = 2**63
# ``map`` reports progress after each of this many blocks of rows (batch sizes, in increasing
# order). The rows are one ``stability_map`` computation through one shared basis (issue 19: a
# block no longer starts its basis afresh), so the blocks cost no extra operator product.
MAP_PROGRESS_BLOCKS = 10


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
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastsgdstab",
        description="Will SGD with this learning rate and batch size stay near the minimum, or blow up?",
    )
    parser.add_argument("--version", action="version", version=f"fastsgdstab {__version__}")
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
    reproduce.add_argument("--runs", type=int, default=10,
                           help=f"runs per cell, 1..{MAX_RUNS:,} (default 10)")
    reproduce.add_argument("--steps", type=int, default=1000,
                           help=f"steps per run, 1..{MAX_STEPS:,} (default 1000)")
    reproduce.add_argument("--seed", type=int, default=0, help="base random seed, >= 0 (default 0)")
    reproduce.add_argument("--out", default="figure1", metavar="DIR",
                           help="output directory for figure1.csv and the PNGs (default ./figure1)")
    reproduce.add_argument("--quick", action="store_true",
                           help="a coarse grid (sigma 1, 8, ..., 50; B 1, 7, ..., 49): seconds, not minutes")
    reproduce.add_argument("--no-plot", action="store_true", help="write the CSV only (no matplotlib needed)")
    reproduce.add_argument("--no-progress", action="store_true", help="no progress bar")
    reproduce.add_argument("--scheduler", default=None, metavar="ADDRESS",
                           help="run the cells on the Dask cluster whose scheduler is at ADDRESS "
                                "(e.g. tcp://10.0.0.5:8786; needs the 'distributed' extra)")

    phase_map = commands.add_parser(
        "map", help="exact phase diagram (spectral radius on an lr x batch-size grid) of a saved family")
    phase_map.add_argument("file", help=".npz file holding 'factors' (n, d, r), 'hessians' (n, d, d) or 'features' (n, d)")
    phase_map.add_argument("--lrs", required=True, metavar="GRID",
                           help="learning rates: 0.1,0.2 or START:STOP:COUNT or START:STOP:COUNT:log "
                                f"(at most {MAX_GRID_VALUES:,} values per grid, "
                                f"{MAX_MAP_POINTS:,} grid points)")
    phase_map.add_argument("--batch-sizes", required=True, metavar="GRID",
                           help="batch sizes in [1, n], same syntax (e.g. 1:1000:50:log)")
    phase_map.add_argument("--sampling", choices=SAMPLING_SCHEMES, default="bernoulli",
                           help="batch sampling scheme (default: bernoulli, the paper's model)")
    phase_map.add_argument("--out", default=None, metavar="IMAGE",
                           help="also draw the map into IMAGE (e.g. map.png; the format follows the "
                                "extension, PNG without one; needs matplotlib). Default: no image, "
                                "the table only")
    phase_map.add_argument("--force", action="store_true",
                           help="overwrite an existing --out or --save file (default: refuse)")
    phase_map.add_argument("--scheduler", default=None, metavar="ADDRESS",
                           help="compute the map on the Dask cluster whose scheduler is at ADDRESS "
                                "(e.g. tcp://10.0.0.5:8786; needs the 'distributed' extra)")
    phase_map.add_argument("--save", default=None, metavar="FILE.npz",
                           help="also save the grid, spectral radius, error bounds and critical lrs "
                                "(in an existing directory)")
    phase_map.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    commands.add_parser(
        "warmup", help="compile every Numba kernel into the disk cache (once, after install or in CI)")
    return parser


QUICK_SIGMAS = range(1, 51, 7)
QUICK_BATCH_SIZES = range(1, 50, 6)


def _check_plotting(parser, command: str) -> None:
    from .plotting import PLOT_EXTRA_MESSAGE

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(2, f"fastsgdstab {command}: error: {PLOT_EXTRA_MESSAGE}\n")


# ------------------------------------------------------------------ checks before computing
def _check_output_file(path: str, option: str, overwrite: bool = True) -> None:
    """``path`` can be written as a file: not a directory, in an existing writable directory
    (and, unless ``overwrite``, not an existing file)."""
    if not path:
        raise ValueError(f"{option} must not be empty")
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a directory; give a file name")
    if os.path.lexists(path):
        if not overwrite:
            raise ValueError(f"{option} {path} exists; add --force to overwrite it")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{option} {path} exists and is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: directory {os.path.dirname(path) or parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: directory {parent} is not writable")


def _check_output_directory(path: str, option: str, files) -> None:
    """``path`` is a directory, or can be created, and ``files`` can be written inside it."""
    if not path:
        raise ValueError(f"{option} must not be empty")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path} exists and is not a directory")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {path}: directory is not writable")
        for name in files:
            _check_output_file(os.path.join(path, name), option)
        return
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{option} {path}: cannot create it, {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot create it, directory {existing} is not writable")


def _check_count(value: int, option: str, largest: int) -> int:
    if not 1 <= value <= largest:
        raise ValueError(f"{option} must be an integer in [1, {largest:,}]; got {value}")
    return value


def parse_grid(text: str, name: str = "grid") -> np.ndarray:
    """Parse a grid of numbers from the command line.

    Accepted forms, combinable with commas:

    * ``0.1,0.2,0.5``: a list;
    * ``START:STOP:COUNT``: COUNT evenly spaced values from START to STOP inclusive
      (``numpy.linspace``); COUNT must be an integer >= 1;
    * ``START:STOP:COUNT:log``: the same, geometrically spaced (``numpy.geomspace``).

    Parameters
    ----------
    text : str
        The grid, as typed.
    name : str, default "grid"
        Named in error messages (the option, e.g. ``--lrs``).

    Returns
    -------
    ndarray of float
        The values in the order given (not sorted, repeats kept).

    Raises
    ------
    ValueError
        A part that is none of the forms, a COUNT that is not an integer >= 1, a geometric
        range that is not positive, or no values at all; the message starts with ``name``.

    Examples
    --------
    >>> parse_grid("0.01:1:5").round(4).tolist()
    [0.01, 0.2575, 0.505, 0.7525, 1.0]
    >>> parse_grid("1:100:3:log").tolist()
    [1.0, 10.0, 100.0]
    >>> parse_grid("1,2,4:8:3").tolist()
    [1.0, 2.0, 4.0, 6.0, 8.0]
    """
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        fields = part.split(":")
        try:
            if len(fields) == 1:
                values.append(float(fields[0]))
                continue
            if len(fields) not in (3, 4) or (len(fields) == 4 and fields[3] != "log"):
                raise ValueError
            start, stop, count = float(fields[0]), float(fields[1]), fields[2]
            if not count.isdigit() or int(count) < 1:
                raise ValueError
            space = np.geomspace if len(fields) == 4 else np.linspace
            if space is np.geomspace and (start <= 0 or stop <= 0):
                raise ValueError
            values.extend(space(start, stop, int(count)).tolist())
        except ValueError:
            raise ValueError(
                f"{name}: cannot read {part!r}; use numbers separated by commas, START:STOP:COUNT "
                f"(evenly spaced, inclusive) or START:STOP:COUNT:log (geometric, positive)"
            ) from None
    if not values:
        raise ValueError(f"{name}: no values in {text!r}")
    return np.array(values)


def _grid_size(text: str) -> int:
    """Values ``parse_grid`` would produce from ``text``, counted without producing them.

    Follows parse_grid's syntax; a part it would reject counts as one value (parse_grid then
    reports it).
    """
    total = 0
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        fields = part.split(":")
        count = fields[2] if len(fields) in (3, 4) else ""
        if count.isdecimal() and count.isascii():
            digits = count.lstrip("0")
            total += int(digits or "0") if len(digits) <= 18 else 10**18
        else:
            total += 1
    return total


def _read_grid(text: str, option: str) -> np.ndarray:
    size = _grid_size(text)
    if size > MAX_GRID_VALUES:
        raise ValueError(f"{option}: {text!r} has {size:,} values; at most {MAX_GRID_VALUES:,} "
                         f"per grid are accepted")
    return parse_grid(text, option)


def _image_path(path: str) -> str:
    """Where matplotlib will write ``path``: with ``.png`` appended when it has no extension."""
    return path if os.path.splitext(path)[1] else path + ".png"


def _check_image_format(path: str, option: str) -> None:
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(path)[1][1:].lower()
    if extension not in formats:
        raise ValueError(f"{option} {path}: matplotlib cannot write .{extension} files; use .png "
                         f"(or one of {', '.join('.' + name for name in sorted(formats))})")


# ------------------------------------------------------------------ commands
def _reproduce(args, parser, out) -> None:
    import csv
    import inspect

    from .experiments import FIGURE1_LRS, FIGURE1_SAMPLINGS, figure1

    _check_count(args.runs, "--runs", MAX_RUNS)
    _check_count(args.steps, "--steps", MAX_STEPS)
    # Repeated values would be repeated panels (and cells with the same index): keep the first.
    lrs = tuple(dict.fromkeys(args.lr)) if args.lr else FIGURE1_LRS
    samplings = tuple(dict.fromkeys(args.sampling)) if args.sampling else FIGURE1_SAMPLINGS
    if args.quick:
        grid = dict(sigmas=QUICK_SIGMAS, batch_sizes=QUICK_BATCH_SIZES)
    else:
        defaults = inspect.signature(figure1).parameters
        grid = {name: defaults[name].default for name in ("sigmas", "batch_sizes")}
    cells = len(lrs) * len(samplings) * len(grid["sigmas"]) * len(grid["batch_sizes"])
    if not 0 <= args.seed <= _SEED_END - cells:
        raise ValueError(f"--seed must be an integer in [0, 2**63 - {cells}] (cell i uses seed + i); "
                         f"got {args.seed}")
    pngs = [] if args.no_plot else [f"figure1_lr{lr:g}_{sampling}.png" for lr in lrs for sampling in samplings]
    _check_output_directory(args.out, "--out", ["figure1.csv", *pngs])
    if not args.no_plot:
        _check_plotting(parser, "reproduce")
    progress = _reproduce_progress(args.no_progress, len(lrs) * len(samplings))
    if args.scheduler:
        from . import _distributed

        result = _distributed.on_scheduler(args.scheduler, _distributed.figure1, lrs, samplings,
                                           runs=args.runs, steps=args.steps, seed=args.seed,
                                           progress=False if args.no_progress else None, **grid)
    else:
        result = figure1(lrs, samplings, runs=args.runs, steps=args.steps, seed=args.seed,
                         progress=progress, **grid)
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


def _reproduce_progress(disabled: bool, panels: int):
    """``figure1``'s progress: False, None (its tqdm bar, stderr a terminal) or a callable that
    prints a line per panel on stderr (not a terminal: logs, CI)."""
    if disabled:
        return False
    if _is_terminal(sys.stderr):
        return None
    started = time.perf_counter()
    done_panels = []

    def line(lr, sampling, cells_done, cells_total):
        done_panels.append((lr, sampling))
        print(f"figure1: panel {len(done_panels)} of {panels} (lr = {lr:g}, {sampling}) done, "
              f"{cells_done} of {cells_total} cells, {time.perf_counter() - started:.1f} s",
              file=sys.stderr, flush=True)

    return line


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class _MapProgress:
    """Progress of ``map`` over its blocks of rows, on stderr: a tqdm bar (terminal) or a line
    per block once the run has taken longer than ``PROGRESS_AFTER_SECONDS`` (not a terminal)."""

    def __init__(self, rows: int, enabled: bool):
        self.rows = rows
        self.done = 0
        self.started = time.perf_counter()
        self.enabled = enabled
        self.bar = None
        if enabled and _is_terminal(sys.stderr):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=rows, unit="batch size", desc="map", file=sys.stderr,
                            dynamic_ncols=True, delay=PROGRESS_AFTER_SECONDS)

    def update(self, batch_sizes: np.ndarray) -> None:
        self.done += batch_sizes.size
        if self.bar is not None:
            self.bar.update(batch_sizes.size)
            return
        elapsed = time.perf_counter() - self.started
        if self.enabled and elapsed > PROGRESS_AFTER_SECONDS:
            print(f"map: batch sizes {np.min(batch_sizes):g} to {np.max(batch_sizes):g} done, "
                  f"{self.done} of {self.rows} rows, {elapsed:.1f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _RowProgress:
    """Called after each row of the map (batch sizes in increasing order): reports a block of
    rows to ``_MapProgress`` each time one of ``MAP_PROGRESS_BLOCKS`` blocks is done."""

    def __init__(self, bar: _MapProgress, sorted_batch_sizes: np.ndarray):
        self.bar = bar
        self.rows = sorted_batch_sizes
        blocks = np.array_split(np.arange(self.rows.size), min(MAP_PROGRESS_BLOCKS, self.rows.size))
        self.block_ends = [int(block[-1]) + 1 for block in blocks if block.size]
        self.done = 0
        self.reported = 0

    def __call__(self) -> None:
        self.done += 1
        while self.block_ends and self.done >= self.block_ends[0]:
            end = self.block_ends.pop(0)
            self.bar.update(self.rows[self.reported:end])
            self.reported = end


def _stability_map_in_blocks(family, lrs, batch_sizes, sampling: str, progress: bool):
    """``stability_map`` with progress on stderr between blocks of rows (batch sizes in
    increasing order): one ``stability_map`` call, so one shared basis across all rows (the
    Python API's own computation: the same answers and operator products), its rows reported
    per block through its per-row callback."""
    from . import phase

    # Every value checked before anything is computed.
    family, lrs, batch_sizes, sampling, _, _, _ = phase.check_map_arguments(
        family, lrs, batch_sizes, sampling)
    bar = _MapProgress(batch_sizes.size, progress)
    try:
        with limited_blas(operator_work(family)):
            return phase.stability_map(family, lrs, batch_sizes, sampling=sampling,
                                       progress=_RowProgress(bar, np.sort(batch_sizes)))
    finally:
        bar.close()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _map(args, parser, out) -> int:
    """``map``: 0, or 1 when the image asked for could not be drawn (no matplotlib)."""
    lrs = _read_grid(args.lrs, "--lrs")
    batch_sizes = _read_grid(args.batch_sizes, "--batch-sizes")
    if lrs.size * batch_sizes.size > MAX_MAP_POINTS:
        raise ValueError(f"--lrs x --batch-sizes is {lrs.size:,} x {batch_sizes.size:,} = "
                         f"{lrs.size * batch_sizes.size:,} grid points; at most {MAX_MAP_POINTS:,} "
                         f"are accepted")
    image = None
    if args.out is not None:
        _check_output_file(args.out, "--out", overwrite=args.force)
        image = _image_path(args.out)
        _check_output_file(image, "--out", overwrite=args.force)
    if args.save:
        _check_output_file(args.save, "--save", overwrite=args.force)
        if image is not None and os.path.abspath(args.save) == os.path.abspath(image):
            raise ValueError(f"--out and --save name the same file, {image}")
    plotting = image is not None and _has_matplotlib()
    if plotting:
        _check_image_format(image, "--out")
    family = HessianFamily.load(args.file)
    if args.scheduler:
        from . import _distributed

        result = _distributed.on_scheduler(args.scheduler, _distributed.stability_map, family, lrs,
                                           batch_sizes, sampling=args.sampling)
    else:
        result = _stability_map_in_blocks(family, lrs, batch_sizes, args.sampling,
                                          progress=not args.no_progress)
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
    if image is None:
        print("(no image written: add --out map.png to draw the phase diagram; needs matplotlib)",
              file=out)
        return 0
    if not plotting:
        from .plotting import PLOT_EXTRA_MESSAGE

        out.flush()
        print(f"fastsgdstab map: no image written to {image}: {PLOT_EXTRA_MESSAGE} "
              f"(the table above needs no matplotlib)", file=sys.stderr)
        return 1
    from .plotting import plot_stability_map

    plot_stability_map(result, image)
    print(f"wrote {image}", file=out)
    return 0


def warmup(out=None) -> list:
    """Compile every Numba kernel of the package into the disk cache, through the public
    functions, on tiny problems: every sampling scheme, rank 1 and rank 2 families, with and
    without momentum where the functions take it, and ``simulate`` on families with per-sample
    gradients (the affine kernel).

    After it, the first call of a fresh process loads machine code instead of compiling it
    (docs/performance.md has the figures). Run once after install and in CI
    (``fastsgdstab warmup``); with ``NUMBA_CACHE_DIR`` set, the cache goes there. Calls that
    find their kernels cached cost milliseconds, so a second warmup is quick.

    Parameters
    ----------
    out : file, optional
        Where a line per step is printed (none by default).

    Returns
    -------
    list of (str, float)
        Each step and its seconds.

    Raises
    ------
    OSError
        Not raised for an unwritable cache: Numba then warns and compiles in memory only.

    Examples
    --------
    >>> steps = warmup()                       # doctest: +SKIP
    >>> [name for name, seconds in steps][:2]  # doctest: +SKIP
    ['critical_lr', 'spectral_radius']
    """
    import inspect
    import warnings

    from . import experiments, geometry, moments, phase, sampling, simulation, theory

    exact_schemes = sampling.SAMPLING_SCHEMES
    simulation_schemes = getattr(sampling, "SIMULATION_SAMPLING_SCHEMES", exact_schemes)
    rng = np.random.default_rng(0)
    families = [HessianFamily.from_features(rng.standard_normal((12, 3))),
                HessianFamily(rng.standard_normal((12, 3, 2)))]
    simulate_options = [{}]
    if "momentum" in inspect.signature(simulation.simulate).parameters:
        simulate_options.append({"momentum": 0.5})
    steps_taken = []

    def step(name, call):
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
        steps_taken.append((name, seconds))
        if out is not None:
            print(f"{name}: {seconds:.2f} s", file=out, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny problems: simulation warnings are noise here
        for family in families:
            tag = f"rank {family.rank}"
            step(f"critical_lr ({tag})", lambda: [moments.critical_lr(family, 4, sampling=s)
                                                  for s in exact_schemes])
            step(f"spectral_radius ({tag})", lambda: moments.spectral_radius(family, 0.1, 4))
            step(f"critical_batch_size ({tag})", lambda: moments.critical_batch_size(family, 0.1))
            step(f"second_moment ({tag})", lambda: moments.second_moment(family, 0.1, 4, 3))
            step(f"stability_map ({tag})", lambda: phase.stability_map(family, [0.1, 1.0], [2, 6]))
            if "momentum" in inspect.signature(moments.critical_lr).parameters:
                step(f"momentum ({tag})", lambda: (
                    moments.critical_lr(family, 4, momentum=0.5),
                    moments.spectral_radius(family, 0.1, 4, momentum=0.5),
                    moments.second_moment(family, 0.1, 4, 3, momentum=0.5),
                    phase.stability_map(family, [0.1, 1.0], [2, 6], momentum=0.5)))
            step(f"geometry ({tag})", lambda: (
                geometry.coherence(family), geometry.coherence(family, store_limit=1),  # matrix-free
                geometry.non_uniformity(family), geometry.sample_sharpness(family)))
            step(f"theory ({tag})", lambda: (theory.theorem1(family, 0.1, 4), theory.lemma1(family, 0.1, 4),
                                             theory.rayleigh_bounds(family, 4)))
            for scheme in simulation_schemes:
                for options in simulate_options:
                    label = ", ".join([scheme, tag] + [f"{k}={v}" for k, v in options.items()])
                    step(f"simulate ({label})", lambda: (
                        simulation.simulate(family, 0.1, 4, 3, 4, sampling=scheme, progress=False,
                                            **options),
                        simulation.simulate(family, 0.1, 4, 3, 4, sampling=scheme, init="uniform",
                                            record_every=2, progress=False, **options),
                        simulation.simulate(family, 0.1, 4, 3, 4, sampling=scheme,
                                            init=np.ones(family.d), progress=False, **options)))
            # a family with per-sample gradients: the affine kernel (chunk_affine)
            gradients = rng.standard_normal((family.n, family.d))
            noisy = HessianFamily(family.factors, gradients=gradients - gradients.mean(axis=0))
            step(f"simulate with gradients ({tag})", lambda: [
                simulation.simulate(noisy, 0.1, 4, 3, 4, sampling=scheme, progress=False,
                                    **options)
                for scheme in simulation_schemes for options in simulate_options])
            # the loss floor's trajectory with momentum (affine_momentum_trajectory)
            step(f"second_moment with gradients ({tag})", lambda: [
                moments.second_moment(noisy, 0.1, 4, 3, **options) for options in simulate_options])
        # a map through the shared basis (phase._Basis, kernel sandwich_operator): the basis
        # needs k (k + 1) / 2 >= 8 symmetric directions, more than the rank 1 and 2 families give
        wide = HessianFamily.from_features(rng.standard_normal((12, 6)))
        step("stability_map (shared basis)", lambda: phase.stability_map(wide, [0.1, 1.0], [2, 6]))
        step("figure1", lambda: experiments.figure1(lrs=[0.5], samplings=["bernoulli"], sigmas=[1],
                                                    batch_sizes=[1], n=4, runs=2, steps=2,
                                                    progress=False))
    return steps_taken


def _print_report(family: HessianFamily, lr: float, batch_size: float, sampling: str, out) -> None:
    from .reporting import report

    start = time.perf_counter()
    with limited_blas(operator_work(family)):
        text = str(report(family, lr, batch_size, sampling=sampling))
    print(text, file=out)
    print(f"(computed in {time.perf_counter() - start:.2f} s)", file=out)


def main(argv=None, out=None) -> int:
    out = sys.stdout if out is None else out
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    _check_option_names(parser, argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "reproduce":
            _reproduce(args, parser, out)
            return 0
        if args.command == "map":
            return _map(args, parser, out)
        if args.command == "warmup":
            warmup(out)
            return 0
        if args.command == "analyze":
            family = HessianFamily.load(args.file)
            lr, batch_size = args.lr, args.batch_size
        else:
            family = demo_family()
            lr = 0.5 / family.sharpness() if args.lr is None else check_lr(args.lr)
            batch_size = 8.0 if args.batch_size is None else args.batch_size
            check_batch_size(batch_size, family.n, integer=args.sampling != "bernoulli")
            print(f"Built-in problem: least squares, n = {family.n} samples, d = {family.d} features "
                  f"(power-law covariance), lr = {lr:.6g}, batch size = {batch_size:g}.\n", file=out)
        _print_report(family, lr, batch_size, args.sampling, out)
    except BrokenPipeError:  # before OSError, of which it is a subclass
        # The reader went away (``fastsgdstab demo | head``): stop quietly, as Unix tools do.
        if out is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError, ImportError) as exc:
        _fail(parser, args.command, exc)
    except TypeError as exc:
        # Bad arguments reach the library as TypeError only through its argument checks
        # (fastsgdstab._validation); any other TypeError is a bug and keeps its traceback.
        if not _raised_by_validation(exc):
            raise
        _fail(parser, args.command, exc)
    return 0


# Spellings a newcomer tries that are no prefix or near miss of the real option.
_OPTION_SYNONYMS = {"--learning-rate": "--lr", "--learning-rates": "--lrs", "--eta": "--lr",
                    "--step-size": "--lr", "--rate": "--lr", "--bs": "--batch-size",
                    "--batch": "--batch-size", "--batchsize": "--batch-size",
                    "--minibatch-size": "--batch-size", "--output": "--out", "--scheme": "--sampling",
                    "--samples": "--sampling", "--quiet": "--no-progress", "--overwrite": "--force"}


def _subparsers(parser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_strings(parser) -> list:
    return [option for action in parser._actions for option in action.option_strings
            if option.startswith("--")]


def _nearest_option(word: str, known: list) -> str | None:
    """The known option ``word`` was probably meant to be: ``_`` for ``-``, a synonym, or the
    closest by ``difflib``."""
    import difflib

    normal = word.lower().replace("_", "-")
    candidates = [normal, _OPTION_SYNONYMS.get(normal, ""), _OPTION_SYNONYMS.get(normal.rstrip("s"), "")]
    for candidate in candidates:
        if candidate in known:
            return candidate
        prefixed = [option for option in known if candidate and option.startswith(candidate)]
        if len(prefixed) == 1:
            return prefixed[0]
    close = difflib.get_close_matches(normal, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _check_option_names(parser, argv: list) -> None:
    """Exit 2 naming the first unknown ``--option`` of ``argv`` and the one meant, before
    argparse sees it (argparse names it only among "unrecognized arguments", after any
    missing-argument error the misspelling itself caused)."""
    commands = _subparsers(parser)
    current, command = parser, None
    for token in argv:
        if token == "--":
            return
        if command is None and token in commands:
            current, command = commands[token], token
            continue
        if not token.startswith("--") or token == "--":
            continue
        word = token.split("=", 1)[0]
        known = _option_strings(current) + ["--help"]
        if word in known or len([option for option in known if option.startswith(word)]) == 1:
            continue  # exact, or an unambiguous abbreviation (argparse accepts those)
        name = f"fastsgdstab {command}" if command else "fastsgdstab"
        suggestion = _nearest_option(word, known)
        hint = f"; did you mean {suggestion}?" if suggestion else ""
        options = ", ".join(sorted(set(known)))
        parser.exit(2, f"{name}: error: unknown option {word}{hint} (options: {options})\n")


def _fail(parser, command: str, exc: BaseException) -> None:
    """Exit 2 with ``fastsgdstab COMMAND: error: MESSAGE`` on one line."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"  # not "[Errno 2] No such file or directory: 'x'"
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    parser.exit(2, f"fastsgdstab {command}: error: {_command_line_syntax(text)}\n")


# The library's argument names and their command-line spellings, longest first so that
# "batch_sizes" is not read as "batch_size" + "s".
_OPTION_NAMES = (("batch_sizes", "--batch-sizes"), ("batch_size", "--batch-size"),
                 ("lrs", "--lrs"), ("lr", "--lr"), ("sampling", "--sampling"))


def _command_line_syntax(text: str) -> str:
    """A library message in command-line terms: ``batch_size must ...`` -> ``--batch-size must
    ...``, ``sampling='bernoulli'`` -> ``--sampling bernoulli``."""
    import re

    text = re.sub(r"\bsampling=['\"](\w+)['\"]", r"--sampling \1", text)
    for name, option in _OPTION_NAMES:
        text = re.sub(rf"(?<![-\w]){name}(?=\s+must\b)", option, text)
    return text


def _raised_by_validation(exc: BaseException) -> bool:
    traceback = exc.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and traceback.tb_frame.f_globals.get("__name__") == "fastsgdstab._validation"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
