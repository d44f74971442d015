"""The JAX adapter (issue 22, item 3): fastsgdstab.jax.family_from_function.

References are independent of the adapter's code: the torch adapter (``family_from_model``) on
the same network written in PyTorch with the same float64 weights; ``HessianFamily.from_jacobians``
on Jacobians, output Hessians and gradients written out by hand (the chain rule in numpy, the
closed-form Lambda of MSE and cross-entropy); and ``jax.hessian`` of the whole mean loss on a
flat parameter vector (the real Hessian, not its Gauss-Newton part) at an interpolating minimum.
"""

import subprocess
import sys
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fastsgdstab as fs  # noqa: E402
from fastsgdstab import HessianFamily, critical_lr  # noqa: E402
from fastsgdstab.jax import (  # noqa: E402
    GaussNewtonWarning,
    cross_entropy,
    family_from_function,
    mse,
)

RTOL = 1e-10

# Points away from a minimum (random targets, cross-entropy, float32 weights) carry gradients
# whose mean is not zero: the family says so, as it should; asserted where it matters.
pytestmark = pytest.mark.filterwarnings("ignore::fastsgdstab.NotAMinimumWarning")


def _close(a, b, rtol=RTOL, floor=1e-300):
    """|a - b| <= rtol max(|b|, floor) entrywise-max (floor: the scale of a quantity that is
    round-off at a minimum, such as a gradient there)."""
    a, b = np.asarray(a), np.asarray(b)
    scale = max(np.abs(b).max(), floor)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max() <= rtol * scale, np.abs(a - b).max() / scale


# ----------------------------------------------------------------------------- the network, twice
def _weights(p, h, C, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(h, p)) / np.sqrt(p), rng.normal(size=h) * 0.1,
            rng.normal(size=(C, h)) / np.sqrt(h), rng.normal(size=C) * 0.1]


def _apply(params, x):  # the JAX twin of Sequential(Linear, Tanh, Linear): weights (out, in)
    W1, b1, W2, b2 = params
    return jnp.tanh(x @ W1.T + b1) @ W2.T + b2


def _np_apply(params, X):
    W1, b1, W2, b2 = params
    return np.tanh(X @ W1.T + b1) @ W2.T + b2


def _hidden(params, X):
    W1, b1 = params[0], params[1]
    return np.tanh(X @ W1.T + b1)


def _interpolate(params, X, Y):
    """The last layer by least squares: an exact interpolating minimum of MSE."""
    features = np.hstack([_hidden(params, X), np.ones((X.shape[0], 1))])
    solution = np.linalg.lstsq(features, Y, rcond=None)[0]
    params = list(params)
    params[2], params[3] = solution[:-1].T.copy(), solution[-1].copy()
    assert np.abs(_np_apply(params, X) - Y).max() < 1e-11
    return params


def _torch_twin(params):
    torch = pytest.importorskip("torch")
    W1, b1, W2, b2 = params
    model = torch.nn.Sequential(torch.nn.Linear(W1.shape[1], W1.shape[0]), torch.nn.Tanh(),
                                torch.nn.Linear(W2.shape[1], W2.shape[0])).double()
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(torch.from_numpy(np.asarray(value)))
    return model


def _data(n, p, C, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, p)), rng.normal(size=(n, C))


def _both(params, X, Y, jax_loss, torch_loss, **kwargs):
    torch = pytest.importorskip("torch")
    from fastsgdstab.torch import GaussNewtonWarning as TorchGaussNewtonWarning
    from fastsgdstab.torch import family_from_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GaussNewtonWarning)
        warnings.simplefilter("ignore", TorchGaussNewtonWarning)
        warnings.simplefilter("ignore", fs.NotAMinimumWarning)   # the points away from a minimum
        ours = family_from_function(_apply, params, X, Y, jax_loss, **kwargs)
        theirs = family_from_model(_torch_twin(params), torch.from_numpy(X), torch.as_tensor(Y),
                                   torch_loss, **kwargs)
    return ours, theirs


def _check_same(ours, theirs, B=3):
    assert ours.route == theirs.route and ours.parameter_count == theirs.parameter_count
    assert ours.outputs == theirs.outputs and ours.family.n == theirs.family.n
    # V_i V_i^T: the factors up to a rotation of their columns
    _close(ours.family.dense(), theirs.family.dense())
    if theirs.family.gradients is not None:  # round-off at a minimum: on the factors' scale
        _close(ours.family.gradients, theirs.family.gradients,
               floor=np.abs(theirs.family.factors).max())
    for sampling in ("bernoulli", "without_replacement"):
        _close(critical_lr(ours.family, B, sampling=sampling),
               critical_lr(theirs.family, B, sampling=sampling))
    for name in ("loss", "gradient_norm", "sample_gradient_norm"):
        _close(getattr(ours, name), getattr(theirs, name), floor=1.0)


# ----------------------------------------------------------------------------- against torch
def test_mse_at_an_interpolating_minimum_equals_the_torch_adapter():
    torch = pytest.importorskip("torch")
    X, Y = _data(7, 3, 2, 1)
    params = _interpolate(_weights(3, 8, 2, 1), X, Y)
    ours, theirs = _both(params, X, Y, mse, torch.nn.MSELoss())
    _check_same(ours, theirs)
    assert ours.family.rank == 2 and ours.relative_gradient < 1e-10
    assert ours.gauss_newton_gap < 1e-8 and ours.parameter_count == 8 * 3 + 8 + 2 * 8 + 2


def test_mse_away_from_a_minimum_gradients_equal_the_torch_adapter():
    """Random targets: nonzero per-sample gradients g_i = J_i^T grad_f l, compared entry by entry."""
    torch = pytest.importorskip("torch")
    X, Y = _data(7, 3, 2, 2)
    ours, theirs = _both(_weights(3, 8, 2, 2), X, Y, mse, torch.nn.MSELoss())
    _check_same(ours, theirs)
    assert np.abs(ours.family.gradients).max() > 0.01
    _close(ours.relative_gradient, theirs.relative_gradient)
    # the gap is a power-iteration estimate from another start: close, not equal
    assert abs(ours.gauss_newton_gap - theirs.gauss_newton_gap) < 0.05 * theirs.gauss_newton_gap


@pytest.mark.parametrize("probabilities", [False, True])
def test_cross_entropy_equals_the_torch_adapter(probabilities):
    torch = pytest.importorskip("torch")
    X, _ = _data(7, 3, 3, 3)
    labels = np.array([0, 2, 1, 1, 0, 2, 2])
    Y = np.eye(3)[labels] * 0.8 + 0.2 / 3 if probabilities else labels
    ours, theirs = _both(_weights(3, 8, 3, 3), X, Y, cross_entropy, torch.nn.CrossEntropyLoss())
    _check_same(ours, theirs)
    assert ours.family.rank == 2   # diag(p) - p p^T has rank C - 1


def test_gram_route_and_probe_equal_the_torch_adapter():
    torch = pytest.importorskip("torch")
    X, Y = _data(7, 3, 2, 4)
    params = _interpolate(_weights(3, 8, 2, 4), X, Y)
    ours, theirs = _both(params, X, Y, mse, torch.nn.MSELoss(), reduce=True, check_gauss_newton=False)
    assert ours.route == "gram" and ours.family.gradients is None
    _close(critical_lr(ours.family, 3), critical_lr(theirs.family, 3))
    _close(np.linalg.eigvalsh(ours.family.mean()), np.linalg.eigvalsh(theirs.family.mean()))
    ours, theirs = _both(params, X, Y, mse, torch.nn.MSELoss(), probe=[1, 4, 5, 6],
                         check_gauss_newton=False)
    assert ours.family.n == 4 and ours.family.population_size == 7
    _check_same(ours, theirs, B=2)


# ----------------------------------------------------------------------------- against hand-computed Jacobians
def _hand_jacobians(params, X, names):
    """(n, C, d) Jacobians of W2 tanh(W1 x + b1) + b2 by the chain rule, columns ordered as the
    pytree's leaves are named (a dict {'W1', 'W2', 'b1', 'b2'}: sorted keys)."""
    W1, b1, W2, b2 = (params[k] for k in ("W1", "b1", "W2", "b2"))
    h = np.tanh(X @ W1.T + b1)                       # (n, H)
    s = 1 - h ** 2
    n, C, H, p = X.shape[0], W2.shape[0], W1.shape[0], X.shape[1]
    blocks = {
        "['W1']": np.einsum("cj,ij,ik->icjk", W2, s, X).reshape(n, C, H * p),
        "['b1']": np.einsum("cj,ij->icj", W2, s),
        "['W2']": np.einsum("ce,ij->icej", np.eye(C), h).reshape(n, C, C * H),
        "['b2']": np.broadcast_to(np.eye(C), (n, C, C)),
    }
    return np.concatenate([blocks[name] for name in names], axis=2)


def _dict_params(seed, p=3, h=8, C=3):
    W1, b1, W2, b2 = _weights(p, h, C, seed)
    return {"W1": W1, "b1": b1, "W2": W2, "b2": b2}


def _dict_apply(params, x):
    return jnp.tanh(x @ params["W1"].T + params["b1"]) @ params["W2"].T + params["b2"]


def test_mse_equals_from_jacobians_with_hand_jacobians():
    params = _dict_params(5)
    X, Y = _data(7, 3, 3, 5)
    with pytest.warns(GaussNewtonWarning, match="not a minimum"):
        result = family_from_function(_dict_apply, params, X, Y, mse)
    assert result.parameter_names == ("['W1']", "['W2']", "['b1']", "['b2']")
    J = _hand_jacobians(params, X, result.parameter_names)
    out = np.tanh(X @ params["W1"].T + params["b1"]) @ params["W2"].T + params["b2"]
    q = 2.0 / 3 * (out - Y)                                   # d mse / d f
    reference = HessianFamily.from_jacobians(J, output_hessians=2.0 / 3 * np.eye(3),
                                             gradients=np.einsum("icd,ic->id", J, q))
    _close(result.family.dense(), reference.dense())
    _close(result.family.gradients, reference.gradients)
    _close(critical_lr(result.family, 2), critical_lr(reference, 2))
    _close(result.loss, np.mean((out - Y) ** 2))


def test_cross_entropy_equals_from_jacobians_with_hand_jacobians():
    params = _dict_params(6)
    X, _ = _data(7, 3, 3, 6)
    labels = np.array([2, 0, 1, 2, 1, 0, 1])
    with pytest.warns(GaussNewtonWarning):
        result = family_from_function(_dict_apply, params, X, labels, cross_entropy)
    J = _hand_jacobians(params, X, result.parameter_names)
    out = np.tanh(X @ params["W1"].T + params["b1"]) @ params["W2"].T + params["b2"]
    P = np.exp(out - out.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    Lam = np.einsum("ic,cd->icd", P, np.eye(3)) - np.einsum("ic,id->icd", P, P)
    g = np.einsum("icd,ic->id", J, P - np.eye(3)[labels])
    reference = HessianFamily.from_jacobians(J, output_hessians=Lam, gradients=g)
    _close(result.family.dense(), reference.dense())
    _close(result.family.gradients, reference.gradients, rtol=1e-9)
    _close(critical_lr(result.family, 3), critical_lr(reference, 3))


def test_more_outputs_than_parameters_takes_jacfwd_and_zero_d_leaves():
    """f(x) = a x + b with scalar leaves a, b and C = 4 outputs > d = 2: J_i = [x_i, 1]."""
    X = np.random.default_rng(7).normal(size=(5, 4))
    params = {"a": 1.5, "b": -0.25}
    Y = 1.5 * X - 0.25
    result = family_from_function(lambda p, x: p["a"] * x + p["b"], params, X, Y, mse)
    J = np.stack([X, np.ones_like(X)], axis=2)           # (n, C, d)
    reference = HessianFamily.from_jacobians(J, output_hessians=0.5 * np.eye(4))
    _close(result.family.dense(), reference.dense())
    assert result.parameter_names == ("['a']", "['b']")


def test_the_mean_is_the_real_hessian_of_the_mean_loss_and_the_lr_convention():
    """At an interpolating minimum: mean_i H_i = jax.hessian of the whole mean loss on a flat
    parameter vector; so full-batch GD (B = n) is stable up to 2 / sharpness of that loss; a loss
    twice as large halves every critical lr."""
    from jax.flatten_util import ravel_pytree

    X, Y = _data(7, 3, 2, 8)
    params = _interpolate(_weights(3, 8, 2, 8), X, Y)
    result = family_from_function(_apply, params, X, Y, mse)
    with jax.enable_x64(True):
        flat, unravel = ravel_pytree([jnp.asarray(p) for p in params])
        # (1/n) sum_i mse_i = the mean over every entry
        H = np.asarray(jax.jit(jax.hessian(lambda t: jnp.mean((_apply(unravel(t), X) - Y) ** 2)))(flat))
    _close(result.family.mean(), H, rtol=1e-9)
    top = np.linalg.eigvalsh(H)[-1]
    _close(critical_lr(result.family, 7, sampling="without_replacement"), 2 / top, rtol=1e-9)
    doubled = family_from_function(_apply, params, X, Y, lambda o, y: 2 * mse(o, y))
    for B in (1, 3):
        _close(critical_lr(doubled.family, B), critical_lr(result.family, B) / 2, rtol=1e-9)


# ----------------------------------------------------------------------------- precision and state
def test_float32_params_are_computed_in_float64_and_no_global_state_changes():
    X, Y = _data(7, 3, 2, 9)
    params = _interpolate(_weights(3, 8, 2, 9), X, Y)
    as32 = [jnp.asarray(p, dtype=jnp.float32) for p in params]   # x64 off: jnp makes float32
    before = jax.config.jax_enable_x64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GaussNewtonWarning)   # float32 weights: not the minimum
        result = family_from_function(_apply, as32, X, Y, mse)
    assert jax.config.jax_enable_x64 == before
    assert all(p.dtype == jnp.float32 for p in as32)          # the caller's arrays untouched
    exact = family_from_function(_apply, [np.asarray(p, dtype=np.float64) for p in as32], X, Y, mse)
    _close(result.family.dense(), exact.family.dense())       # float32 values, float64 arithmetic
    assert jnp.ones(1).dtype == (jnp.float64 if before else jnp.float32)


@pytest.mark.slow  # a rare path; its own compilations (about 2 s of CPU)
def test_float32_on_request():
    X, Y = _data(7, 3, 2, 10)
    params = _interpolate(_weights(3, 8, 2, 10), X, Y)
    exact = family_from_function(_apply, params, X, Y, mse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GaussNewtonWarning)
        single = family_from_function(_apply, params, X, Y, mse, dtype="float32")
    _close(single.family.sharpness(), exact.family.sharpness(), rtol=1e-5)


def test_without_a_local_float64_scope_x64_off_is_a_clear_error(monkeypatch):
    import fastsgdstab.jax as adapter

    monkeypatch.setattr(adapter, "_float64_scope", lambda: None)
    X, Y = _data(7, 3, 2, 11)
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on globally in this process")
    with pytest.raises(ValueError, match=r"dtype float64 needs JAX's 64-bit mode.*jax_enable_x64"):
        family_from_function(_apply, _weights(3, 8, 2, 11), X, Y, mse)


def test_a_function_that_casts_to_float32_is_refused():
    X, Y = _data(7, 3, 2, 12)
    with pytest.raises(ValueError, match=r"apply_fn returned float32 outputs"):
        family_from_function(lambda p, x: _apply(p, x).astype(jnp.float32), _weights(3, 8, 2, 12),
                             X, Y, mse)
    with pytest.raises(ValueError, match=r"loss returned float32"):
        family_from_function(_apply, _weights(3, 8, 2, 12), X, Y,
                             lambda o, y: mse(o, y).astype(jnp.float32))


# ----------------------------------------------------------------------------- bad input
def _small():
    X, Y = _data(7, 3, 2, 27)
    return _interpolate(_weights(3, 8, 2, 27), X, Y), X, Y


def _batch_norm_like(p, x):
    out = _apply(p, x)
    return out - out.mean(0) if x.shape[0] > 1 else out


@pytest.mark.parametrize("case, error, message", [
    ("output shape", ValueError, r"output shape \(7, 2\) does not match the targets' shape \(7, 3\)"),
    ("vector callable", ValueError, "no per-sample form"),
    ("nan parameters", ValueError, r"params leaf \[0\] holds NaN"),
    ("nan inputs", ValueError, "inputs must be finite"),
    ("nan targets", ValueError, "targets must be finite"),
    ("integer leaf", TypeError, r"params leaf \['steps'\] has dtype int"),
    ("no leaves", ValueError, "params has no array leaves"),
    ("empty", ValueError, "empty"),
    ("one sample", ValueError, "at least 2 samples"),
    ("lengths", ValueError, "same number of samples"),
    ("not a function", TypeError, "apply_fn must be a callable"),
    ("loss by name", TypeError, "loss must be a callable"),
    ("not a loss", TypeError, "loss must be"),
    ("chunk", ValueError, "chunk_size"),
    ("reduce", TypeError, "reduce"),
    ("memory", ValueError, "memory_bytes"),
    ("dtype", TypeError, "dtype must be float64"),
    ("non-convex", ValueError, "not convex in the model's outputs"),
    ("class out of range", ValueError, r"classes in \[0, C\) = \[0, 2\); found 2"),
    ("batch statistic", ValueError, "does not treat the samples of a batch independently"),
    ("first axis", ValueError, "must map a batch of m inputs to m outputs"),
    ("returns a tuple", TypeError, "must return one array"),
    ("nan outputs", ValueError, "outputs .* are NaN or inf"),
])
def test_bad_input(case, error, message):
    params, X, Y = _small()
    apply_fn, loss, kwargs = _apply, mse, {}
    if case == "output shape":
        Y = np.zeros((7, 3))
    elif case == "vector callable":
        loss = lambda o, y: (o - y) ** 2  # noqa: E731
    elif case == "nan parameters":
        params[0] = params[0].copy()
        params[0][0, 0] = np.nan
    elif case == "nan inputs":
        X = X.copy()
        X[2, 1] = np.nan
    elif case == "nan targets":
        Y = Y.copy()
        Y[0, 0] = np.inf
    elif case == "integer leaf":
        params = {"net": params, "steps": np.array(3)}
        apply_fn = lambda p, x: _apply(p["net"], x)  # noqa: E731
    elif case == "no leaves":
        params = {}
    elif case == "empty":
        X, Y = X[:0], Y[:0]
    elif case == "one sample":
        X, Y = X[:1], Y[:1]
    elif case == "lengths":
        Y = Y[:6]
    elif case == "not a function":
        apply_fn = "model"
    elif case == "loss by name":
        loss = "mse"
    elif case == "not a loss":
        loss = 3
    elif case == "chunk":
        kwargs = {"chunk_size": 0}
    elif case == "reduce":
        kwargs = {"reduce": "yes"}
    elif case == "memory":
        kwargs = {"memory_bytes": 0}
    elif case == "dtype":
        kwargs = {"dtype": "int32"}
    elif case == "non-convex":
        loss = lambda o, y: -jnp.sum((o - y) ** 2)  # noqa: E731
    elif case == "class out of range":
        loss, Y = cross_entropy, np.array([0, 1, 2, 0, 1, 0, 1])
    elif case == "batch statistic":
        apply_fn = _batch_norm_like
    elif case == "first axis":
        apply_fn = lambda p, x: _apply(p, x)[:1]  # noqa: E731
    elif case == "returns a tuple":
        apply_fn = lambda p, x: (_apply(p, x), {})  # noqa: E731
    elif case == "nan outputs":
        apply_fn = lambda p, x: _apply(p, x) / (x[:, :1] - X[3, 0])  # noqa: E731
    with pytest.raises(error, match=message):
        family_from_function(apply_fn, params, X, Y, loss, **kwargs)


def test_a_second_call_compiles_nothing_and_unhashable_callables_work():
    import fastsgdstab.jax as adapter

    params, X, Y = _small()
    first = family_from_function(_apply, params, X, Y, mse)
    sizes = {name: kernel._cache_size() for name, kernel in adapter._KERNELS.items()}
    again = family_from_function(_apply, [1.0 * p for p in params], X, Y, mse)
    assert {name: kernel._cache_size() for name, kernel in adapter._KERNELS.items()} == sizes

    class Unhashable:
        __hash__ = None

        def __call__(self, p, x):
            return _apply(p, x)

    other = family_from_function(Unhashable(), params, X, Y, mse, check_gauss_newton=False)
    for result in (again, other):
        _close(result.family.dense(), first.family.dense())


def test_near_minimum_warning_and_chunks():
    params, X, Y = _small()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GaussNewtonWarning)
        warnings.simplefilter("error", fs.NotAMinimumWarning)   # gradients of round-off: silent
        whole = family_from_function(_apply, params, X, Y, mse)            # the minimum: silent
        chunked = family_from_function(_apply, params, X, Y, mse, chunk_size=4,
                                       check_gauss_newton=False)
    _close(chunked.family.dense(), whole.family.dense())
    scaled = [1.01 * p for p in params]
    with pytest.warns(GaussNewtonWarning, match="not a minimum: its relative gradient"):
        family_from_function(_apply, scaled, X, Y, mse, check_gauss_newton=False)


# ----------------------------------------------------------------------------- import
def test_importing_the_package_does_not_import_jax():
    code = ("import sys, fastsgdstab, fastsgdstab.family\n"
            "assert 'jax' not in sys.modules, 'fastsgdstab imported jax'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_without_jax_gives_the_install_hint():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'jax' or name.startswith('jax.'):\n"
            "            raise ModuleNotFoundError(\"No module named 'jax'\", name='jax')\n"
            "sys.meta_path.insert(0, Block())\n"
            "try:\n"
            "    import fastsgdstab.jax\n"
            "except ModuleNotFoundError as error:\n"
            "    print(error)\n"
            "else:\n"
            "    print('imported')\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install" in out and "fastsgdstab[jax]" in out


def test_the_module_is_the_adapter_and_jax_is_the_real_jax():
    import fastsgdstab.jax as adapter

    assert adapter.jax is jax and "fastsgdstab" not in jax.__file__
    assert fs.HessianFamily is HessianFamily


@pytest.mark.slow  # a rare path; its own compilations (about 2 s of CPU)
def test_a_loss_that_vmap_cannot_batch():
    """A class-weighted loss reading its target with int(): vmap cannot batch it; computed
    sample by sample, H_i is the weight times the unweighted cross-entropy's."""
    params, X, _ = _small()
    labels = np.array([0, 1, 1, 0, 1, 0, 1])
    weight = {0: 1.0, 1: 3.0}

    def weighted(o, t):
        return weight[int(t)] * cross_entropy(o, t)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GaussNewtonWarning)
        result = family_from_function(_apply, params, X, labels, weighted, check_gauss_newton=False)
        plain = family_from_function(_apply, params, X, labels, cross_entropy, check_gauss_newton=False)
    scale = np.array([weight[int(t)] for t in labels])[:, None, None]
    _close(result.family.dense(), scale * plain.family.dense())


def test_integer_inputs_an_embedding():
    """Token ids as inputs (kept integer): f(x) = E[x] . w, J_i = [e_{x_i} (x) w, E[x_i]]."""
    rng = np.random.default_rng(13)
    params = {"E": rng.normal(size=(5, 3)), "w": rng.normal(size=3)}
    ids = np.array([0, 3, 3, 1, 4, 2])
    y = params["E"][ids] @ params["w"]
    result = family_from_function(lambda p, x: p["E"][x] @ p["w"], params, ids, y, mse,
                                  check_gauss_newton=False)
    J = np.zeros((6, 1, 18))
    for i, token in enumerate(ids):
        J[i, 0, 3 * token:3 * token + 3] = params["w"]
        J[i, 0, 15:] = params["E"][token]
    reference = HessianFamily.from_jacobians(J, output_hessians=[[2.0]])
    _close(result.family.dense(), reference.dense())


def test_float64_is_local_to_the_calling_thread():
    """Two threads computing families while a third creates arrays: the third sees the
    process's default (x64 off: float32) throughout, and the families are identical."""
    import threading

    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on globally in this process")
    rng = np.random.default_rng(14)
    X, w = rng.normal(size=(8, 3)), rng.normal(size=3)
    linear = lambda p, x: x @ p["w"]  # noqa: E731
    reference = family_from_function(linear, {"w": w}, X, X @ w, mse).family.dense()
    errors, seen = [], set()

    def work():
        for _ in range(3):
            dense = family_from_function(linear, {"w": w}, X, X @ w, mse).family.dense()
            errors.append(np.abs(dense - reference).max())

    def watch():
        for _ in range(100):
            seen.add(jnp.ones(1).dtype.name)

    threads = [threading.Thread(target=work), threading.Thread(target=work), threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 6 and max(errors) == 0.0 and seen == {"float32"}
