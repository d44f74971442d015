"""JAX adapter: from a function ``apply_fn(params, inputs)`` and a pytree of parameters to the
family of its per-sample Hessians.

Optional (the ``jax`` extra): importing ``fastsgdstab`` never imports jax; importing
``fastsgdstab.jax`` does.

* :func:`family_from_function`: the Gauss-Newton family ``H_i = J_i^T Lambda_i J_i`` of a JAX
  function at the given parameters (specification page, section "From a network to a family"),
  the counterpart of :func:`fastsgdstab.torch.family_from_model` with the same conventions,
  routes and checks. ``params`` is any pytree of floating arrays (nested dicts, lists, tuples:
  Flax's ``variables["params"]`` is one); ``J_i`` comes from ``jax.vmap`` of ``jax.jacrev``
  (``jax.jacfwd`` when the outputs outnumber the parameters) and ``Lambda_i`` from
  ``jax.hessian`` of the per-sample loss in output space.
* :func:`mse` and :func:`cross_entropy`: per-sample losses with the conventions of
  ``torch.nn.MSELoss()`` and ``torch.nn.CrossEntropyLoss()``, so that a JAX function and its
  PyTorch twin give the same family and the same learning rates.

Precision: the curvature is computed in float64 by default under JAX's thread-local
``jax.enable_x64`` scope (``jax.experimental.enable_x64`` on older releases), entered for the
call only: the caller's ``jax_enable_x64`` setting is never changed. Threads: JAX runs on XLA's
own thread pool, sized when JAX starts (``XLA_FLAGS``); the adapter changes no JAX setting and
no thread count.
"""

from __future__ import annotations

try:
    import jax
    import jax.numpy as jnp
except ModuleNotFoundError as _error:  # exercised in a subprocess (tests/test_jax.py)
    if _error.name is not None and _error.name.split(".")[0] not in ("jax", "jaxlib"):
        raise
    raise ModuleNotFoundError(
        "fastsgdstab.jax needs JAX, which is an optional extra: pip install \"fastsgdstab[jax]\" "
        "(or install jax itself: https://docs.jax.dev)", name="jax") from _error

import contextlib
import math
from dataclasses import dataclass, replace

import numpy as np
from jax.flatten_util import ravel_pytree

from ._adapters import NetworkFamily, attach_gradients, warn_if_not_at_minimum
from ._config import GAUSS_NEWTON_POWER_STEPS, JACOBIAN_RTOL, TORCH_MEMORY_BYTES
from ._progress import ProgressBar
from ._validation import check_positive_int, check_real_scalar
from .family import HessianFamily

__all__ = ["FunctionFamily", "GaussNewtonWarning", "family_from_function", "mse", "cross_entropy"]

# Samples per forward pass when the outputs of the whole dataset are computed.
_FORWARD_CHUNK = 4096


class GaussNewtonWarning(UserWarning):
    """The function is not at an interpolating minimum: the Gauss-Newton family is a surrogate.

    Raised by :func:`family_from_function` when the relative gradient exceeds
    ``RELATIVE_GRADIENT_RTOL`` (not a minimum), or when the part of the Hessian that the
    Gauss-Newton term leaves out, ``sum_c (d ell / d f_c) grad^2 f_c``, is larger than
    ``GAUSS_NEWTON_RTOL`` times the sharpness (the torch adapter's ``GaussNewtonWarning``, for JAX).
    """


@dataclass(frozen=True)
class FunctionFamily(NetworkFamily):
    """What :func:`family_from_function` returns: the family and how close the point is to a
    minimum (the fields of the torch adapter's ``ModelFamily``).

    Attributes
    ----------
    family : HessianFamily
        The Gauss-Newton family: factors (n, d, r) on the factor route, or (n, d', r) in the
        reduced coordinates of the factors' span (d' <= n r) on the Gram route; every answer of
        the library is the same for both. On the factor route it carries the per-sample
        gradients ``g_i = J_i^T grad_f ell_i`` (``family.gradients``).
    route : str
        ``"factors"`` or ``"gram"``.
    parameter_count : int
        d, the number of parameters (the total size of the leaves of ``params``).
    parameter_names : tuple of str
        The leaves' key paths (``jax.tree_util.keystr``), in the order of the flattened
        parameter vector (``jax.tree_util.tree_leaves(params)``, as ``ravel_pytree``).
    outputs : int
        C, the number of outputs per sample.
    loss : float
        Mean per-sample loss at the point.
    gradient_norm : float
        ``||(1/n) sum_i g_i||``, the norm of the full-batch gradient.
    sample_gradient_norm : float
        ``(1/n) sum_i ||g_i||``, the mean per-sample gradient norm (zero at interpolation).
    relative_gradient : float
        ``sample_gradient_norm / (sharpness * ||theta||)`` (dimensionless; 1e-6 or less at a
        good interpolating minimum).
    gauss_newton_gap : float
        Estimated spectral norm of the Hessian minus its Gauss-Newton part, relative to the
        sharpness (power iteration with Hessian-vector products; NaN when not computed).
    """


# ----------------------------------------------------------------------------- per-sample losses
def mse(output, target):
    """``torch.nn.MSELoss()`` for one sample: ``mean_c (f_c - y_c)^2`` (no 1/2).

    Its output-space Hessian is ``(2/C) I``: twice the curvature of ``(1/2) ||f - y||^2`` per
    output, so half its critical learning rate (specification page, section "From a network to
    a family"). :func:`family_from_function` checks that the targets have the outputs' shape.

    Parameters
    ----------
    output, target : jax.Array
        One sample's output and target, of the same shape.

    Returns
    -------
    jax.Array
        A 0-d array.

    Raises
    ------
    ValueError
        Through :func:`family_from_function`, when the targets' shape is not the outputs'.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> float(mse(jnp.array([1.0, 3.0]), jnp.array([0.0, 0.0])))
    5.0
    """
    return jnp.mean((output - target) ** 2)


def cross_entropy(output, target):
    """``torch.nn.CrossEntropyLoss()`` for one sample: ``-log softmax(f)_y`` for an integer class
    ``y``, ``-sum_c y_c log softmax(f)_c`` for class probabilities ``y``.

    Its output-space Hessian is ``diag(p) - p p^T`` with ``p = softmax(f)`` (rank C - 1).

    Parameters
    ----------
    output : jax.Array, shape (C,)
        One sample's logits.
    target : jax.Array
        An integer class in [0, C), or C class probabilities.

    Returns
    -------
    jax.Array
        A 0-d array.

    Raises
    ------
    ValueError
        Logits that are not a vector; through :func:`family_from_function`, classes outside
        [0, C) or probabilities of the wrong shape.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> round(float(cross_entropy(jnp.array([0.0, 0.0]), jnp.array(1))), 6)   # log 2
    0.693147
    """
    if jnp.ndim(output) != 1:
        raise ValueError(f"cross_entropy needs one sample's logits as a vector (C,); got shape "
                         f"{jnp.shape(output)}")
    log_p = jax.nn.log_softmax(output)
    if jnp.issubdtype(jnp.result_type(target), jnp.integer):
        return -jnp.take(log_p, jnp.reshape(target, ()))
    return -jnp.sum(target * log_p)


# ----------------------------------------------------------------------------- precision
def _float64_scope():
    """A context manager that enables float64 in JAX for the current thread only, or None when
    this JAX has none (then the caller's global ``jax_enable_x64`` must be on)."""
    scope = getattr(jax, "enable_x64", None)
    if callable(scope):
        try:
            return scope(True)
        except TypeError:
            pass
    try:
        from jax.experimental import enable_x64
    except ImportError:
        return None
    return enable_x64()


def _precision(dtype):
    if dtype != np.float64:
        return contextlib.nullcontext()
    scope = _float64_scope()
    if scope is not None:
        return scope
    if not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs JAX's 64-bit mode, which is off and which this JAX "
                         "cannot enable locally: call jax.config.update('jax_enable_x64', True) at "
                         "the start of the program, or pass dtype='float32' (and expect about 1e-6 "
                         "relative accuracy)")
    return contextlib.nullcontext()


def _check_dtype(dtype) -> np.dtype:
    try:
        checked = np.dtype(dtype)
    except TypeError:
        checked = None
    if checked not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise TypeError(f"dtype must be float64 (the default) or float32 (a numpy, jax.numpy or "
                        f"string dtype); got {dtype!r}")
    return checked


# ----------------------------------------------------------------------------- argument checks
def _as_data(value, name: str, dtype) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{name} must be an array (jax, numpy or nested lists); could not convert "
                        f"it ({exc})") from exc
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers (float, integer or bool); got dtype "
                        f"{array.dtype}")
    if array.ndim == 0:
        raise ValueError(f"{name} must have a leading sample axis; got a 0-d array")
    if array.dtype.kind == "f":
        array = array.astype(dtype)
        if not np.isfinite(array).all():
            raise ValueError(f"{name} must be finite; found NaN or inf")
    return array


def _check_data(inputs, targets, dtype):
    inputs = _as_data(inputs, "inputs", dtype)
    targets = _as_data(targets, "targets", dtype)
    n = inputs.shape[0]
    if n == 0:
        raise ValueError("the dataset is empty: inputs has 0 samples (axis 0)")
    if targets.shape[0] != n:
        raise ValueError(f"inputs and targets must have the same number of samples (axis 0); got "
                         f"{n} and {targets.shape[0]}")
    if n < 2:
        raise ValueError(f"the dataset must have at least 2 samples; got {n}")
    return jnp.asarray(inputs), jnp.asarray(targets), n


def _check_params(params, dtype):
    """(names, the pytree with every leaf a ``dtype`` jax array, its treedef, d)."""
    try:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    except Exception as exc:
        raise TypeError(f"params must be a pytree of arrays (dicts, lists, tuples; Flax's "
                        f"variables['params']); could not flatten it ({exc})") from exc
    if not leaves:
        raise ValueError("params has no array leaves: nothing to differentiate")
    names, arrays = [], []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path) or "(the root)"
        try:
            array = np.asarray(leaf)
        except Exception as exc:
            raise TypeError(f"params leaf {name} must be an array; got {type(leaf).__name__} "
                            f"({exc})") from exc
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(f"params leaf {name} has dtype {array.dtype}: every leaf of params is "
                            f"differentiated, so each must be a floating array; keep other state out "
                            f"of params (close over it in apply_fn)")
        if not np.isfinite(array).all():
            raise ValueError(f"params leaf {name} holds NaN or inf: the function is not at a point "
                             f"where a curvature exists")
        names.append(name)
        arrays.append(jnp.asarray(array.astype(dtype)))
    d = sum(int(a.size) for a in arrays)
    if d == 0:
        raise ValueError("params has no parameters: every leaf is empty")
    return tuple(names), jax.tree_util.tree_unflatten(treedef, arrays), d


def _check_loss(loss):
    if isinstance(loss, str):
        raise TypeError(f"loss must be a callable loss(output, target) -> 0-d array for ONE "
                        f"sample, not a name; got {loss!r} (for torch's conventions use "
                        f"fastsgdstab.jax.mse or fastsgdstab.jax.cross_entropy)")
    if not callable(loss):
        raise TypeError(f"loss must be a callable loss(output, target) -> 0-d array for ONE sample "
                        f"(fastsgdstab.jax.mse, fastsgdstab.jax.cross_entropy or your own); got "
                        f"{type(loss).__name__}")
    return loss


def _loss_name(loss) -> str:
    return getattr(loss, "__name__", type(loss).__name__)


def _check_targets_for(loss, output_shape, targets, outputs) -> None:
    """The library's own losses: targets that fit them (the torch modules' checks)."""
    n = targets.shape[0]
    if loss is mse and tuple(targets.shape[1:]) != output_shape:
        raise ValueError(f"the model's output shape {(n,) + output_shape} does not match the "
                         f"targets' shape {tuple(targets.shape)} (mse compares them entry by entry)")
    if loss is cross_entropy:
        if len(output_shape) != 1:
            raise ValueError(f"cross_entropy needs outputs of shape (n, C) (logits); got "
                             f"{(n,) + output_shape}")
        if jnp.issubdtype(targets.dtype, jnp.integer) or targets.dtype == jnp.bool_:
            if targets.ndim != 1 or targets.dtype == jnp.bool_:
                raise ValueError(f"cross_entropy's integer targets must be classes of shape (n,); "
                                 f"got shape {tuple(targets.shape)}, dtype {targets.dtype}")
            low, high = int(targets.min()), int(targets.max())
            if low < 0 or high >= outputs:
                raise ValueError(f"cross_entropy's targets must be classes in [0, C) = [0, "
                                 f"{outputs}); found {low if low < 0 else high}")
        elif tuple(targets.shape[1:]) != output_shape:
            raise ValueError(f"cross_entropy's probability targets must have the outputs' shape "
                             f"{(n,) + output_shape}; got {tuple(targets.shape)}")


def _check_per_sample(loss, outputs, targets, dtype) -> None:
    """The loss has a per-sample form: one number per sample, in the working precision."""
    name = _loss_name(loss)
    try:
        values = [loss(o, t) for o, t in zip(outputs, targets)]
    except Exception as exc:
        raise ValueError(f"loss has no per-sample form: calling it on one sample's output (shape "
                         f"{tuple(outputs.shape[1:])}) and target failed ({exc})") from exc
    for value in values:
        size = getattr(value, "size", None)
        if size != 1:
            raise ValueError(f"loss has no per-sample form: on one sample it must return a single "
                             f"number (a 0-d array); {name} returned {type(value).__name__} "
                             f"{tuple(getattr(value, 'shape', ()))}")
        if np.dtype(value.dtype) != dtype:
            raise ValueError(f"loss returned {np.dtype(value.dtype)} values for {dtype} outputs: it "
                             f"computes in lower precision than dtype={dtype.name} (cast inside "
                             f"{name}?)")


def _psd_roots(Lam: np.ndarray) -> np.ndarray:
    """L_i with L_i L_i^T = Lambda_i (eigen-factor), after the symmetry and PSD checks."""
    values, vectors = np.linalg.eigh(0.5 * (Lam + Lam.transpose(0, 2, 1)))
    scale = float(np.abs(values).max()) if values.size else 0.0
    asymmetry = np.abs(Lam - Lam.transpose(0, 2, 1)).max(axis=(1, 2))
    if scale > 0 and float(asymmetry.max()) > 1e-8 * scale:
        raise ValueError("the loss's Hessian in output space is not symmetric (round-off too large?)")
    smallest = values[:, 0]
    worst = int(np.argmin(smallest))
    if float(smallest[worst]) < -JACOBIAN_RTOL * scale:
        raise ValueError(f"the loss is not convex in the model's outputs at sample {worst}: its output-"
                         f"space Hessian has eigenvalue {float(smallest[worst]):.6g} (largest in the "
                         f"data {scale:.6g}); the Gauss-Newton family needs a loss convex in the outputs")
    return vectors * np.sqrt(np.clip(values, 0, None))[:, None, :]


def _generic_gram(rows_of, n, outputs, d, chunk, memory_bytes) -> np.ndarray:
    """The (n C, n C) Gram matrix of the rows, by blocks: an outer block of samples held in about
    half of ``memory_bytes`` against inner chunks streamed after it (recomputed once per outer
    block); every sample's rows are computed with ``record=True`` exactly once."""
    m = n * outputs
    gram = np.empty((m, m))
    per_sample = 8.0 * outputs * d
    outer = n if n * per_sample <= memory_bytes / 2 else max(chunk, int(memory_bytes / 2 // per_sample))
    for a in range(0, n, outer):
        b = min(a + outer, n)
        block = np.empty(((b - a) * outputs, d))
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
    return gram


# ----------------------------------------------------------------------------- compiled kernels
# The user's functions are static arguments of module-level jitted kernels: jax.jit then caches
# the compiled code by (function, shapes, dtypes, x64), so a second call with the same apply_fn
# and loss (a monitor every k steps, a sweep) compiles nothing. Unhashable callables get a
# kernel compiled for the call.
def _jacobians_impl(apply_fn, forward, params, x):
    """(m, C, d) Jacobians of each sample's flat outputs, columns in the order of tree_leaves."""
    def output(p, xi):
        return apply_fn(p, xi[None])[0].reshape(-1)

    jac = jax.vmap((jax.jacfwd if forward else jax.jacrev)(output), in_axes=(None, 0))(params, x)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], leaf.shape[1], -1)
                            for leaf in jax.tree_util.tree_leaves(jac)], axis=2)


def _loss_parts_one(loss, output_shape, out_flat, y):
    """One sample: the loss, d ell / d f (C,) and Lambda = d^2 ell / d f^2 (C, C)."""
    def sample_loss(o):
        return jnp.reshape(loss(o.reshape(output_shape), y), ())

    return sample_loss(out_flat), jax.grad(sample_loss)(out_flat), jax.hessian(sample_loss)(out_flat)


def _loss_parts_impl(loss, output_shape, outputs, targets):
    """Every sample's loss, d ell / d f (n, C) and Lambda (n, C, C), by vmap."""
    return jax.vmap(lambda o, y: _loss_parts_one(loss, output_shape, o, y))(outputs, targets)


def _gap_product_impl(apply_fn, params, tangent, x, w):
    """The product of the Hessian of sum_i w_i . f(x_i) with the tangent, flat."""
    def phi(p):
        return jnp.sum(apply_fn(p, x).reshape(x.shape[0], -1) * w)

    return ravel_pytree(jax.jvp(jax.grad(phi), (params,), (tangent,))[1])[0]


_KERNELS = {
    "jacobians": jax.jit(_jacobians_impl, static_argnums=(0, 1)),
    "loss_parts": jax.jit(_loss_parts_impl, static_argnums=(0, 1)),
    "gap_product": jax.jit(_gap_product_impl, static_argnums=(0,)),
}
_IMPLS = {"jacobians": _jacobians_impl, "loss_parts": _loss_parts_impl,
          "gap_product": _gap_product_impl}


def _kernel(name, function, *static):
    """The compiled kernel ``name`` with its static arguments bound: the cached one when
    ``function`` is hashable, else one compiled for this call."""
    try:
        hash(function)
    except TypeError:
        compiled = jax.jit(lambda *args: _IMPLS[name](function, *static, *args))
        return compiled
    return lambda *args: _KERNELS[name](function, *static, *args)


# ----------------------------------------------------------------------------- the family
def family_from_function(apply_fn, params, inputs, targets, loss, *, chunk_size=None, reduce=None,
                         dtype="float64", check_gauss_newton=True, memory_bytes=None,
                         progress=None, probe=None, seed=0) -> FunctionFamily:
    """The Gauss-Newton family of a JAX function at the parameters ``params``.

    ``H_i = J_i^T Lambda_i J_i`` with ``J_i`` the (C, d) Jacobian of sample i's outputs with
    respect to every leaf of ``params`` (``jax.vmap`` of ``jax.jacrev``, or of ``jax.jacfwd``
    when C > d) and ``Lambda_i`` the (C, C) Hessian of the per-sample loss in output space
    (``jax.hessian``), so any loss works and the learning rates the library then reports are for
    plain SGD, ``params - lr * grad``, on the MEAN over the batch of this per-sample loss
    (specification page, section "From a network to a family"). The loss's scale is the lr's: for
    :func:`mse` (``torch.nn.MSELoss()``, no 1/2), ``Lambda_i = (2/C) I``, half the critical
    learning rate of the ``(1/2) ||f - y||^2`` convention. At an interpolating minimum (every
    per-sample gradient zero) this is the per-sample Hessian exactly; elsewhere it is the
    standard PSD surrogate, and a :class:`GaussNewtonWarning` says so. The per-sample gradients
    ``g_i = J_i^T grad_f ell_i`` are carried by the family on the factor route (specification
    page, section "Non-interpolating minima: stationary covariance and the loss floor").

    The same function, conventions, routes and checks as :func:`fastsgdstab.torch.family_from_model`
    (see it for the routes): a JAX function and its PyTorch twin with the same float64 weights
    give the same family.

    Parameters
    ----------
    apply_fn : callable
        ``apply_fn(params, x)`` maps a batch of inputs x (m, ...) to outputs (m, C) or (m,),
        each sample independently of the others (it is called on batches of one sample inside
        ``jax.vmap``, and on whole chunks; a batch statistic such as Flax's BatchNorm in training
        mode is detected and refused). Flax: ``lambda p, x: model.apply({"params": p}, x)``
        (other collections, such as batch statistics, closed over: they are not differentiated).
    params : pytree
        The parameters (nested dicts, lists, tuples of floating arrays); every leaf is
        differentiated. Converted to ``dtype``; the caller's arrays are not modified.
    inputs, targets : array_like
        The training set (first axis: samples), as ``apply_fn`` and the loss expect them.
        Floating arrays are converted to ``dtype``; integer ones (classes, token ids) are kept.
    loss : callable
        ``loss(output, target)`` for ONE sample (output of shape (C,) or (), as ``apply_fn``
        produces it per sample) returning a 0-d array: :func:`mse`, :func:`cross_entropy` (the
        conventions of torch's ``MSELoss()`` and ``CrossEntropyLoss()``) or your own. Training
        is taken to minimise the mean of the per-sample losses.
    chunk_size : int, optional
        Samples whose Jacobians are computed at once (default: as many as fit, with three
        copies, in a quarter of ``memory_bytes``).
    reduce : bool, optional
        True: the Gram route (only the (n C, n C) Gram matrix of the factors, the family in the
        reduced coordinates of their span, ``HessianFamily.from_gram``; no gradients); False: the
        factor route; None (default): the factor route when the (n, C, d) factors fit in
        ``memory_bytes``.
    dtype : {"float64", "float32"} or a numpy / jax.numpy floating dtype, default "float64"
        Precision of the curvature. float64 is computed under JAX's thread-local
        ``jax.enable_x64`` scope, for this call only (the caller's ``jax_enable_x64`` is left as
        it was); a JAX without such a scope needs ``jax_enable_x64`` on.
    check_gauss_newton : bool, default True
        Estimate the Gauss-Newton gap (``GAUSS_NEWTON_POWER_STEPS`` Hessian-vector products over
        the data) and warn when it exceeds ``GAUSS_NEWTON_RTOL``.
    memory_bytes : float, optional
        Memory for Jacobian rows (default ``TORCH_MEMORY_BYTES``, 1 GB, shared with the torch
        adapter): decides the route and the chunks.
    progress : bool, optional
        A tqdm progress bar on stderr (samples whose Jacobians are done, then the gap's
        Hessian-vector products): None (default) when stderr is a terminal and the work is long;
        True always; False never.
    probe : int or sequence of int, optional
        Use a probe subset of the dataset (specification page, section "A probe subset of a
        large training set"): an integer m draws m distinct samples uniformly (with
        ``numpy.random.default_rng(seed)``), a sequence gives their indices. The family is the
        probe's, with ``population_size`` the dataset's length.
    seed : int, default 0
        Seed of the probe's draw (an integer ``probe``).

    Returns
    -------
    FunctionFamily
        The family, the route taken, the parameter count and leaf names, and the near-minimum
        report.

    Raises
    ------
    TypeError
        ``apply_fn`` or ``loss`` not callable (a loss given by name), ``params`` that is not a
        pytree of floating arrays (the message names the leaf), data that is not numeric, a
        ``dtype`` other than float64 or float32.
    ValueError
        An empty dataset or fewer than 2 samples, inputs and targets of different lengths,
        outputs that do not match the targets, a loss with no per-sample form (a callable that
        does not return one number), NaN or inf in the inputs, targets, parameters (the leaf is
        named), outputs or loss, outputs or losses in lower precision than ``dtype`` (an
        ``apply_fn`` or loss that casts to float32), an ``apply_fn`` whose output for a sample
        depends on the rest of the batch, a loss that is not convex in the outputs at some
        sample, float64 on a JAX that can enable it neither locally nor globally.

    Warns
    -----
    GaussNewtonWarning
        When the point is not close enough to an interpolating minimum for the Gauss-Newton
        family to be the Hessian (relative gradient above ``RELATIVE_GRADIENT_RTOL``, or, with
        ``check_gauss_newton``, Gauss-Newton gap above ``GAUSS_NEWTON_RTOL``).

    Notes
    -----
    JAX computes on XLA's own thread pool, whose size is fixed when JAX starts (``XLA_FLAGS``,
    e.g. ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``); unlike the
    torch adapter, this function does not lower it (JAX has no run-time setting for it) and
    changes no global JAX setting: float64 is enabled for the calling thread and this call only.
    The Jacobians, the loss's derivatives and the gap's Hessian-vector products are compiled
    with ``jax.jit``, with ``apply_fn`` and ``loss`` as static arguments: JAX caches the compiled
    code by their identity and the shapes, so repeated calls with the same function objects
    (not a new ``lambda`` each time) compile nothing after the first.

    Examples
    --------
    >>> import numpy as np, jax.numpy as jnp
    >>> from fastsgdstab.jax import family_from_function, mse
    >>> X = np.random.default_rng(0).normal(size=(8, 3))
    >>> params = {"w": np.array([1.0, -2.0, 0.5])}
    >>> apply_fn = lambda p, x: x @ p["w"]                # a linear model, one output
    >>> y = X @ params["w"]                                # an exact (interpolating) minimum
    >>> result = family_from_function(apply_fn, params, X, y, mse)
    >>> result.family, result.route
    (HessianFamily(n=8, d=3, rank=1), 'factors')
    >>> H = 2 * X.T @ X / 8                                # mse (no 1/2): the mean loss's Hessian
    >>> bool(abs(result.family.sharpness() - np.linalg.eigvalsh(H)[-1]) < 1e-10)
    True
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be a callable apply_fn(params, inputs) -> outputs; got "
                        f"{type(apply_fn).__name__}")
    loss = _check_loss(loss)
    dtype = _check_dtype(dtype)
    if reduce not in (None, True, False):
        raise TypeError(f"reduce must be None, True or False; got {reduce!r}")
    if not isinstance(check_gauss_newton, bool):
        raise TypeError(f"check_gauss_newton must be True or False; got {check_gauss_newton!r}")
    if memory_bytes is None:
        memory_bytes = TORCH_MEMORY_BYTES
    memory_bytes = check_real_scalar(memory_bytes, "memory_bytes")
    if not memory_bytes > 0:
        raise ValueError(f"memory_bytes must be > 0; got {memory_bytes:g}")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    population = None
    if probe is not None:  # a uniform subset; the batch law keeps the dataset's N
        from .estimation import select_probe

        inputs, targets, population = select_probe(inputs, targets, probe, seed)
    with _precision(dtype):
        inputs, targets, n = _check_data(inputs, targets, dtype)
        names, params, d = _check_params(params, dtype)
        bar = ProgressBar(n + (GAUSS_NEWTON_POWER_STEPS if check_gauss_newton else 0), progress,
                          "family_from_function", "sample")
        try:
            result = _family(apply_fn, params, inputs, targets, loss, names, n, d, dtype, chunk_size,
                             reduce, check_gauss_newton, memory_bytes, bar)
        finally:
            bar.close()
    if population is not None:  # the batch law's N is the dataset's size
        result = replace(result, family=result.family.with_population_size(population))
    return result


def _outputs_of(apply_fn, params, x, dtype, what):
    out = apply_fn(params, x)
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"apply_fn must return one array of outputs (m, C) or (m,) for a batch "
                        f"of m inputs; got {type(out).__name__} for {what}")
    out = jnp.asarray(out)
    if out.ndim == 0 or out.shape[0] != x.shape[0]:
        raise ValueError(f"apply_fn must map a batch of m inputs to m outputs (first axis); got "
                         f"output shape {tuple(out.shape)} for {x.shape[0]} inputs")
    if np.dtype(out.dtype) != dtype:
        raise ValueError(f"apply_fn returned {np.dtype(out.dtype)} outputs for {dtype.name} "
                         f"parameters and inputs: it computes in another precision than "
                         f"dtype={dtype.name} (a cast inside it, or a Flax module built with "
                         f"dtype=jnp.float32?); the curvature would carry that precision's error")
    return out


def _family(apply_fn, params, inputs, targets, loss, names, n, d, dtype, chunk_size, reduce,
            check_gauss_newton, memory_bytes, bar) -> FunctionFamily:
    m0 = min(n, 8)
    first = _outputs_of(apply_fn, params, inputs[:m0], dtype, f"{m0} inputs")
    output_shape = tuple(first.shape[1:])
    outputs = int(np.prod(output_shape)) if output_shape else 1
    _check_targets_for(loss, output_shape, targets, outputs)
    _check_per_sample(loss, first, targets[:m0], dtype)

    if not bool(jnp.isfinite(first).all()):
        raise ValueError("the model's outputs (apply_fn's) are NaN or inf at params")

    def output(p, x):  # one sample's outputs, flat (C,)
        return apply_fn(p, x[None])[0].reshape(-1)

    single = np.asarray(jax.vmap(output, in_axes=(None, 0))(params, inputs[:m0]))
    batch = np.asarray(first).reshape(m0, outputs)
    scale = max(float(np.abs(batch).max()), 1e-300)
    if not np.allclose(single, batch, rtol=1e-8, atol=1e-8 * scale):
        raise ValueError("apply_fn does not treat the samples of a batch independently: its outputs "
                         "for one sample alone differ from those in a batch of several (a batch "
                         "statistic, such as Flax's BatchNorm with use_running_average=False?); "
                         "the per-sample family needs the function in evaluation mode")

    flat_outputs = jnp.concatenate([
        _outputs_of(apply_fn, params, inputs[s:s + _FORWARD_CHUNK], dtype, "a chunk of inputs")
        .reshape(-1, outputs) for s in range(0, n, _FORWARD_CHUNK)])
    if not bool(jnp.isfinite(flat_outputs).all()):
        raise ValueError("the model's outputs (apply_fn's) are NaN or inf at params")
    try:  # one compiled vmap, or a loop for a loss that vmap cannot batch (data-dependent
        # Python control flow)
        parts = _kernel("loss_parts", loss, output_shape)(flat_outputs, targets)
    except Exception:
        per_sample = [_loss_parts_one(loss, output_shape, o, t) for o, t in zip(flat_outputs, targets)]
        parts = [jnp.stack(values) for values in zip(*per_sample)]
    losses, q, Lam = (np.asarray(part) for part in parts)
    if not np.isfinite(losses).all():
        raise ValueError("the loss is NaN or inf at params")
    if not (np.isfinite(q).all() and np.isfinite(Lam).all()):
        raise ValueError("the loss's gradient or Hessian in output space is NaN or inf at params")
    roots = _psd_roots(Lam.reshape(n, outputs, outputs))                                # L L^T = Lambda

    jacobian_kernel = _kernel("jacobians", apply_fn, outputs > d)   # jacfwd when C > d

    def jacobians(start, stop):  # (m, C, d), columns in the order of tree_leaves(params)
        return np.asarray(jacobian_kernel(params, inputs[start:stop]))

    if chunk_size is None:  # a quarter of the memory for one chunk of rows and two copies
        chunk = max(1, min(n, int(memory_bytes // (4 * 3 * 8 * outputs * d))))
    else:
        chunk = min(chunk_size, n)
    route = "gram" if reduce or (reduce is None and 8.0 * n * outputs * d > memory_bytes) else "factors"
    grad_sum = np.zeros(d)
    grad_norms = np.zeros(n)

    def rows_of(start, stop, record):  # rows L_i^T J_i, (m C, d)
        J = jacobians(start, stop)
        if not np.isfinite(J).all():
            raise ValueError("the Jacobian of apply_fn's outputs with respect to params is NaN or "
                             "inf at params")
        if record:
            g = np.einsum("icd,ic->id", J, q[start:stop])   # per-sample gradients J^T q
            grad_sum[:] += g.sum(0)
            grad_norms[start:stop] = np.linalg.norm(g, axis=1)
            bar.update(stop - start)
        return np.einsum("icd,ick->ikd", J, roots[start:stop]).reshape(-1, d)

    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if route == "factors":
        rows = np.concatenate([rows_of(a, b, True) for a, b in bounds]).reshape(n, outputs, d)
        # g_i = J_i^T q_i = rows_i^T (L_i^+ q_i): q_i lies in the range of Lambda_i = L_i L_i^T
        # (the torch adapter's form; for cross-entropy it drops the round-off along 1).
        coefficients = np.einsum("ikc,ic->ik", np.linalg.pinv(roots), q)
        gradients = np.einsum("ikd,ik->id", rows, coefficients)
        family = HessianFamily.from_jacobians(rows)
    else:
        gradients = None
        family = HessianFamily.from_gram(_generic_gram(rows_of, n, outputs, d, chunk, memory_bytes),
                                         outputs)
    sharpness = family.sharpness()
    flat_params, unravel = ravel_pytree(params)
    theta_norm = float(np.linalg.norm(np.asarray(flat_params)))
    sample_gradient_norm = float(grad_norms.mean())
    gradient_norm = float(np.linalg.norm(grad_sum)) / n
    relative = sample_gradient_norm / (sharpness * theta_norm) if sharpness * theta_norm > 0 else math.inf
    if gradients is not None:
        family = attach_gradients(family, gradients, relative)
    gap = math.nan
    if check_gauss_newton:
        gap = _gauss_newton_gap(apply_fn, params, inputs, q, chunk, n, d, unravel, bar) \
            / sharpness if sharpness > 0 else math.nan
    warn_if_not_at_minimum("function", GaussNewtonWarning, relative=relative, gap=gap,
                           check_gauss_newton=check_gauss_newton,
                           sample_gradient_norm=sample_gradient_norm, gradient_norm=gradient_norm)
    return FunctionFamily(family=family, route=route, parameter_count=d, parameter_names=names,
                          outputs=outputs, loss=float(losses.mean()), gradient_norm=gradient_norm,
                          sample_gradient_norm=sample_gradient_norm, relative_gradient=relative,
                          gauss_newton_gap=gap)


def _gauss_newton_gap(apply_fn, params, inputs, q, chunk, n, d, unravel, bar=None) -> float:
    """max |eigenvalue| of (1/n) sum_i sum_c q_ic grad^2 f_ic (power iteration, Hessian-vector
    products of phi(theta) = (1/n) sum_i q_i . f_i(theta) with q fixed)."""
    if not bool((q != 0).any()):
        return 0.0
    weights = jnp.asarray(q)

    product = _kernel("gap_product", apply_fn)   # compiled once per chunk shape

    def hvp(v):
        tangent = unravel(jnp.asarray(v))
        total = np.zeros(d)
        for s in range(0, n, chunk):
            total += np.asarray(product(params, tangent, inputs[s:s + chunk], weights[s:s + chunk]))
        return total / n

    v = np.random.default_rng(0).standard_normal(d)
    value = 0.0
    for _ in range(GAUSS_NEWTON_POWER_STEPS):
        norm = float(np.linalg.norm(v))
        if norm == 0:
            return 0.0
        v = v / norm
        w = hvp(v)
        value = abs(float(w @ v))
        v = w
        if bar is not None:
            bar.update(1)
    return max(value, float(np.linalg.norm(v)))
