"""The block runner of the Monte-Carlo simulation: the package's internal API for ``simulate``.

A simulation is cut into blocks of runs. Run j draws every random number from its own
counter-based stream keyed by ``(seed, j)`` (``_kernels/rng.py``), so a block computed anywhere
(another thread, another process, a Dask worker) has the bits of those rows of the whole
simulation. The pieces, used by ``simulation.simulate`` (in this process) and by
``_distributed.simulate`` (on a Dask cluster), neither of which imports the other's internals:

* ``check_arguments``: every check of ``simulate``'s arguments, giving the picklable
  ``Settings``;
* ``run_block(settings, first_run, last_run)``: simulate runs ``[first_run, last_run)`` to a
  picklable ``Block``. Inside, the runs are cut again into parts that a thread pool runs at
  once (``parts``): the kernels (``_kernels/sgd.py``) are serial and release the GIL, so the
  threads share the cores without Numba's ``parallel=True`` machinery, whose compilation was
  most of a cold start. As many threads as Numba's thread count in the calling thread
  (``numba.get_num_threads()``: ``NUMBA_NUM_THREADS``, a caller's ``numba.set_num_threads``, or
  the share of the cores a Dask task gets), never more;
* ``combine(settings, blocks, elapsed)``: the ``SimulationResult`` of blocks that partition
  the runs (concatenation in run order, then the statistics, computed once).
"""

from __future__ import annotations

import math
import numbers
import os
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from ._config import (
    CHUNK_SECONDS,
    DEFAULT_RECORD_BUDGET,
    DEFAULT_RECORDS,
    FIRST_CHUNK_SECONDS,
    MIN_EFFECTIVE_FRACTION,
    MIN_EFFECTIVE_RUNS,
    RARE_RUNS_FRACTION,
    PROGRESS_AFTER_SECONDS,
)
from ._kernels import sgd as _sgd
from ._validation import as_real_array, check_batch_size, check_finite, check_lr, check_positive_int, check_real_scalar
from ._engine import check_family, factor_rows, range_basis, reduced
from ._statistics import wilson_interval
from ._warnings import warn
from .sampling import bernoulli_tables, check_simulation_sampling

__all__ = ["SimulationResult", "SimulationWarning", "Settings", "Block", "check_arguments",
           "run_block", "combine", "parts", "numba_threads"]


class SimulationWarning(RuntimeWarning):
    """A simulation estimate that should not be taken at face value (or a partial result)."""


@dataclass(frozen=True)
class SimulationResult:
    """Runs of linearised SGD and the statistics estimated from them.

    Attributes
    ----------
    log_sq_norm : ndarray, shape (runs, records)
        ``log ||w_t||^2`` (natural log) of every run at the recorded steps; exact, whatever the
        size of w (``-inf`` if a run reached exactly 0).
    recorded_steps : ndarray of int, shape (records,)
        The step t of each column: 0, record_every, 2 record_every, ..., and the last step.
    lyapunov_exponent, lyapunov_exponent_stderr : float
        Typical per-step growth rate of ``||w_t||``, ``(1/t) E log(||w_t|| / ||w_0||)`` at the
        last recorded step, averaged over runs, and its standard error over runs. It tends to
        the top Lyapunov exponent as t grows (bias O(1/t) from the initial transient, not
        included in the standard error). Negative: typical runs shrink.
    log_mean_sq, log_mean_sq_stderr : ndarray, shape (records,)
        ``log`` of the sample mean over runs of ``||w_t||^2`` and its standard error (delta
        method: the relative standard error of the sample mean).
    effective_sample_size : ndarray, shape (records,)
        ``(sum_j x_j)^2 / sum_j x_j^2`` with ``x_j = ||w_t||^2`` of run j: how many runs carry
        the sample mean.
    log_mean_sq_untrustworthy : ndarray of bool, shape (records,)
        True where the effective sample size is below 30 or below 1% of the runs: too few runs
        (the warning says so when the effective sample size is at least 10% of the runs), or
        rare runs dominate (below 10%). Near and
        above the mean-square threshold the mean is carried by rare runs; the sample mean is
        then typically far below the true one (use ``second_moment`` for the mean square).
        Even an unflagged sample mean can miss a tail that no run has reached.
    diverged : ndarray of bool, shape (runs,)
        The paper's rule: ``||w_t||^2 >= divergence_factor ||w_0||^2`` at some step
        ``1 <= t <= steps`` (every step is checked, recorded or not).
    first_diverged_step : ndarray of int, shape (runs,)
        The first such t, or -1.
    diverged_fraction : float
        Fraction of runs that diverged.
    diverged_fraction_interval : (float, float)
        Wilson score 95% interval of the divergence probability.
    steps_completed : int
        Steps simulated: ``steps``, or fewer when interrupted.
    interrupted : bool
        True when Ctrl-C stopped the simulation; every field covers the completed steps.
    elapsed_seconds : float
        Wall time of the simulation (including the first call's compilation).
    lr, batch_size, steps, runs, seed, sampling, init, record_every, divergence_factor
        The settings (``init`` is "normal", "uniform" or "vector").
    momentum, nesterov, drop_last
        The momentum settings (0.0 and False: plain SGD) and, for ``sampling="reshuffle"``,
        whether the short last batch of an epoch is dropped.
    excess_loss, excess_loss_stderr : float or None
        Families with per-sample gradients only (None otherwise, and None if interrupted
        before the burn-in ended): the time average of ``(1/2) w_t^T H w_t`` over the steps
        ``burn_in < t <= steps_completed`` and over the runs, the stationary excess loss
        (section "Non-interpolating minima: stationary covariance and the loss floor"; in the
        loss's own convention, H its Hessian), and its standard error: from the spread of the
        runs' own time averages (independent runs) with two runs or more, from batch means over
        20 consecutive stretches of time with one run. The burn-in's bias (the transient from
        w_0) is not in the standard error. ``inf`` (both) when some run left the float range:
        no stationary state at this lr (those runs are ``diverged``).
    burn_in : int or None
        Steps left out of the excess loss's time average (None without gradients).
    """

    log_sq_norm: np.ndarray
    recorded_steps: np.ndarray
    lyapunov_exponent: float
    lyapunov_exponent_stderr: float
    log_mean_sq: np.ndarray
    log_mean_sq_stderr: np.ndarray
    effective_sample_size: np.ndarray
    log_mean_sq_untrustworthy: np.ndarray
    diverged: np.ndarray
    first_diverged_step: np.ndarray
    diverged_fraction: float
    diverged_fraction_interval: tuple
    steps_completed: int
    interrupted: bool
    elapsed_seconds: float
    lr: float
    batch_size: float
    steps: int
    runs: int
    seed: int
    sampling: str
    init: str
    record_every: int
    divergence_factor: float
    momentum: float = 0.0
    nesterov: bool = False
    drop_last: bool = False
    excess_loss: float | None = None
    excess_loss_stderr: float | None = None
    burn_in: int | None = None

    def __str__(self) -> str:
        """A short summary; the arrays (``log_sq_norm`` ...) are fields."""
        low, high = self.diverged_fraction_interval
        flagged = int(np.sum(self.log_mean_sq_untrustworthy))
        lines = [
            f"SimulationResult: {self.runs} runs x {self.steps_completed} of {self.steps} steps, "
            f"lr={self.lr:.6g}, batch_size={self.batch_size:g}, sampling={self.sampling}, "
            f"init={self.init}, seed={self.seed}"
            + (f", momentum={self.momentum:g}" + (" (Nesterov)" if self.nesterov else "")
               if self.momentum else "")
            + (", drop_last=True" if self.drop_last else "")
            + (" (interrupted)" if self.interrupted else ""),
            f"  Lyapunov exponent (typical growth of log ||w_t|| per step) "
            f"{self.lyapunov_exponent:.6g} +/- {self.lyapunov_exponent_stderr:.2g} (standard error)",
            f"  diverged (||w_t||^2 >= {self.divergence_factor:g} ||w_0||^2): "
            f"{int(np.sum(self.diverged))} of {self.runs} runs ({self.diverged_fraction:.4g}), "
            f"95% interval [{low:.4g}, {high:.4g}]",
            f"  log mean ||w_t||^2 at t = {int(self.recorded_steps[-1])}: {self.log_mean_sq[-1]:.6g} "
            f"+/- {self.log_mean_sq_stderr[-1]:.2g}"
            + (f" (untrustworthy at {flagged} of {self.log_mean_sq_untrustworthy.size} recorded "
               f"steps: use second_moment)" if flagged else ""),
            f"  {self.log_sq_norm.shape[1]} recorded steps per run; computed in "
            f"{self.elapsed_seconds:.2f} s",
        ]
        if self.excess_loss is not None:
            lines.insert(-1, f"  excess loss (1/2) w^T H w, time average after {self.burn_in} "
                             f"burn-in steps (the loss's own convention): {self.excess_loss:.6g} "
                             f"+/- {self.excess_loss_stderr:.2g} (standard error; compare "
                             f"fastsgdstab.stationary)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ checks
def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer in [0, 2**63); got {seed!r} of type {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63); got {seed}")
    return seed


def _check_init(init, d: int):
    """``(kind code, vector, name)`` for the kernel."""
    if init is None or (isinstance(init, str) and init == "normal"):
        return _sgd.INIT_NORMAL, np.zeros(d), "normal"
    if isinstance(init, str):
        if init == "uniform":
            return _sgd.INIT_UNIFORM, np.zeros(d), "uniform"
        raise ValueError(
            f"init must be 'normal' (w_0 ~ N(0, I), the default), 'uniform' (w_0 ~ Uniform[0, 1)^d) "
            f"or a vector of shape ({d},); got the string {init!r}"
        )
    vector = as_real_array(init, "init")
    if vector.shape != (d,):
        raise ValueError(
            f"init must be 'normal' (w_0 ~ N(0, I), the default), 'uniform' (w_0 ~ Uniform[0, 1)^d) "
            f"or a vector of shape ({d},) (the same w_0 for every run); got an array of shape "
            f"{vector.shape}"
        )
    check_finite(vector, "init")
    if not np.any(vector):
        raise ValueError("init must not be the zero vector (every run would stay at 0)")
    return _sgd.INIT_FIXED, vector, "vector"


def _check_divergence_factor(value) -> float:
    value = check_real_scalar(value, "divergence_factor")
    if not value > 1.0:
        raise ValueError(
            f"divergence_factor must be > 1 (a run diverges when ||w_t||^2 >= divergence_factor "
            f"* ||w_0||^2); got {value:g}"
        )
    return value


def _check_record_every(record_every, steps: int, runs: int) -> int:
    if record_every is None:
        records = max(1, min(DEFAULT_RECORDS, DEFAULT_RECORD_BUDGET // runs - 1))
        return max(1, -(-steps // records))
    record_every = check_positive_int(record_every, "record_every")
    if record_every > steps:
        raise ValueError(f"record_every must be in [1, steps] = [1, {steps}]; got {record_every}")
    return record_every


def _check_memory(runs: int, d: int, records: int, momentum: bool = False,
                  reshuffle_n: int = 0) -> None:
    """Refuse, before allocating, a simulation whose state would not fit in memory.

    The state is one d-vector (two with momentum) and a few scalars per run, plus the recorded
    log norms and, under reshuffling, the run's permutation of the n samples (int64); with the
    operating system's lazy allocation an oversized request would otherwise be accepted and the
    process killed later, when the kernel writes to it.
    """
    needed = 8.0 * runs * (d * (2 if momentum else 1) + 4 + records + reshuffle_n)
    limit = _available_memory_bytes()
    if needed > limit:
        permutations = (f" and a permutation of the n = {reshuffle_n:,} samples per run (reshuffle)"
                        if reshuffle_n else "")
        raise ValueError(
            f"runs = {runs:,} with d = {d:,} and {records:,} recorded steps{permutations} needs "
            f"about {needed / 2**30:,.1f} GiB, more than this machine's {limit / 2**30:,.1f} GiB; "
            f"use fewer runs or a larger record_every")


def _available_memory_bytes() -> float:
    """Physical memory (the limit a single call may plan for), or 8 GiB if unknown."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float(8 * 2**30)


def _check_momentum(momentum, nesterov):
    """``(momentum, nesterov)`` checked as ``torch.optim.SGD`` checks them (dampening 0)."""
    momentum = check_real_scalar(momentum, "momentum")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1) (the heavy-ball coefficient mu); got {momentum!r}")
    if not isinstance(nesterov, (bool, np.bool_)):
        raise TypeError(f"nesterov must be True or False; got {nesterov!r}")
    if nesterov and momentum == 0.0:
        raise ValueError("Nesterov momentum requires a momentum > 0 (nesterov=True with momentum=0)")
    return float(momentum), bool(nesterov)


def _check_drop_last(drop_last, sampling: str, n: int, batch_size: float) -> bool:
    if not isinstance(drop_last, (bool, np.bool_)):
        raise TypeError(f"drop_last must be True or False; got {drop_last!r}")
    if drop_last and sampling != "reshuffle":
        raise ValueError(f"drop_last=True applies to sampling='reshuffle' only (epochs of a "
                         f"permutation); got sampling={sampling!r}")
    return bool(drop_last)


def _check_population(family, sampling: str) -> int:
    """The size of the set ``simulate`` draws batches from: the family's ``population_size`` N.

    A probe of n samples stands for a training set of N = m n samples made of m copies of each
    probe sample: that population has the probe's H and N(X), and so the second-moment map of
    the training set's batch law (its a, b with N; specification page, section "A probe subset
    of a large training set"). The simulation draws from it exactly (``_population_rows``);
    with replacement, drawing from the copies is drawing from the probe, so any N >= n is
    accepted there. The other schemes need N to be a multiple of n (a ValueError otherwise)."""
    n, population = family.n, family.population_size
    if population != n and sampling != "with_replacement" and population % n:
        raise ValueError(
            f"simulate with sampling={sampling!r} draws batches from a population of "
            f"population_size = {population} samples made of copies of the n = {n} probe samples, "
            f"so population_size must be a multiple of n; got {population} = {population // n} n + "
            f"{population % n}. Use family.with_population_size(N) with N a multiple of n, or "
            f"sampling='with_replacement' (whose law does not depend on the population size)")
    if population != n and sampling != "with_replacement":
        needed = 8.0 * population * family.rank * family.d
        if needed > 0.5 * _available_memory_bytes():
            raise ValueError(
                f"simulate with sampling={sampling!r} and population_size = {population:,} holds "
                f"the population's factor rows ({population:,} x {family.rank} x {family.d:,} "
                f"floats, {needed / 2**30:,.1f} GiB), more than half of this machine's memory; "
                f"use sampling='with_replacement' or a smaller population_size")
    return population


def _population_rows(rows: np.ndarray, family, sampling: str) -> np.ndarray:
    """The kernel's factor rows for the population (population_size N = m n, ``m`` copies of
    the probe's rows, copy j of sample i at index j n + i); the probe's own rows when N = n or
    under sampling with replacement (whose law is the same)."""
    population, n = family.population_size, family.n
    if population == n or sampling == "with_replacement":
        return rows
    return np.tile(rows, (population // n, 1))


def _check_progress(progress):
    if progress is None or isinstance(progress, (bool, np.bool_)):
        return progress
    raise TypeError(f"progress must be None (automatic), True or False; got {progress!r}")


@dataclass(frozen=True)
class Settings:
    """The arguments of one simulation, checked (``init`` as the kernel's code and vector)."""

    family: object
    lr: float
    batch_size: float
    steps: int
    runs: int
    seed: int
    sampling: str
    init_kind: int
    init_vector: np.ndarray
    init: str
    record_every: int
    divergence_factor: float
    progress: object
    momentum: float = 0.0
    nesterov: bool = False
    drop_last: bool = False
    burn_in: int | None = None  # steps before the loss average (families with gradients only)

    def reported(self) -> dict:
        """The settings a ``SimulationResult`` carries."""
        return dict(lr=self.lr, batch_size=self.batch_size, steps=self.steps, runs=self.runs,
                    seed=self.seed, sampling=self.sampling, init=self.init,
                    record_every=self.record_every, divergence_factor=self.divergence_factor,
                    momentum=self.momentum, nesterov=self.nesterov, drop_last=self.drop_last,
                    **({} if self.burn_in is None else dict(burn_in=self.burn_in)))


def _check_burn_in(burn_in, steps: int, affine: bool):
    """The burn-in of the loss average: None without gradients (nothing is averaged), else an
    integer in [0, steps) (default ``steps // 4``)."""
    if not affine:
        if burn_in is not None:
            raise ValueError("burn_in applies to families with per-sample gradients only (the "
                             "time-averaged excess loss); this family has none")
        return None
    if burn_in is None:
        return steps // 4
    burn_in = check_positive_int(burn_in, "burn_in", minimum=0)
    if burn_in >= steps:
        raise ValueError(f"burn_in must be in [0, steps) = [0, {steps}) (the excess loss is "
                         f"averaged over the steps after it); got {burn_in}")
    return burn_in


def check_arguments(family, lr, batch_size, steps, runs, seed=0, sampling="bernoulli",
                     init="normal", record_every=None, divergence_factor=1000.0, progress=None,
                     momentum=0.0, nesterov=False, drop_last=False, burn_in=None) -> Settings:
    """Every check of ``simulate``'s arguments (same names), before any allocation or
    computation: the settings of a simulation, which ``run_block`` and ``combine`` take.
    Picklable (plain values, the family and a small array)."""
    family = check_family(family)
    sampling = check_simulation_sampling(sampling)
    lr = check_lr(lr)
    population = _check_population(family, sampling)  # population_size (probe of a training set)
    batch_size = check_batch_size(batch_size, population, integer=sampling != "bernoulli",
                                  samples=family.n)
    steps = check_positive_int(steps, "steps")
    runs = check_positive_int(runs, "runs")
    seed = _check_seed(seed)
    init_kind, init_vector, init_name = _check_init(init, family.d)
    record_every = _check_record_every(record_every, steps, runs)
    divergence_factor = _check_divergence_factor(divergence_factor)
    progress = _check_progress(progress)
    momentum, nesterov = _check_momentum(momentum, nesterov)
    drop_last = _check_drop_last(drop_last, sampling, population, batch_size)
    burn_in = _check_burn_in(burn_in, steps, family.gradients is not None)
    _check_memory(runs, family.d, steps // record_every + 2, momentum > 0,
                  population if sampling == "reshuffle" else 0)
    return Settings(family, lr, batch_size, steps, runs, seed, sampling, init_kind, init_vector,
                     init_name, record_every, divergence_factor, progress, momentum, nesterov,
                     drop_last, burn_in)


# ------------------------------------------------------------------------------ statistics
def _log_mean_and_ess(log_x: np.ndarray):
    """Column-wise log of the mean of exp(log_x) over rows, its standard error and the ESS."""
    runs = log_x.shape[0]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        top = np.max(log_x, axis=0)
        safe_top = np.where(np.isfinite(top), top, 0.0)
        shifted = np.exp(log_x - safe_top)
        total = shifted.sum(axis=0)
        total_sq = (shifted * shifted).sum(axis=0)
        log_mean = np.log(total) + safe_top - math.log(runs)
        log_mean = np.where(np.isposinf(top) | np.isnan(top), top, log_mean)
        ess = total * total / total_sq
        if runs > 1:
            stderr = np.sqrt(np.maximum(runs / ess - 1.0, 0.0) / (runs - 1))
        else:
            stderr = np.full(ess.shape, np.nan)
    ess = np.where(np.isfinite(ess), ess, np.nan)
    return log_mean, stderr, ess


def _lyapunov(log_sq_norm: np.ndarray, last_step: int):
    if last_step == 0:
        return math.nan, math.nan
    rates = (log_sq_norm[:, -1] - log_sq_norm[:, 0]) / (2.0 * last_step)
    with np.errstate(invalid="ignore"):
        mean = float(np.mean(rates))
        if rates.shape[0] < 2 or not math.isfinite(mean):
            return mean, math.nan
        return mean, float(np.std(rates, ddof=1) / math.sqrt(rates.shape[0]))


# ------------------------------------------------------------------------------ driver
# Consecutive batches of time whose means give the excess loss's standard error (one run).
LOSS_BATCHES = 20

# Largest binary exponent of the step size handed to the kernel (2^1000 ~ 1e301).
_MAX_STEP_EXPONENT = 1000


def _largest_magnitude(array: np.ndarray, block: int = 1 << 18) -> float:
    """``max |array|`` in one pass over memory: the max and the min of each block of 2 MB (in
    cache for the second), no temporary of the array's size (512 MB at n = 1e6, d = 64)."""
    flat = array.reshape(-1)
    biggest = 0.0
    for start in range(0, flat.shape[0], block):
        part = flat[start:start + block]
        biggest = max(biggest, float(part.max()), -float(part.min()))
    return biggest


# max |factor entry| of each family simulated (families are immutable: their factors are a
# read-only copy), so that repeated calls on a family at large n skip the pass over its rows
_LARGEST_ENTRY = weakref.WeakKeyDictionary()


def _family_rows(family):
    """``(factor rows, max |entry|)`` of a family, the maximum computed once per family."""
    rows = factor_rows(family)
    try:
        biggest = _LARGEST_ENTRY[family]
    except (KeyError, TypeError):
        biggest = _largest_magnitude(rows)
        try:
            _LARGEST_ENTRY[family] = biggest
        except TypeError:  # (not weakly referenceable: no cache)
            pass
    return rows, biggest


def _scaled_rows(rows: np.ndarray, step_size: float, biggest: float | None = None):
    """``(rows 2^-e, step_size 4^e)``: the same steps, with the rows' largest entry in [0.5, 1).

    A step depends on the rows and the step size only through ``step_size u u^T``, and scaling
    by a power of two is exact (barring subnormal entries), so ordinary families give the
    kernel the same arithmetic bit for bit, while families from 1e-150 to 1e150 give it rows of
    size 1 (the specification page, section "Certified answers and scale"). If ``step_size 4^e`` would
    pass 2^1000, the rows keep the excess: ``step_size ||u||^2 <= (n / B) lr lambda_1(H)``, so
    while ``lr lambda_1(H)`` is a float the rows stay below ``2^27 sqrt(n / B)``, well inside
    the kernel's margin.
    """
    if rows.size == 0:
        return rows, step_size
    if biggest is None:
        biggest = _largest_magnitude(rows)
    if biggest == 0.0:
        return rows, step_size
    exponent = math.frexp(biggest)[1]
    excess = math.frexp(step_size)[1] + 2 * exponent - _MAX_STEP_EXPONENT
    if excess > 0:
        exponent -= (excess + 1) // 2
    if exponent == 0:  # already in [0.5, 1): no copy
        return rows, step_size
    return np.ldexp(rows, -exponent), math.ldexp(step_size, 2 * exponent)


def _kernel_array(array, dtype=np.float64) -> np.ndarray:
    """``array`` as the one array type the kernels are compiled for: C-contiguous, writable.

    Numba compiles a kernel once per combination of argument types, and a read-only or strided
    array is a type of its own: a read-only view (the factor rows of a zero family, which
    ``_scaled_rows`` passes on unscaled, or a frozen ``init``) would compile the simulation
    kernels a second time, several seconds from an empty cache. Scalars go to the kernels as
    Python ``int`` (int64) and ``float`` for the same reason.
    """
    return np.require(array, dtype=dtype, requirements=["C", "A", "W"])


def _kernel_rows(rows: np.ndarray) -> np.ndarray:
    """The factor rows as the kernels take them: C-contiguous float64, read-only (the kernels
    only read them). A read-only view, never a copy of contiguous rows (512 MB at n = 1e6,
    d = 64): the family's own frozen factors and fresh scaled rows alike."""
    view = np.ascontiguousarray(rows, dtype=np.float64).view()
    view.flags.writeable = False
    return view


def _recorded_steps(steps: int, record_every: int) -> np.ndarray:
    """0, record_every, 2 record_every, ..., and the last step."""
    recorded = np.arange(0, steps + 1, record_every, dtype=np.int64)
    if recorded[-1] != steps:
        recorded = np.append(recorded, steps)
    return recorded


_SCHEMES = {"bernoulli": _sgd.SCHEME_BERNOULLI,
            "without_replacement": _sgd.SCHEME_WITHOUT_REPLACEMENT,
            "with_replacement": _sgd.SCHEME_WITH_REPLACEMENT,
            "reshuffle": _sgd.SCHEME_RESHUFFLE}


class Runs:
    """The kernels' arguments and the state of runs ``[first_run, last_run)``, allocated once;
    w_0 drawn on creation.

    ``advance(first, last)`` takes every run from step ``first`` to step ``last``. Between calls
    the state is whole (a chunk either ran or did not), so the simulation can stop after any.
    Row k holds the global run ``first_run + k``, whose stream is keyed by ``(seed, first_run +
    k)``: a block of runs computed alone has the bits of those rows of the whole simulation.
    Two kernels, ``chunk_linear`` and, for a family with gradients, ``chunk_affine``, each in
    the variant of the scheme and of momentum or not (``_kernels/sgd.py``), compiled once for
    every family; ``advance_part`` runs one part.
    """

    def __init__(self, settings: Settings, first_run: int = 0, last_run: int | None = None):
        family = settings.family
        last_run = settings.runs if last_run is None else last_run
        n, d, runs = family.n, family.d, last_run - first_run
        self.settings = settings
        self.first_run = int(first_run)
        # The kernel wants rows at most 1 in absolute value; only step_size u u^T matters.
        rows, biggest = _family_rows(family)
        rows, step_size = _scaled_rows(rows, settings.lr / settings.batch_size, biggest)
        rows = _population_rows(rows, family, settings.sampling)  # population_size (probe)
        n = rows.shape[0] // family.rank
        self.rows = _kernel_rows(rows)
        self.step_size = float(step_size)
        self.rank = int(family.rank)
        self.integer_batch = int(settings.batch_size) if settings.sampling != "bernoulli" else 0
        if settings.sampling == "bernoulli":
            cdf, guide = bernoulli_tables(n, settings.batch_size / n)
            self.cdf = _kernel_array(cdf)
            self.guide = _kernel_array(guide, np.int64)
        self.recorded_steps = _recorded_steps(settings.steps, settings.record_every)
        self.W = np.empty((runs, d))
        self.log_scale = np.empty(runs)
        self.counters = np.zeros(runs, dtype=np.uint64)
        self.first_diverged = np.full(runs, -1, dtype=np.int64)
        self.log_sq_norm = np.full((runs, self.recorded_steps.shape[0]), np.nan)
        _sgd.initial_kernel(settings.init_kind)(settings.seed, self.first_run,
                                                _kernel_array(settings.init_vector), self.W,
                                                self.counters, self.log_scale)
        self.log_sq_norm[:, 0] = self.log_scale
        self.log_threshold = self.log_scale + math.log(settings.divergence_factor)
        # momentum state, scaled with W: w_{-1} = w_0 (heavy ball) or v_{-1} = 0 (Nesterov)
        if settings.momentum == 0.0:
            self.momentum_kind = _sgd.MOMENTUM_NONE
            self.Z = np.empty((runs, 0))
        elif settings.nesterov:
            self.momentum_kind = _sgd.NESTEROV
            self.Z = np.zeros((runs, d))
        else:
            self.momentum_kind = _sgd.HEAVY_BALL
            self.Z = self.W.copy()
        self.scheme = _SCHEMES[settings.sampling]
        if settings.sampling != "bernoulli":  # (the kernels take every scheme's arguments)
            self.cdf = np.zeros(1)
            self.guide = np.zeros(1, dtype=np.int64)
        if settings.sampling == "reshuffle":
            # every run's permutation of the samples, reshuffled at the start of each epoch
            self.order = np.empty((runs, n), dtype=np.int64)
            self.order[:] = np.arange(n)
            batch = self.integer_batch
            self.steps_per_epoch = int(n // batch if settings.drop_last else -(-n // batch))
        else:
            self.order = np.empty((runs, 0), dtype=np.int64)
            self.steps_per_epoch = 1
        self.affine = family.gradients is not None
        # the kernel variant of this path (scheme, momentum or not): only its code compiles
        variant = _sgd.affine_kernel if self.affine else _sgd.linear_kernel
        self.kernel = variant(self.scheme, self.momentum_kind != _sgd.MOMENTUM_NONE)
        if self.affine:
            self._init_affine(family, runs)

    def _init_affine(self, family, runs: int) -> None:
        """The state of the affine iteration (a family with gradients): W holds w_t itself
        (``log_scale`` 0), the gradients (copies for a probe's population, as the rows), the
        factor C of ``H = C C^T`` for the loss, and the per-run sums of the loss over
        ``LOSS_BATCHES`` consecutive batches of the steps after the burn-in."""
        settings = self.settings
        self.W *= np.exp(0.5 * self.log_scale)[:, None]
        if settings.init_kind == _sgd.INIT_FIXED:
            self.W[:] = settings.init_vector  # w_0 exactly, not rescaled
        self.log_scale[:] = 0.0
        if self.momentum_kind == _sgd.HEAVY_BALL:
            self.Z = self.W.copy()
        gradients = np.asarray(family.gradients, dtype=np.float64)
        if family.population_size != family.n and settings.sampling != "with_replacement":
            gradients = np.tile(gradients, (family.population_size // family.n, 1))
        self.gradients = _kernel_array(gradients)
        reduction = reduced(family)
        scale = np.sqrt(reduction.sharpness * np.asarray(reduction.unit_eigenvalues))
        self.loss_factor = _kernel_array(range_basis(family) * scale[None, :])
        window = settings.steps - settings.burn_in
        self.loss_batches = int(min(LOSS_BATCHES, window))
        self.loss_sums = np.zeros((runs, self.loss_batches))
        self.overflowed = np.zeros(runs, dtype=np.bool_)
        self.gradient_step = float(settings.lr / settings.batch_size)

    def advance_part(self, start: int, stop: int, first: int, last: int) -> None:
        """Take rows ``[start, stop)`` of the state from step ``first`` to step ``last``: one
        serial kernel call on slices of the state arrays (views, written in place), with the
        global run index of row ``start`` as the stream key's first run."""
        settings = self.settings
        part = slice(start, stop)
        first_run = self.first_run + start
        capacity = self.cdf.shape[0] - 1 if settings.sampling == "bernoulli" else self.integer_batch
        scratch = _sgd.scratch(self.rows.shape[0] // self.rank,
                               max(capacity, 1) if self.affine else capacity, self.rank,
                               self.W.shape[1])
        if self.affine:
            self.kernel(self.rows, self.rank, self.gradients, self.loss_factor,
                        self.integer_batch, self.steps_per_epoch, self.step_size,
                        self.gradient_step, self.cdf, self.guide, settings.seed, first_run,
                        int(first), int(last), settings.steps, settings.record_every,
                        self.log_threshold[part], self.momentum_kind, float(settings.momentum),
                        int(settings.burn_in), self.loss_batches, self.W[part], self.Z[part],
                        self.counters[part], self.first_diverged[part], self.overflowed[part],
                        self.log_sq_norm[part], self.loss_sums[part], self.order[part],
                        *scratch)
            return
        self.kernel(self.rows, self.rank, self.integer_batch, self.steps_per_epoch,
                    self.step_size, self.cdf, self.guide, settings.seed, first_run, int(first),
                    int(last), settings.steps, settings.record_every, self.log_threshold[part],
                    self.momentum_kind, float(settings.momentum), self.W[part], self.Z[part],
                    self.log_scale[part], self.counters[part], self.first_diverged[part],
                    self.log_sq_norm[part], self.order[part], *scratch)

    def records_up_to(self, done: int):
        """``(recorded_steps, log_sq_norm)`` of the completed steps: the recorded columns up to
        ``done``, and ``done`` itself (from the current state) if it was not a recorded step."""
        if done == self.settings.steps:
            return self.recorded_steps, self.log_sq_norm
        keep = self.recorded_steps <= done
        recorded_steps = self.recorded_steps[keep]
        log_sq_norm = self.log_sq_norm[:, keep]
        if recorded_steps[-1] != done:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                current = self.log_scale + np.log(np.einsum("ij,ij->i", self.W, self.W))
            if self.affine:  # a stopped run (overflow) is recorded as +inf, never NaN
                current = np.where(self.overflowed, math.inf, current)
            recorded_steps = np.append(recorded_steps, done)
            log_sq_norm = np.concatenate([log_sq_norm, current[:, None]], axis=1)
        return recorded_steps, log_sq_norm


def _estimated_seconds_per_step(settings: Settings, runs: int) -> float:
    """A guess before any step is timed: ~4 B d r flops per run-step (the batch product) plus
    the sampling, at a conservative 1 GFLOP/s."""
    expected_batch = settings.batch_size * settings.family.rank
    d = settings.family.d
    return runs * (4.0 * expected_batch * d + 20.0 * expected_batch + 4.0 * d) / 1e9


def _chunk_steps(seconds: float, seconds_per_step: float) -> int:
    """The number of steps (at least 1) that take about ``seconds`` at the given speed."""
    return max(1, int(seconds / max(seconds_per_step, 1e-12)))


class _InterruptFlag:
    """Turns SIGINT into a flag that the chunk loop reads (main thread only).

    A KeyboardInterrupt raised by the default handler could land between a kernel's return and
    the bookkeeping of the chunk; with the flag, a chunk is either counted or not run.
    """

    def __init__(self):
        self.raised = False
        self._installed = False
        self._previous = None

    def _handler(self, signum, frame):
        self.raised = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            # None: the previous handler was not installed from Python and cannot be named;
            # the default action is the nearest (never leave the flag handler in place).
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)
        return False


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="simulate", leave=False,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.2)


class _Progress:
    """The progress bar of one simulation, closed on exit. ``progress=None``: shown from the
    first chunk after which the whole run is estimated to take over ``PROGRESS_AFTER_SECONDS``;
    True: from the first chunk; False: never."""

    def __init__(self, steps: int, progress):
        self._steps = steps
        self._progress = progress
        self._bar = None

    def __enter__(self):
        return self

    def after_chunk(self, done: int, advanced: int, seconds_per_step: float) -> None:
        if self._bar is not None:
            self._bar.update(advanced)
        elif done < self._steps and (
                self._progress or (self._progress is None
                                   and seconds_per_step * self._steps > PROGRESS_AFTER_SECONDS)):
            self._bar = _progress_bar(self._steps, done)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
        return False


def _run_chunks(advance, steps: int, seconds_per_step: float, progress, chunk_steps=None,
                on_chunk=None):
    """Call ``advance(first, last)`` on consecutive chunks of steps until ``steps`` or Ctrl-C.

    The first chunk is sized from ``seconds_per_step`` (a guess) to last about
    ``FIRST_CHUNK_SECONDS``, later ones from the measured speed to last about
    ``CHUNK_SECONDS``, unless ``chunk_steps`` fixes them. Between chunks: ``on_chunk(done)``
    (a test hook), the Ctrl-C flag, the progress bar. Returns ``(steps done, interrupted)``.
    """
    chunk = chunk_steps or min(steps, _chunk_steps(FIRST_CHUNK_SECONDS, seconds_per_step))
    done = 0
    with _InterruptFlag() as flag, _Progress(steps, progress) as bar:
        while done < steps:
            last = min(steps, done + chunk)
            tick = time.perf_counter()
            advance(done, last)
            elapsed = time.perf_counter() - tick
            advanced, done = last - done, last
            if on_chunk is not None:
                on_chunk(done)
            if flag.raised:
                return done, done < steps
            if elapsed > 0:
                seconds_per_step = elapsed / advanced
            if chunk_steps is None:
                # Never shrink a chunk that took less than twice the target: a chunk's fixed
                # cost (a few us per run) then cannot make chunks smaller and smaller.
                floor = chunk if elapsed < 2.0 * CHUNK_SECONDS else 1
                chunk = max(floor, _chunk_steps(CHUNK_SECONDS, seconds_per_step))
            bar.after_chunk(done, advanced, seconds_per_step)
    return done, False



# ------------------------------------------------------------------------------ blocks of runs
@dataclass(frozen=True)
class Block:
    """Runs ``[first_run, last_run)`` of a simulation, simulated for ``steps_done`` steps.

    ``log_sq_norm`` (runs_in_block, records) holds ``log ||w_t||^2`` at ``recorded_steps``
    (the recorded steps up to ``steps_done``, and ``steps_done`` itself); ``first_diverged``
    (runs_in_block,) the first step at which the divergence rule fired, or -1. Plain arrays
    and integers: picklable, so a block can be computed in another process.
    """

    first_run: int
    last_run: int
    log_sq_norm: np.ndarray
    first_diverged: np.ndarray
    recorded_steps: np.ndarray
    steps_done: int
    interrupted: bool
    loss_sums: np.ndarray | None = None  # (runs_in_block, batches), families with gradients
    overflowed: np.ndarray | None = None  # (runs_in_block,) bool, families with gradients


# A block's runs are cut into this many parts per thread, so that a thread slowed down by other
# work on the machine leaves its remaining parts to the others.
PARTS_PER_THREAD = 4


def numba_threads() -> int:
    """Numba's thread count in the calling thread (``numba.get_num_threads()``: a caller's
    ``numba.set_num_threads``, else ``NUMBA_NUM_THREADS``), without starting Numba's threading
    layer when nothing has started it: ``get_num_threads`` would start the layer's thread pool
    (idle threads for kernels this package does not have), and before that no thread can have
    set a count of its own, so the count is ``NUMBA_NUM_THREADS``. (``_is_initialized`` is a
    Numba internal; without it, ``get_num_threads`` is asked.)"""
    try:
        from numba.np.ufunc import parallel

        started = bool(parallel._is_initialized)
    except (ImportError, AttributeError):  # pragma: no cover - another Numba version
        started = True
    threads = numba.get_num_threads() if started else numba.config.NUMBA_NUM_THREADS
    return max(1, int(threads))


def parts(runs: int, threads: int):
    """Contiguous ``(start, stop)`` parts of ``range(runs)`` for ``threads`` threads: one part
    with one thread, else ``PARTS_PER_THREAD`` per thread (at most one per run), sizes
    differing by at most one."""
    count = 1 if threads <= 1 else max(1, min(runs, PARTS_PER_THREAD * threads))
    edges = [runs * i // count for i in range(count + 1)]
    return [(edges[i], edges[i + 1]) for i in range(count)]


# Kernel parts running at once in this process, over every simulate call and every calling
# thread: at most NUMBA_NUM_THREADS (the cores Numba was given), so that callers that run
# simulations in several threads at once (a thread pool, Dask's worker threads) share the cores
# instead of each starting a pool of its own size. (Under the earlier parallel kernels Numba's
# threading layer played this part.) Held only around one kernel call: never nested.
_RUNNING = threading.BoundedSemaphore(max(1, int(numba.config.NUMBA_NUM_THREADS)))


def _run_part(state, start: int, stop: int, first: int, last: int) -> None:
    with _RUNNING:
        state.advance_part(start, stop, first, last)


class _PartRunner:
    """``advance(first, last)`` of a block: every part from step ``first`` to ``last``, on a
    pool of ``threads`` threads (in the calling thread when there is one part).

    Each part is a serial kernel call on its own rows of the state, so parts never write to
    the same memory and a run's bits do not depend on the part or thread that ran it. At most
    ``NUMBA_NUM_THREADS`` parts run at once in the process, whatever the number of callers. The call
    returns when every part is done (the state is whole between chunks); the pool is shut
    down, waiting for any part still running, on exit, also after an exception.
    """

    def __init__(self, state: Runs, bounds, threads: int):
        self._state = state
        self._bounds = bounds
        self._threads = min(threads, len(bounds))
        self._pool = None

    def __enter__(self):
        if self._threads > 1:
            self._pool = ThreadPoolExecutor(max_workers=self._threads,
                                            thread_name_prefix="fastsgdstab-simulate")
        return self.advance

    def advance(self, first: int, last: int) -> None:
        state = self._state
        if self._pool is None:
            for start, stop in self._bounds:
                _run_part(state, start, stop, first, last)
            return
        futures = [self._pool.submit(_run_part, state, start, stop, first, last)
                   for start, stop in self._bounds]
        for future in futures:
            future.result()  # (re-raises a part's exception)

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        return False


def run_block(settings: Settings, first_run: int, last_run: int, *, chunk_steps=None,
               on_chunk=None) -> Block:
    """Simulate the runs ``[first_run, last_run)`` (global indices, ``0 <= first_run < last_run
    <= settings.runs``) of the simulation that ``settings`` describes.

    Run j's random numbers come from the stream keyed by ``(settings.seed, j)`` whatever block
    it is computed in, so the rows of blocks that partition ``[0, runs)``, concatenated in run
    order, are bit for bit those of ``simulate`` (``combine`` does the concatenation and the
    statistics). Ctrl-C stops the block after the current chunk (main thread only: in a worker
    thread every block runs to the end). The block's runs are cut into ``parts`` that a pool of
    ``numba_threads()`` threads runs chunk by chunk (serial kernels that release the GIL); a
    caller's Numba thread count is read, never changed. ``chunk_steps`` and ``on_chunk`` are
    ``_simulate``'s test hooks.
    """
    first_run, last_run = int(first_run), int(last_run)
    if not 0 <= first_run < last_run <= settings.runs:
        raise ValueError(f"a block of runs must satisfy 0 <= first_run < last_run <= runs = "
                         f"{settings.runs}; got [{first_run}, {last_run})")
    state = Runs(settings, first_run, last_run)
    # compiles (or loads from the cache) without simulating, in this thread: not timed below
    _run_part(state, 0, 1, 0, 0)
    threads = numba_threads()
    bounds = parts(last_run - first_run, threads)
    with _PartRunner(state, bounds, threads) as advance:
        done, interrupted = _run_chunks(advance, settings.steps,
                                        _estimated_seconds_per_step(settings,
                                                                    last_run - first_run),
                                        settings.progress, chunk_steps, on_chunk)
    recorded_steps, log_sq_norm = state.records_up_to(done)
    return Block(first_run, last_run, np.ascontiguousarray(log_sq_norm), state.first_diverged,
                  recorded_steps, int(done), bool(interrupted),
                  state.loss_sums if state.affine else None,
                  state.overflowed if state.affine else None)


def combine(settings: Settings, blocks, elapsed_seconds: float) -> SimulationResult:
    """The ``SimulationResult`` of blocks that partition the runs, given in run order.

    Every block must have completed the same number of steps (interrupted blocks: the caller
    reruns or trims them). Warns (``SimulationWarning``) as ``simulate`` does when the result is
    partial or the sample mean square is untrustworthy.
    """
    blocks = list(blocks)
    if not blocks:
        raise ValueError("combine needs at least one block")
    expected = 0
    for block in blocks:
        if block.first_run != expected:
            raise ValueError(f"blocks must partition [0, {settings.runs}) in run order; a block "
                             f"starts at run {block.first_run}, expected {expected}")
        expected = block.last_run
    if expected != settings.runs:
        raise ValueError(f"blocks must partition [0, {settings.runs}) in run order; they end at "
                         f"run {expected}")
    done = blocks[0].steps_done
    if any(block.steps_done != done for block in blocks):
        raise ValueError(f"blocks completed different numbers of steps "
                         f"({sorted({block.steps_done for block in blocks})}); combine only "
                         f"blocks that completed the same steps")
    interrupted = any(block.interrupted for block in blocks) or done < settings.steps
    log_sq_norm = np.concatenate([block.log_sq_norm for block in blocks], axis=0)
    first_diverged = np.concatenate([block.first_diverged for block in blocks])
    if done < settings.steps:
        warn(f"simulation interrupted after {done} of {settings.steps} steps; the result covers "
             f"the completed steps (interrupted=True)", SimulationWarning)
    excess = {}
    if settings.burn_in is not None:
        excess = _excess_loss(settings,
                              np.concatenate([block.loss_sums for block in blocks], axis=0),
                              np.concatenate([block.overflowed for block in blocks]), done)
    return _result(log_sq_norm, blocks[0].recorded_steps, first_diverged, done, interrupted,
                   elapsed_seconds, **settings.reported(), **excess)


def _excess_loss(settings: Settings, loss_sums: np.ndarray, overflowed: np.ndarray,
                 done: int) -> dict:
    """The time-averaged excess loss ``(1/2) w_t^T H w_t`` over the steps ``burn_in < t <=
    done`` and all runs, and its standard error: from the spread of the runs' own averages
    (independent) with two runs or more, from the batch means over time (``LOSS_BATCHES``
    consecutive batches) with one run. Infinite (and a warning) if a run overflowed: no
    stationary state. None before the burn-in ends (an interrupted run)."""
    burn_in, runs = settings.burn_in, loss_sums.shape[0]
    averaged = done - burn_in
    fields = {}
    if averaged <= 0:
        return fields
    if np.any(overflowed):
        warn(f"{int(overflowed.sum())} of {runs} runs left the float range (||w_t||^2 > 1e250, "
             f"stopped there and counted as diverged): no stationary state at this lr; "
             f"excess_loss is inf", SimulationWarning)
        return dict(fields, excess_loss=math.inf, excess_loss_stderr=math.inf)
    batches = loss_sums.shape[1]
    window = settings.steps - burn_in
    counts = np.bincount(np.arange(averaged) * batches // window, minlength=batches)
    run_means = loss_sums.sum(axis=1) / averaged
    value = float(np.mean(run_means))
    if runs >= 2:
        stderr = float(np.std(run_means, ddof=1) / math.sqrt(runs))
    else:
        used = counts > 0
        means = loss_sums[0, used] / counts[used]
        if means.shape[0] >= 2:
            stderr = float(np.std(means, ddof=1) / math.sqrt(means.shape[0]))
        else:
            stderr = math.inf  # one batch of time and one run: no estimate of the error
    return dict(fields, excess_loss=value, excess_loss_stderr=stderr)


def _untrustworthy_message(ess, untrustworthy, recorded_steps, runs) -> str:
    """Why the sample mean is flagged: rare runs (an effective sample size below
    ``RARE_RUNS_FRACTION`` of the runs, at the worst recorded step) or too few runs."""
    first = int(recorded_steps[np.argmax(untrustworthy)])
    flagged = ess[untrustworthy]
    where = (f"the sample mean of ||w_t||^2 is untrustworthy at {int(untrustworthy.sum())} of "
             f"{untrustworthy.size} recorded steps (first at t = {first}, "
             f"log_mean_sq_untrustworthy): ")
    if not np.any(np.isfinite(flagged)):
        return (where + "no effective sample size exists there, every run having reached exactly "
                "0 (or overflowed); use second_moment for the exact mean square.")
    smallest = float(np.nanmin(flagged))
    if smallest < RARE_RUNS_FRACTION * runs:
        return (where + f"rare runs dominate, an effective sample size as small as {smallest:.3g} "
                f"of {runs} runs carries it. Near and above the mean-square threshold more runs "
                f"do not cure this; use second_moment for the exact mean square.")
    needed = max(MIN_EFFECTIVE_RUNS, MIN_EFFECTIVE_FRACTION * runs)
    return (where + f"too few runs, an effective sample size as small as {smallest:.3g} of {runs} "
            f"runs carries it (fewer than {needed:g}); use more runs, or second_moment for the "
            f"exact mean square.")


def _result(log_sq_norm, recorded_steps, first_diverged, done, interrupted, elapsed,
            excess_loss=None, excess_loss_stderr=None, **settings):
    runs = log_sq_norm.shape[0]
    log_sq_norm = np.ascontiguousarray(log_sq_norm)
    lyapunov, lyapunov_stderr = _lyapunov(log_sq_norm, int(recorded_steps[-1]))
    log_mean, log_mean_stderr, ess = _log_mean_and_ess(log_sq_norm)
    with np.errstate(invalid="ignore"):
        untrustworthy = ~(ess >= max(MIN_EFFECTIVE_RUNS, MIN_EFFECTIVE_FRACTION * runs))
    if np.any(untrustworthy):
        warn(_untrustworthy_message(ess, untrustworthy, recorded_steps, runs), SimulationWarning)
    diverged = (first_diverged >= 0) & (first_diverged <= done)
    count = int(diverged.sum())
    return SimulationResult(
        log_sq_norm=log_sq_norm,
        recorded_steps=recorded_steps,
        lyapunov_exponent=lyapunov,
        lyapunov_exponent_stderr=lyapunov_stderr,
        log_mean_sq=log_mean,
        log_mean_sq_stderr=log_mean_stderr,
        effective_sample_size=ess,
        log_mean_sq_untrustworthy=untrustworthy,
        diverged=diverged,
        first_diverged_step=np.where(diverged, first_diverged, -1),
        diverged_fraction=count / runs,
        diverged_fraction_interval=wilson_interval(count, runs),
        steps_completed=int(done),
        interrupted=bool(interrupted),
        elapsed_seconds=float(elapsed),
        excess_loss=excess_loss,
        excess_loss_stderr=excess_loss_stderr,
        **settings,
    )
