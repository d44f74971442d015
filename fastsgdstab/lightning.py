"""Lightning layer: :class:`StabilityCallback`, a ``lightning.pytorch.Callback`` over
:class:`fastsgdstab.torch.StabilityMonitor`.

Optional (the ``lightning`` extra: ``pip install "fastsgdstab[lightning]"``): ``import
fastsgdstab`` never imports this module, Lightning or torch. The imports below are absolute, so
``import lightning`` is the real Lightning package, not this module.
"""

from __future__ import annotations

try:
    import lightning.pytorch as _pl
except ModuleNotFoundError as _error:  # exercised in a subprocess (tests/test_callbacks.py)
    if _error.name is not None and _error.name.split(".")[0] not in ("lightning", "torch"):
        raise
    raise ModuleNotFoundError(
        "fastsgdstab.lightning needs Lightning (and PyTorch), an optional extra: pip install "
        "\"fastsgdstab[lightning]\"", name=_error.name) from _error

from fastsgdstab.torch.monitor import StabilityMonitor, unwrap_optimizer

__all__ = ["StabilityCallback"]


class StabilityCallback(_pl.Callback):
    """Exact stability quantities of a Lightning run, logged to the module's loggers.

    A thin layer over :class:`fastsgdstab.torch.StabilityMonitor`: at the start of training it
    builds the monitor on the LightningModule (or ``model``) and the Trainer's optimizer (a
    ``torch.optim.SGD``); after each optimiser step (``on_train_batch_end``, step index
    ``trainer.global_step - 1``, from 0) it calls ``monitor.step`` and, when a record is taken,
    logs its numeric fields (``StabilityMonitor.metrics``: ``stability/critical_lr``,
    ``stability/lr_over_critical``, ``stability/sharpness``, ``stability/critical_batch_size``,
    ``stability/excess_loss``...) with ``log_metrics`` of every logger of the module
    (``pl_module.loggers``) at the Trainer's global step. The records are also in
    ``callback.monitor.history``. Specification page, sections "Exact critical learning rate"
    and "From a network to a family".

    Loss convention: learning rates are for ``torch.optim.SGD`` on ``loss`` with mean reduction
    (``MSELoss()``: twice the curvature and half the learning rate of the (1/2)||f - y||^2
    convention); the module's own training loss must be that loss for the numbers to be the
    run's. The monitor never changes training's numbers: no gradient is touched, the module's
    mode and every global RNG state (torch, Python's ``random``, numpy) are restored.

    Parameters
    ----------
    probe_inputs, probe_targets : torch.Tensor or array_like
        A fixed subset of the training data (the family's samples).
    loss : torch loss module or callable
        The per-sample loss, as in :func:`fastsgdstab.torch.family_from_model`.
    batch_size : int
        The training batch size B: the samples of one optimiser step (with gradient
        accumulation, the loader's batch size times ``accumulate_grad_batches``; records are
        taken on optimiser steps only, at the end of the batch that completes one).
    model : torch.nn.Module, optional
        The network mapping a batch of probe inputs to outputs; default the LightningModule
        itself (its ``forward``).
    **monitor_options
        ``every``, ``sampling``, ``population_size``, ``max_overhead`` and the family options
        of :class:`~fastsgdstab.torch.StabilityMonitor` (the default cadence: every 100 steps
        within a 5% budget of the loop's wall time).

    Attributes
    ----------
    monitor : StabilityMonitor or None
        Built at ``on_train_start``.

    Raises
    ------
    TypeError
        At the start of training, when the Trainer does not have exactly one optimiser or it is
        not a ``torch.optim.SGD``.

    Examples
    --------
    >>> import torch, lightning.pytorch as pl
    >>> from fastsgdstab.lightning import StabilityCallback
    >>> X, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> callback = StabilityCallback(X, y, torch.nn.MSELoss(), batch_size=4, every=2)
    >>> isinstance(callback, pl.Callback), callback.monitor
    (True, None)
    """

    def __init__(self, probe_inputs, probe_targets, loss, *, batch_size, model=None, prefix="stability/",
                 **monitor_options):
        super().__init__()
        self.probe_inputs, self.probe_targets, self.loss = probe_inputs, probe_targets, loss
        self.batch_size, self.model, self.prefix = batch_size, model, prefix
        self.monitor_options = dict(monitor_options)
        self.monitor = None
        self._last_step = -1
        # Checked now (bad arguments fail at construction, not after the Trainer has started).
        if model is not None:
            StabilityMonitor(model, probe_inputs, probe_targets, loss, batch_size=batch_size,
                             **monitor_options)

    def on_train_start(self, trainer, pl_module):
        optimizers = [unwrap_optimizer(o) for o in trainer.optimizers]
        if len(optimizers) != 1:
            raise TypeError(f"StabilityCallback needs exactly one optimizer (a torch.optim.SGD); "
                            f"the Trainer has {len(optimizers)}")
        model = pl_module if self.model is None else self.model
        self.monitor = StabilityMonitor(model, self.probe_inputs, self.probe_targets, self.loss,
                                        batch_size=self.batch_size, optimizer=optimizers[0],
                                        **self.monitor_options)
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1   # the optimiser step just taken
        if self.monitor is None or step < 0 or step == self._last_step:
            return   # before training, or a gradient-accumulation batch with no optimiser step
        self._last_step = step
        row = self.monitor.step(step)
        if row is None:
            return
        metrics = StabilityMonitor.metrics(row, self.prefix)
        for logger in pl_module.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
