"""The family of a model and its routes: ``family_from_model`` (factors, generic Gram rows),
the near-minimum report and the Gauss-Newton gap."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

from .._adapters import NetworkFamily, attach_gradients, warn_if_not_at_minimum
from .._config import GAUSS_NEWTON_POWER_STEPS, TORCH_MEMORY_BYTES
from .._validation import check_real_scalar
from .._progress import ProgressBar
from ..family import HessianFamily, gram_family
from ._common import (
    SAME_SHAPE_LOSSES,
    check_data,
    check_loss_values,
    check_model,
    chunk_samples,
    chunked,
    PerSampleLoss,
    over_samples,
    psd_roots,
    ThreadPhases,
    torch_policy,
    torch_warnings,
    trainable_parameters,
)
from .gram import generic_gram, structured_gram

__all__ = ["ModelFamily", "GaussNewtonWarning", "family_from_model"]


def _structured_enabled() -> bool:
    """The package's switch ``fastsgdstab.torch._STRUCTURED`` (False: always the generic rows; tests)."""
    import fastsgdstab.torch as package

    return package._STRUCTURED


class GaussNewtonWarning(UserWarning):
    """The model is not at an interpolating minimum: the Gauss-Newton family is a surrogate.

    Raised by :func:`family_from_model` when the relative gradient exceeds
    ``RELATIVE_GRADIENT_RTOL`` (not a minimum), or when the part of the Hessian that the
    Gauss-Newton term leaves out, ``sum_c (d ell / d f_c) grad^2 f_c``, is larger than
    ``GAUSS_NEWTON_RTOL`` times the sharpness.
    """


@dataclass(frozen=True)
class ModelFamily(NetworkFamily):
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



# ----------------------------------------------------------------------------- the family
def family_from_model(model, inputs, targets, loss, *, chunk_size=None, reduce=None,
                      device="cpu", dtype=torch.float64, check_gauss_newton=True,
                      memory_bytes=None, progress=None, probe=None, seed=0) -> ModelFamily:
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
    progress : bool, optional
        A tqdm progress bar on stderr (samples whose Jacobian rows are done, then the gap's
        Hessian-vector products), as ``simulate``'s: None (default) shows it when stderr is a
        terminal and the work is estimated to take over ``PROGRESS_AFTER_SECONDS``; True always;
        False never.
    probe : int or sequence of int, optional
        Use a probe subset of the dataset (specification page, section "A probe subset of a
        large training set"): an integer m draws m distinct samples uniformly (with
        ``numpy.random.default_rng(seed)``), a sequence gives their indices. The family is the
        probe's, with ``population_size`` the dataset's length, so that the engines use the
        training set's batch law; pass it to :func:`fastsgdstab.estimate` for an interval.
        Only the probe's samples are converted and differentiated.
    seed : int, default 0
        Seed of the probe's draw (an integer ``probe``).

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
        family to be the Hessian: the relative gradient exceeds ``RELATIVE_GRADIENT_RTOL`` (the
        point is not a minimum; checked always), or the Gauss-Newton gap exceeds
        ``GAUSS_NEWTON_RTOL`` (checked with ``check_gauss_newton``).

    Notes
    -----
    torch's intra-op thread pool follows the library's threading policy while the function runs,
    phase by phase (one thread when the multiply-adds of the phase's largest product are below
    ``BLAS_THREADS_MIN_WORK``, the caller's count otherwise): the passes over the samples
    (Jacobian rows, the layers' records, the Gauss-Newton gap) count n C d, the Gram matrix's
    products (n C)^2 times a layer's width (the generic rows: times d); the caller's count is
    restored afterwards. The DeprecationWarnings that torch.func's
    first use raises from ``torch.jit`` internally are silenced inside the call only.

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
    check_model(model)
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
    per_sample = PerSampleLoss(loss)
    population = None
    if probe is not None:  # a uniform subset; the batch law keeps the dataset's N
        from ..estimation import select_probe

        inputs, targets, population = select_probe(inputs, targets, probe, seed)
    inputs, targets, n = check_data(inputs, targets, dtype, device)
    names, params, rest = trainable_parameters(model, dtype, device)
    d = sum(p.numel() for p in params.values())
    bar = ProgressBar(n + (GAUSS_NEWTON_POWER_STEPS if check_gauss_newton else 0), progress,
                      "family_from_model", "sample")
    was_training = model.training
    model.eval()
    try:
        with torch_policy(n * d):
            outputs = output_count(model, params, rest, inputs)
        # torch's threads phase by phase (ThreadPhases): the passes over the samples (Jacobian
        # rows, the Linear layers' records, the Gauss-Newton gap) are work n C d; the Gram
        # matrix's products, about (n C)^2 times a width, get their own setting.
        with torch_warnings(), ThreadPhases(n * d * outputs) as phases:
            result = _family_from_model(model, inputs, targets, per_sample, names, params, rest, n,
                                        d, chunk_size, reduce, check_gauss_newton, memory_bytes, bar,
                                        phases)
        if population is not None:  # the batch law's N is the dataset's size
            result = replace(result, family=result.family.with_population_size(population))
        return result
    finally:
        model.train(was_training)
        bar.close()


def _owned_array(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a numpy array (no copy when it is already on the CPU)."""
    return tensor.detach().cpu().numpy()


def output_count(model, params, rest, inputs) -> int:
    """C, from one sample's forward pass (a cheap bound of the work; 1 if the model fails: the
    full checks then report it)."""
    try:
        with torch.no_grad():
            out = functional_call(model, (params, rest), (inputs[:1],))
        return max(1, int(out[0].numel()))
    except Exception:
        return 1


def _family_from_model(model, inputs, targets, per_sample, names, params, rest, n, d, chunk_size,
                       reduce, check_gauss_newton, memory_bytes, bar, phases) -> ModelFamily:
    def output(p, x):
        return functional_call(model, (p, rest), (x[None],))[0]

    with torch.no_grad():
        probe = functional_call(model, (params, rest), (inputs[: min(n, 8)],))
    if probe.shape[0] != min(n, 8):
        raise ValueError(f"the model must map a batch of m inputs to m outputs (first axis); got "
                         f"output shape {tuple(probe.shape)} for {min(n, 8)} inputs")
    output_shape = tuple(probe.shape[1:])
    outputs = int(np.prod(output_shape)) if output_shape else 1
    if per_sample.module is not None and isinstance(per_sample.module, SAME_SHAPE_LOSSES):
        if tuple(targets.shape[1:]) != output_shape:
            raise ValueError(f"the model's output shape {(n,) + output_shape} does not match the "
                             f"targets' shape {tuple(targets.shape)} ({per_sample.name} compares them "
                             f"entry by entry)")
    per_sample.check(probe, targets[: min(n, 8)])

    def sample_loss(out_flat, y):
        return per_sample(out_flat.reshape(output_shape), y).reshape(())

    outputs_all = chunked(lambda x: functional_call(model, (params, rest), (x,)).detach(), inputs,
                           max(1, min(n, 4096)))
    if not torch.isfinite(outputs_all).all():
        raise ValueError("the model's outputs are NaN or inf at its parameters")
    flat_outputs = outputs_all.reshape(n, outputs)
    losses = over_samples(sample_loss, flat_outputs, targets)
    check_loss_values(losses, "the loss")
    q = over_samples(grad(sample_loss), flat_outputs, targets)       # d ell / d f, (n, C)
    Lam = over_samples(hessian(sample_loss), flat_outputs, targets)  # (n, C, C)
    roots = psd_roots(Lam)                                        # (n, C, C): L L^T = Lambda

    def jacobian_rows(x):  # (m, C, d): rows L_i^T J_i
        jac = vmap(jacrev(output), in_dims=(None, 0))(params, x)
        flat = torch.cat([jac[name].reshape(x.shape[0], outputs, -1) for name in names], dim=2)
        return flat

    chunk = chunk_samples(chunk_size, n, outputs, d, memory_bytes)
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
            bar.update(stop - start)
        return torch.einsum("icd,ick->ikd", J, roots[start:stop]).reshape(-1, d)

    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    gap_chunk = chunk
    structured = None
    if route == "gram" and _structured_enabled():
        structured = structured_gram(model, params, rest, names, inputs, roots, q, n, outputs,
                                      chunk_size, memory_bytes, bar, phases)
        phases.switch(n * d * outputs)
    if route == "factors":
        rows = torch.cat([rows_of(a, b, True) for a, b in bounds]).reshape(n, outputs, d)
        # Loss floor: the family carries the per-sample gradients g_i = J_i^T q_i
        # = rows_i^T (L_i^+ q_i) (q_i lies in the range of Lambda_i = L_i L_i^T: positive definite
        # for MSE; for cross-entropy q = p - y is orthogonal to 1, Lambda's null vector).
        # Factor route only: on the Gram routes the family has no gradients.
        coefficients = torch.einsum("ikc,ic->ik", torch.linalg.pinv(roots), q)
        gradients = torch.einsum("ikd,ik->id", rows, coefficients).cpu().numpy()
        family = HessianFamily.from_jacobians(rows.cpu().numpy())
    elif structured is not None:
        gram, norms, total_norm, route, gap_chunk = structured
        del structured
        grad_norms.copy_(norms)
        grad_sum.zero_()[0] = total_norm  # only its norm is reported
        # The Gram matrix is ours: from_gram may factor it in place (its memory becomes the
        # family's factors on the Cholesky route), so no second (n C)^2 array is formed.
        family = gram_family(HessianFamily, _owned_array(gram), outputs, None, None, overwrite=True)
        del gram
    else:
        m = n * outputs  # its largest product: (outer block's rows) x d x (n C)
        phases.switch(min(m, outputs * max(chunk, int(memory_bytes / 2 // (8.0 * outputs * d)))) * d * m)
        gram = generic_gram(rows_of, n, outputs, d, chunk, memory_bytes, grad_sum.dtype, grad_sum.device)
        phases.switch(n * d * outputs)
        family = gram_family(HessianFamily, _owned_array(gram), outputs, None, None, overwrite=True)
        del gram
    sharpness = family.sharpness()
    theta_norm = math.sqrt(sum(float((p * p).sum()) for p in params.values()))
    sample_gradient_norm = float(grad_norms.mean())
    gradient_norm = float(torch.linalg.vector_norm(grad_sum)) / n
    relative = sample_gradient_norm / (sharpness * theta_norm) if sharpness * theta_norm > 0 else math.inf
    if route == "factors":
        reduced = family.__dict__.get("_reduced")  # computed for the sharpness: shared, not redone
        family = attach_gradients(family, gradients, relative)
        if reduced is not None:  # the reduction depends on the factors only, which are the same
            family.__dict__["_reduced"] = reduced
    gap = math.nan
    if check_gauss_newton:
        gap = _gauss_newton_gap(model, params, rest, inputs, q, output_shape, gap_chunk, n, bar) \
            / sharpness if sharpness > 0 else math.nan
    warn_if_not_at_minimum("model", GaussNewtonWarning, relative=relative, gap=gap,
                           check_gauss_newton=check_gauss_newton,
                           sample_gradient_norm=sample_gradient_norm, gradient_norm=gradient_norm)
    return ModelFamily(family=family, route=route, parameter_count=d, parameter_names=names,
                       outputs=outputs, loss=float(losses.mean()), gradient_norm=gradient_norm,
                       sample_gradient_norm=sample_gradient_norm, relative_gradient=relative,
                       gauss_newton_gap=gap)



def _gauss_newton_gap(model, params, rest, inputs, q, output_shape, chunk, n, bar=None) -> float:
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
        if bar is not None:
            bar.update(1)
    norm = math.sqrt(sum(float((t * t).sum()) for t in v.values()))
    return max(value, norm)


