"""The progress bar of long work in Python (``stability_map``'s rows, ``family_from_model``'s
samples): one convention, ``simulate``'s. ``progress=None`` shows a tqdm bar on stderr when stderr
is a terminal and the work is estimated (from the units done so far) to take longer than
``PROGRESS_AFTER_SECONDS``; True always; False never."""

from __future__ import annotations

import sys
import time

import numpy as np

from ._config import PROGRESS_AFTER_SECONDS

__all__ = ["ProgressBar", "check_progress"]


def check_progress(progress):
    """``progress`` itself, or a TypeError naming what it accepts."""
    if progress is None or isinstance(progress, (bool, np.bool_)):
        return progress
    raise TypeError(f"progress must be None (a bar when stderr is a terminal and the work is long), "
                    f"True or False; got {progress!r}")


def _terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class ProgressBar:
    """A bar of ``total`` units named ``desc``; ``update(amount)`` after each piece of work,
    ``close()`` (or the ``with`` block's end) when done."""

    def __init__(self, total: int, progress, desc: str, unit: str):
        progress = check_progress(progress)
        self.total, self.desc, self.unit = total, desc, unit
        self.automatic = progress is None and _terminal()
        self.done, self.bar = 0, None
        self.start = time.perf_counter()
        if progress and total > 0:
            self._open()

    def _open(self):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=self.done, unit=self.unit, desc=self.desc,
                        leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=0.2)

    def update(self, amount: int = 1) -> None:
        self.done += amount
        if self.bar is not None:
            self.bar.update(amount)
        elif self.automatic and 0 < self.done < self.total:
            elapsed = time.perf_counter() - self.start
            if elapsed * self.total / self.done > PROGRESS_AFTER_SECONDS:
                self._open()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
