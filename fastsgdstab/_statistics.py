"""Statistics shared by the Monte-Carlo engine and the PyTorch adapter's escape test."""

from __future__ import annotations

import math

from ._config import WILSON_Z


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """95% Wilson interval of a binomial proportion ``successes / trials``."""
    z2 = WILSON_Z * WILSON_Z
    p = successes / trials
    denominator = 1.0 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denominator
    half = WILSON_Z / denominator * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    # The interval's ends are exactly 0 (no success) and 1 (all): not round-off near them.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high
