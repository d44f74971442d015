"""Hostile arguments to every public function: junk of every type and shape, in every position.

A call with a bad argument must raise TypeError or ValueError whose message names the argument;
a call whose "junk" happens to be valid must return normally. Nothing else may escape: no
ZeroDivisionError, OverflowError, LinAlgError, Numba typing error or NaN passed on.
"""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastsgdstab as fs
from fastsgdstab import theory

FAMILY = fs.HessianFamily.from_features(np.random.default_rng(0).standard_normal((6, 3)))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.text(max_size=5),
    st.floats(allow_nan=True, allow_infinity=True), st.complex_numbers(max_magnitude=1e3),
    st.just(np.float32(2.0)), st.just(np.int64(3)), st.just(np.nan), st.just(-0.0),
    st.just(1e-320), st.just(1e308), st.just(float(FAMILY.n)), st.just(FAMILY.n + 1e-9),
)
arrays = st.one_of(
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=0, max_dims=4, max_side=4),
               elements=st.one_of(st.floats(-1e300, 1e300),
                                  st.sampled_from([math.nan, math.inf, -math.inf]))),
    hnp.arrays(np.complex128, hnp.array_shapes(max_dims=3, max_side=3),
               elements=st.complex_numbers(max_magnitude=10)),
    st.lists(st.one_of(st.floats(-3, 3), st.lists(st.floats(-3, 3), max_size=3)), max_size=4),
    st.just(np.zeros((6, 3))), st.just(np.full((6, 3), np.inf)), st.just("abc"),
    st.just(np.zeros((2, 0, 1))), st.just(np.ones((1, 3, 1))),
)
junk = st.one_of(scalars, arrays)

# (name, call taking the junk value, the parameter name the message must mention)
CALLS = [
    ("HessianFamily", lambda v: fs.HessianFamily(v), "factors"),
    ("from_features", lambda v: fs.HessianFamily.from_features(v), "features"),
    ("from_dense", lambda v: fs.HessianFamily.from_dense(v), "hessians"),
    ("from_dense tol", lambda v: fs.HessianFamily.from_dense(FAMILY.dense(), tol=v), "tol"),
    ("critical_lr family", lambda v: fs.critical_lr(v, 2), "family"),
    ("critical_lr batch_size", lambda v: fs.critical_lr(FAMILY, v), "batch_size"),
    ("critical_lr sampling", lambda v: fs.critical_lr(FAMILY, 2, sampling=v), "sampling"),
    ("spectral_radius lr", lambda v: fs.spectral_radius(FAMILY, v, 2), "lr"),
    ("spectral_radius batch_size", lambda v: fs.spectral_radius(FAMILY, 0.1, v), "batch_size"),
    ("critical_batch_size lr", lambda v: fs.critical_batch_size(FAMILY, v), "lr"),
    ("second_moment steps", lambda v: fs.second_moment(FAMILY, 0.1, 2, v), "steps"),
    ("second_moment init", lambda v: fs.second_moment(FAMILY, 0.1, 2, 3, init=v), "init"),
    ("simulate runs", lambda v: fs.simulate(FAMILY, 0.1, 2, 3, v, progress=False), "runs"),
    ("simulate seed", lambda v: fs.simulate(FAMILY, 0.1, 2, 3, 4, seed=v, progress=False), "seed"),
    ("simulate init", lambda v: fs.simulate(FAMILY, 0.1, 2, 3, 4, init=v, progress=False), "init"),
    ("simulate divergence_factor",
     lambda v: fs.simulate(FAMILY, 0.1, 2, 3, 4, divergence_factor=v, progress=False), "divergence_factor"),
    ("stability_map lrs", lambda v: fs.stability_map(FAMILY, v, [2]), "lrs"),
    ("stability_map batch_sizes", lambda v: fs.stability_map(FAMILY, [0.1], v), "batch_sizes"),
    ("stability_map rtol", lambda v: fs.stability_map(FAMILY, [0.1], [2], rtol=v), "rtol"),
    ("report lr", lambda v: fs.report(FAMILY, v, 2), "lr"),
    ("coherence store_limit", lambda v: fs.coherence(FAMILY, store_limit=v), "store_limit"),
    ("theorem1 lr", lambda v: theory.theorem1(FAMILY, v, 2), "lr"),
    ("lemma1 batch_size", lambda v: theory.lemma1(FAMILY, 0.1, v), "batch_size"),
    ("theorem2_family sigma", lambda v: theory.theorem2_family(6, v, 1.0), "sigma"),
    ("theorem2_family sharpness", lambda v: theory.theorem2_family(6, 2, v), "sharpness"),
    ("rayleigh_bounds batch_size", lambda v: theory.rayleigh_bounds(FAMILY, v), "batch_size"),
]


def _finite_or_inf(value):
    """Every float in a result is a number (inf allowed where documented), never NaN."""
    if isinstance(value, float):
        return not math.isnan(value)
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return not np.any(np.isnan(value))
    return True


@pytest.mark.parametrize("name, call, parameter", CALLS, ids=[c[0] for c in CALLS])
@settings(max_examples=40)
@given(value=junk)
def test_junk_gives_a_clear_error_or_a_valid_answer(name, call, parameter, value):
    if parameter in ("steps", "runs") and isinstance(value, (int, np.integer)) and 10**5 < value <= 10**9:
        return  # valid, only long: not a hostile input
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # simulation and certification warnings are answers
        try:
            result = call(value)
        except (TypeError, ValueError) as exc:
            message = str(exc)
            assert parameter in message or (parameter == "family" and "HessianFamily" in message), (
                f"{name}: the message does not name {parameter!r}: {message}")
            return
    if isinstance(result, float):
        assert _finite_or_inf(result), f"{name} returned NaN for {value!r}"
