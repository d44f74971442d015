"""The typical critical learning rate: where a single run's growth rate (the top Lyapunov
exponent) crosses zero, estimated with common random numbers and an interval over runs.

The exact ``critical_lr`` is the mean-square threshold. A single run follows the top Lyapunov
exponent ``gamma(lr) = lim (1/t) log ||w_t||``, and Jensen's inequality gives
``exp(2 gamma) <= rho(Q)``: below ``eta*`` every run shrinks, and above it typical runs can keep
shrinking while rare runs carry the mean square (the specification page, section "Typical runs:
the Lyapunov critical learning rate"). This module estimates
``eta_typ = inf{lr > 0 : gamma(lr) >= 0}`` from :func:`fastsgdstab.simulate`.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from ._engine import check_family, check_momentum, reduced
from ._estimate import Cost, Estimate
from ._validation import check_batch_size, check_positive_int, check_real_scalar
from .family import HessianFamily
from .moments import critical_lr
from .sampling import check_simulation_sampling
from .simulation import SimulationWarning, simulate

__all__ = ["TypicalCriticalLR", "typical_critical_lr"]

TYPICAL_RUNS = 256
"""Default number of runs of ``typical_critical_lr`` (each evaluated lr simulates all of them)."""

TYPICAL_STEPS = 2000
"""Default number of steps per run; the exponent is the slope over the steps after burn-in."""

TYPICAL_SCAN = (1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0, 16.0,
                32.0, 100.0, 1000.0)
"""Multiples of the starting lr (``eta*``) at which the exponent is evaluated, in order, until it
is >= 0: the first crossing lies between the last two. A crossing and recrossing between two
consecutive points is not seen (the exponent need not be monotone in lr)."""

TYPICAL_ROOT_RTOL = 1e-5
"""Brent's method stops when the point estimate is known to this relative accuracy (well below
its statistical error at the default budget, ~0.1% of the root in d = 1; a coarser tolerance
moved the estimate systematically by a noticeable fraction of a standard error)."""

TYPICAL_END_XTOL = 0.05
"""The interval's ends are located to this fraction of the delta-method standard error, and each
end is then moved outwards by that tolerance, so the root finder's error never shrinks the
interval."""

MIN_LOG_RATE = -1e3
"""A run that reached exactly 0 (``1 - lr h_B = 0`` in some direction, for an exact lr) has rate
-inf; it is counted as this rate per step (far below any rate a float run can have otherwise:
a step changes ``log ||w||`` by at least ``log 2^-1074 ~ -745``), so that means stay finite."""


@dataclass(frozen=True)
class TypicalCriticalLR(Estimate):
    """The typical (Lyapunov) critical learning rate, its interval and the exact one beside it.

    Attributes
    ----------
    value : float
        ``eta_typ``, the first lr (from ``eta*`` upwards) at which the estimated Lyapunov
        exponent reaches 0: typical runs shrink below it and grow above it.
    interval : (float, float)
        The lrs around the first crossing where the estimated exponent is not significantly
        different from 0: ``|gamma-hat(lr)| <= t * stderr(lr)`` over the independent runs, with
        ``t`` the Student quantile of ``level`` (an inverted t-test; nominal coverage ``level``).
        Each end is located to ``TYPICAL_END_XTOL`` delta-method standard errors and moved
        outwards by that tolerance. It covers the statistical error, not the O(1/steps) bias of
        a finite-time exponent in d > 1 (d = 1 has none: the increments are i.i.d.), nor a
        crossing narrower than the scan (``TYPICAL_SCAN``). For i.i.d. schemes the low end is
        never below ``eta_star`` (Jensen).
    level : float
    cost : Cost
    method : str
    stderr : float
        Standard error of ``value`` by the delta method: the exponent's standard error over
        runs at the root divided by its slope in lr there.
    eta_star : float or None
        The exact mean-square critical lr (``critical_lr``) for the same scheme and momentum;
        None for ``sampling="reshuffle"``, which has no exact one-step map.
    start_lr : float
        Where the search started: ``eta_star``, or for reshuffling the exact
        without-replacement critical lr.
    lrs : ndarray
        Every lr evaluated, ascending.
    lyapunov_exponents, lyapunov_exponent_stderr : ndarray
        The estimated exponent (per step, of ``log ||w_t||``; natural log) at each lr, and its
        standard error over runs.
    batch_size, sampling, momentum, nesterov, runs, steps, burn_in, seed
        The settings. The lr is in the family's loss convention (``H_i`` the Hessian of the
        per-sample loss; ``torch.nn.MSELoss`` has no 1/2: twice the curvature, half the lr).
    """

    stderr: float
    eta_star: float | None
    start_lr: float
    lrs: np.ndarray
    lyapunov_exponents: np.ndarray
    lyapunov_exponent_stderr: np.ndarray
    batch_size: float
    sampling: str
    momentum: float
    nesterov: bool
    runs: int
    steps: int
    burn_in: int
    seed: int

    @property
    def ratio(self) -> float | None:
        """``value / eta_star`` (None without an exact ``eta_star``)."""
        if self.eta_star is None or not self.eta_star:
            return None
        return self.value / self.eta_star

    def __str__(self) -> str:
        low, high = self.interval
        optimiser = (f", momentum={self.momentum:g}" + (" (Nesterov)" if self.nesterov else "")
                     if self.momentum else "")
        exact = ("no exact mean-square critical lr for reshuffling (search started at the "
                 f"without-replacement eta* = {self.start_lr:.6g})" if self.eta_star is None else
                 f"exact mean-square critical lr eta* = {self.eta_star:.6g}"
                 + (f" (typical / eta* = {self.ratio:.4g})" if self.ratio is not None else ""))
        return "\n".join([
            f"TypicalCriticalLR: batch_size={self.batch_size:g}, sampling={self.sampling}{optimiser}",
            f"  typical (Lyapunov) critical lr {self.value:.6g}, {100 * self.level:g}% interval "
            f"[{low:.6g}, {high:.6g}] (estimate; {self.method})",
            f"  {exact}",
            f"  {self.runs} runs x {self.steps} steps (burn-in {self.burn_in}) at {self.lrs.size} "
            f"lrs: {self.cost.simulated_steps:,} steps in {self.cost.elapsed_seconds:.2f} s",
        ])


# ------------------------------------------------------------------------------ checks
def _check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer in [0, 2**63); got {seed!r} of type "
                        f"{type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63); got {seed}")
    return seed


def _check_level(level) -> float:
    level = check_real_scalar(level, "level")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1 (e.g. 0.95); got {level!r}")
    return level


def _check_budget(runs, steps, burn_in):
    runs = check_positive_int(runs, "runs", minimum=2)
    steps = check_positive_int(steps, "steps", minimum=2)
    if burn_in is None:
        burn_in = steps // 4
    elif isinstance(burn_in, (bool, np.bool_)) or not isinstance(burn_in, numbers.Integral):
        raise TypeError(f"burn_in must be an integer in [0, steps) = [0, {steps}) or None "
                        f"(steps // 4); got {burn_in!r}")
    burn_in = int(burn_in)
    if not 0 <= burn_in < steps:
        raise ValueError(f"burn_in must lie in [0, steps) = [0, {steps}) (the exponent is the "
                         f"slope over steps burn_in..steps); got {burn_in}")
    return runs, steps, burn_in


# ------------------------------------------------------------------------------ the estimator
class _Exponent:
    """The per-run Lyapunov rates at any lr, every evaluation kept (common random numbers: the
    same seed gives every lr the same w_0 and the same batches, so the mean rate is a smooth
    function of lr between the log singularities where ``1 - lr lambda(H_B) = 0``)."""

    def __init__(self, family, batch_size, sampling, momentum, nesterov, runs, steps, burn_in,
                 seed, client):
        self.arguments = dict(batch_size=batch_size, steps=steps, runs=runs, seed=seed,
                              sampling=sampling, momentum=momentum, nesterov=nesterov,
                              client=client, progress=False, init="normal")
        self.family = family
        self.steps, self.burn_in = steps, burn_in
        self.record_every = math.gcd(burn_in, steps) if burn_in else steps
        self.rates = {}  # lr -> per-run rates (runs,)
        self.runs = runs
        self.simulated_steps = 0

    def per_run(self, lr: float) -> np.ndarray:
        lr = float(lr)
        if lr not in self.rates:
            with warnings.catch_warnings(record=True) as caught:
                # The sample mean square is not used here; its warnings are not ours to show.
                warnings.simplefilter("always", SimulationWarning)
                result = simulate(self.family, lr, record_every=self.record_every, **self.arguments)
            if result.interrupted:
                raise KeyboardInterrupt("typical_critical_lr interrupted during a simulation")
            for warning in caught:
                if not issubclass(warning.category, SimulationWarning):
                    warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                           warning.lineno)
            column = self.burn_in // self.record_every
            with np.errstate(invalid="ignore"):
                rates = (result.log_sq_norm[:, -1] - result.log_sq_norm[:, column]) / (
                    2.0 * (self.steps - self.burn_in))
            # A run at exactly 0 (-inf, or -inf - -inf = nan) shrinks as fast as a run can.
            rates = np.where(np.isnan(rates), -np.inf, rates)
            self.rates[lr] = np.maximum(rates, MIN_LOG_RATE)
            self.simulated_steps += self.arguments["runs"] * self.steps
        return self.rates[lr]

    def __call__(self, lr: float) -> float:
        return float(np.mean(self.per_run(lr)))

    def stderr(self, lr: float) -> float:
        """Standard error of the mean rate over the runs (which are independent)."""
        rates = self.per_run(lr)
        return float(np.std(rates, ddof=1)) / math.sqrt(rates.size)


METHOD = "inverted t-test of the exponent over runs (common random numbers)"


def _first_nonnegative(lrs: np.ndarray, values: np.ndarray) -> int:
    """Index of the first (ascending) of ``values >= 0``; -1 if none."""
    nonneg = values >= 0.0
    return int(np.argmax(nonneg)) if nonneg.any() else -1


def _end(exponent: _Exponent, sign: float, quantile: float, xtol: float, floor, top: float):
    """The first lr at which the confidence bound ``B(lr) = gamma-hat(lr) + sign * quantile *
    stderr(lr)`` is >= 0 (``sign = +1``: the upper bound, whose first crossing is the interval's
    low end; ``-1``: the lower bound, the high end), moved outwards by the root finder's
    tolerance. ``floor``: an lr below which the true root cannot lie (eta*, by Jensen), or None.
    ``top``: the largest lr tried (the high end is inf if the bound is still < 0 there)."""

    def bound(lr):
        return exponent(lr) + sign * quantile * exponent.stderr(lr)

    def table():
        lrs = np.array(sorted(exponent.rates))
        return lrs, np.array([bound(lr) for lr in lrs])

    lrs, values = table()
    k = _first_nonnegative(lrs, values)
    if sign > 0.0:
        # the low end: below it the upper bound is < 0 (every typical run shrinks, at the level)
        if k == 0 and floor is not None:
            return float(lrs[0])  # the root is never below eta* (Jensen): the end is eta*
        lowest = float(lrs[0])
        while k == 0 and lrs[0] > lowest / TYPICAL_SCAN[-1]:
            # reshuffling: no floor; the bound is >= 0 at every lr evaluated: go down
            exponent.per_run(lrs[0] / TYPICAL_SCAN[2])
            lrs, values = table()
            k = _first_nonnegative(lrs, values)
    else:
        # the high end: extend upwards until the lower bound is >= 0 somewhere
        step = max(xtol / TYPICAL_END_XTOL, TYPICAL_ROOT_RTOL * lrs[-1])
        while k < 0:
            point = lrs[-1] + step
            if point > top:
                return math.inf
            exponent.per_run(point)
            step *= 2.0
            lrs, values = table()
            k = _first_nonnegative(lrs, values)
    if k == 0:
        return float(lrs[0])
    a, b = float(lrs[k - 1]), float(lrs[k])
    if bound(b) == 0.0:
        return b
    x = brentq(bound, a, b, xtol=xtol, rtol=4 * np.finfo(float).eps)
    # outwards by the tolerance, but never past the evaluated points that bracket the end
    return max(x - xtol, a) if sign > 0.0 else min(x + xtol, b)


def _confidence_ends(exponent: _Exponent, root: float, stderr: float, quantile: float, floor):
    """``(low, high)``: the lrs where the exponent is not significantly different from 0 around
    the first crossing, ``{lr : |gamma-hat(lr)| <= quantile * stderr(lr)}``: the first crossings
    of the upper and of the lower confidence bound. At the true root gamma = 0, so it lies
    inside with the probability of a t-test not rejecting (``level``, over the runs), whatever
    the slope, the root finder's accuracy and the grid of lrs (common random numbers make the
    bounds smooth in lr)."""
    finite = math.isfinite(stderr) and stderr > 0.0
    xtol = TYPICAL_END_XTOL * stderr if finite else TYPICAL_ROOT_RTOL * root
    if finite:
        # the ends the delta method predicts, slightly outside: tight brackets for Brent
        for k in (-1.25, 1.25):
            point = root + k * quantile * stderr
            if point > 0.0 and (floor is None or point > floor):
                exponent.per_run(point)
    top = max(exponent.rates) * TYPICAL_SCAN[-1]
    low = _end(exponent, 1.0, quantile, xtol, floor, top)
    high = _end(exponent, -1.0, quantile, xtol, floor, top)
    # The interval contains the estimate (the bounds need not be monotone between points).
    return min(low, root), max(high, root)


def typical_critical_lr(family, batch_size, *, sampling="bernoulli", momentum=0.0, nesterov=False,
                        runs=TYPICAL_RUNS, steps=TYPICAL_STEPS, burn_in=None, seed=0, level=0.95,
                        client=None) -> TypicalCriticalLR:
    """Typical (Lyapunov) critical learning rate: where a single run stops shrinking.

    ``eta_typ = inf{lr > 0 : gamma(lr) >= 0}`` with ``gamma`` the top Lyapunov exponent of
    linearised SGD (section "Typical runs: the Lyapunov critical learning rate"). By Jensen's
    inequality ``exp(2 gamma) <= rho(Q)``, so ``gamma <= 0`` up to the exact mean-square
    ``eta*`` (:func:`fastsgdstab.critical_lr`) and ``eta_typ >= eta*``; the two differ where
    rare batches carry the mean square (high coherence, small batches) and with heavy-ball
    momentum.

    The estimate: ``gamma(lr)`` is the mean over runs of each run's slope of
    ``log ||w_t||`` between step ``burn_in`` and step ``steps`` (:func:`fastsgdstab.simulate`),
    with common random numbers (the same seed, hence the same ``w_0`` and batches, at every
    lr, so the estimate is smooth in lr). From ``eta*`` the lr is scanned upwards by the factors
    ``TYPICAL_SCAN`` until the exponent is >= 0 (runs live on the range of H: the common null
    space of the H_i never moves), and Brent's method finds the root between the
    last two points. The interval inverts the t-test of ``gamma(lr) = 0`` over the runs (which
    are independent): from the first crossing of the upper confidence bound
    ``gamma-hat + t stderr`` to the first crossing of the lower one ``gamma-hat - t stderr``
    (``t`` the Student quantile of ``level``, ``runs - 1`` degrees of freedom), each found by
    Brent's method to ``TYPICAL_END_XTOL`` delta-method standard errors and moved outwards by
    that tolerance. At the true root ``gamma = 0``, so the interval covers it exactly when the
    test there does not reject: the coverage does not depend on the slope, the root finder or
    the grid of lrs.

    ``sampling="reshuffle"`` has no exact ``eta*``; the search starts at the exact
    without-replacement ``eta*`` (same momentum) and goes down by the same factors if the
    exponent is already >= 0 there (then the crossing found is the first one below that start,
    not necessarily the first from 0). ``eta_star`` is None.

    Parameters
    ----------
    family : HessianFamily
    batch_size : float or int
        In [1, n]; an integer except for Bernoulli sampling.
    sampling : {"bernoulli", "without_replacement", "with_replacement", "reshuffle"}
    momentum : float, default 0.0
        torch.optim.SGD's momentum in [0, 1) (heavy ball, or Nesterov with ``nesterov=True``).
    nesterov : bool, default False
    runs : int, default 256
        Runs per evaluated lr (>= 2).
    steps : int, default 2000
        Steps per run (>= 2).
    burn_in : int, optional
        Steps discarded before the slope is taken, in [0, steps); default ``steps // 4``.
    seed : int, default 0
        The runs' seed (the same at every lr).
    level : float, default 0.95
        Nominal coverage of the interval, in (0, 1).
    client : dask.distributed.Client, optional
        Run each simulation on this cluster (``simulate``'s ``client``): the same numbers.

    Returns
    -------
    TypicalCriticalLR
        An :class:`Estimate` (value, interval, level, cost, method) with the exact ``eta_star``
        beside it and the exponents at every lr evaluated. The learning rates are in the
        family's loss convention (``H_i`` the Hessian of the per-sample loss;
        ``torch.nn.MSELoss`` has no 1/2, so its Hessians are twice ``from_features``'s and its
        learning rates half).

    Raises
    ------
    TypeError, ValueError
        Invalid arguments (the message names the argument).
    RuntimeError
        The exponent stays negative up to ``TYPICAL_SCAN[-1] * eta*`` (or, for reshuffling,
        positive down to ``eta* / TYPICAL_SCAN[-1]``).

    Examples
    --------
    Two samples in d = 1 with curvatures 1 and 3, one per step: the mean square grows beyond
    ``eta* = 2 E h / E h^2 = 0.8``, while ``gamma(lr) = (log|1 - lr| + log|1 - 3 lr|) / 2``
    stays negative up to its first root ``4 / 3``, where ``(lr - 1) (3 lr - 1) = 1``.

    >>> from fastsgdstab import HessianFamily, typical_critical_lr
    >>> family = HessianFamily.from_features([[1.0], [3.0 ** 0.5]])
    >>> result = typical_critical_lr(family, 1, sampling="without_replacement", runs=64,
    ...                              steps=400)
    >>> round(result.eta_star, 6), round(result.value, 2)
    (0.8, 1.33)
    >>> low, high = result.interval
    >>> bool(low <= 4 / 3 <= high)
    True
    """
    started = time.perf_counter()
    family = check_family(family)
    sampling = check_simulation_sampling(sampling)
    batch_size = check_batch_size(batch_size, family.n, integer=sampling != "bernoulli")
    momentum, nesterov = check_momentum(momentum, nesterov)
    runs, steps, burn_in = _check_budget(runs, steps, burn_in)
    seed = _check_seed(seed)
    level = _check_level(level)

    exact_sampling = "without_replacement" if sampling == "reshuffle" else sampling
    start = critical_lr(family, batch_size, sampling=exact_sampling, momentum=momentum,
                        nesterov=nesterov)
    eta_star = None if sampling == "reshuffle" else start
    settings = dict(batch_size=batch_size, sampling=sampling, momentum=momentum,
                    nesterov=nesterov, runs=runs, steps=steps, burn_in=burn_in, seed=seed)
    method = METHOD
    if not math.isfinite(start):
        # No curvature: nothing ever moves, gamma = 0 at every lr; no finite threshold.
        empty = np.empty(0)
        return TypicalCriticalLR(math.inf, (math.inf, math.inf), level,
                                 Cost(0, 0, time.perf_counter() - started), method, math.nan,
                                 eta_star, start, empty, empty, empty, **settings)

    exponent = _Exponent(_on_range(family), batch_size, sampling, momentum, nesterov, runs, steps, burn_in,
                         seed, client)
    root, (low, high), stderr = _locate(exponent, start, sampling, level)
    lrs = np.array(sorted(exponent.rates))
    means = np.array([np.mean(exponent.rates[lr]) for lr in lrs])
    stderrs = np.array([np.std(exponent.rates[lr], ddof=1) / math.sqrt(runs) for lr in lrs])
    cost = Cost(exponent.simulated_steps, len(exponent.rates), time.perf_counter() - started)
    return TypicalCriticalLR(root, (low, high), level, cost, method, stderr,
                             eta_star, float(start), lrs, means, stderrs, **settings)


def _locate(exponent, start: float, sampling: str, level: float):
    """``(root, (low, high), stderr)`` from an exponent (``exponent(lr)`` the mean rate,
    ``exponent.stderr(lr)`` its standard error over the ``exponent.runs`` independent runs,
    ``exponent.per_run(lr)`` the rates, every evaluation kept in ``exponent.rates``): the scan
    from ``start``, Brent's root, the delta-method standard error and the inverted t-test's
    ends. Separate from the simulations so that it can be checked on exact i.i.d. increments."""
    lower, upper = _bracket(exponent, start, sampling)
    if exponent(lower) >= 0.0:  # i.i.d.: gamma-hat(eta*) >= 0, the root is eta* itself
        root = lower
    elif exponent(upper) == 0.0:
        root = upper
    else:
        root = brentq(exponent, lower, upper, xtol=TYPICAL_ROOT_RTOL * lower,
                      rtol=TYPICAL_ROOT_RTOL)
    stderr = _delta_stderr(exponent, root, lower, upper)
    from scipy.stats import t as student_t  # here: scipy.stats is slow to import

    quantile = float(student_t.ppf(0.5 + level / 2.0, exponent.runs - 1))
    floor = start if sampling != "reshuffle" else None
    return float(root), _confidence_ends(exponent, root, stderr, quantile, floor), float(stderr)


def _on_range(family: HessianFamily) -> HessianFamily:
    """The family written in an orthonormal basis of the range of H (the same family if H has
    full rank). Directions in the common null space of every H_i never move: a run's component
    there is a constant that would hide the sign of the exponent below the threshold (the slope
    of ``log(c + e^{2 gamma t})`` tends to 0, not to gamma < 0). The exponent is rotation
    invariant, and ``w_0 ~ N(0, I)`` projects to ``N(0, I_k)`` on the range."""
    reduction = reduced(family)
    if reduction.k == family.d or reduction.k == 0:
        return family
    rows = reduction.rows.reshape(family.n, family.rank, reduction.k)
    return HessianFamily(np.ascontiguousarray(rows.transpose(0, 2, 1)))


def _bracket(exponent: _Exponent, start: float, sampling: str):
    """``(a, b)`` with the exponent < 0 at a and >= 0 at b, a the last scan point below the first
    crossing; ``(start, start)`` when the exponent is already >= 0 at an i.i.d. ``eta*``."""
    if exponent(start) >= 0.0:
        if sampling != "reshuffle":
            return start, start
        previous = start
        for factor in TYPICAL_SCAN[1:]:
            point = start / factor
            if exponent(point) < 0.0:
                return point, previous
            previous = point
        raise RuntimeError(
            f"the estimated Lyapunov exponent is >= 0 at every lr down to {previous:.6g} "
            f"(1/{TYPICAL_SCAN[-1]:g} of the without-replacement eta* = {start:.6g}); no "
            f"typical critical lr found")
    previous = start
    for factor in TYPICAL_SCAN[1:]:
        point = start * factor
        if exponent(point) >= 0.0:
            return previous, point
        previous = point
    raise RuntimeError(
        f"the estimated Lyapunov exponent stays negative up to {previous:.6g} "
        f"({TYPICAL_SCAN[-1]:g} eta*, eta* = {start:.6g}); no typical critical lr found below it")


def _delta_stderr(exponent: _Exponent, root: float, lower: float, upper: float) -> float:
    """The exponent's standard error at the root over its slope in lr (the nearest evaluated
    points on either side of the root, else the bracket's ends): the delta method."""
    rates = exponent.per_run(root)
    spread = float(np.std(rates, ddof=1)) / math.sqrt(rates.size)
    below = [lr for lr in exponent.rates if lr < root]
    above = [lr for lr in exponent.rates if lr > root]
    if not below or not above:
        return math.nan
    a, b = max(below), min(above)
    slope = (exponent(b) - exponent(a)) / (b - a)
    if not slope > 0.0:
        return math.inf
    return spread / slope
