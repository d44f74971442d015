"""Argument checks shared by every public function.

Each check returns the cleaned value or raises a ``ValueError``/``TypeError`` whose message names
the argument, says what was wrong and what is accepted. Engines and kernels never re-check.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def as_real_array(value, name: str) -> np.ndarray:
    """``np.asarray`` plus a dtype check: real numbers only, returned as contiguous float64."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an array of real numbers; could not convert it ({exc})") from exc
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"{name} must hold real numbers (bool, int or float); got dtype {array.dtype}"
        )
    return np.ascontiguousarray(array, dtype=np.float64)


def check_finite(array: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(array)):
        bad = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(
            f"{name} must be finite; found {array[tuple(bad)]} at index {tuple(int(i) for i in bad)}"
        )


def check_real_scalar(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r} of type {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond the float range, such as 10**400
        raise ValueError(f"{name} must be finite; got an integer beyond the float range") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return value


def check_lr(lr) -> float:
    """A learning rate: a finite real number > 0."""
    lr = check_real_scalar(lr, "lr")
    if lr <= 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    return lr


def check_batch_size(batch_size, n: int, *, integer: bool = False, samples: int | None = None) -> float:
    """A batch size: a real number in [1, n] (an integer there if ``integer``); ``n`` is the
    family's population_size, and ``samples`` its n, named in the message when they differ."""
    value = check_real_scalar(batch_size, "batch_size")
    if not 1.0 <= value <= n:
        if samples is None or samples == n:
            raise ValueError(f"batch_size must lie in [1, n] = [1, {n}]; got {value:g}")
        raise ValueError(f"batch_size must lie in [1, N] = [1, {n}] with N = population_size (the "
                         f"training set of which the family's {samples} samples are a probe); got {value:g}")
    if integer and value != int(value):
        raise ValueError(f"batch_size must be an integer in [1, {n}] for this sampling scheme; got {value:g}")
    return value


def check_positive_int(value, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}")
    return value


def check_grid(values, name: str) -> np.ndarray:
    """A grid: a non-empty 1-d sequence of finite real numbers (a single number is a grid of one)."""
    array = as_real_array(values, name)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d sequence of numbers; got shape {array.shape}")
    check_finite(array, name)
    return array


def check_lrs(lrs) -> np.ndarray:
    """A grid of learning rates, each > 0."""
    lrs = check_grid(lrs, "lrs")
    if np.any(lrs <= 0):
        raise ValueError(f"lrs must all be > 0; got {lrs[lrs <= 0][0]:g}")
    return lrs


def check_batch_sizes(batch_sizes, n: int, name: str = "batch_sizes", *,
                      integer: bool = False, samples: int | None = None) -> np.ndarray:
    """A grid of batch sizes, each a real number in [1, n] (an integer there if ``integer``);
    ``n`` and ``samples`` as in :func:`check_batch_size`."""
    batch_sizes = check_grid(batch_sizes, name)
    bad = (batch_sizes < 1) | (batch_sizes > n)
    if np.any(bad):
        if samples is None or samples == n:
            raise ValueError(f"{name} must all lie in [1, n] = [1, {n}]; got {batch_sizes[bad][0]:g}")
        raise ValueError(f"{name} must all lie in [1, N] = [1, {n}] with N = population_size (the "
                         f"training set of which the family's {samples} samples are a probe); "
                         f"got {batch_sizes[bad][0]:g}")
    if integer and np.any(batch_sizes != np.round(batch_sizes)):
        value = batch_sizes[batch_sizes != np.round(batch_sizes)][0]
        raise ValueError(f"{name} must all be integers in [1, {n}] for this sampling scheme "
                         f"(a batch of exactly B samples); got {value:g}")
    return batch_sizes
