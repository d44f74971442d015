"""Tracking stability during training: :class:`StabilityMonitor`, for any PyTorch training loop."""

from __future__ import annotations

import math
import warnings

import torch

from ..moments import critical_batch_size, critical_lr
from ..sampling import SAMPLING_SCHEMES
from ._common import check_model
from .family import GaussNewtonWarning, family_from_model

__all__ = ["StabilityMonitor", "EdgeOfStabilityWarning", "MONITOR_FIELDS"]

MONITOR_FIELDS = ("step", "lr", "momentum", "nesterov", "batch_size", "loss", "sharpness",
                  "critical_lr", "lr_over_critical", "critical_batch_size", "gradient_norm",
                  "relative_gradient")
"""The columns of :attr:`StabilityMonitor.history`, in order."""


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
    records: the probe loss; the sharpness lambda_1(H); the exact critical learning rate
    ``eta*(B)`` for that momentum (``fastsgdstab.critical_lr``; learning rates for
    ``torch.optim.SGD`` on ``loss`` with mean reduction: ``MSELoss()`` has twice the curvature
    and half the learning rate of the (1/2)||f - y||^2 convention); ``lr / eta*``; the
    critical batch size at the current lr (``fastsgdstab.critical_batch_size``; inf when no
    batch size is stable, 1.0 when every one is); the full-batch gradient norm and the relative
    gradient of the probe set (how far from a minimum). Specification page, sections "Exact
    critical learning rate", "Exact critical batch size", "Momentum" and "From a network to a
    family". The first time lr exceeds eta* it warns (:class:`EdgeOfStabilityWarning`).

    The monitor never changes training: the family is computed on detached copies of the
    parameters in evaluation mode (the model's mode is restored), torch's global RNG state is
    restored after each record, and no gradient of the model is touched.

    Parameters
    ----------
    model : torch.nn.Module
    probe_inputs, probe_targets : torch.Tensor or array_like
        A fixed subset of the training data (at least 2 samples): the family's samples.
    loss : torch loss module or callable
        As in :func:`family_from_model`.
    every : int, default 100
        Record on steps divisible by it.
    batch_size : int
        The training batch size B (1 <= B <= the probe size; the probe set stands for the
        data, so B is the batch size relative to it).
    sampling : str, default "without_replacement"
        The batch scheme of the exact answers (``fastsgdstab.SAMPLING_SCHEMES``).
    optimizer : torch.optim.SGD, optional
        Read at every record (lr, momentum, nesterov). Without it pass ``lr=`` (and
        ``momentum=``) to :meth:`step`.
    **family_options
        Passed to :func:`family_from_model` (``chunk_size``, ``reduce``, ``device``,
        ``memory_bytes``).

    Attributes
    ----------
    history : pandas.DataFrame or list of dict
        One row per record, columns ``MONITOR_FIELDS`` (a DataFrame when pandas is installed).

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
    """

    def __init__(self, model, probe_inputs, probe_targets, loss, *, every=100, batch_size,
                 sampling="without_replacement", optimizer=None, **family_options):
        check_model(model)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1; got {every!r}")
        n = len(probe_inputs)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be an integer in [1, n] = [1, {n}] (n: the probe "
                             f"set's size); got {batch_size!r}")
        if sampling not in SAMPLING_SCHEMES:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING_SCHEMES)}; got {sampling!r}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(f"optimizer must be a torch.optim.SGD (the exact answers are for SGD); "
                            f"got {type(optimizer).__name__}")
        allowed = {"chunk_size", "reduce", "device", "memory_bytes", "dtype"}
        unknown = set(family_options) - allowed
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; family options are {sorted(allowed)}")
        self.model, self.inputs, self.targets, self.loss = model, probe_inputs, probe_targets, loss
        self.every, self.batch_size, self.sampling, self.optimizer = every, batch_size, sampling, optimizer
        self.family_options = dict(family_options)
        self.rows = []
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

    def record(self, step, *, lr=None, momentum=None, nesterov=False) -> dict:
        """Record now, whatever the step; returns the row."""
        lr, momentum, nesterov = self._settings(lr, momentum, nesterov)
        rng = torch.random.get_rng_state()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", GaussNewtonWarning)   # reported as relative_gradient
                result = family_from_model(self.model, self.inputs, self.targets, self.loss,
                                           check_gauss_newton=False, progress=False,
                                           **self.family_options)
        finally:
            torch.random.set_rng_state(rng)
        family = result.family
        options = {"sampling": self.sampling, "momentum": momentum, "nesterov": nesterov}
        eta = critical_lr(family, self.batch_size, **options)
        batch = critical_batch_size(family, lr, **options)
        row = {"step": step, "lr": lr, "momentum": momentum, "nesterov": nesterov,
               "batch_size": self.batch_size, "loss": result.loss, "sharpness": family.sharpness(),
               "critical_lr": eta, "lr_over_critical": lr / eta if eta > 0 else math.inf,
               "critical_batch_size": batch, "gradient_norm": result.gradient_norm,
               "relative_gradient": result.relative_gradient}
        self.rows.append(row)
        if lr > eta and not self._warned:
            self._warned = True
            warnings.warn(f"step {step}: lr = {lr:.6g} exceeds the exact critical learning rate "
                          f"eta*(B = {self.batch_size}) = {eta:.6g} of the current point "
                          f"({self.sampling}, momentum {momentum:g}; torch.optim.SGD on this loss, "
                          f"mean reduction): the linearised SGD there is mean-square unstable",
                          EdgeOfStabilityWarning, stacklevel=3)
        return row

    def step(self, step, *, lr=None, momentum=None, nesterov=False):
        """Call once per training step: records (and returns the row) when ``step`` is a
        multiple of ``every``; returns None otherwise."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0; got {step!r}")
        if step % self.every:
            return None
        return self.record(step, lr=lr, momentum=momentum, nesterov=nesterov)

    @property
    def history(self):
        """The records: a pandas DataFrame (columns ``MONITOR_FIELDS``) when pandas is installed,
        else the list of row dicts."""
        try:
            import pandas
        except ImportError:
            return [dict(row) for row in self.rows]
        return pandas.DataFrame(self.rows, columns=list(MONITOR_FIELDS))

    def plot(self, ax=None):
        """lr and eta*(B) over the steps (log scale), sharpness's 2 / lambda_1 for reference;
        returns the matplotlib Axes (the ``plot`` extra)."""
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
