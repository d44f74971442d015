"""``sweep``: many families times many settings in one call, one tidy table, local or on Dask.

The work is cut into tasks of one family and up to ``SWEEP_SETTINGS_PER_TASK`` of its settings
(the family's reduction and its critical learning rates are shared within a task). A row's own
failure (a batch size beyond that family's n, say) is caught where it happens and named in the
row's ``error`` column; a task's failure (an unreadable family file, a worker lost more often
than Dask's retry limit) marks that task's rows. Ctrl-C returns the rows finished so far, the
others marked ``not run``. Nothing is lost because something else failed.

The module carries a private name so that it does not hide the function ``sweep``.
"""

from __future__ import annotations

import inspect
import itertools
import math
import numbers
import os
import sys
import warnings
from collections.abc import Mapping

import numpy as np

from ._warnings import warn
from ._config import DECISION_MARGIN, SWEEP_SETTINGS_PER_TASK
from ._validation import check_lr
from .family import HessianFamily, family_of
from .sampling import check_sampling

__all__ = ["sweep"]

_EXACT_COLUMNS = ("verdict", "spectral_radius", "spectral_radius_lower", "spectral_radius_upper",
                  "critical_lr", "critical_batch_size")
_SIMULATION_COLUMNS = ("diverged_fraction", "diverged_fraction_low", "diverged_fraction_high",
                       "lyapunov_exponent", "lyapunov_exponent_stderr")
_TEXT_COLUMNS = ("family", "sampling", "verdict", "warning", "error")
_SIMULATE_RESERVED = ("lr", "batch_size", "sampling", "progress", "client", "family")


# ------------------------------------------------------------------------------ checks
def _check_families(families):
    """``[(label, family or path)]``: a mapping label -> family/path, or a sequence of them."""
    if isinstance(families, (HessianFamily, str, bytes, os.PathLike)) or family_of(families) is not None:
        families = [families]
    if isinstance(families, Mapping):
        items = [(str(label), value) for label, value in families.items()]
    else:
        try:
            values = list(families)
        except TypeError:
            raise TypeError(
                f"families must be a sequence (or a dict label -> family) of HessianFamily objects "
                f"or paths of saved families (.npz); got {type(families).__name__}") from None
        items = [(os.fspath(value) if isinstance(value, (str, os.PathLike)) else str(index), value)
                 for index, value in enumerate(values)]
    if not items:
        raise ValueError("families must hold at least one family")
    # A wrapper such as torch's ModelFamily stands for the family it holds (family_of).
    items = [(label, family_of(value) or value) for label, value in items]
    for label, value in items:
        if not isinstance(value, (HessianFamily, str, os.PathLike)):
            raise TypeError(
                f"families must hold HessianFamily objects (or objects whose .family is one, as "
                f"fastsgdstab.torch.family_from_model returns) or paths of saved families (.npz); "
                f"entry {label!r} is a {type(value).__name__}")
    labels = [label for label, _ in items]
    if len(set(labels)) < len(labels):
        repeated = next(label for label in labels if labels.count(label) > 1)
        raise ValueError(f"families: the label {repeated!r} appears twice (pass a dict with "
                         f"distinct labels)")
    return [(label, os.fspath(value) if isinstance(value, os.PathLike) else value)
            for label, value in items]


def _check_settings(settings):
    """A list of dicts with ``lr``, ``batch_size`` and ``sampling`` (default "bernoulli").

    A mapping of lists is a grid: every combination, the last key varying fastest.
    """
    if isinstance(settings, Mapping):
        if any(isinstance(values, (str, bytes)) or not np.iterable(values)
               for values in settings.values()):
            settings = [dict(settings)]
        else:
            names = list(settings)
            settings = [dict(zip(names, combination))
                        for combination in itertools.product(*(list(settings[name]) for name in names))]
    else:
        try:
            settings = list(settings)
        except TypeError:
            raise TypeError(
                f"settings must be a sequence of dicts (each with lr and batch_size) or a dict of "
                f"lists (a grid); got {type(settings).__name__}") from None
    if not settings:
        raise ValueError("settings must hold at least one setting (a dict with lr and batch_size)")
    checked = []
    for index, setting in enumerate(settings):
        if not isinstance(setting, Mapping):
            raise TypeError(f"settings[{index}] must be a dict with keys lr and batch_size "
                            f"(and optionally sampling and the exact functions' keywords); got "
                            f"{type(setting).__name__}")
        missing = [key for key in ("lr", "batch_size") if key not in setting]
        if missing:
            raise ValueError(f"settings[{index}] must give lr and batch_size; {' and '.join(missing)} "
                             f"missing in {dict(setting)!r}")
        setting = {str(key): value for key, value in setting.items()}
        setting["lr"] = check_lr(setting["lr"])
        setting["sampling"] = _check_sweep_sampling(setting.get("sampling", "bernoulli"))
        batch_size = setting["batch_size"]
        if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, numbers.Real):
            raise TypeError(f"settings[{index}]: batch_size must be a real number; got {batch_size!r}")
        setting["batch_size"] = float(batch_size)
        checked.append(setting)
    return checked


def _check_sweep_sampling(sampling) -> str:
    """The exact engine's schemes, and those only ``simulate`` knows (random reshuffling: no exact
    answer, the row is simulated only)."""
    if isinstance(sampling, str) and sampling in _simulation_only_schemes():
        return sampling
    return check_sampling(sampling)


def _simulation_only_schemes() -> tuple:
    from . import sampling

    schemes = getattr(sampling, "SIMULATION_SAMPLING_SCHEMES", sampling.SAMPLING_SCHEMES)
    return tuple(s for s in schemes if s not in sampling.SAMPLING_SCHEMES)


def _check_simulate(simulate):
    """``None`` or the keywords of ``fastsgdstab.simulate`` (steps and runs required)."""
    if simulate is None:
        return None
    if not isinstance(simulate, Mapping):
        raise TypeError(f"simulate must be None (no simulation) or a dict of simulate's keywords "
                        f"(steps and runs required); got {type(simulate).__name__}")
    simulate = dict(simulate)
    missing = [key for key in ("steps", "runs") if key not in simulate]
    if missing:
        raise ValueError(f"simulate must give steps and runs; {' and '.join(missing)} missing")
    reserved = [key for key in _SIMULATE_RESERVED if key in simulate]
    if reserved:
        raise ValueError(f"simulate must not give {', '.join(reserved)}: lr, batch_size and sampling "
                         f"come from settings, and progress is sweep's")
    return simulate


def _check_progress(progress):
    if progress is None or isinstance(progress, (bool, np.bool_)):
        return progress
    raise TypeError(f"progress must be None (when stderr is a terminal), True or False; got {progress!r}")


# ------------------------------------------------------------------------------ one task
def _failure(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _verdict(rho: float) -> str:
    """As ``report``: "converges" (rho < 1), "diverges" (rho > 1), "marginal" within the margin."""
    if rho > 1.0 + DECISION_MARGIN:
        return "diverges"
    if rho < 1.0 - DECISION_MARGIN:
        return "converges"
    return "marginal"


def _accepted(function, extras: dict) -> dict:
    """The extra setting keys that are keywords of ``function``."""
    parameters = inspect.signature(function).parameters
    return {key: value for key, value in extras.items() if key in parameters}


def _check_extras(extras: dict, simulated: bool) -> None:
    """Every extra setting key must be a keyword of a function the row calls."""
    from .moments import critical_batch_size, critical_lr, spectral_radius
    from .simulation import simulate

    functions = [spectral_radius, critical_lr, critical_batch_size] + ([simulate] if simulated else [])
    known = set().union(*(inspect.signature(f).parameters for f in functions))
    unknown = [key for key in extras if key not in known]
    if unknown:
        raise TypeError(f"setting key {unknown[0]!r} is not a keyword of "
                        f"{', '.join(f.__name__ for f in functions)}")


def _row(family, setting, simulate_kwargs, caches):
    """The computed columns of one (family, setting); exceptions propagate."""
    lr, batch_size, sampling = setting["lr"], setting["batch_size"], setting["sampling"]
    extras = {key: value for key, value in setting.items()
              if key not in ("lr", "batch_size", "sampling")}
    extras_key = tuple(sorted((key, repr(value)) for key, value in extras.items()))
    _check_extras(extras, simulate_kwargs is not None)
    if sampling in _simulation_only_schemes():
        row = {}  # no exact answer (the exact columns stay NaN): simulated only
    else:
        row = _exact_columns(family, lr, batch_size, sampling, extras, extras_key, caches)
    if simulate_kwargs is not None:
        row.update(_simulation_columns(family, lr, batch_size, sampling, extras, simulate_kwargs))
    return row


def _exact_columns(family, lr, batch_size, sampling, extras, extras_key, caches):
    from .moments import critical_batch_size, critical_lr, spectral_radius

    bracket = spectral_radius(family, lr, batch_size, sampling=sampling, bounds=True,
                              **_accepted(spectral_radius, extras))
    lr_key = (batch_size, sampling, extras_key)
    if lr_key not in caches["critical_lr"]:
        caches["critical_lr"][lr_key] = float(critical_lr(family, batch_size, sampling=sampling,
                                                          **_accepted(critical_lr, extras)))
    batch_key = (lr, sampling, extras_key)
    if batch_key not in caches["critical_batch_size"]:
        caches["critical_batch_size"][batch_key] = float(critical_batch_size(
            family, lr, sampling=sampling, **_accepted(critical_batch_size, extras)))
    row = dict(verdict=_verdict(bracket.value), spectral_radius=float(bracket.value),
               spectral_radius_lower=float(bracket.lower),
               spectral_radius_upper=float(bracket.upper),
               critical_lr=caches["critical_lr"][lr_key],
               critical_batch_size=caches["critical_batch_size"][batch_key])
    if family.gradients is not None:  # the loss floor (issue 20): inf where none exists
        from .loss_floor import NoStationaryStateError, stationary
        try:
            row["excess_loss"] = float(stationary(family, lr, batch_size, sampling=sampling,
                                                  **_accepted(stationary, extras)).excess_loss)
        except NoStationaryStateError:
            row["excess_loss"] = math.inf
    return row


def _simulation_columns(family, lr, batch_size, sampling, extras, simulate_kwargs):
    from .simulation import simulate

    kwargs = dict(simulate_kwargs)
    steps, runs = kwargs.pop("steps"), kwargs.pop("runs")
    result = simulate(family, lr, batch_size, steps, runs, sampling=sampling, progress=False,
                      **_accepted(simulate, extras), **kwargs)
    low, high = result.diverged_fraction_interval
    row = dict(diverged_fraction=float(result.diverged_fraction),
               diverged_fraction_low=float(low), diverged_fraction_high=float(high),
               lyapunov_exponent=float(result.lyapunov_exponent),
               lyapunov_exponent_stderr=float(result.lyapunov_exponent_stderr))
    if result.excess_loss is not None:  # a family with per-sample gradients: the floor simulated
        row.update(simulated_excess_loss=float(result.excess_loss),
                   simulated_excess_loss_stderr=float(result.excess_loss_stderr))
    return row


def task_rows(family, settings, simulate_kwargs):
    """The rows (dicts of computed columns, ``warning`` and ``error``) of one family and a block
    of its settings. A family given as a path is loaded here (on the worker); a failure to load
    raises (the whole task fails); a failure of one row is caught into its ``error``."""
    if not isinstance(family, HessianFamily):
        family = HessianFamily.load(family)
    caches = {"critical_lr": {}, "critical_batch_size": {}}
    rows = []
    for setting in settings:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                row = _row(family, setting, simulate_kwargs, caches)
                error = ""
            except Exception as exc:  # noqa: BLE001 - named in the row, never lost
                row, error = {}, _failure(exc)
        messages = list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
        row.update(warning=" | ".join(messages), error=error)
        rows.append(row)
    return rows


def _distributed_task_rows(slots, family, settings, simulate_kwargs):
    from ._distributed import run_task

    rows, _ = run_task(slots, task_rows, family, settings, simulate_kwargs)
    return rows


# ------------------------------------------------------------------------------ the table
def _pandas():
    try:
        import pandas
    except ImportError:
        return None
    return pandas


def _extra_dtype(values):
    if all(isinstance(value, (bool, np.bool_)) for value in values):
        return bool
    if all(isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
           for value in values):
        return float
    return str


def _table(labels, settings, rows, simulate: bool):
    """One row per (family, setting): the inputs, then the computed columns (NaN and "" where a
    row failed or did not run), then ``warning`` and ``error``."""
    extras = list(dict.fromkeys(key for setting in settings for key in setting
                                if key not in ("lr", "batch_size", "sampling")))
    numeric = [name for name in _EXACT_COLUMNS if name != "verdict"]
    if any("excess_loss" in row for row in rows):  # a family with per-sample gradients
        numeric.append("excess_loss")
    if simulate:
        numeric += list(_SIMULATION_COLUMNS)
        if any("simulated_excess_loss" in row for row in rows):  # the floor, estimated
            numeric += ["simulated_excess_loss", "simulated_excess_loss_stderr"]
    names = ["family", "lr", "batch_size", "sampling", *extras, "verdict", *numeric, "warning", "error"]
    columns = {name: [] for name in names}
    for (label, setting), row in zip(((label, setting) for label in labels for setting in settings), rows):
        columns["family"].append(label)
        for key in ("lr", "batch_size", "sampling", *extras):
            columns[key].append(setting.get(key))
        columns["verdict"].append(row.get("verdict", ""))
        for name in numeric:
            columns[name].append(row.get(name, math.nan))
        columns["warning"].append(row.get("warning", ""))
        columns["error"].append(row.get("error", ""))
    dtypes = {name: float for name in ["lr", "batch_size", *numeric]}
    dtypes.update({name: str for name in _TEXT_COLUMNS})
    for name in extras:
        present = [value for value in columns[name] if value is not None]
        dtypes[name] = _extra_dtype(present) if present else float
        if dtypes[name] is float:
            columns[name] = [math.nan if value is None else float(value) for value in columns[name]]
        elif dtypes[name] is bool:
            columns[name] = [bool(value) for value in columns[name]]  # a missing flag is False
        else:
            columns[name] = ["" if value is None else str(value) for value in columns[name]]
    pandas = _pandas()
    if pandas is not None:
        return pandas.DataFrame({name: pandas.Series(columns[name], dtype=object if dtypes[name]
                                                     is str else dtypes[name]) for name in names})
    fields = []
    for name in names:
        if dtypes[name] is str:
            width = max([1, *(len(value) for value in columns[name])])
            fields.append((name, f"U{width}"))
        else:
            fields.append((name, dtypes[name]))
    table = np.empty(len(rows), dtype=fields)
    for name in names:
        table[name] = columns[name]
    return table


# ------------------------------------------------------------------------------ running
def _blocks(settings):
    size = SWEEP_SETTINGS_PER_TASK
    return [(first, min(len(settings), first + size)) for first in range(0, len(settings), size)]


def _local_bar(total: int, progress):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", desc="sweep", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.2, leave=False)


def _run_local(families, settings, tasks, simulate_kwargs, progress, rows):
    bar = _local_bar(len(rows), progress)
    try:
        for family_index, first, last in tasks:
            start = family_index * len(settings)
            try:
                block = task_rows(families[family_index][1], settings[first:last], simulate_kwargs)
            except Exception as exc:  # noqa: BLE001 - the task's rows name it
                block = [dict(error=_failure(exc))] * (last - first)
            rows[start + first:start + last] = block
            if bar is not None:
                bar.update(last - first)
    finally:
        if bar is not None:
            bar.close()


def _run_distributed(client, families, settings, tasks, simulate_kwargs, progress, rows):
    from ._distributed import as_completed_with_progress, check_client, share, task_slots

    client = check_client(client)
    slots = task_slots(client)
    # Each family object is sent once (a future that Dask recomputes if its workers die); paths
    # are read by the workers themselves (a shared file system).
    shared = {index: share(client, family) for index, (_, family) in enumerate(families)
              if isinstance(family, HessianFamily)}
    futures = [client.submit(_distributed_task_rows, slots, shared.get(index, families[index][1]),
                             settings[first:last], simulate_kwargs, pure=False)
               for index, first, last in tasks]
    for task, future in as_completed_with_progress(client, futures, progress=progress, unit="row",
                                                   desc="sweep",
                                                   sizes=[last - first for _, first, last in tasks]):
        family_index, first, last = tasks[task]
        start = family_index * len(settings)
        if future.status == "finished":
            block = future.result()
        else:
            try:
                exception = future.exception()
            except Exception as exc:  # noqa: BLE001 - a cancelled future
                exception = exc
            block = [dict(error=_failure(exception))] * (last - first)
        rows[start + first:start + last] = block


def sweep(families, settings, *, simulate=None, client=None, progress=None):
    """Exact stability answers (and optionally simulations) for many families x many settings.

    For every family and every setting, one row: the exact mean-square verdict and spectral
    radius with its proven bracket (:func:`fastsgdstab.spectral_radius`), the critical learning
    rate at the setting's batch size and the critical batch size at its learning rate
    (:func:`fastsgdstab.critical_lr`, :func:`fastsgdstab.critical_batch_size`; see the
    specification page, sections "The exact second-moment map", "Exact critical learning rate"
    and "Exact critical batch size"), and with ``simulate`` the fraction of simulated runs that
    diverged (Wilson 95% interval) and the Lyapunov exponent with its standard error
    (:func:`fastsgdstab.simulate`). For a family with per-sample gradients an ``excess_loss``
    column holds its loss floor (:func:`fastsgdstab.stationary`; ``inf`` where there is no
    stationary state), and with ``simulate`` a ``simulated_excess_loss`` column beside it: the
    simulated runs' time-averaged excess loss after ``burn_in`` steps (a simulate keyword,
    default ``steps // 4``) with its standard error in ``simulated_excess_loss_stderr`` (an
    estimate; the only floor of "reshuffle" rows; ``inf`` where runs left the float range). Learning rates are in the family's loss convention: ``H`` is
    the mean of the ``H_i`` and a step is ``w <- w - lr (1/B) sum_batch H_i w``.

    Runs locally (with a progress bar) or, with ``client``, on a Dask cluster, one task per
    family and block of settings, the rows arriving as tasks finish; the numbers are the same
    either way. A failure never loses the sweep: a row that fails (e.g. a batch size above that
    family's n) or a task that fails (an unreadable family file; a worker lost more often than
    Dask retries) has NaN values and names the failure in its ``error`` column; Ctrl-C returns
    the finished rows, the others with ``error`` "not run: interrupted". Both warn.

    Parameters
    ----------
    families : sequence or dict
        ``HessianFamily`` objects (or objects whose ``.family`` is one, such as
        ``fastsgdstab.torch.family_from_model``'s result) or paths of saved families (``.npz``, as
        :meth:`HessianFamily.save` writes; on a cluster the workers read them, so the path must
        be valid there), or a dict ``{label: family or path}``. The ``family`` column holds the
        dict's labels, else the path, else the position in the sequence (``"0"``, ``"1"``, ...).
    settings : sequence of dict, or dict of lists
        Each setting a dict with ``lr``, ``batch_size`` and optionally ``sampling`` (default
        "bernoulli"; "reshuffle" has no exact answer: its rows are simulated only, their exact
        columns NaN, and need ``simulate``); any other key (``momentum``, ``nesterov``,
        ``drop_last``) is passed as a keyword to those of the exact functions and ``simulate``
        that take it (a key none of them takes fails the row), and becomes a column. A
        dict of lists, e.g. ``{"lr": [0.1, 0.2], "batch_size": [1, 8]}``, is the grid of every
        combination (the last key varying fastest).
    simulate : dict, optional
        Keywords of :func:`fastsgdstab.simulate` (``steps`` and ``runs`` required; ``seed``,
        ``init``, ``record_every``, ``divergence_factor``): every row is also simulated. Default
        None: exact answers only.
    client : dask.distributed.Client, optional
        Run on this cluster; default None: in this process (dask is then never imported).
    progress : bool, optional
        A tqdm progress bar over the rows on stderr; None: when stderr is a terminal.

    Returns
    -------
    pandas.DataFrame or numpy structured array
        A DataFrame when pandas is installed, else a structured array with the same fields
        (text fields as fixed-width unicode). One row per (family, setting), families outer.
        Columns: ``family``, ``lr``, ``batch_size``, ``sampling``, any extra setting keys,
        ``verdict`` ("converges", "diverges" or "marginal": rho within 1e-9 of 1; "" if the
        row failed), ``spectral_radius``, ``spectral_radius_lower``, ``spectral_radius_upper``,
        ``critical_lr``, ``critical_batch_size`` (``inf``: no batch size is stable); with
        ``simulate`` also ``diverged_fraction``, ``diverged_fraction_low``,
        ``diverged_fraction_high``, ``lyapunov_exponent``, ``lyapunov_exponent_stderr``; for a
        family with per-sample gradients also ``excess_loss`` (exact) and, with ``simulate``,
        ``simulated_excess_loss`` and ``simulated_excess_loss_stderr``; then
        ``warning`` (the warnings the row raised, joined by " | ") and ``error`` ("" or
        "ExceptionType: message").

    Raises
    ------
    TypeError, ValueError
        Malformed ``families``, ``settings`` (an lr not > 0, an unknown sampling scheme, a
        missing lr or batch_size), ``simulate`` or ``progress``, or a ``client`` that is not a
        ``dask.distributed.Client``: checked before anything runs. Failures of single rows or
        tasks are reported in the table instead.

    Warns
    -----
    RuntimeWarning
        Some rows failed or did not run (interrupted); their ``error`` says why.

    Examples
    --------
    >>> import numpy as np
    >>> from fastsgdstab import HessianFamily, sweep
    >>> families = {"identity": HessianFamily.from_features(np.eye(4)),
    ...             "equal": HessianFamily.from_features(np.ones((4, 1)))}
    >>> table = sweep(families, {"lr": [0.5, 2.5], "batch_size": [1, 4]}, progress=False)
    >>> table["verdict"].tolist()   # identity, lr 2.5: E(1 - 2.5 z / B)^2, z ~ Bernoulli(B / 4)
    ['converges', 'converges', 'diverges', 'converges', 'converges', 'converges', 'diverges', 'diverges']
    >>> table["family"][5], float(table["lr"][5]), float(table["batch_size"][5])
    ('equal', 0.5, 4.0)
    >>> round(float(table["critical_lr"][5]), 9)   # all H_i = 1, B = n: gradient descent, 2 / lambda_1
    2.0
    """
    families = _check_families(families)
    settings = _check_settings(settings)
    simulate_kwargs = _check_simulate(simulate)
    progress = _check_progress(progress)
    simulated_only = sorted({s["sampling"] for s in settings} & set(_simulation_only_schemes()))
    if simulated_only and simulate_kwargs is None:
        raise ValueError(f"sampling={simulated_only[0]!r} has no exact answer (no one-step "
                         f"second-moment map); pass simulate=dict(steps=..., runs=...) to simulate "
                         f"it, or use one of the exact engine's schemes")
    if client is not None:
        from ._distributed import check_client

        check_client(client)
    tasks = [(index, first, last) for index in range(len(families)) for first, last in _blocks(settings)]
    rows = [None] * (len(families) * len(settings))
    interrupted = False
    try:
        if client is None:
            _run_local(families, settings, tasks, simulate_kwargs, progress, rows)
        else:
            _run_distributed(client, families, settings, tasks, simulate_kwargs, progress, rows)
    except KeyboardInterrupt:
        interrupted = True
    unfinished = [index for index, row in enumerate(rows) if row is None]
    for index in unfinished:
        rows[index] = dict(error="not run: interrupted")
    failed = sum(1 for row in rows if row.get("error")) - len(unfinished)
    if interrupted:
        warn(f"sweep interrupted: {len(rows) - len(unfinished)} of {len(rows)} rows "
                      f"finished; the others have error 'not run: interrupted'", RuntimeWarning)
    if failed:
        warn(f"sweep: {failed} of {len(rows)} rows failed; their error column names the "
                      f"failure", RuntimeWarning)
    return _table([label for label, _ in families], settings, rows, simulate_kwargs is not None)
