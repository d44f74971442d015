"""What every part of the torch adapter shares: argument checks, the per-sample loss, torch's
threads under the library's policy, the progress bar."""

from __future__ import annotations

import contextlib
import threading
import warnings

import numpy as np
import torch
from torch.func import vmap

from .._config import JACOBIAN_RTOL
from .._threads import blas_thread_limit, policy_enabled
from .._validation import check_positive_int

# Loss modules whose targets have the model's output shape.
SAME_SHAPE_LOSSES = (torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.HuberLoss, torch.nn.SmoothL1Loss,
                      torch.nn.BCEWithLogitsLoss, torch.nn.BCELoss, torch.nn.SoftMarginLoss)



# ----------------------------------------------------------------------------- torch's threads, warnings
class _TorchThreads:
    """Process-wide reference-counted limit of torch's intra-op thread pool to one thread (the
    library's threading policy, fastsgdstab/_threads.py, applied to torch: the adapter's work is
    many small operations, which torch's threads only slow down on a shared machine). Lowers
    only, restores the caller's count when the last concurrent adapter call leaves, and leaves a
    count that someone else changed meanwhile as they set it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = 0
        self._saved = None

    def enter(self) -> None:
        with self._lock:
            self._holders += 1
            if self._holders == 1:
                original = torch.get_num_threads()
                self._saved = None
                if original > 1:
                    torch.set_num_threads(1)
                    self._saved = original

    def leave(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._saved is not None:
                if torch.get_num_threads() == 1:
                    torch.set_num_threads(self._saved)
                self._saved = None


_TORCH_THREADS = _TorchThreads()


@contextlib.contextmanager
def torch_policy(work):
    """torch's threads under the library's policy for ``work`` multiply-adds (one thread below
    ``BLAS_THREADS_MIN_WORK``, the process's setting above; ``FASTSGDSTAB_THREAD_POLICY=off``
    turns it off), and the DeprecationWarnings that torch.func's first use raises from
    torch.jit silenced locally (they are torch's internals, not the caller's code)."""
    with torch_warnings(), _thread_limit(work):
        yield


@contextlib.contextmanager
def torch_warnings():
    """torch.func's DeprecationWarnings from torch.jit silenced, locally."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        yield


@contextlib.contextmanager
def _thread_limit(work):
    if not policy_enabled() or blas_thread_limit(work) is None:
        yield
        return
    _TORCH_THREADS.enter()
    try:
        yield
    finally:
        _TORCH_THREADS.leave()


class ThreadPhases:
    """torch's threads under the policy phase by phase, within one call: ``switch(work)`` leaves
    the current phase's limit and takes the next one's, so that a call whose passes over the
    samples are small work (one thread) and whose Gram products are large (the process's
    threads) gets each its own setting. A context manager: the last phase is left on exit."""

    def __init__(self, work=None):
        self._current = None
        if work is not None:
            self.switch(work)

    def switch(self, work) -> None:
        self.close()
        limit = _thread_limit(work)
        limit.__enter__()
        self._current = limit

    def close(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            current.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ----------------------------------------------------------------------------- argument checks
def check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")


def _as_tensor(value, name: str, dtype, device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(np.asarray(value))
        except Exception as exc:
            raise TypeError(f"{name} must be a torch.Tensor or an array; could not convert it ({exc})") from exc
    if value.ndim == 0:
        raise ValueError(f"{name} must have a leading sample axis; got a 0-d tensor")
    if value.is_floating_point():
        value = value.to(dtype)
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} must be finite; found NaN or inf")
    return value.to(device)


def check_data(inputs, targets, dtype, device):
    inputs = _as_tensor(inputs, "inputs", dtype, device)
    targets = _as_tensor(targets, "targets", dtype, device)
    n = inputs.shape[0]
    if n == 0:
        raise ValueError("the dataset is empty: inputs has 0 samples (axis 0)")
    if targets.shape[0] != n:
        raise ValueError(f"inputs and targets must have the same number of samples (axis 0); got "
                         f"{n} and {targets.shape[0]}")
    if n < 2:
        raise ValueError(f"the dataset must have at least 2 samples; got {n}")
    return inputs, targets, n


def trainable_parameters(model, dtype, device):
    """(names, parameters as a dict of float tensors, the rest: frozen parameters and buffers)."""
    params, rest = {}, {}
    for name, p in model.named_parameters():
        if not torch.isfinite(p.detach()).all():
            raise ValueError(f"model parameter {name!r} holds NaN or inf: the model is not at a point "
                             f"where a curvature exists")
        target = params if p.requires_grad else rest
        target[name] = p.detach().to(device=device, dtype=dtype if p.is_floating_point() else p.dtype)
    for name, b in model.named_buffers():
        rest[name] = b.detach().to(device=device, dtype=dtype if b.is_floating_point() else b.dtype)
    if not params:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    return tuple(params), params, rest


class PerSampleLoss:
    """A loss as a function of one sample's output and target, returning a 0-d tensor."""

    def __init__(self, loss):
        if isinstance(loss, torch.nn.Module):
            reduction = getattr(loss, "reduction", "mean")
            if reduction != "mean":
                raise ValueError(f"loss must use reduction='mean' (what the library's learning rates "
                                 f"assume: SGD on the mean over the batch); got reduction={reduction!r}")
            if getattr(loss, "weight", None) is not None and isinstance(
                    loss, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)):
                raise ValueError("loss has no per-sample form: with class weights, "
                                 f"{type(loss).__name__}'s mean divides by the sum of the weights of the "
                                 "batch, not by its size; pass a per-sample callable instead")
            self.module = loss
        elif callable(loss):
            self.module = None
        else:
            raise TypeError(f"loss must be a torch loss module (MSELoss(), CrossEntropyLoss(), ...) or a "
                            f"callable loss(output, target) -> 0-d tensor for one sample; got "
                            f"{type(loss).__name__}")
        self.loss = loss
        self.name = type(loss).__name__ if self.module is not None else getattr(loss, "__name__", "loss")

    def __call__(self, output, target):
        if self.module is not None:
            return self.module(output[None], target[None])
        return self.loss(output, target)

    def batch(self, outputs, targets):
        """The mean over a batch, as training computes it."""
        if self.module is not None:
            return self.module(outputs, targets)
        return torch.stack([self.loss(o, t) for o, t in zip(outputs, targets)]).mean()

    def check(self, outputs, targets) -> None:
        """The loss has a per-sample form: 0-d per-sample values whose mean is the batch loss."""
        if self.module is not None and isinstance(self.module, SAME_SHAPE_LOSSES) \
                and outputs.shape != targets.shape:
            raise ValueError(f"the model's output shape {tuple(outputs.shape)} does not match the "
                             f"targets' shape {tuple(targets.shape)} ({self.name} compares them "
                             f"entry by entry)")
        try:
            values = [self(o, t) for o, t in zip(outputs, targets)]
        except Exception as exc:
            raise ValueError(f"loss has no per-sample form: calling it on one sample's output "
                             f"(shape {tuple(outputs.shape[1:])}) and target failed ({exc})") from exc
        bad = [v for v in values if not isinstance(v, torch.Tensor) or v.numel() != 1]
        if bad:
            raise ValueError(f"loss has no per-sample form: on one sample it must return a single "
                             f"number (a 0-d tensor); got {type(bad[0]).__name__} "
                             f"{tuple(getattr(bad[0], 'shape', ()))}")
        if self.module is not None:
            per_sample = torch.stack([v.reshape(()) for v in values]).mean()
            try:
                whole = self.module(outputs, targets)
            except Exception as exc:
                raise ValueError(f"the model's outputs {tuple(outputs.shape)} and the targets "
                                 f"{tuple(targets.shape)} do not fit {self.name} ({exc})") from exc
            if whole.numel() != 1 or not torch.isclose(whole.reshape(()), per_sample, rtol=1e-6, atol=1e-12):
                raise ValueError(f"loss has no per-sample form: {self.name} on a batch is not the mean "
                                 f"of its per-sample values ({float(whole.reshape(-1)[0]):.6g} against "
                                 f"{float(per_sample):.6g}); pass a per-sample callable instead")


def check_loss_values(values: torch.Tensor, what: str) -> None:
    if not torch.isfinite(values).all():
        raise ValueError(f"{what} is NaN or inf at the model's parameters")


def chunk_samples(chunk_size, n: int, rows_per_sample: int, d: int, memory_bytes: float) -> int:
    if chunk_size is None:
        # a quarter of the memory for one chunk of rows and its two copies inside torch.func
        return max(1, min(n, int(memory_bytes // (4 * 3 * 8 * rows_per_sample * d))))
    return min(check_positive_int(chunk_size, "chunk_size"), n)



def over_samples(function, outputs, targets):
    """``function`` on every (output, target) pair, stacked: vmap, or a loop for a loss that
    vmap cannot batch (data-dependent Python control flow, ``.item()``)."""
    try:
        return vmap(function)(outputs, targets)
    except Exception:
        return torch.stack([function(o, t) for o, t in zip(outputs, targets)])


def chunked(function, inputs, chunk):
    return torch.cat([function(inputs[s:s + chunk]) for s in range(0, inputs.shape[0], chunk)])


def psd_roots(Lam: torch.Tensor) -> torch.Tensor:
    """L_i with L_i L_i^T = Lambda_i (eigen-factor), after the symmetry and PSD checks."""
    values, vectors = torch.linalg.eigh(0.5 * (Lam + Lam.transpose(1, 2)))
    scale = float(values.abs().max()) if values.numel() else 0.0
    asymmetry = (Lam - Lam.transpose(1, 2)).abs().amax(dim=(1, 2))
    if scale > 0 and float(asymmetry.max()) > 1e-8 * scale:
        raise ValueError("the loss's Hessian in output space is not symmetric (round-off too large?)")
    smallest = values[:, 0]
    worst = int(torch.argmin(smallest))
    if float(smallest[worst]) < -JACOBIAN_RTOL * scale:
        raise ValueError(f"the loss is not convex in the model's outputs at sample {worst}: its output-"
                         f"space Hessian has eigenvalue {float(smallest[worst]):.6g} (largest in the "
                         f"data {scale:.6g}); the Gauss-Newton family needs a loss convex in the outputs")
    return vectors * values.clamp(min=0).sqrt()[:, None, :]


