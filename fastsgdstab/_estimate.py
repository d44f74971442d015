"""``Estimate``: a number estimated from data, with its uncertainty (shared result type).

Estimates carry their uncertainty: a point value, an interval at a stated level, and what it
cost. ``fastsgdstab.estimate`` (a bootstrap over a probe's samples) returns one; other
estimators of the library may return the same type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Estimate"]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with an interval (specification page, section "A probe subset of a large
    training set").

    Attributes
    ----------
    value : float
        The plug-in estimate: the function evaluated on the data itself (for
        :func:`fastsgdstab.estimate`, on the whole probe). Units and loss convention those of
        the function (a learning rate is for the library's convention: per-sample loss with
        Hessian ``H_i``, ``H = mean H_i``).
    interval : tuple of float
        ``(lower, upper)``: a confidence interval for the quantity the data estimate (for a
        probe, the whole training set's value), at ``level``; ``method`` says which.
    level : float
        Nominal coverage of ``interval`` (e.g. 0.95).
    cost : float
        Wall-clock seconds spent.
    bias_corrected : float
        ``2 value - mean(replicates)``: the plug-in value minus the bootstrap estimate of its
        bias (NaN-free: equal to ``value`` when a replicate is not finite).
    resamples : int
        Number of bootstrap resamples.
    method : str
        How ``interval`` was formed: ``"percentile"``, ``"basic"`` or ``"bca"``.
    standard_error : float
        Standard deviation of the replicates (``inf`` when one is not finite).
    replicates : ndarray
        The bootstrap values, one per resample, in resample order.
    intervals : dict
        Every interval computed from the same replicates, by method name.
    evaluations : int
        Number of evaluations of the function (the plug-in, the resamples and, for "bca", the
        jackknife).
    """

    value: float
    interval: tuple
    level: float
    cost: float
    bias_corrected: float = math.nan
    resamples: int = 0
    method: str = "percentile"
    standard_error: float = math.nan
    replicates: np.ndarray = field(default_factory=lambda: np.zeros(0), compare=False, repr=False)
    intervals: dict = field(default_factory=dict, compare=False, repr=False)
    evaluations: int = 0

    @property
    def lower(self) -> float:
        return self.interval[0]

    @property
    def upper(self) -> float:
        return self.interval[1]

    def __str__(self) -> str:
        return (f"{self.value:.6g} (bias-corrected {self.bias_corrected:.6g}; "
                f"{100 * self.level:g}% {self.method} interval [{self.interval[0]:.6g}, "
                f"{self.interval[1]:.6g}], {self.resamples} resamples, {self.cost:.3g} s)")
