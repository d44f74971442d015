"""Running the library's work on a Dask cluster (``client=`` of ``simulate``, ``stability_map``,
``sweep``; ``--scheduler`` of the command line).

The library builds no scheduler of its own: Dask (``dask.distributed``) moves the data, runs the
tasks, retries those of a worker that died, and reports failures. This module only cuts the work
into tasks whose results are the same numbers the local call computes:

* ``simulate``: runs are independent and run j draws every random number from its own stream
  keyed by ``(seed, j)``, so a block of runs computed anywhere is bit for bit those rows of the
  full simulation. The blocks are those of the local call: ``_blocks`` (the block runner, the
  internal API shared with ``simulation``) checks the arguments, runs a block on a worker (on
  the worker's share of the cores, in threads) and combines the blocks in run order, computing
  the statistics once, on the client.
* ``stability_map``: contiguous blocks of the (sorted) batch sizes, or of the learning rates, each
  a local ``stability_map`` on a worker. Every value carries its proven bracket, so the map is
  equal to the local one to the certified bound (the values themselves may differ in the last
  digits: a block's shared basis starts from a different batch size); so is ``critical_lr``,
  also found through the block's shared basis (with its proven bracket for plain SGD).
* ``figure1``: the paper's experiment split into one task per (lr, sampling, sigma) panel row,
  each the public ``figure1`` on that part of the grid with the seed offset of its first cell
  (cell i uses seed + i): bit-identical to the local experiment.

The family is sent to the cluster once (``share``: a future holding it, which the workers
fetch from each other and Dask recomputes if the workers holding it die): every task gets a
reference to it, not a copy in its arguments.

Worker threads: a task sets its own Numba thread count (``numba.set_num_threads`` is per
thread) and, while any task of this library runs in a worker process, BLAS pools are limited
(threadpoolctl, restored when the last one ends), both to ``cores // slots``: the host's cores
divided by the task slots (worker threads) of every worker on that host, so that workers x
threads never exceeds the cores. The simulation's kernels are serial (a block runs its parts on
that many Python threads), so concurrent tasks in one worker never launch Numba parallel
kernels at once.

Nothing here is imported by ``import fastsgdstab``; dask is imported only when a client (or a
scheduler address) is given.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import threading
import time
import warnings

import numpy as np

from ._config import DISTRIBUTED_TASKS_PER_SLOT, SIMULATE_MIN_RUNS_PER_TASK
from ._warnings import warn

__all__ = ["share", "check_client", "task_slots", "worker_threads", "run_task", "simulate", "stability_map",
           "figure1", "connect", "on_scheduler", "as_completed_with_progress", "split"]

DISTRIBUTED_EXTRA_MESSAGE = (
    "running on a Dask cluster needs dask.distributed: pip install 'fastsgdstab[distributed]'")


# ------------------------------------------------------------------------------ the client
def _distributed_module():
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - the extra is installed in the test env
        raise ImportError(DISTRIBUTED_EXTRA_MESSAGE) from exc
    return distributed


def check_client(client):
    """The client itself, or a TypeError naming what is accepted."""
    distributed = _distributed_module()
    if not isinstance(client, distributed.Client):
        raise TypeError(f"client must be a dask.distributed.Client (or None to compute locally); "
                        f"got {type(client).__name__}")
    if client.status not in ("running", "connecting", "newly-created"):
        raise ValueError(f"client must be connected to a scheduler; its status is {client.status!r}")
    return client


def task_slots(client) -> dict:
    """``{worker address: task slots on its host}``: the threads of every worker on the same
    host; a task there uses ``cores // slots`` Numba and BLAS threads."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    hosts = {address: info.get("host") or _host(address) for address, info in workers.items()}
    per_host = {}
    for address, info in workers.items():
        per_host[hosts[address]] = per_host.get(hosts[address], 0) + int(info.get("nthreads") or 1)
    return {address: per_host[host] for address, host in hosts.items()}


def _total_slots(client) -> int:
    """Task slots (worker threads) of the whole cluster, at least 1."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return max(1, sum(int(info.get("nthreads") or 1) for info in workers.values()))


def _host(address: str) -> str:
    """``tcp://127.0.0.1:40123`` -> ``127.0.0.1``."""
    location = address.split("://", 1)[-1]
    return location.rsplit(":", 1)[0] if ":" in location else location.split("/", 1)[0]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _threads_here(slots: dict) -> int:
    """Threads for one task in this worker: the host's cores over its task slots (>= 1)."""
    here = None
    try:
        from distributed import get_worker

        worker = get_worker()
        here = slots.get(worker.address)
        if here is None:  # a worker that joined after the work was submitted
            here = int(worker.state.nthreads)
    except (ImportError, ValueError, AttributeError):
        pass
    return max(1, _cores() // max(1, here or 1))


# Worker-process state of the BLAS limits: applied when the first task of this library starts in
# the process, restored when the last one ends (a BLAS limit is process-wide, not per thread).
_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_LIMITER = None


@contextlib.contextmanager
def worker_threads(threads: int):
    """Within the block: Numba's threads for this thread and BLAS's for the process <= ``threads``.

    ``numba.set_num_threads`` is thread-local (restored on exit); the BLAS limit is shared by the
    tasks of this library running in the process and restored when the last one ends.
    """
    global _BLAS_USERS, _BLAS_LIMITER
    import numba

    threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    with _BLAS_LOCK:
        if _BLAS_USERS == 0:
            try:
                from threadpoolctl import threadpool_limits

                _BLAS_LIMITER = threadpool_limits(limits=threads)
            except ImportError:  # pragma: no cover - a dependency of scikit-learn and ours
                _BLAS_LIMITER = None
        _BLAS_USERS += 1
    try:
        yield threads
    finally:
        numba.set_num_threads(previous)
        with _BLAS_LOCK:
            _BLAS_USERS -= 1
            if _BLAS_USERS == 0 and _BLAS_LIMITER is not None:
                _BLAS_LIMITER.restore_original_limits()
                _BLAS_LIMITER = None


def run_task(slots: dict, function, *args, **kwargs):
    """``function(*args, **kwargs)`` on a worker with its thread limits; returns ``(value,
    warnings)`` where ``warnings`` lists ``(category, message)`` raised meanwhile (re-issued on
    the client by ``reissue``)."""
    with worker_threads(_threads_here(slots)), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = function(*args, **kwargs)
    return value, [(w.category, str(w.message)) for w in caught]


def reissue(caught) -> None:
    """Warn on the client what a task warned on its worker (each distinct message once),
    attributed to the caller of the public function whose ``client=`` hook called this module."""
    seen = set()
    for category, message in caught:
        if (category, message) not in seen:
            seen.add((category, message))
            warn(message, category)


def _identity(value):
    return value


def share(client, value):
    """A future holding ``value`` on the cluster, sent once: tasks that take it as an argument
    fetch it from the worker that holds it, not from the client. It is a task (the value in its
    arguments) rather than ``client.scatter``, so that if every worker holding it dies, Dask
    recomputes it instead of failing the tasks that need it."""
    return client.submit(_identity, value, pure=False)


def split(count: int, parts: int):
    """``parts`` contiguous ``(start, stop)`` blocks of ``range(count)``, sizes differing by at
    most one (no empty block)."""
    parts = max(1, min(int(parts), int(count)))
    edges = [count * i // parts for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts)]


def _progress_bar(total: int, progress, unit: str, desc: str):
    """A tqdm bar on stderr (``progress=None``: only when stderr is a terminal), or None."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.2, leave=False)


def as_completed_with_progress(client, futures, *, progress, unit: str, desc: str, sizes=None):
    """Yield ``(index, future)`` as the futures finish (errors included), advancing a progress
    bar by ``sizes[index]`` (1 by default). On KeyboardInterrupt or any exception the futures not
    yet finished are cancelled before it propagates."""
    distributed = _distributed_module()
    index_of = {future.key: i for i, future in enumerate(futures)}
    bar = _progress_bar(sum(sizes) if sizes is not None else len(futures), progress, unit, desc)
    try:
        for future in distributed.as_completed(futures, loop=client.loop):
            index = index_of[future.key]
            if bar is not None:
                bar.update(sizes[index] if sizes is not None else 1)
            yield index, future
    except BaseException:
        client.cancel([future for future in futures if not future.done()])
        raise
    finally:
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------------ simulate
def _simulate_block(slots, settings, first_run, last_run):
    from ._blocks import run_block

    return run_task(slots, run_block, settings, first_run, last_run)


def simulate(client, family, lr, batch_size, steps, runs, *, progress=None, runs_per_task=None,
             **kwargs):
    """``fastsgdstab.simulate`` on a Dask cluster: the same result, bit for bit.

    The runs are cut into contiguous blocks (about ``DISTRIBUTED_TASKS_PER_SLOT`` per worker
    thread, at least ``SIMULATE_MIN_RUNS_PER_TASK`` runs each, or ``runs_per_task``); the checked
    settings (with the family) are scattered once to every worker; each task simulates its
    block (run j's random streams are keyed by ``(seed, j)``, so a block is exactly those rows
    of the full run); the client concatenates the blocks and computes the statistics. Every
    other keyword is ``simulate``'s, passed on untouched. ``progress``: a bar over the runs
    (None: when stderr is a terminal). ``elapsed_seconds`` is the wall time on the client.
    Ctrl-C cancels the unfinished tasks and raises KeyboardInterrupt.
    """
    started = time.perf_counter()
    client = check_client(client)
    from ._blocks import check_arguments, combine

    # The block runner's check (simulate's keywords, its defaults) rejects an unknown keyword,
    # so keywords that simulate gains later pass through unchanged.
    bound = inspect.signature(check_arguments).bind(family, lr, batch_size, steps, runs,
                                                    **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments, progress=False)
    settings = check_arguments(**arguments)
    runs = int(settings.runs)
    slots = task_slots(client)
    if runs_per_task is None:
        tasks = _total_slots(client) * DISTRIBUTED_TASKS_PER_SLOT
        runs_per_task = max(SIMULATE_MIN_RUNS_PER_TASK, math.ceil(runs / tasks))
    elif isinstance(runs_per_task, bool) or not isinstance(runs_per_task, (int, np.integer)) \
            or runs_per_task < 1:
        raise ValueError(f"runs_per_task must be an integer >= 1; got {runs_per_task!r}")
    bounds = [(first, min(runs, first + int(runs_per_task)))
              for first in range(0, runs, int(runs_per_task))]
    shared = share(client, settings)
    futures = [client.submit(_simulate_block, slots, shared, first, last, pure=False)
               for first, last in bounds]
    blocks = [None] * len(bounds)
    caught = []
    for index, future in as_completed_with_progress(
            client, futures, progress=progress, unit="run", desc="simulate",
            sizes=[last - first for first, last in bounds]):
        blocks[index], warned = future.result()
        caught.extend(warned)
    reissue(caught)
    return combine(settings, blocks, time.perf_counter() - started)


# ------------------------------------------------------------------------------ stability_map
def _map_block(slots, family, lrs, batch_sizes, sampling, rtol, kwargs):
    from .phase import stability_map as local_map

    return run_task(slots, local_map, family, lrs, batch_sizes, sampling=sampling, rtol=rtol,
                    **kwargs)


def stability_map(client, family, lrs, batch_sizes, *, sampling="bernoulli", rtol=1e-6,
                  split_by="auto", tasks=None, **kwargs):
    """``fastsgdstab.stability_map`` on a Dask cluster: the same map to its certified bound.

    The batch sizes (``split_by="batch_sizes"``) or learning rates (``"lrs"``; ``"auto"``: the
    longer grid) are sorted and cut into ``tasks`` contiguous blocks (default: about
    ``DISTRIBUTED_TASKS_PER_SLOT`` per worker thread, capped by the grid); each block is a local
    ``stability_map`` on a worker, with the family scattered once. The blocks are assembled in
    the order of the grids given. At every point the proven bracket ``[radius_lower,
    radius_upper]`` holds the true radius, as in the local call; ``critical_lr`` is found through
    the block's shared basis, equal to the local call's within the engine's tolerance, with its
    proven bracket (plain SGD; split by learning rates, every block proves one for every batch
    size, and the result holds their intersection and the first block's value).
    ``operator_products`` is the sum over the blocks, ``elapsed_seconds`` the wall time. Every
    other keyword (``momentum``, ``nesterov``) is ``stability_map``'s, passed on untouched; the
    other fields of the result come from the blocks (all equal).
    """
    from dataclasses import replace

    from .phase import check_map_arguments

    started = time.perf_counter()
    client = check_client(client)
    family, lrs, batch_sizes, sampling, rtol, _, _ = check_map_arguments(
        family, lrs, batch_sizes, sampling, rtol, **kwargs)
    if split_by == "auto":
        split_by = "lrs" if lrs.size > batch_sizes.size else "batch_sizes"
    if split_by not in ("batch_sizes", "lrs"):
        raise ValueError(f"split_by must be 'auto', 'batch_sizes' or 'lrs'; got {split_by!r}")
    axis = batch_sizes if split_by == "batch_sizes" else lrs
    slots = task_slots(client)
    if tasks is None:
        tasks = _total_slots(client) * DISTRIBUTED_TASKS_PER_SLOT
    elif isinstance(tasks, bool) or not isinstance(tasks, (int, np.integer)) or tasks < 1:
        raise ValueError(f"tasks must be an integer >= 1; got {tasks!r}")
    # Contiguous blocks of the sorted grid: a block's shared basis carries over from one batch
    # size (or lr) to the next, as in the local call.
    order = np.argsort(axis, kind="stable")
    blocks = [order[first:last] for first, last in split(axis.size, tasks)]
    shared = share(client, family)
    futures = []
    for block in blocks:
        block_lrs, block_batch_sizes = (lrs, batch_sizes[block]) if split_by == "batch_sizes" \
            else (lrs[block], batch_sizes)
        futures.append(client.submit(_map_block, slots, shared, block_lrs, block_batch_sizes,
                                     sampling, rtol, kwargs, pure=False))
    shape = (batch_sizes.size, lrs.size)
    radius, lower, upper = np.empty(shape), np.empty(shape), np.empty(shape)
    critical = np.empty(batch_sizes.size)
    # Proven brackets of the critical lrs (plain SGD; None with momentum): split by lrs, every
    # block proves its own, and their intersection is proven too.
    bounds = np.array([np.full(batch_sizes.size, -np.inf), np.full(batch_sizes.size, np.inf)])
    products = 0
    caught = []
    part = None
    for index, future in as_completed_with_progress(client, futures, progress=False, unit="block",
                                                    desc="stability_map"):
        part, warned = future.result()
        caught.extend(warned)
        block = blocks[index]
        products += part.operator_products
        if split_by == "batch_sizes":
            radius[block], lower[block], upper[block] = (part.spectral_radius, part.radius_lower,
                                                         part.radius_upper)
            critical[block] = part.critical_lr
            if getattr(part, "critical_lr_lower", None) is not None:
                bounds[:, block] = part.critical_lr_lower, part.critical_lr_upper
        else:
            radius[:, block], lower[:, block], upper[:, block] = (
                part.spectral_radius, part.radius_lower, part.radius_upper)
            if index == 0:  # the same block's value whatever the order of completion
                critical[:] = part.critical_lr
            if getattr(part, "critical_lr_lower", None) is not None:
                bounds[0] = np.maximum(bounds[0], part.critical_lr_lower)
                bounds[1] = np.minimum(bounds[1], part.critical_lr_upper)
    reissue(caught)
    extra = {}
    if getattr(part, "critical_lr_lower", None) is not None:
        critical = np.clip(critical, bounds[0], bounds[1])
        extra = {"critical_lr_lower": bounds[0], "critical_lr_upper": bounds[1]}
    return replace(part, lrs=lrs, batch_sizes=batch_sizes, spectral_radius=radius,
                   radius_lower=lower, radius_upper=upper, critical_lr=critical,
                   operator_products=products, elapsed_seconds=time.perf_counter() - started,
                   **extra)


# ------------------------------------------------------------------------------ figure 1
def _figure1_part(slots, lr, sampling, sigma, batch_sizes, seed, kwargs):
    from .experiments import figure1 as local_figure1

    return run_task(slots, local_figure1, [lr], [sampling], sigmas=[sigma],
                    batch_sizes=batch_sizes, seed=seed, progress=False, **kwargs)


def figure1(client, lrs=None, samplings=None, *, sigmas=range(1, 51), batch_sizes=range(1, 50),
            seed=0, progress=None, **kwargs):
    """``fastsgdstab.experiments.figure1`` on a Dask cluster: the same result, bit for bit.

    One task per (lr, sampling, sigma): the public ``figure1`` on that row of cells with the
    seed of its first cell (cell i of the whole grid uses ``seed + i``, in the order lr,
    sampling, sigma, batch size), so every cell is computed exactly as in the local call. Other
    keywords (``runs``, ``steps``, ``n``, ``sharpness``) are figure1's. ``progress``: a bar over
    the cells. (Each task recomputes the critical lrs of its family, which the local call
    shares between learning rates: at most ``len(lrs)`` times the exact work, in parallel.)
    """
    from ._validation import check_grid, check_lrs
    from .experiments import FIGURE1_LRS, FIGURE1_SAMPLINGS, Figure1
    from .sampling import check_sampling

    started = time.perf_counter()
    client = check_client(client)
    lrs = [float(lr) for lr in check_lrs(FIGURE1_LRS if lrs is None else lrs)]
    samplings = [check_sampling(s) for s in (FIGURE1_SAMPLINGS if samplings is None else samplings)]
    sigmas = [int(s) for s in check_grid(list(sigmas), "sigmas")]
    batch_sizes = [int(b) for b in check_grid(list(batch_sizes), "batch_sizes")]
    if not samplings:
        raise ValueError("samplings must name at least one sampling scheme")
    for name, values in [("lrs", lrs), ("samplings", samplings), ("sigmas", sigmas),
                         ("batch_sizes", batch_sizes)]:
        if len(set(values)) < len(values):
            raise ValueError(f"{name} must not repeat a value; got {values}")
    slots = task_slots(client)
    parts = [(lr, sampling, sigma) for lr in lrs for sampling in samplings for sigma in sigmas]
    futures = [client.submit(_figure1_part, slots, lr, sampling, sigma, batch_sizes,
                             seed + index * len(batch_sizes), kwargs, pure=False)
               for index, (lr, sampling, sigma) in enumerate(parts)]
    results = [None] * len(parts)
    for index, future in as_completed_with_progress(
            client, futures, progress=progress, unit="cell", desc="figure1",
            sizes=[len(batch_sizes)] * len(parts)):
        results[index], _ = future.result()  # figure1 silences its own warnings
    first = results[0]
    fields = ("lr", "sampling", "batch_size", "sigma", "diverged_runs", "simulated_diverges",
              "exact_diverges", "theorem1_diverges", "critical_lr")
    arrays = {name: np.concatenate([getattr(part, name) for part in results]) for name in fields}
    return Figure1(**arrays, runs=first.runs, steps=first.steps, seed=seed, n=first.n,
                   sharpness=first.sharpness, elapsed_seconds=time.perf_counter() - started)


# ------------------------------------------------------------------------------ command line
@contextlib.contextmanager
def connect(address, *, timeout: float = 20.0):
    """A ``dask.distributed.Client`` connected to the scheduler at ``address``, closed on exit.

    Raises OSError (naming the address) when no scheduler answers within ``timeout`` seconds,
    ValueError for an empty address, ImportError when dask.distributed is not installed.
    """
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"--scheduler must be a scheduler address such as tcp://host:8786; "
                         f"got {address!r}")
    distributed = _distributed_module()
    try:
        client = distributed.Client(address.strip(), timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise OSError(f"--scheduler {address}: no Dask scheduler answered within {timeout:g} s "
                      f"({type(exc).__name__}: {exc})") from None
    try:
        yield client
    finally:
        client.close()


def on_scheduler(address, function, *args, **kwargs):
    """``function(client, *args, **kwargs)`` with a client connected to ``address``, then closed.

    The command line's ``--scheduler ADDRESS``: e.g. ``on_scheduler(address, figure1, lrs, ...)``
    or ``on_scheduler(address, stability_map, family, lrs, batch_sizes, sampling=...)``.
    """
    with connect(address) as client:
        return function(client, *args, **kwargs)
