"""Warnings name the caller's line, not a line of the library, whatever frames (the threading
policy's decorator, a public function calling another, the distributed path) lie between."""

import warnings

import numpy as np
import pytest

import fastsgdstab as fs
from fastsgdstab._warnings import user_stacklevel


def _one_warning(call, category):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    mine = [w for w in caught if issubclass(w.category, category)]
    assert mine, f"no {category.__name__} was raised"
    return mine[0]


def test_simulation_warning_names_the_callers_file():
    family = fs.HessianFamily.from_features(np.eye(3))
    # Far beyond the threshold: the sample mean square rests on a few runs.
    caught = _one_warning(lambda: fs.simulate(family, lr=3.0, batch_size=1, steps=50, runs=20,
                                              seed=0, progress=False), fs.SimulationWarning)
    assert caught.filename == __file__


def test_sweep_warning_names_the_callers_file():
    family = fs.HessianFamily.from_features(np.eye(3))
    caught = _one_warning(lambda: fs.sweep([family], [{"lr": 0.1, "batch_size": 1},
                                                      {"lr": 0.1, "batch_size": 99}],
                                           progress=False), RuntimeWarning)
    assert caught.filename == __file__


def test_stacklevel_counts_library_frames():
    # Called from outside the package: the caller's own frame is level 1.
    assert user_stacklevel() == 1


@pytest.mark.parametrize("depth", [1, 3])
def test_warn_from_nested_library_frames_reaches_the_caller(depth):
    from fastsgdstab import _warnings

    def nested(level):  # defined here, so these frames count as the caller's, not the library's
        if level == 0:
            return _warnings.warn("x", UserWarning)
        return nested(level - 1)

    caught = _one_warning(lambda: nested(depth), UserWarning)
    assert caught.filename == __file__
