"""Figure 1 of Dexter et al. (ICLR 2024): their synthetic experiment, with exact verdicts.

For every integer coherence sigma, Theorem 2's family (:func:`fastsgdstab.theory.theorem2_family`);
for every cell (lr, sampling, sigma, batch size), ``runs`` runs of linearised SGD and, beside
their verdict, the exact mean-square one and Theorem 1's. The closed forms come from
:mod:`fastsgdstab.theory`; this module only runs the grid and collects the verdicts.

``figure1`` is split by concern: ``_check_arguments`` (the grids), ``_cells`` (the cell list in
seed order), ``_run_cells`` (panel by panel) and ``_run_cell`` (the simulations and verdicts), ``_assemble`` (the
result).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sys
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .._config import DECISION_MARGIN
from .._validation import check_grid, check_lrs
from ..moments import critical_lr
from ..sampling import check_sampling
from ..simulation import simulate
from .._threads import limited_blas
from ..theory import theorem1_closed_form_diverges, theorem2_bernoulli_diverges, theorem2_family

__all__ = ["FIGURE1_LRS", "FIGURE1_SAMPLINGS", "FIGURE1_TYPICAL_BUDGET", "Figure1", "figure1"]

FIGURE1_LRS = (0.2, 0.5, 0.8)
FIGURE1_SAMPLINGS = ("bernoulli", "without_replacement")
FIGURE1_TYPICAL_BUDGET = {"runs": 64, "steps": 1000}
"""``figure1(typical=True)``'s budget per (sigma, sampling, batch size): smaller than
``typical_critical_lr``'s default (a full grid has thousands of cells); a mapping passed as
``typical`` replaces it."""


@dataclass(frozen=True)
class Figure1:
    """The paper's synthetic experiment, one entry per cell; see :func:`figure1`.

    Cells are (lr, sampling, sigma, batch_size); every array below has one entry per cell.

    Attributes
    ----------
    lr, sampling, batch_size, sigma : ndarray
        The cell.
    diverged_runs : ndarray of int
        Runs flagged by the paper's rule, ``||w_t||^2 >= 1000 ||w_0||^2`` at some ``t <= steps``.
    simulated_diverges : ndarray of bool
        More than half of the runs diverged (the paper's verdict; a typical-run statement).
    exact_diverges : ndarray of bool
        The exact mean-square verdict, ``rho(Q) > 1``: the closed form of Theorem 2 for
        Bernoulli sampling (:func:`fastsgdstab.theory.theorem2_bernoulli_diverges`, in exact
        rational arithmetic), the engine's critical lr otherwise. A cell exactly on the
        boundary (``rho = 1``) is not divergent.
    theorem1_diverges : ndarray of bool
        Theorem 1's condition holds (:func:`fastsgdstab.theory.theorem1_closed_form_diverges`,
        exact rational arithmetic with the construction's coherence sigma and sharpness); False
        means inconclusive, not "converges".
    critical_lr : ndarray
        The exact critical learning rate of the cell's family, batch size and sampling.
    runs, steps, seed, n, sharpness : int or float
        The settings.
    elapsed_seconds : float
    typical_lr : ndarray or None
        With ``figure1(..., typical=True)``: the typical (Lyapunov) critical lr of the cell's
        family, batch size and sampling (:func:`fastsgdstab.typical_critical_lr`, an estimate;
        the same for every lr panel); None otherwise. ``typical_lr > lr``: a typical run of the
        cell shrinks.
    typical_interval : ndarray, shape (cells, 2), or None
        Its interval (nominal coverage 95%).
    """

    lr: np.ndarray
    sampling: np.ndarray
    batch_size: np.ndarray
    sigma: np.ndarray
    diverged_runs: np.ndarray
    simulated_diverges: np.ndarray
    exact_diverges: np.ndarray
    theorem1_diverges: np.ndarray
    critical_lr: np.ndarray
    runs: int
    steps: int
    seed: int
    n: int
    sharpness: float
    elapsed_seconds: float
    typical_lr: np.ndarray | None = None
    typical_interval: np.ndarray | None = None

    @property
    def typical_diverges(self) -> np.ndarray | None:
        """Per cell, ``lr > typical_lr`` (a typical run grows); None without ``typical``."""
        return None if self.typical_lr is None else self.lr > self.typical_lr

    def panels(self) -> list:
        """The (lr, sampling) pairs, in the order they were run."""
        seen = []
        for pair in zip(self.lr.tolist(), self.sampling.tolist()):
            if pair not in seen:
                seen.append(pair)
        return seen

    def panel(self, lr, sampling) -> np.ndarray:
        """Boolean mask of the cells of one panel."""
        return (self.lr == lr) & (self.sampling == sampling)

    def agreement(self, lr, sampling) -> tuple:
        """``(simulated vs exact, simulated vs Theorem 1)``: fractions of the panel's cells whose
        verdicts agree (Theorem 1 inconclusive counts as "does not diverge")."""
        mask = self.panel(lr, sampling)
        simulated = self.simulated_diverges[mask]
        return (float(np.mean(simulated == self.exact_diverges[mask])),
                float(np.mean(simulated == self.theorem1_diverges[mask])))

    def rows(self):
        """CSV rows (header first): lr, sampling, batch_size, sigma, diverged_runs, runs,
        simulated, exact, theorem1, critical_lr."""
        yield ["lr", "sampling", "batch_size", "sigma", "diverged_runs", "runs", "simulated",
               "exact", "theorem1", "critical_lr"]
        for i in range(self.lr.size):
            yield [repr(float(self.lr[i])), str(self.sampling[i]), int(self.batch_size[i]),
                   int(self.sigma[i]), int(self.diverged_runs[i]), self.runs,
                   "diverges" if self.simulated_diverges[i] else "converges",
                   "diverges" if self.exact_diverges[i] else "stable",
                   "diverges" if self.theorem1_diverges[i] else "inconclusive",
                   repr(float(self.critical_lr[i]))]


class _Cell(NamedTuple):
    lr: float
    sampling: str
    sigma: int
    batch_size: int


class _Outcome(NamedTuple):
    diverged_runs: int
    simulated_diverges: bool
    exact_diverges: bool
    theorem1_diverges: bool
    critical_lr: float


# ------------------------------------------------------------------ argument checks
def _check_integers(values, name: str, n: int) -> list:
    array = check_grid(list(values), name)
    if np.any(array != np.round(array)) or np.any(array < 1) or np.any(array > n):
        raise ValueError(f"{name} must be integers in [1, n] = [1, {n}]; got {array.tolist()}")
    return [int(v) for v in array]


def _check_typical(typical) -> dict | None:
    """None (no typical thresholds) or the keyword arguments of ``typical_critical_lr``."""
    if isinstance(typical, (bool, np.bool_)):
        return dict(FIGURE1_TYPICAL_BUDGET) if typical else None
    if isinstance(typical, dict):
        allowed = {"runs", "steps", "burn_in", "level"}
        unknown = sorted(set(typical) - allowed)
        if unknown:
            raise ValueError(f"typical must be a bool or a dict with keys among {sorted(allowed)} "
                             f"(typical_critical_lr's budget); got the keys {unknown}")
        return {**FIGURE1_TYPICAL_BUDGET, **typical}
    raise TypeError(f"typical must be a bool or a dict of typical_critical_lr's budget (runs, "
                    f"steps, burn_in, level); got {typical!r} of type {type(typical).__name__}")


def _typical_cells(cells, budget: dict, *, seed, n, sharpness):
    """``(typical_lr, typical_interval)`` per cell: ``typical_critical_lr`` once per (sigma,
    sampling, batch size), with the seed of its first cell (it does not depend on the lr)."""
    from ..typical import typical_critical_lr

    results = {}
    families = {}
    for index, cell in enumerate(cells):
        key = (cell.sigma, cell.sampling, cell.batch_size)
        if key not in results:
            if cell.sigma not in families:
                families[cell.sigma] = theorem2_family(n, cell.sigma, sharpness)
            results[key] = typical_critical_lr(families[cell.sigma], cell.batch_size,
                                               sampling=cell.sampling, seed=seed + index,
                                               **budget)
    chosen = [results[(cell.sigma, cell.sampling, cell.batch_size)] for cell in cells]
    return (np.array([r.value for r in chosen], dtype=float),
            np.array([r.interval for r in chosen], dtype=float).reshape(len(cells), 2))


def _check_arguments(lrs, samplings, sigmas, batch_sizes, n) -> tuple[list, list, list, list]:
    """The four grids as lists (floats, scheme names, integers in [1, n]), each without repeats."""
    lrs = [float(lr) for lr in check_lrs(lrs)]
    samplings = [check_sampling(sampling) for sampling in samplings]
    if not samplings:
        raise ValueError("samplings must name at least one sampling scheme")
    sigmas = _check_integers(sigmas, "sigmas", n)
    batch_sizes = _check_integers(batch_sizes, "batch_sizes", n)
    for name, values in [("lrs", lrs), ("samplings", samplings), ("sigmas", sigmas),
                         ("batch_sizes", batch_sizes)]:
        if len(set(values)) < len(values):
            # a repeated value would repeat cells (and panels): say so rather than guess
            raise ValueError(f"{name} must not repeat a value; got {values}")
    return lrs, samplings, sigmas, batch_sizes


# ------------------------------------------------------------------ the cells
def _cells(lrs, samplings, sigmas, batch_sizes) -> list:
    """Every cell in seed order: lr, then sampling, sigma and batch size (the last varying
    fastest). Cell i uses seed ``seed + i``."""
    return [_Cell(*cell) for cell in itertools.product(lrs, samplings, sigmas, batch_sizes)]


# ------------------------------------------------------------------ running
def _run_cell(cell: _Cell, family, eta: float, *, runs, steps, seed, n, sharpness) -> _Outcome:
    """Simulate one cell and decide its three verdicts; ``eta`` is its exact critical lr."""
    with warnings.catch_warnings():
        # The sample mean square is not used here; its warning is noise.
        warnings.simplefilter("ignore")
        result = simulate(family, cell.lr, cell.batch_size, steps, runs, seed=seed,
                          sampling=cell.sampling, init="uniform", record_every=steps,
                          progress=False)
    diverged = int(result.diverged.sum())
    if cell.sampling == "bernoulli":
        exact = theorem2_bernoulli_diverges(cell.lr, sharpness, n, cell.sigma, cell.batch_size,
                                            exact=True)
    else:
        # No closed form: the engine's critical lr, a tie (rho = 1 to its accuracy) not divergent.
        exact = cell.lr > eta * (1.0 + DECISION_MARGIN)
    theorem1 = theorem1_closed_form_diverges(cell.lr, sharpness, n, cell.sigma, cell.batch_size,
                                             exact=True)
    return _Outcome(diverged, 2 * diverged > runs, exact, theorem1, eta)


@contextlib.contextmanager
def _progress_bar(total: int, progress):
    """A tqdm bar on stderr (None: only when stderr is a terminal), or None for no bar."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="cell", desc="figure1", file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5)
    try:
        yield bar
    finally:
        bar.close()


def _by_panel(cells) -> dict:
    """``{(lr, sampling): [cell indices in seed order]}``, panels in the order of the grids."""
    panels = {}
    for index, cell in enumerate(cells):
        panels.setdefault((cell.lr, cell.sampling), []).append(index)
    return panels


def _run_cells(cells, *, runs, steps, seed, n, sharpness, progress) -> list:
    """The outcome of every cell, in cell order; visited panel by panel (a callable ``progress``
    hears of each panel as it completes). Each sigma's family is built once and each (sigma,
    sampling, batch size)'s critical lr computed once, whatever the number of panels."""
    outcomes = [None] * len(cells)
    families = {}
    critical = {}
    done = 0
    report = progress if callable(progress) else None
    with _progress_bar(len(cells), None if report else progress) as bar:
        for (lr, sampling), indices in _by_panel(cells).items():
            for index in indices:
                cell = cells[index]
                if cell.sigma not in families:
                    families[cell.sigma] = theorem2_family(n, cell.sigma, sharpness)
                family = families[cell.sigma]
                key = (cell.sigma, sampling, cell.batch_size)
                if key not in critical:
                    critical[key] = critical_lr(family, cell.batch_size, sampling=sampling)
                outcomes[index] = _run_cell(cell, family, critical[key], runs=runs, steps=steps,
                                            seed=seed + index, n=n, sharpness=sharpness)
                if bar is not None:
                    bar.update(1)
            done += len(indices)
            if report is not None:
                report(lr, sampling, done, len(cells))
    return outcomes


# ------------------------------------------------------------------ the result
def _assemble(cells, outcomes, *, runs, steps, seed, n, sharpness, elapsed_seconds) -> Figure1:
    def column(values, dtype=None):
        return np.array(list(values), dtype=dtype)

    return Figure1(
        lr=column((cell.lr for cell in cells), float),
        sampling=column(cell.sampling for cell in cells),
        batch_size=column((cell.batch_size for cell in cells), int),
        sigma=column((cell.sigma for cell in cells), int),
        diverged_runs=column((outcome.diverged_runs for outcome in outcomes), int),
        simulated_diverges=column((outcome.simulated_diverges for outcome in outcomes), bool),
        exact_diverges=column((outcome.exact_diverges for outcome in outcomes), bool),
        theorem1_diverges=column((outcome.theorem1_diverges for outcome in outcomes), bool),
        critical_lr=column((outcome.critical_lr for outcome in outcomes), float),
        runs=runs, steps=steps, seed=seed, n=n, sharpness=float(sharpness),
        elapsed_seconds=elapsed_seconds,
    )


def figure1(lrs=FIGURE1_LRS, samplings=FIGURE1_SAMPLINGS, *, runs=10, steps=1000,
            sigmas=range(1, 51), batch_sizes=range(1, 50), n=100, sharpness=2.0, seed=0,
            progress=None, typical=False) -> Figure1:
    """The synthetic experiment of Dexter et al. (specification page, section "The paper's
    synthetic experiment (the reproduction target)"), with the exact mean-square verdict beside
    the simulated one.

    For every integer coherence sigma, the Theorem-2 family (:func:`fastsgdstab.theory.theorem2_family`,
    ``lambda_1(H) = sharpness``, dimension ``n - sigma + 1``); for every batch size, lr and
    sampling scheme, ``runs`` runs of linearised SGD from ``w_0 ~ Uniform[0, 1)^d`` for ``steps``
    steps (:func:`fastsgdstab.simulate`). A run diverges when ``||w_t||^2 >= 1000 ||w_0||^2`` at
    some ``t <= steps``; a cell diverges when more than half of its runs do. The exact verdict is
    :func:`fastsgdstab.theory.theorem2_bernoulli_diverges` for Bernoulli sampling (the engine's
    critical lr otherwise), Theorem 1's is :func:`fastsgdstab.theory.theorem1_closed_form_diverges`,
    both in exact rational arithmetic.

    Parameters
    ----------
    lrs : sequence of float
        Learning rates, > 0, without repeats (the paper's panels: 0.2, 0.5, 0.8).
    samplings : sequence of str
        Any of "bernoulli", "without_replacement", "with_replacement", without repeats.
    runs, steps : int
        Runs per cell (10) and steps per run (1000).
    sigmas, batch_sizes : sequence of int
        Integers in [1, n], without repeats (the paper: 1..50 and 1..49).
    n : int
        Number of samples (100).
    sharpness : float
        ``lambda_1(H)`` (2).
    seed : int
        Cell i (in the order lr, sampling, sigma, batch size) uses seed ``seed + i``.
    progress : bool or callable, optional
        tqdm progress bar on stderr over the cells; None: only when stderr is a terminal. A
        callable is called instead after each panel as ``progress(lr, sampling, cells_done,
        cells_total)`` (the command line prints a line per panel with it when stderr is not a
        terminal).
    typical : bool or dict, default False
        Also estimate each cell's typical (Lyapunov) critical lr
        (:func:`fastsgdstab.typical_critical_lr`, once per sigma, sampling and batch size, with
        ``FIGURE1_TYPICAL_BUDGET`` = 64 runs x 1,000 steps per lr, or the budget given as a dict:
        ``runs``, ``steps``, ``burn_in``, ``level``) into ``typical_lr`` and
        ``typical_interval``; :func:`fastsgdstab.plotting.plot_figure1_panel` then draws the
        typical boundary. It simulates: seconds per cell.

    Returns
    -------
    Figure1

    Raises
    ------
    TypeError, ValueError
        An lr not > 0; an unknown sampling scheme or none; a sigma or batch size that is not an
        integer in [1, n]; a repeated value in a grid; and whatever
        :func:`fastsgdstab.theory.theorem2_family` and :func:`fastsgdstab.simulate` reject
        (``n``, ``sharpness``, ``runs``, ``steps``, ``seed``).

    Examples
    --------
    >>> from fastsgdstab.experiments import figure1
    >>> result = figure1(lrs=[0.5], samplings=["bernoulli"], sigmas=[1, 50], batch_sizes=[1, 49],
    ...                  runs=4, steps=200)
    >>> result.sigma.tolist(), result.batch_size.tolist()
    ([1, 1, 50, 50], [1, 49, 1, 49])
    >>> result.exact_diverges.tolist()     # sigma below theory.theorem2_sigma_boundary
    [True, True, True, False]
    >>> result.theorem1_diverges.tolist()  # sigma below theory.theorem1_sigma_boundary
    [True, True, False, False]
    >>> result.agreement(0.5, "bernoulli")[0]   # simulated vs exact verdicts
    1.0
    """
    with limited_blas(parallel=True):  # small dense solves and Numba-parallel simulations
        return _figure1(lrs, samplings, runs=runs, steps=steps, sigmas=sigmas,
                        batch_sizes=batch_sizes, n=n, sharpness=sharpness, seed=seed,
                        progress=progress, typical=typical)


def _figure1(lrs, samplings, *, runs, steps, sigmas, batch_sizes, n, sharpness, seed,
             progress, typical=False) -> Figure1:
    started = time.perf_counter()
    lrs, samplings, sigmas, batch_sizes = _check_arguments(lrs, samplings, sigmas, batch_sizes, n)
    budget = _check_typical(typical)
    cells = _cells(lrs, samplings, sigmas, batch_sizes)
    settings = dict(runs=runs, steps=steps, seed=seed, n=n, sharpness=sharpness)
    outcomes = _run_cells(cells, progress=progress, **settings)
    result = _assemble(cells, outcomes, elapsed_seconds=time.perf_counter() - started, **settings)
    if budget is None:
        return result
    typical_lr, typical_interval = _typical_cells(cells, budget, seed=seed, n=n,
                                                  sharpness=sharpness)
    return dataclasses.replace(result, typical_lr=typical_lr, typical_interval=typical_interval,
                               elapsed_seconds=time.perf_counter() - started)
