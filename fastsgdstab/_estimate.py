"""The result type shared by every Monte-Carlo estimate: a value, an interval, its level, a cost.

A proven answer is a ``Bracket`` (its ends are certain); an estimate is an ``Estimate`` (its
interval holds the true value with probability about ``level``, from the spread of independent
runs). Engines that estimate (the typical critical learning rate, bootstrap intervals) return
this type or a subclass that adds their own fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BootstrapEstimate", "Cost", "Estimate"]


@dataclass(frozen=True)
class Cost:
    """What an estimate cost.

    Attributes
    ----------
    simulated_steps : int
        SGD steps simulated in all (runs x steps, summed over every simulation).
    simulations : int
        Calls of the simulation engine (one per learning rate evaluated, for instance).
    elapsed_seconds : float
        Wall time.
    evaluations : int
        Evaluations of an exact function (a bootstrap's plug-in, resamples and jackknife).
    """

    simulated_steps: int
    simulations: int
    elapsed_seconds: float
    evaluations: int = 0


@dataclass(frozen=True)
class Estimate:
    """A Monte-Carlo estimate with its interval.

    Attributes
    ----------
    value : float
        The point estimate.
    interval : (float, float)
        ``(low, high)``, an interval of nominal coverage ``level`` (how it was obtained:
        ``method``). It covers the statistical error of the runs, not a bias (say so where a
        bias exists).
    level : float
        Nominal coverage of ``interval``, in (0, 1).
    cost : Cost
        Steps simulated and wall time.
    method : str
        How the interval was obtained, in a few words (e.g. "percentile bootstrap over runs").

    Examples
    --------
    >>> from fastsgdstab import Estimate
    >>> from fastsgdstab._estimate import Cost
    >>> estimate = Estimate(1.0, (0.9, 1.1), 0.95, Cost(1000, 1, 0.01), "normal approximation")
    >>> estimate.width, estimate.relative_width
    (0.20000000000000007, 0.20000000000000007)
    """

    value: float
    interval: tuple
    level: float
    cost: Cost
    method: str

    @property
    def width(self) -> float:
        """``high - low``."""
        return self.interval[1] - self.interval[0]

    @property
    def relative_width(self) -> float:
        """``(high - low) / |value|`` (inf for a zero value)."""
        return self.width / abs(self.value) if self.value else float("inf")

    def __str__(self) -> str:
        low, high = self.interval
        return (f"{self.value:.6g}, {100 * self.level:g}% interval [{low:.6g}, {high:.6g}] "
                f"({self.method}; {self.cost.simulated_steps:,} simulated steps, "
                f"{self.cost.elapsed_seconds:.2f} s)")


@dataclass(frozen=True)
class BootstrapEstimate(Estimate):
    """:class:`Estimate` of a bootstrap over a probe's samples (specification page, section "A
    probe subset of a large training set"); returned by :func:`fastsgdstab.estimate`.

    Attributes (beyond ``Estimate``'s)
    ----------------------------------
    bias_corrected : float
        ``2 value - mean(replicates)``: the plug-in value minus the bootstrap estimate of its
        bias (equal to ``value`` when a replicate is not finite).
    resamples : int
        Number of bootstrap resamples.
    standard_error : float
        Standard deviation of the replicates (``inf`` when one is not finite).
    replicates : ndarray
        The bootstrap values, one per resample, in resample order.
    intervals : dict
        Every interval computed from the same replicates, by method name ("percentile",
        "basic", "bca").
    evaluations : int
        Number of evaluations of the function (the plug-in, the resamples and, for "bca", the
        jackknife).

    ``value`` is the plug-in estimate (the function on the whole probe), ``interval`` a
    confidence interval for the whole training set's value at ``level``, ``method`` its kind,
    ``cost.elapsed_seconds`` the wall time. Units and loss convention are the function's (a
    learning rate is for the library's convention: per-sample loss with Hessian ``H_i``).
    """

    bias_corrected: float = math.nan
    resamples: int = 0
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
                f"{self.interval[1]:.6g}], {self.resamples} resamples, "
                f"{self.cost.elapsed_seconds:.3g} s)")
