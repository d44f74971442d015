"""The result type shared by every Monte-Carlo estimate: a value, an interval, its level, a cost.

A proven answer is a ``Bracket`` (its ends are certain); an estimate is an ``Estimate`` (its
interval holds the true value with probability about ``level``, from the spread of independent
runs). Engines that estimate (the typical critical learning rate, bootstrap intervals) return
this type or a subclass that adds their own fields.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Cost", "Estimate"]


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
    """

    simulated_steps: int
    simulations: int
    elapsed_seconds: float


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
