"""Tracking stability during training: :class:`StabilityMonitor`, for any PyTorch training loop."""

from __future__ import annotations

import math
import random
import time
import warnings

import numpy as np
import torch

from .._config import JACOBIAN_RTOL
from ..family import NotAMinimumWarning
from ..loss_floor import NoStationaryStateError, stationary
from ..moments import critical_batch_size, critical_lr
from ..sampling import SAMPLING_SCHEMES
from ._common import check_model
from .family import GaussNewtonWarning, family_from_model

__all__ = ["StabilityMonitor", "EdgeOfStabilityWarning", "MONITOR_FIELDS"]

MONITOR_FIELDS = ("step", "lr", "momentum", "nesterov", "batch_size", "loss", "sharpness",
                  "critical_lr", "lr_over_critical", "critical_batch_size", "gradient_norm",
                  "relative_gradient", "excess_loss", "excess_loss_note")
"""The columns of :attr:`StabilityMonitor.history`, in order."""


DEFAULT_EVERY = 100
"""The default cadence: a record every 100 steps (thinned by ``DEFAULT_MAX_OVERHEAD``)."""

DEFAULT_MAX_OVERHEAD = 0.05
"""The default budget: the monitor's time at most 5% of the training loop's wall time."""

FIRST_RECORD_PRODUCTS = 150
"""The first record's cost estimate (before any record was timed): this many products of the
exact solves' noise operator (the certified eigen-solves of eta* and of the critical batch size,
and the stationary solve's own eigen-solve and conjugate gradients), each about ``4 n C k^2``
floating-point operations (n probe samples, C outputs each, k = min(n C, d))."""

FIRST_RECORD_FLOP_RATE = 1e10
"""The floating-point rate (per second) the first record's estimate assumes: below one core's
matrix-product rate, so the estimate errs on the costly side (the record comes later)."""


def unwrap_optimizer(optimizer):
    """The torch optimizer inside Lightning's or Accelerate's wrapper (``.optimizer``), for the
    callbacks of ``fastsgdstab.lightning`` and ``fastsgdstab.transformers``."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 4:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def _reduced_rank(family) -> int:
    """k, the rank the family's (cached) reduction to H's eigenbasis kept."""
    from .._engine import reduced

    return reduced(family).k


class EdgeOfStabilityWarning(UserWarning):
    """The optimiser's learning rate exceeds the exact critical learning rate eta*(B) of the
    current point (the linearised SGD there is mean-square unstable)."""


class StabilityMonitor:
    """Exact stability quantities of a training run, recorded every ``every`` steps.

    Call :meth:`step` once per training step (after ``optimizer.step()``). Every ``every`` steps
    it builds the Gauss-Newton family of the model on the fixed probe set
    (:func:`family_from_model`, its fast route for the model; the Gauss-Newton gap is not
    estimated, and the model is far from a minimum during training, so its warning is not
    raised: ``relative_gradient`` says how far), reads the learning rate and momentum from
    ``optimizer`` (``torch.optim.SGD``: one learning rate, heavy-ball or Nesterov momentum), and
    records (columns ``MONITOR_FIELDS``): the probe loss; the sharpness lambda_1(H); the exact
    critical learning rate ``eta*(B)`` for that momentum (``fastsgdstab.critical_lr``); ``lr /
    eta*``; the critical batch size at the current lr (``fastsgdstab.critical_batch_size``; inf
    when no batch size is stable, 1.0 when every one is); the full-batch gradient norm and the
    relative gradient of the probe set (how far from a minimum); and the stationary excess loss
    (``fastsgdstab.stationary``: the loss floor that SGD at this lr and batch size settles to
    above the minimum of the quadratic model of the current point; specification page, section
    "Non-interpolating minima: stationary covariance and the loss floor"). The excess loss needs
    the family's per-sample gradients (the factor route): on the Gram route it is None; at or
    above eta* there is no stationary state and it is ``inf``; ``excess_loss_note`` says why
    (empty when the value was computed). Specification page, sections "Exact critical learning
    rate", "Exact critical batch size", "Momentum" and "From a network to a family". The first
    time lr exceeds eta* it warns (:class:`EdgeOfStabilityWarning`).

    Loss convention: every learning rate (``lr``, ``critical_lr``) is for ``torch.optim.SGD`` on
    ``loss`` with mean reduction over the batch, and the excess loss is in that loss's units
    (``MSELoss()`` has twice the curvature and half the learning rate of the (1/2)||f - y||^2
    convention).

    The monitor never changes training: the family is computed on detached float64 copies of
    the parameters in evaluation mode (the model's mode is restored; no ``.grad`` is touched),
    and torch's CPU (and, when initialised, CUDA) RNG, Python's ``random`` and numpy's global RNG
    states are restored after each record.

    Cost and default cadence: a record costs a family build and two or three exact solves (on
    the docs' digits MLP, a probe of 32 images with 10 outputs: k = 320, about as much as
    thousands of its training steps). The default cadence (``every`` not given) is a record due
    every ``DEFAULT_EVERY`` = 100 steps within a budget of ``DEFAULT_MAX_OVERHEAD`` = 5% of the
    loop's wall time, counted honestly: a due record is taken only when the monitor's time so far
    *plus the record's expected cost* stays within 5% of the loop's own time since the first
    call (``monitor.seconds + expected <= max_overhead * loop``), so no record overshoots the
    budget by more than the error of its estimate. The expected cost is the last record's
    measured time; before the first record it is estimated from the sizes
    (``FIRST_RECORD_PRODUCTS`` operator products of ``4 n C k^2`` operations at
    ``FIRST_RECORD_FLOP_RATE``, plus the Jacobian rows and the reduction; the output count C is
    read from one forward pass of one probe input, in evaluation mode, RNG restored). So the
    first record is deferred until the loop has run long enough to pay for it, and a run
    shorter than about 20 records' cost gets no record at the default cadence (its overhead is
    then one forward pass). An explicit ``every`` records on every multiple of it
    (deterministic steps), with no budget unless ``max_overhead`` is given (then the same rule).
    ``seconds``, ``skipped`` and ``overhead`` report what it spent.

    The excess loss of an interpolating probe (its n C factor columns linearly independent: the
    reduction's rank k equals n C) is exactly 0 below eta* (the quadratic model has a point where
    every per-sample gradient vanishes, so the gradient noise at its minimum is zero) and is
    recorded so without a solve, ``excess_loss_note`` saying why (not at a point that is a
    minimum to round-off, where the adapter re-centres the gradients: there
    ``fastsgdstab.stationary`` is called).

    Parameters
    ----------
    model : torch.nn.Module
    probe_inputs, probe_targets : torch.Tensor or array_like
        A fixed subset of the training data (at least 2 samples): the family's samples.
    loss : torch loss module or callable
        As in :func:`family_from_model`.
    every : int, optional
        Record on steps divisible by it. Default: ``DEFAULT_EVERY`` = 100, with the budget
        ``max_overhead = DEFAULT_MAX_OVERHEAD`` = 0.05 unless ``max_overhead`` is given.
    batch_size : int
        The training batch size B (1 <= B <= ``population_size``).
    sampling : str, default "without_replacement"
        The batch scheme of the exact answers (``fastsgdstab.SAMPLING_SCHEMES``).
    optimizer : torch.optim.SGD, optional
        Read at every record (lr, momentum, nesterov). Without it pass ``lr=`` (and
        ``momentum=``) to :meth:`step`.
    population_size : int, optional
        N, the size of the training set the batches are drawn from, when the probe is a subset
        of it (an integer >= the probe's size; default: the probe's size, the probe standing
        for the data). The batch law's N (specification page, section "A probe subset of a
        large training set").
    max_overhead : float, optional
        The share of the loop's wall time the monitor may spend (in (0, 1)). Default: 0.05 when
        ``every`` is not given, no limit when it is.
    **family_options
        Passed to :func:`family_from_model` (``chunk_size``, ``reduce``, ``device``,
        ``memory_bytes``, ``dtype``).

    Attributes
    ----------
    rows : list of dict
        The records, one dict per record (keys ``MONITOR_FIELDS``).
    history : pandas.DataFrame or list of dict
        The same as a table (a DataFrame when pandas is installed).
    seconds : float
        Wall time spent in records (and the first record's estimate) so far.
    skipped : int
        Due records skipped by ``max_overhead``.
    expected : float or None
        The expected cost of the next record in seconds (the last record's time; None before
        the budget needed one).

    Raises
    ------
    ValueError, TypeError
        Bad arguments (named in the message).

    Examples
    --------
    >>> import torch
    >>> from fastsgdstab.torch import StabilityMonitor
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> X = torch.randn(8, 3, dtype=torch.float64)
    >>> y = torch.zeros(8, 1, dtype=torch.float64)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    >>> monitor = StabilityMonitor(model, X, y, torch.nn.MSELoss(), every=5, batch_size=4,
    ...                            optimizer=optimizer)
    >>> for step in range(10):
    ...     optimizer.zero_grad()
    ...     torch.nn.MSELoss()(model(X[:4]), y[:4]).backward()
    ...     optimizer.step()
    ...     row = monitor.step(step)
    >>> [r["step"] for r in monitor.rows], monitor.rows[0]["lr"]
    ([0, 5], 0.05)
    >>> bool(monitor.rows[0]["lr_over_critical"] < 1)
    True
    >>> row = monitor.rows[0]   # targets y = X w with w = 0: the quadratic model interpolates
    >>> round(row["excess_loss"], 12), row["excess_loss_note"]   # so the loss floor is 0
    (0.0, '')
    """

    def __init__(self, model, probe_inputs, probe_targets, loss, *, every=None, batch_size,
                 sampling="without_replacement", optimizer=None, population_size=None,
                 max_overhead=None, **family_options):
        check_model(model)
        if every is None:
            every = DEFAULT_EVERY
            if max_overhead is None:
                max_overhead = DEFAULT_MAX_OVERHEAD
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1; got {every!r}")
        n = len(probe_inputs)
        if population_size is not None and (isinstance(population_size, bool)
                                            or not isinstance(population_size, (int, np.integer))
                                            or population_size < n):
            raise ValueError(f"population_size must be an integer >= the probe's size {n} (the "
                             f"training set's size), or None; got {population_size!r}")
        N = n if population_size is None else int(population_size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or not 1 <= batch_size <= N:
            raise ValueError(f"batch_size must be an integer in [1, N] = [1, {N}] (N: "
                             f"population_size, or the probe set's size); got {batch_size!r}")
        if sampling not in SAMPLING_SCHEMES:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING_SCHEMES)}; got {sampling!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(f"optimizer must be a torch.optim.SGD (the exact answers are for SGD); "
                            f"got {type(optimizer).__name__}")
        if max_overhead is not None and (isinstance(max_overhead, bool)
                                         or not isinstance(max_overhead, (int, float))
                                         or not 0.0 < max_overhead < 1.0):
            raise ValueError(f"max_overhead must be a number in (0, 1) (a share of the loop's wall "
                             f"time) or None; got {max_overhead!r}")
        allowed = {"chunk_size", "reduce", "device", "memory_bytes", "dtype"}
        unknown = set(family_options) - allowed
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; family options are {sorted(allowed)}")
        self.model, self.inputs, self.targets, self.loss = model, probe_inputs, probe_targets, loss
        self.every, self.batch_size, self.sampling, self.optimizer = every, int(batch_size), sampling, optimizer
        self.population_size = None if population_size is None else N
        self.max_overhead = max_overhead
        self.family_options = dict(family_options)
        self.rows = []
        self.seconds = 0.0
        self.skipped = 0
        self.expected = None
        self._started = None
        self._warned = False

    def _settings(self, lr, momentum, nesterov):
        if self.optimizer is not None:
            groups = self.optimizer.param_groups
            rates = {float(g["lr"]) for g in groups}
            if len(rates) != 1:
                raise ValueError(f"the optimizer has parameter groups with different learning rates "
                                 f"{sorted(rates)}: the exact answers are for one learning rate")
            group = groups[0]
            if float(group.get("dampening", 0.0)) != 0.0 or float(group.get("weight_decay", 0.0)) != 0.0:
                raise ValueError("the optimizer uses dampening or weight decay, which the exact answers "
                                 "do not model")
            return float(group["lr"]), float(group.get("momentum", 0.0)), bool(group.get("nesterov", False))
        if lr is None:
            raise ValueError("without an optimizer, step() needs lr= (and momentum= if any)")
        return float(lr), float(momentum or 0.0), bool(nesterov)

    @staticmethod
    def _rng_restored(compute):
        """``compute()`` with torch's CPU (and initialised CUDA), Python's and numpy's global RNG
        states restored afterwards."""
        states = (torch.random.get_rng_state(), random.getstate(), np.random.get_state())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None
        try:
            return compute()
        finally:
            torch.random.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

    def _family(self):
        """The family on the probe (population size applied), and the model's report; every
        global RNG state restored."""
        def compute():
            with warnings.catch_warnings(), torch.enable_grad():
                warnings.simplefilter("ignore", GaussNewtonWarning)   # reported as relative_gradient
                warnings.simplefilter("ignore", NotAMinimumWarning)   # training is not at a minimum
                return family_from_model(self.model, self.inputs, self.targets, self.loss,
                                         check_gauss_newton=False, progress=False,
                                         **self.family_options)

        result = self._rng_restored(compute)
        family = result.family
        if self.population_size is not None and self.population_size != family.n:
            # Keeps the gradients and shares the cached reduction (one eigendecomposition).
            family = family.with_population_size(self.population_size)
        return family, result

    def _first_cost(self) -> float:
        """The first record's estimated seconds, from the sizes (see the class text)."""
        from ._common import trainable_parameters
        from .family import output_count

        def outputs():
            dtype = self.family_options.get("dtype", torch.float64)
            device = self.family_options.get("device", "cpu")
            names, params, rest = trainable_parameters(self.model, dtype, device)
            inputs = self.inputs[:1] if isinstance(self.inputs, torch.Tensor) \
                else torch.as_tensor(np.asarray(self.inputs[:1]))
            if inputs.is_floating_point():
                inputs = inputs.to(dtype)
            was_training = self.model.training
            self.model.eval()
            try:
                count = output_count(self.model, params, rest, inputs.to(device))
            finally:
                self.model.train(was_training)
            return count, sum(p.numel() for p in params.values())

        C, d = self._rng_restored(outputs)
        n = len(self.inputs)
        m = n * C
        k = min(m, d)
        flops = (FIRST_RECORD_PRODUCTS * 4.0 * m * k * k   # the exact solves
                 + 2.0 * m * m * d + 10.0 * k ** 3         # the Gram matrix and its eigensolve
                 + 6.0 * m * d)                            # the Jacobian rows
        return flops / FIRST_RECORD_FLOP_RATE

    def _excess_loss(self, family, lr, eta, options, recentred=False):
        """(excess loss, note): the stationary excess loss, or None / inf and the reason.
        ``recentred``: the adapter removed the gradients' mean (a point at a minimum to
        round-off), so they need not lie in each sample's factor span: no shortcut."""
        if family.gradients is None:
            return None, ("the family has no per-sample gradients (the Gram route: pass "
                          "reduce=False for the factor route)")
        if not lr < eta:
            return math.inf, (f"no stationary state: lr = {lr:.6g} >= eta* = {eta:.6g} (the "
                              f"covariance grows without limit)")
        columns = family.n * family.rank
        if not recentred and _reduced_rank(family) == columns:
            # The adapter's gradients are g_i = U_i c_i (J_i^T q_i, q_i in the range of
            # Lambda_i). With the n r factor columns linearly independent, some w has
            # U_i^T w = -c_i for every i: there every per-sample gradient of the quadratic model
            # vanishes, so at its minimum the gradient noise is zero, and so is the floor.
            return 0.0, (f"exact: the probe's {columns} factor columns are linearly independent "
                         f"(rank {columns}), so the quadratic model interpolates the probe: no "
                         f"loss floor")
        try:
            with warnings.catch_warnings():
                # not a minimum during training: the floor of the quadratic model's minimum
                warnings.simplefilter("ignore", NotAMinimumWarning)
                return stationary(family, lr, self.batch_size, **options).excess_loss, ""
        except NoStationaryStateError as error:
            # lr past the edge (numerically, next to it): inf; gradients along flat directions: None
            return (math.inf if math.isnan(error.outside) else None), str(error)

    def record(self, step, *, lr=None, momentum=None, nesterov=False) -> dict:
        """Record now, whatever the step; returns the row (a dict, keys ``MONITOR_FIELDS``)."""
        start = time.perf_counter()
        if self._started is None:
            self._started = start
        try:
            lr, momentum, nesterov = self._settings(lr, momentum, nesterov)
            family, result = self._family()
            options = {"sampling": self.sampling, "momentum": momentum, "nesterov": nesterov}
            eta = critical_lr(family, self.batch_size, **options)
            batch = critical_batch_size(family, lr, **options)
            excess, note = self._excess_loss(family, lr, eta, options,
                                             result.relative_gradient <= JACOBIAN_RTOL)
            row = {"step": step, "lr": lr, "momentum": momentum, "nesterov": nesterov,
                   "batch_size": self.batch_size, "loss": result.loss, "sharpness": family.sharpness(),
                   "critical_lr": eta, "lr_over_critical": lr / eta if eta > 0 else math.inf,
                   "critical_batch_size": batch, "gradient_norm": result.gradient_norm,
                   "relative_gradient": result.relative_gradient, "excess_loss": excess,
                   "excess_loss_note": note}
            self.rows.append(row)
        finally:
            elapsed = time.perf_counter() - start
            self.seconds += elapsed
            self.expected = elapsed
        if lr > eta and not self._warned:
            self._warned = True
            warnings.warn(f"step {step}: lr = {lr:.6g} exceeds the exact critical learning rate "
                          f"eta*(B = {self.batch_size}) = {eta:.6g} of the current point "
                          f"({self.sampling}, momentum {momentum:g}; torch.optim.SGD on this loss, "
                          f"mean reduction): the linearised SGD there is mean-square unstable",
                          EdgeOfStabilityWarning, stacklevel=3)
        return row

    def due(self, step) -> bool:
        """Whether :meth:`step` would record at ``step``: a multiple of ``every`` and (with
        ``max_overhead``) the monitor's time with the record's expected cost within its share
        of the loop's wall time (``seconds + expected <= max_overhead * loop``; the first
        time a record is due the expected cost is estimated from the sizes)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an integer >= 0; got {step!r}")
        if step % self.every:
            return False
        if self.max_overhead is None:
            return True
        now = time.perf_counter()
        if self._started is None:
            self._started = now
        if self.expected is None:
            self.expected = self._first_cost()
            self.seconds += time.perf_counter() - now   # the estimate's forward pass counts
        loop = time.perf_counter() - self._started - self.seconds
        return self.seconds + self.expected <= self.max_overhead * loop

    def step(self, step, *, lr=None, momentum=None, nesterov=False):
        """Call once per training step: records (and returns the row) when ``step`` is a
        multiple of ``every`` and the overhead budget allows (see :meth:`due`); returns None
        otherwise."""
        if self._started is None:
            self._started = time.perf_counter()
        if not self.due(step):
            if step % self.every == 0:
                self.skipped += 1
            return None
        return self.record(int(step), lr=lr, momentum=momentum, nesterov=nesterov)

    @staticmethod
    def metrics(row, prefix="stability/") -> dict:
        """The numeric fields of a record as ``{prefix + name: float}``, for a logger: ``step``
        and ``batch_size`` (the logger's own), ``excess_loss_note`` and a None ``excess_loss``
        are left out; ``nesterov`` becomes 0.0 or 1.0; inf stays inf."""
        out = {}
        for name in MONITOR_FIELDS:
            value = row[name]
            if name in ("step", "batch_size", "excess_loss_note") or value is None:
                continue
            out[prefix + name] = float(value)
        return out

    @property
    def overhead(self) -> float:
        """The monitor's time over the loop's own time since the first call (0 before it)."""
        if self._started is None:
            return 0.0
        loop = time.perf_counter() - self._started - self.seconds
        return self.seconds / loop if loop > 0 else math.inf

    @property
    def history(self):
        """The records: a pandas DataFrame (columns ``MONITOR_FIELDS``; ``excess_loss`` keeps
        None where it was not computed, so the table has no NaN) when pandas is installed, else
        the list of row dicts."""
        try:
            import pandas
        except ImportError:
            return [dict(row) for row in self.rows]
        table = pandas.DataFrame(self.rows, columns=list(MONITOR_FIELDS))
        if any(row["excess_loss"] is None for row in self.rows):
            table["excess_loss"] = pandas.Series([row["excess_loss"] for row in self.rows],
                                                 index=table.index, dtype=object)
        return table

    def plot(self, ax=None):
        """lr, eta*(B) and 2 / sharpness over the steps (log scale); returns the matplotlib Axes
        (the ``plot`` extra). Learning rates for torch.optim.SGD on the loss, mean reduction."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError('plotting needs matplotlib, which is an optional extra: '
                              'pip install "fastsgdstab[plot]"') from error
        if ax is None:
            _, ax = plt.subplots(figsize=(6.4, 4.8))
        steps = [r["step"] for r in self.rows]
        ax.plot(steps, [r["lr"] for r in self.rows], label="lr")
        ax.plot(steps, [r["critical_lr"] for r in self.rows], label=f"eta*(B = {self.batch_size})")
        ax.plot(steps, [2.0 / r["sharpness"] if r["sharpness"] > 0 else math.inf for r in self.rows],
                linestyle="--", label="2 / sharpness")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate (torch.optim.SGD on the loss, mean reduction)")
        ax.legend()
        return ax
