"""Warnings attributed to the caller's line, however deep in the library they are raised.

A fixed ``stacklevel`` is wrong as soon as a frame is added between the public function and the
line that warns (a decorator such as the threading policy, a distributed path, a public function
calling another): the warning then names a line of the library. ``warn`` counts the frames that
belong to the package at the moment of the warning and points at the first frame outside it
(the approach of pandas' ``find_stack_level``). Thread-safe: it changes no global state.
"""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by this function's caller name the first
    frame outside the fastsgdstab package."""
    frame = sys._getframe(1)  # the frame that will call warnings.warn: stacklevel 1
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` attributed to the library's caller."""
    # user_stacklevel() counts from this function's frame; warnings.warn is called from here.
    warnings.warn(message, category, stacklevel=user_stacklevel())
