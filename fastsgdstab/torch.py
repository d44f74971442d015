"""PyTorch adapter: from a ``torch.nn.Module`` to the family of its per-sample Hessians.

Optional (the ``torch`` extra): importing ``fastsgdstab`` never imports torch; importing
``fastsgdstab.torch`` does.

* :func:`family_from_model`: the Gauss-Newton family ``H_i = J_i^T Lambda_i J_i`` of a model at
  its current parameters (specification page, section "From a network to a family"), with
  ``Lambda_i`` the Hessian of the user's own per-sample loss in output space (autograd), so the
  learning rates the library reports are for ``torch.optim.SGD(model.parameters(), lr)`` on that
  loss with mean reduction. Jacobian rows are computed by chunks (``torch.func``); for large
  models only the (n C x n C) Gram matrix of the factors is formed (the Gram route).
* :func:`escape_test`: the user's own check of the theory: real ``torch.optim.SGD`` from a small
  perturbation of the minimum, counting the runs that leave it.
* :func:`preconditioner_from_adam`: the frozen preconditioner ``P = 1 / (sqrt(v) + eps)`` of an
  Adam, AdamW or RMSprop state, for ``HessianFamily.preconditioned``.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

from ._warnings import warn
from ._config import (
    ESCAPE_FACTOR,
    GAUSS_NEWTON_POWER_STEPS,
    GAUSS_NEWTON_RTOL,
    JACOBIAN_RTOL,
    TORCH_MEMORY_BYTES,
)
from ._validation import check_lr, check_positive_int, check_real_scalar
from .family import HessianFamily
from ._statistics import wilson_interval

__all__ = [
    "ModelFamily",
    "EscapeResult",
    "GaussNewtonWarning",
    "family_from_model",
    "escape_test",
    "preconditioner_from_adam",
    "ESCAPE_SAMPLING",
]

ESCAPE_SAMPLING = ("reshuffle", "bernoulli", "without_replacement", "with_replacement")
"""Batch schemes of :func:`escape_test`: DataLoader-style reshuffled epochs, and the library's three."""

# Loss modules whose targets have the model's output shape.
_SAME_SHAPE_LOSSES = (torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.HuberLoss, torch.nn.SmoothL1Loss,
                      torch.nn.BCEWithLogitsLoss, torch.nn.BCELoss, torch.nn.SoftMarginLoss)


class GaussNewtonWarning(UserWarning):
    """The model is not at an interpolating minimum: the Gauss-Newton family is a surrogate.

    Raised by :func:`family_from_model` when the part of the Hessian that the Gauss-Newton term
    leaves out, ``sum_c (d ell / d f_c) grad^2 f_c``, is larger than ``GAUSS_NEWTON_RTOL`` times
    the sharpness.
    """


@dataclass(frozen=True)
class ModelFamily:
    """What :func:`family_from_model` returns: the family and how close the point is to a minimum.

    Attributes
    ----------
    family : HessianFamily
        The Gauss-Newton family: factors (n, d, r) on the factor route, or (n, d', r) in the
        reduced coordinates of the factors' span (d' <= n r) on the Gram route; every answer of
        the library is the same for both.
    route : str
        ``"factors"``; ``"gram"`` (generic Jacobian rows); ``"gram (linear layers)"`` (the
        Gram matrix from the layer-wise structure of ``nn.Linear`` layers, no Jacobian rows); or
        ``"gram (linear layers + generic)"`` (that, plus the generic rows of the other trainable
        parameters, such as normalisation affines).
    parameter_count : int
        d, the number of trainable parameters (``requires_grad=True``).
    parameter_names : tuple of str
        Their names, in the order of the flattened parameter vector (``model.named_parameters()``).
    outputs : int
        C, the number of outputs per sample.
    loss : float
        Mean per-sample loss at the point.
    gradient_norm : float
        ``||(1/n) sum_i g_i||``, the norm of the full-batch gradient.
    sample_gradient_norm : float
        ``(1/n) sum_i ||g_i||``, the mean per-sample gradient norm (zero at interpolation).
    relative_gradient : float
        ``sample_gradient_norm / (sharpness * ||theta||)``: the length of a Newton step on the
        per-sample gradient relative to the parameters' norm (dimensionless; 1e-6 or less at a
        good interpolating minimum).
    gauss_newton_gap : float
        Estimated spectral norm of the Hessian minus its Gauss-Newton part, relative to the
        sharpness (power iteration with Hessian-vector products; NaN when not computed).
    """

    family: HessianFamily
    route: str
    parameter_count: int
    parameter_names: tuple
    outputs: int
    loss: float
    gradient_norm: float
    sample_gradient_norm: float
    relative_gradient: float
    gauss_newton_gap: float

    def __str__(self) -> str:
        return (f"ModelFamily: n = {self.family.n}, d = {self.parameter_count} parameters, "
                f"C = {self.outputs} outputs, {self.route} route (family d = {self.family.d}, "
                f"rank {self.family.rank})\n"
                f"  sharpness {self.family.sharpness():.6g}, mean loss {self.loss:.3g}\n"
                f"  near-minimum check: relative gradient {self.relative_gradient:.3g}, "
                f"Gauss-Newton gap {self.gauss_newton_gap:.3g} (of the sharpness)")


@dataclass(frozen=True)
class EscapeResult:
    """What :func:`escape_test` returns.

    Attributes
    ----------
    runs, escaped : int
        Runs made and runs that left the minimum (excess loss grew by ``factor``, or became NaN
        or inf).
    fraction : float
        ``escaped / runs``.
    interval : tuple of float
        95% Wilson interval of the escape probability.
    max_ratios : ndarray, shape (runs,)
        Per run: the largest excess-loss ratio ``(L_t - L*) / (L_0 - L*)`` seen (inf when the
        loss became non-finite).
    final_ratios : ndarray, shape (runs,)
        Per run: the ratio at the last step made (the escape step for a run that escaped).
    escape_steps : ndarray of int, shape (runs,)
        The step at which a run escaped, -1 for runs that did not.
    lr, batch_size, sampling, steps, factor
        The settings.
    """

    runs: int
    escaped: int
    fraction: float
    interval: tuple
    max_ratios: np.ndarray = field(repr=False)
    final_ratios: np.ndarray = field(repr=False)
    escape_steps: np.ndarray = field(repr=False)
    lr: float = 0.0
    batch_size: int = 1
    sampling: str = "reshuffle"
    steps: int = 0
    factor: float = ESCAPE_FACTOR

    def __str__(self) -> str:
        low, high = self.interval
        return (f"escape_test: {self.escaped} of {self.runs} runs escaped (excess loss x{self.factor:g}) "
                f"in {self.steps} steps at lr = {self.lr:.6g}, batch size {self.batch_size}, "
                f"{self.sampling} batches; 95% interval [{low:.3f}, {high:.3f}]; "
                f"median final excess-loss ratio {np.median(self.final_ratios):.3g}")


# ----------------------------------------------------------------------------- argument checks
def _check_model(model) -> None:
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


def _check_data(inputs, targets, dtype, device):
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


def _trainable(model, dtype, device):
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


class _PerSampleLoss:
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
        if self.module is not None and isinstance(self.module, _SAME_SHAPE_LOSSES) \
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


def _check_loss_values(values: torch.Tensor, what: str) -> None:
    if not torch.isfinite(values).all():
        raise ValueError(f"{what} is NaN or inf at the model's parameters")


def _chunk_samples(chunk_size, n: int, rows_per_sample: int, d: int, memory_bytes: float) -> int:
    if chunk_size is None:
        # a quarter of the memory for one chunk of rows and its two copies inside torch.func
        return max(1, min(n, int(memory_bytes // (4 * 3 * 8 * rows_per_sample * d))))
    return min(check_positive_int(chunk_size, "chunk_size"), n)


def _gram(rows_of, n, outputs, d, chunk, memory_bytes, dtype, device) -> torch.Tensor:
    """The (n C, n C) Gram matrix of the rows, by blocks: an outer block of samples held in about
    half of ``memory_bytes`` against inner chunks streamed after it (recomputed once per outer
    block); every sample's rows are computed with ``record=True`` exactly once."""
    m = n * outputs
    gram = torch.empty((m, m), dtype=dtype, device=device)
    per_sample = 8.0 * outputs * d
    outer = n if n * per_sample <= memory_bytes / 2 else max(chunk, int(memory_bytes / 2 // per_sample))
    for a in range(0, n, outer):
        b = min(a + outer, n)
        block = torch.empty(((b - a) * outputs, d), dtype=dtype, device=device)
        for c in range(a, b, chunk):
            e = min(c + chunk, b)
            block[(c - a) * outputs:(e - a) * outputs] = rows_of(c, e, True)
        gram[a * outputs:b * outputs, a * outputs:b * outputs] = block @ block.T
        for c in range(b, n, chunk):
            e = min(c + chunk, n)
            product = block @ rows_of(c, e, False).T
            gram[a * outputs:b * outputs, c * outputs:e * outputs] = product
            gram[c * outputs:e * outputs, a * outputs:b * outputs] = product.T
        del block
    return gram.cpu()


# The Gram route's structured form for nn.Linear layers (False: always the generic rows; tests).
_STRUCTURED = True


def _linear_layers(model, names):
    """The ``nn.Linear`` modules holding a trainable parameter, with the names of their trainable
    weight and bias (None for a frozen or absent one); None when a trainable parameter is tied
    (reachable under two names: shared, so the per-layer formula does not apply)."""
    trainable = set(names)
    seen = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen and (name in trainable or seen[id(p)] in trainable):
            return None
        seen.setdefault(id(p), name)
    layers = {}
    for prefix, module in model.named_modules():
        if type(module) is not torch.nn.Linear:  # subclasses may not call F.linear in forward
            continue
        base = prefix + "." if prefix else ""
        weight = base + "weight" if base + "weight" in trainable else None
        bias = base + "bias" if module.bias is not None and base + "bias" in trainable else None
        if weight or bias:
            layers[module] = (weight, bias)
    return layers


def _structured_gram(model, params, rest, names, inputs, roots, q, n, outputs, chunk_size,
                     memory_bytes):
    """The (n C, n C) Gram matrix of the factor rows from the layer-wise Kronecker structure of
    the Jacobians of ``nn.Linear`` layers, or None when it does not apply (the generic route).

    For a layer ``y = W a + b`` the rows of ``L_i^T J_i`` with respect to (W, b) are
    ``(delta_ik a_i^T, delta_ik)``, ``delta_ik`` the cotangent ``roots[i, :, k]`` pulled back to
    the layer's output: the layer's Gram block is ``(Delta Delta^T) * (A A^T + 1)`` elementwise,
    with A (n, in) the layer's inputs and Delta (n C, out). One forward pass per chunk of samples
    (hooks record each layer's input and output) and C + 2 backward passes (the C cotangent
    columns, the loss gradient q for the near-minimum report, and a random cotangent whose
    parameter gradient by autograd must equal the structured one: any use of a layer's weight
    outside a single 2-d call of the layer, such as weight sharing, a (batch, seq, features)
    input or a weight read directly, sends the computation back to the generic route).
    Other trainable parameters (normalisation affines, embeddings, convolutions) add their
    generic Jacobian rows, when those fit in half of ``memory_bytes``.

    Returns (gram, per-sample gradient norms (n,), norm of the summed gradient, route, chunk)."""
    layers = _linear_layers(model, names)
    if not layers:
        return None
    in_layers = {name for pair in layers.values() for name in pair if name}
    others = [k for k in names if k not in in_layers]
    d_other = sum(params[k].numel() for k in others)
    m = n * outputs
    dtype, device = roots.dtype, roots.device
    if 8.0 * m * d_other > memory_bytes / 2:
        return None
    widths = sum(module.in_features + outputs * module.out_features for module in layers)
    if 8.0 * n * widths > memory_bytes / 2:   # the recorded inputs and pulled-back cotangents
        return None
    chunk = min(n, check_positive_int(chunk_size, "chunk_size") if chunk_size is not None else 1024)
    order = list(layers)
    record, calls = {}, {}

    def hook(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        record[module] = (args[0] if args else None, output)

    live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    A = {module: None for module in order}
    Delta = {module: None for module in order}
    Dq = {module: None for module in order}
    generator = torch.Generator(device="cpu").manual_seed(0)
    handles = [module.register_forward_hook(hook) for module in order]
    try:
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            x = inputs[s:e]
            record.clear()
            calls.clear()
            with torch.enable_grad():
                out = functional_call(model, (live, rest), (x,)).reshape(e - s, outputs)
            if any(count != 1 for count in calls.values()):
                return None                            # a layer called twice: weight sharing
            used = [module for module in order if module in record]
            for module in used:
                a, y = record[module]
                if not (isinstance(a, torch.Tensor) and a.ndim == 2 and a.shape[0] == e - s
                        and y.ndim == 2 and y.shape[0] == e - s and y.requires_grad):
                    return None                        # extra dimensions: the generic route
            ys = [record[module][1] for module in used]
            probe = torch.randn((e - s, outputs), generator=generator, dtype=dtype).to(device)
            cotangents = [roots[s:e, :, k] for k in range(outputs)] + [q[s:e], probe]
            pulled = []
            for v in cotangents:
                grads = torch.autograd.grad(out, ys, grad_outputs=v, retain_graph=True, allow_unused=True)
                pulled.append([torch.zeros_like(y) if g is None else g.detach() for g, y in zip(grads, ys)])
            # the check: autograd's gradient for the probe against the structured one
            wanted = [name for module in order for name in layers[module] if name]
            truth = torch.autograd.grad(out, [live[k] for k in wanted], grad_outputs=probe,
                                        allow_unused=True)
            truth = dict(zip(wanted, truth))
            position = {module: j for j, module in enumerate(used)}
            for module in order:
                weight, bias = layers[module]
                if module in position:
                    a, delta = record[module][0].detach(), pulled[-1][position[module]]
                    mine = {weight: delta.T @ a, bias: delta.sum(0)}
                else:
                    mine = {weight: torch.zeros_like(live[weight]) if weight else None,
                            bias: torch.zeros_like(live[bias]) if bias else None}
                for name in (weight, bias):
                    if name is None:
                        continue
                    ref = truth[name]
                    ref = torch.zeros_like(live[name]) if ref is None else ref
                    scale = float(ref.abs().max()) + float(mine[name].abs().max())
                    if float((ref - mine[name]).abs().max()) > 1e-9 * scale:
                        return None                    # the weight is used outside the layer's call
            del out, ys, truth
            for module in order:
                if A[module] is None:
                    A[module] = torch.zeros((n, module.in_features), dtype=dtype, device=device)
                    Delta[module] = torch.zeros((n, outputs, module.out_features), dtype=dtype, device=device)
                    Dq[module] = torch.zeros((n, module.out_features), dtype=dtype, device=device)
                if module in position:
                    j = position[module]
                    A[module][s:e] = record[module][0].detach()
                    for k in range(outputs):
                        Delta[module][s:e, k] = pulled[k][j]
                    Dq[module][s:e] = pulled[outputs][j]
            record.clear()
    finally:
        for handle in handles:
            handle.remove()
        record.clear()

    gram = torch.zeros((m, m), dtype=dtype, device=device)
    norms2 = torch.zeros(n, dtype=dtype, device=device)
    total2 = 0.0
    block = max(1, min(n, int(memory_bytes / 4 // (8.0 * outputs * m))))  # samples per row block
    for module in order:
        weight, bias = layers[module]
        a, D, dq = A[module], Delta[module].reshape(m, -1), Dq[module]
        S = a @ a.T if weight else torch.zeros((n, n), dtype=dtype, device=device)
        if bias:
            S += 1.0
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            product = D[i0 * outputs:i1 * outputs] @ D.T
            product.view(i1 - i0, outputs, n, outputs).mul_(S[i0:i1, None, :, None])
            gram[i0 * outputs:i1 * outputs] += product
            del product
        dq2 = (dq * dq).sum(1)
        norms2 += dq2 * ((a * a).sum(1) if weight else 0.0) + (dq2 if bias else 0.0)
        if weight:
            total2 += float(((dq.T @ a) ** 2).sum())
        if bias:
            total2 += float((dq.sum(0) ** 2).sum())
        A[module] = Delta[module] = Dq[module] = None
    route = "gram (linear layers)"
    if others:
        route = "gram (linear layers + generic)"
        fixed = dict(params)
        sub = {k: params[k] for k in others}

        def output(p, x):
            return functional_call(model, ({**fixed, **p}, rest), (x[None],))[0]

        step = max(1, min(n, int(memory_bytes / 4 // (3 * 8.0 * outputs * max(d_other, 1)))))
        rows = torch.empty((m, d_other), dtype=dtype, device=device)
        g_sum = torch.zeros(d_other, dtype=dtype, device=device)
        for s in range(0, n, step):
            e = min(s + step, n)
            jac = vmap(jacrev(output), in_dims=(None, 0))(sub, inputs[s:e])
            J = torch.cat([jac[k].reshape(e - s, outputs, -1) for k in others], dim=2)
            g = torch.einsum("icd,ic->id", J, q[s:e])
            norms2[s:e] += (g * g).sum(1)
            g_sum += g.sum(0)
            rows[s * outputs:e * outputs] = torch.einsum("icd,ick->ikd", J, roots[s:e]).reshape(-1, d_other)
        gram.addmm_(rows, rows.T)
        total2 += float((g_sum * g_sum).sum())
        del rows
    return gram, norms2.clamp(min=0).sqrt(), math.sqrt(total2), route, chunk


# ----------------------------------------------------------------------------- the family
def family_from_model(model, inputs, targets, loss, *, chunk_size=None, reduce=None,
                      device="cpu", dtype=torch.float64, check_gauss_newton=True,
                      memory_bytes=None) -> ModelFamily:
    """The Gauss-Newton family of a PyTorch model at its current parameters.

    ``H_i = J_i^T Lambda_i J_i`` with ``J_i`` the (C, d) Jacobian of sample i's outputs with
    respect to the trainable parameters and ``Lambda_i`` the (C, C) Hessian of the per-sample
    loss in output space, both by autograd (``torch.func``), so any loss works and the learning
    rates the library then reports are for ``torch.optim.SGD(model.parameters(), lr)`` on this
    loss with mean reduction over the batch (for ``MSELoss()``, ``Lambda_i = (2/C) I``: half the
    critical learning rate of the ``(1/2) ||f - y||^2`` convention). At an interpolating minimum
    (every per-sample gradient zero) this is the per-sample Hessian exactly; elsewhere it is the
    standard PSD surrogate, and a :class:`GaussNewtonWarning` says so.

    The curvature is computed in evaluation mode (``model.eval()``: batch norm uses its running
    statistics, dropout is off; the model's mode is restored afterwards), in ``dtype`` (float64
    by default, whatever the model's dtype), on ``device``; the model itself is not modified.
    Parameters with ``requires_grad=False`` are excluded (d counts the trainable ones).

    Two routes, every answer the same: the factor route stores the (n, d, C) factors; the Gram
    route (when they would not fit in ``memory_bytes``, 1 GB by default, or ``reduce=True``)
    forms only the (n C, n C) Gram matrix of the factors, block by block (memory about
    ``memory_bytes`` for the rows plus three (n C)^2 float64 matrices for the Gram matrix and its
    eigendecomposition), and returns the family in the reduced coordinates of the factors' span
    (``HessianFamily.from_gram``). On the Gram route, ``nn.Linear`` layers need no Jacobian rows:
    a layer ``y = W a + b`` contributes ``(Delta Delta^T) * (A A^T + 1)`` elementwise (A its
    inputs, Delta the pulled-back cotangents of the scaled outputs; one forward and C + 2
    backward passes per chunk of samples), and only the other trainable parameters get generic
    rows. A layer called more than once, on inputs with extra dimensions, or whose weight is used
    outside its call is detected (autograd's gradient for a random cotangent must equal the
    structured one) and the generic rows are used instead.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch of inputs (n, ...) to outputs (n, C) or (n,).
    inputs, targets : torch.Tensor or array_like
        The training set (first axis: samples), as the loss expects them.
    loss : torch loss module or callable
        A loss module with ``reduction='mean'`` (``MSELoss()``, ``CrossEntropyLoss()``,
        ``BCEWithLogitsLoss()``, ``HuberLoss()``...), called on one-sample batches; or a
        callable ``loss(output, target)`` for ONE sample (output of shape (C,) or (), as the
        model produces it per sample) returning a 0-d tensor. Training is taken to minimise the
        mean of the per-sample losses.
    chunk_size : int, optional
        Samples whose Jacobian rows are computed at once (default: as many as fit, with
        torch.func's copies, in a quarter of ``memory_bytes``).
    reduce : bool, optional
        True: the Gram route; False: the factor route; None (default): the factor route when
        the factors fit in ``memory_bytes``.
    device : str or torch.device, default "cpu"
        Where the Jacobians are computed (``"cuda"`` where available).
    dtype : torch.dtype, default torch.float64
    memory_bytes : float, optional
        Memory for Jacobian rows (default ``TORCH_MEMORY_BYTES``, 1 GB): decides the route and
        the chunks. The Gram route holds an outer block of rows in half of it and streams the
        other samples' rows past it (recomputing them once per outer block), so a larger value
        means fewer recomputations.
    check_gauss_newton : bool, default True
        Estimate the Gauss-Newton gap (``GAUSS_NEWTON_POWER_STEPS`` Hessian-vector products over
        the data) and warn when it exceeds ``GAUSS_NEWTON_RTOL``.

    Returns
    -------
    ModelFamily
        The family, the route taken, the parameter count and names, and the near-minimum report.

    Raises
    ------
    TypeError
        ``model`` not a Module, ``loss`` neither a loss module nor callable, data that is not
        numeric.
    ValueError
        An empty dataset or fewer than 2 samples, inputs and targets of different lengths,
        outputs that do not match the targets, a loss with no per-sample form (reduction other
        than 'mean', class weights, a callable that does not return one number), NaN or inf in
        the parameters or the loss, no trainable parameter, a loss that is not convex in the
        outputs at some sample.

    Warns
    -----
    GaussNewtonWarning
        When the point is not close enough to an interpolating minimum for the Gauss-Newton
        family to be the Hessian.

    Examples
    --------
    >>> import torch
    >>> from fastsgdstab import critical_lr
    >>> from fastsgdstab.torch import family_from_model
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(3, 1, bias=False)
    >>> X = torch.randn(8, 3)
    >>> y = model(X).detach()            # an exact (interpolating) minimum
    >>> result = family_from_model(model, X, y, torch.nn.MSELoss())
    >>> result.family, result.route
    (HessianFamily(n=8, d=3, rank=1), 'factors')
    >>> H = 2 * X.double().T @ X.double() / 8    # MSELoss: the Hessian of the mean loss
    >>> bool(abs(result.family.sharpness() - torch.linalg.eigvalsh(H)[-1]) < 1e-10)
    True
    """
    _check_model(model)
    device = torch.device(device)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
    if reduce not in (None, True, False):
        raise TypeError(f"reduce must be None, True or False; got {reduce!r}")
    if not isinstance(check_gauss_newton, bool):
        raise TypeError(f"check_gauss_newton must be True or False; got {check_gauss_newton!r}")
    if memory_bytes is None:
        memory_bytes = TORCH_MEMORY_BYTES
    memory_bytes = check_real_scalar(memory_bytes, "memory_bytes")
    if not memory_bytes > 0:
        raise ValueError(f"memory_bytes must be > 0; got {memory_bytes:g}")
    per_sample = _PerSampleLoss(loss)
    inputs, targets, n = _check_data(inputs, targets, dtype, device)
    names, params, rest = _trainable(model, dtype, device)
    d = sum(p.numel() for p in params.values())
    was_training = model.training
    model.eval()
    try:
        return _family_from_model(model, inputs, targets, per_sample, names, params, rest, n, d,
                                  chunk_size, reduce, check_gauss_newton, memory_bytes)
    finally:
        model.train(was_training)


def _family_from_model(model, inputs, targets, per_sample, names, params, rest, n, d, chunk_size,
                       reduce, check_gauss_newton, memory_bytes) -> ModelFamily:
    def output(p, x):
        return functional_call(model, (p, rest), (x[None],))[0]

    with torch.no_grad():
        probe = functional_call(model, (params, rest), (inputs[: min(n, 8)],))
    if probe.shape[0] != min(n, 8):
        raise ValueError(f"the model must map a batch of m inputs to m outputs (first axis); got "
                         f"output shape {tuple(probe.shape)} for {min(n, 8)} inputs")
    output_shape = tuple(probe.shape[1:])
    outputs = int(np.prod(output_shape)) if output_shape else 1
    if per_sample.module is not None and isinstance(per_sample.module, _SAME_SHAPE_LOSSES):
        if tuple(targets.shape[1:]) != output_shape:
            raise ValueError(f"the model's output shape {(n,) + output_shape} does not match the "
                             f"targets' shape {tuple(targets.shape)} ({per_sample.name} compares them "
                             f"entry by entry)")
    per_sample.check(probe, targets[: min(n, 8)])

    def sample_loss(out_flat, y):
        return per_sample(out_flat.reshape(output_shape), y).reshape(())

    outputs_all = _chunked(lambda x: functional_call(model, (params, rest), (x,)).detach(), inputs,
                           max(1, min(n, 4096)))
    if not torch.isfinite(outputs_all).all():
        raise ValueError("the model's outputs are NaN or inf at its parameters")
    flat_outputs = outputs_all.reshape(n, outputs)
    losses = _per_sample(sample_loss, flat_outputs, targets)
    _check_loss_values(losses, "the loss")
    q = _per_sample(grad(sample_loss), flat_outputs, targets)       # d ell / d f, (n, C)
    Lam = _per_sample(hessian(sample_loss), flat_outputs, targets)  # (n, C, C)
    roots = _psd_roots(Lam)                                        # (n, C, C): L L^T = Lambda

    def jacobian_rows(x):  # (m, C, d): rows L_i^T J_i
        jac = vmap(jacrev(output), in_dims=(None, 0))(params, x)
        flat = torch.cat([jac[name].reshape(x.shape[0], outputs, -1) for name in names], dim=2)
        return flat

    chunk = _chunk_samples(chunk_size, n, outputs, d, memory_bytes)
    factor_bytes = 8.0 * n * outputs * d
    route = "gram" if reduce or (reduce is None and factor_bytes > memory_bytes) else "factors"
    grad_sum = torch.zeros(d, dtype=inputs.dtype if inputs.is_floating_point() else torch.float64,
                           device=inputs.device)
    grad_norms = torch.zeros(n, dtype=grad_sum.dtype, device=grad_sum.device)

    def rows_of(start, stop, record):
        J = jacobian_rows(inputs[start:stop])
        if record:
            g = torch.einsum("icd,ic->id", J, q[start:stop])   # per-sample gradients J^T q
            grad_sum.add_(g.sum(0))
            grad_norms[start:stop] = torch.linalg.vector_norm(g, dim=1)
        return torch.einsum("icd,ick->ikd", J, roots[start:stop]).reshape(-1, d)

    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    gap_chunk = chunk
    structured = None
    if route == "gram" and _STRUCTURED:
        structured = _structured_gram(model, params, rest, names, inputs, roots, q, n, outputs,
                                      chunk_size, memory_bytes)
    if route == "factors":
        rows = torch.cat([rows_of(a, b, True) for a, b in bounds]).reshape(n, outputs, d)
        # --- issue 20 (loss floor): the family carries the per-sample gradients g_i = J_i^T q_i
        # = rows_i^T (L_i^+ q_i) (q_i lies in the range of Lambda_i = L_i L_i^T: positive definite
        # for MSE; for cross-entropy q = p - y is orthogonal to 1, Lambda's null vector).
        # Factor route only: on the Gram routes the family has no gradients.
        coefficients = torch.einsum("ikc,ic->ik", torch.linalg.pinv(roots), q)
        gradients = torch.einsum("ikd,ik->id", rows, coefficients).cpu().numpy()
        family = HessianFamily.from_jacobians(rows.cpu().numpy(), gradients=gradients)
    elif structured is not None:
        gram, norms, total_norm, route, gap_chunk = structured
        grad_norms.copy_(norms)
        grad_sum.zero_()[0] = total_norm  # only its norm is reported
        family = HessianFamily.from_gram(gram.cpu().numpy(), outputs)
        del gram
    else:
        family = HessianFamily.from_gram(
            _gram(rows_of, n, outputs, d, chunk, memory_bytes, grad_sum.dtype, grad_sum.device).numpy(),
            outputs)
    sharpness = family.sharpness()
    theta_norm = math.sqrt(sum(float((p * p).sum()) for p in params.values()))
    sample_gradient_norm = float(grad_norms.mean())
    gradient_norm = float(torch.linalg.vector_norm(grad_sum)) / n
    relative = sample_gradient_norm / (sharpness * theta_norm) if sharpness * theta_norm > 0 else math.inf
    gap = math.nan
    if check_gauss_newton:
        gap = _gauss_newton_gap(model, params, rest, inputs, q, output_shape, gap_chunk, n) / sharpness \
            if sharpness > 0 else math.nan
        if not gap <= GAUSS_NEWTON_RTOL:
            warn(
                f"the model is not at an interpolating minimum: the Hessian differs from its "
                f"Gauss-Newton part by about {gap:.3g} of the sharpness (mean per-sample gradient "
                f"norm {sample_gradient_norm:.3g}, relative gradient {relative:.3g}); the family is "
                f"the Gauss-Newton surrogate there, not the Hessian (train to interpolation for "
                f"exact answers)", GaussNewtonWarning)
    return ModelFamily(family=family, route=route, parameter_count=d, parameter_names=names,
                       outputs=outputs, loss=float(losses.mean()), gradient_norm=gradient_norm,
                       sample_gradient_norm=sample_gradient_norm, relative_gradient=relative,
                       gauss_newton_gap=gap)


def _per_sample(function, outputs, targets):
    """``function`` on every (output, target) pair, stacked: vmap, or a loop for a loss that
    vmap cannot batch (data-dependent Python control flow, ``.item()``)."""
    try:
        return vmap(function)(outputs, targets)
    except Exception:
        return torch.stack([function(o, t) for o, t in zip(outputs, targets)])


def _chunked(function, inputs, chunk):
    return torch.cat([function(inputs[s:s + chunk]) for s in range(0, inputs.shape[0], chunk)])


def _psd_roots(Lam: torch.Tensor) -> torch.Tensor:
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


def _gauss_newton_gap(model, params, rest, inputs, q, output_shape, chunk, n) -> float:
    """max |eigenvalue| of (1/n) sum_i sum_c q_ic grad^2 f_ic (power iteration, Hessian-vector
    products of phi(theta) = (1/n) sum_i q_i . f_i(theta) with q fixed)."""
    if not bool((q != 0).any()):
        return 0.0
    shapes = {k: v.shape for k, v in params.items()}

    def phi(p, x, weights):
        out = functional_call(model, (p, rest), (x,)).reshape(x.shape[0], -1)
        return (out * weights).sum() / n

    def hvp(v):
        total = {k: torch.zeros(s, dtype=params[k].dtype, device=params[k].device) for k, s in shapes.items()}
        for s in range(0, n, chunk):
            x, w = inputs[s:s + chunk], q[s:s + chunk]
            _, tangent = jvp(lambda p: grad(phi)(p, x, w), (params,), (v,))
            for k in total:
                total[k] += tangent[k]
        return total

    generator = torch.Generator(device="cpu").manual_seed(0)
    v = {k: torch.randn(s, generator=generator, dtype=params[k].dtype).to(params[k].device)
         for k, s in shapes.items()}
    value = 0.0
    for _ in range(GAUSS_NEWTON_POWER_STEPS):
        norm = math.sqrt(sum(float((t * t).sum()) for t in v.values()))
        if norm == 0:
            return 0.0
        v = {k: t / norm for k, t in v.items()}
        w = hvp(v)
        value = abs(sum(float((w[k] * v[k]).sum()) for k in v))
        v = w
    norm = math.sqrt(sum(float((t * t).sum()) for t in v.values()))
    return max(value, norm)


# ----------------------------------------------------------------------------- escape test
def escape_test(model, inputs, targets, loss, lr, batch_size, *, steps, runs, sampling="reshuffle",
                seed=0, perturbation=1e-3, factor=ESCAPE_FACTOR, dtype=torch.float64,
                device="cpu") -> EscapeResult:
    """Does real ``torch.optim.SGD`` leave this minimum? The user's own check of the theory.

    Each run copies the model (in ``dtype``, evaluation mode, as the curvature was computed),
    perturbs its trainable parameters by a random direction of norm ``perturbation * ||theta*||``
    (``perturbation`` itself if ``theta* = 0``), then makes ``steps`` steps of
    ``torch.optim.SGD(lr)`` on the mean loss of each batch. A run has escaped when its excess
    loss over the minimum, ``L(theta_t) - L(theta*)`` on the whole training set, reaches
    ``factor`` (the paper's 1000) times its starting value, or becomes NaN or inf. The model
    passed in is not modified.

    Batches: ``"reshuffle"`` as ``DataLoader(shuffle=True, drop_last=False)`` (a new permutation
    each epoch, consecutive batches of ``batch_size``, the last one shorter); ``"bernoulli"``
    (each sample with probability B/n; the batch's loss sum is divided by the nominal B, as in
    the library's model; an empty batch makes no step); ``"without_replacement"`` (a uniform
    B-subset each step); ``"with_replacement"`` (B uniform draws).

    Parameters
    ----------
    model : torch.nn.Module
        At (or near) a minimum of the loss on ``(inputs, targets)``.
    inputs, targets : torch.Tensor or array_like
    loss : torch loss module or callable
        As in :func:`family_from_model`.
    lr : float
        The learning rate of ``torch.optim.SGD``.
    batch_size : int
        In [1, n].
    steps, runs : int
        Steps per run (>= 1) and runs (>= 1).
    sampling : str, default "reshuffle"
        One of ``ESCAPE_SAMPLING``.
    seed : int, default 0
        Seeds the perturbations and the batches (run r uses ``seed`` and r).
    perturbation : float, default 1e-3
        Relative size of the starting perturbation, in (0, 1).
    factor : float, default 1000
        Growth of the excess loss that counts as an escape (> 1).
    dtype : torch.dtype, default torch.float64
        Precision of the runs (float64 so that the excess loss near an interpolating minimum is
        above round-off).
    device : str or torch.device, default "cpu"

    Returns
    -------
    EscapeResult
        Runs, escaped count, fraction with its 95% Wilson interval, per-run excess-loss ratios
        and escape steps.

    Raises
    ------
    TypeError, ValueError
        Invalid arguments (the message names the argument); a starting excess loss that is not
        positive (a perturbation below round-off).

    Examples
    --------
    >>> import torch
    >>> from fastsgdstab.torch import escape_test
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> X = torch.eye(2).repeat(4, 1)      # 8 samples
    >>> y = model(X).detach()              # an exact minimum; MSELoss: H = I, eta* = 2 at B = n
    >>> escape_test(model, X, y, torch.nn.MSELoss(), 1.8, 8, steps=20, runs=2).escaped
    0
    >>> escape_test(model, X, y, torch.nn.MSELoss(), 2.2, 8, steps=40, runs=2).escaped
    2
    """
    _check_model(model)
    device = torch.device(device)
    per_sample = _PerSampleLoss(loss)
    inputs, targets, n = _check_data(inputs, targets, dtype, device)
    lr = check_lr(lr)
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, numbers.Integral) \
            or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an integer in [1, n] = [1, {n}]; got {batch_size!r}")
    batch_size = int(batch_size)
    steps = check_positive_int(steps, "steps")
    runs = check_positive_int(runs, "runs")
    if sampling not in ESCAPE_SAMPLING:
        raise ValueError(f"sampling must be one of {', '.join(ESCAPE_SAMPLING)}; got {sampling!r}")
    seed = check_positive_int(seed, "seed", minimum=0)
    perturbation = check_real_scalar(perturbation, "perturbation")
    if not 0 < perturbation < 1:
        raise ValueError(f"perturbation must be in (0, 1); got {perturbation}")
    factor = check_real_scalar(factor, "factor")
    if not factor > 1:
        raise ValueError(f"factor must be > 1; got {factor}")

    base = copy.deepcopy(model).to(device=device, dtype=dtype)
    base.eval()
    trainable = [p for p in base.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    for name, p in base.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"model parameter {name!r} holds NaN or inf")
    with torch.no_grad():
        per_sample.check(base(inputs[: min(n, 8)]), targets[: min(n, 8)])
    minimum = [p.detach().clone() for p in trainable]
    theta_norm = math.sqrt(sum(float((p * p).sum()) for p in minimum))
    radius = perturbation * theta_norm if theta_norm > 0 else perturbation

    def full_loss():
        with torch.no_grad():
            return float(per_sample.batch(base(inputs), targets))

    floor = full_loss()
    if not math.isfinite(floor):
        raise ValueError("the loss is NaN or inf at the model's parameters")
    max_ratios, final_ratios = np.zeros(runs), np.zeros(runs)
    escape_steps = np.full(runs, -1, dtype=np.int64)
    for run in range(runs):
        generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + run)
        direction = [torch.randn(p.shape, generator=generator, dtype=dtype) for p in minimum]
        scale = radius / math.sqrt(sum(float((t * t).sum()) for t in direction))
        with torch.no_grad():
            for p, p0, t in zip(trainable, minimum, direction):
                p.copy_(p0 + scale * t.to(device))
        start = full_loss() - floor
        if not start > 0:
            raise ValueError(f"the perturbed loss is not above the minimum's ({start:.3g}): "
                             f"perturbation = {perturbation} is below round-off; take a larger one")
        optimizer = torch.optim.SGD(trainable, lr=lr)
        batches = _batches(n, batch_size, sampling, generator)
        ratio = top = 1.0
        for step in range(1, steps + 1):
            index = next(batches)
            optimizer.zero_grad(set_to_none=True)
            if index.numel():
                value = per_sample.batch(base(inputs[index]), targets[index])
                if sampling == "bernoulli":
                    value = value * (index.numel() / batch_size)
                value.backward()
                optimizer.step()
            ratio = (full_loss() - floor) / start
            if not math.isfinite(ratio):
                ratio = math.inf
            top = max(top, ratio)
            if ratio >= factor:
                escape_steps[run] = step
                break
        max_ratios[run], final_ratios[run] = top, ratio
    escaped = int((escape_steps >= 0).sum())
    return EscapeResult(runs=runs, escaped=escaped, fraction=escaped / runs,
                        interval=wilson_interval(escaped, runs), max_ratios=max_ratios,
                        final_ratios=final_ratios, escape_steps=escape_steps, lr=lr,
                        batch_size=batch_size, sampling=sampling, steps=steps, factor=factor)


def _batches(n, batch_size, sampling, generator):
    """An endless stream of index tensors, one per step."""
    while True:
        if sampling == "reshuffle":
            order = torch.randperm(n, generator=generator)
            for s in range(0, n, batch_size):
                yield order[s:s + batch_size]
        elif sampling == "bernoulli":
            yield torch.nonzero(torch.rand(n, generator=generator) < batch_size / n).reshape(-1)
        elif sampling == "without_replacement":
            yield torch.randperm(n, generator=generator)[:batch_size]
        else:
            yield torch.randint(n, (batch_size,), generator=generator)


# ----------------------------------------------------------------------------- preconditioners
def preconditioner_from_adam(optimizer, model) -> np.ndarray:
    """The frozen diagonal preconditioner of an Adam, AdamW or RMSprop state, as a vector.

    Late in training the second-moment estimate v barely moves, and the step is preconditioned
    SGD with ``P = 1 / (sqrt(v) + eps)`` (specification page, section "Preconditioned SGD"); use
    it as ``family.preconditioned(P)`` with the optimiser's learning rate. Bias correction as
    ``torch.optim.Adam``/``AdamW`` apply it at the current step count t:
    ``P = 1 / (bc1 (sqrt(v / bc2) + eps))`` with ``bc1 = 1 - beta1^t`` (torch divides the
    learning rate by it) and ``bc2 = 1 - beta2^t`` (both are 1 after a few thousand steps);
    ``amsgrad=True`` uses ``max_exp_avg_sq``. RMSprop has no bias correction:
    ``P = 1 / (sqrt(v) + eps)`` with ``v = square_avg`` (minus ``grad_avg^2`` when
    ``centered=True``). The first-moment average of Adam (beta1) and RMSprop's momentum are not
    part of P: the family answers for the preconditioned step without them.

    Parameters
    ----------
    optimizer : torch.optim.Adam, torch.optim.AdamW or torch.optim.RMSprop
        After at least one step (its state holds v for every trainable parameter).
    model : torch.nn.Module
        Gives the order: the trainable parameters of ``model.named_parameters()``, flattened and
        concatenated, as in :func:`family_from_model`.

    Returns
    -------
    ndarray, shape (d,)
        P, positive, float64.

    Raises
    ------
    TypeError
        Another optimiser, or ``model`` not a Module.
    ValueError
        A trainable parameter that the optimiser does not hold, or has no state for yet.

    Examples
    --------
    >>> import torch
    >>> from fastsgdstab.torch import preconditioner_from_adam
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.0, eps=0.0)
    >>> model.weight.grad = torch.tensor([[2.0, 0.5]])
    >>> optimizer.step()
    >>> preconditioner_from_adam(optimizer, model)   # alpha = 0: v = g^2, P = 1 / |g|
    array([0.5, 2. ])
    """
    _check_model(model)
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)):
        raise TypeError(f"optimizer must be a torch.optim.Adam, AdamW or RMSprop; got "
                        f"{type(optimizer).__name__}")
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    pieces = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in groups:
            raise ValueError(f"parameter {name!r} is trainable but not in the optimizer")
        state, group = optimizer.state.get(p, {}), groups[id(p)]
        eps = float(group["eps"])
        if isinstance(optimizer, torch.optim.RMSprop):
            if "square_avg" not in state:
                raise ValueError(f"the optimizer has no state for parameter {name!r} yet: take a step first")
            v = state["square_avg"].detach().double()
            if group.get("centered", False):
                v = v - state["grad_avg"].detach().double() ** 2
            P = 1.0 / (v.clamp(min=0).sqrt() + eps)
        else:
            key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
            if key not in state:
                raise ValueError(f"the optimizer has no state for parameter {name!r} yet: take a step first")
            v = state[key].detach().double()
            t = float(state["step"])
            beta1, beta2 = group["betas"]
            bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
            P = 1.0 / (bc1 * ((v / bc2).sqrt() + eps))
        pieces.append(P.reshape(-1).cpu().numpy())
    if not pieces:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    P = np.concatenate(pieces)
    if not np.all(np.isfinite(P)):
        raise ValueError("the preconditioner is infinite somewhere (v = 0 with eps = 0): set eps > 0")
    return P
