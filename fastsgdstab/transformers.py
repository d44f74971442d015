"""Hugging Face layer: :class:`StabilityCallback`, a ``transformers.TrainerCallback`` over
:class:`fastsgdstab.torch.StabilityMonitor`.

Optional (the ``transformers`` extra: ``pip install "fastsgdstab[transformers]"``): ``import
fastsgdstab`` never imports this module, transformers or torch. The imports below are
absolute, so ``import transformers`` is the real package, not this module.
"""

from __future__ import annotations

try:
    import transformers as _transformers
except ModuleNotFoundError as _error:  # exercised in a subprocess (tests/test_callbacks.py)
    if _error.name is not None and _error.name.split(".")[0] not in ("transformers", "torch"):
        raise
    raise ModuleNotFoundError(
        "fastsgdstab.transformers needs Hugging Face transformers (and PyTorch), an optional "
        "extra: pip install \"fastsgdstab[transformers]\"", name=_error.name) from _error

from fastsgdstab.torch.monitor import StabilityMonitor, unwrap_optimizer

__all__ = ["StabilityCallback"]


class StabilityCallback(_transformers.TrainerCallback):
    """Exact stability quantities of a Hugging Face ``Trainer`` run, in its logs.

    A thin layer over :class:`fastsgdstab.torch.StabilityMonitor`: at ``on_train_begin`` it
    builds the monitor on ``model`` (default: the Trainer's model; it must map a batch of probe
    inputs to the outputs, ``model(probe_inputs)``) and the Trainer's optimiser (a
    ``torch.optim.SGD``, e.g. ``optimizers=(torch.optim.SGD(...), None)``); after each optimiser
    step (``on_step_end``, step index ``state.global_step - 1``, from 0) it calls
    ``monitor.step``. A record's numeric fields (``StabilityMonitor.metrics``:
    ``stability/critical_lr``, ``stability/lr_over_critical``, ``stability/sharpness``,
    ``stability/excess_loss``...) are appended at once to ``state.log_history`` (with ``step``
    = ``state.global_step``) and added to the ``logs`` of the Trainer's next ``on_log`` (callbacks
    after this one, such as the reporting integrations added later, see them). The callback
    never asks the Trainer to log (that would change its loss averaging). All records are also
    in ``callback.monitor.history``. Specification page, sections "Exact critical learning
    rate" and "From a network to a family".

    Loss convention: learning rates are for ``torch.optim.SGD`` on ``loss`` with mean reduction
    (``MSELoss()``: twice the curvature and half the learning rate of the (1/2)||f - y||^2
    convention); the model's training loss must be that loss for the numbers to be the run's.
    The monitor never changes training's numbers: no gradient is touched, the model's mode and
    every global RNG state (torch, Python's ``random``, numpy) are restored.

    Parameters
    ----------
    probe_inputs, probe_targets : torch.Tensor or array_like
        A fixed subset of the training data (the family's samples).
    loss : torch loss module or callable
        The per-sample loss, as in :func:`fastsgdstab.torch.family_from_model`.
    batch_size : int, optional
        The training batch size B; default ``args.per_device_train_batch_size *
        args.gradient_accumulation_steps * args.world_size`` (one optimiser step's samples).
    model : torch.nn.Module, optional
        The network mapping a batch of probe inputs to outputs; default the Trainer's model.
    **monitor_options
        ``every``, ``sampling``, ``population_size``, ``max_overhead`` and the family options
        of :class:`~fastsgdstab.torch.StabilityMonitor` (the default cadence: every 100 steps
        within a 5% budget of the loop's wall time).

    Attributes
    ----------
    monitor : StabilityMonitor or None
        Built at ``on_train_begin``.

    Raises
    ------
    TypeError
        At the start of training, when the Trainer's optimiser is not a ``torch.optim.SGD``.

    Examples
    --------
    >>> import torch, transformers
    >>> from fastsgdstab.transformers import StabilityCallback
    >>> X, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> callback = StabilityCallback(X, y, torch.nn.MSELoss(), batch_size=4, every=2)
    >>> isinstance(callback, transformers.TrainerCallback), callback.monitor
    (True, None)
    """

    def __init__(self, probe_inputs, probe_targets, loss, *, batch_size=None, model=None,
                 prefix="stability/", **monitor_options):
        self.probe_inputs, self.probe_targets, self.loss = probe_inputs, probe_targets, loss
        self.batch_size, self.model, self.prefix = batch_size, model, prefix
        self.monitor_options = dict(monitor_options)
        self.monitor = None
        self._pending = {}
        if model is not None and batch_size is not None:  # bad arguments fail now
            StabilityMonitor(model, probe_inputs, probe_targets, loss, batch_size=batch_size,
                             **monitor_options)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        network = self.model if self.model is not None else model
        optimizer = unwrap_optimizer(optimizer)
        if optimizer is None:
            raise TypeError("StabilityCallback: the Trainer gave no optimizer at on_train_begin")
        batch_size = self.batch_size
        if batch_size is None:
            batch_size = (args.per_device_train_batch_size * args.gradient_accumulation_steps
                          * max(1, args.world_size))
        self.monitor = StabilityMonitor(network, self.probe_inputs, self.probe_targets, self.loss,
                                        batch_size=batch_size, optimizer=optimizer,
                                        **self.monitor_options)
        self._pending = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is None or state.global_step < 1:
            return
        row = self.monitor.step(state.global_step - 1)
        if row is None:
            return
        metrics = StabilityMonitor.metrics(row, self.prefix)
        state.log_history.append({**metrics, "step": state.global_step})
        self._pending = metrics

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending:
            logs.update(self._pending)
            self._pending = {}
