"""Answers for a large training set from a probe subset: the bootstrap (``fastsgdstab.estimate``).

A uniform probe of n samples from a training set of N (``HessianFamily(...,
population_size=N)``) gives unbiased estimates of H and of the noise operator, but the plug-in
critical learning rate of the probe is a random, biased estimate of the training set's
(specification page, section "A probe subset of a large training set"). :func:`estimate`
resamples the probe's samples with replacement, recomputes, and reports the plug-in value, a
bias-corrected value and an interval.

Reuse of the full family's reduction: every quantity of the library is invariant under
rotations of parameter space and depends on the factors only through their coordinates in the
range of H. A resample's H is a sum of a subset of the probe's H_i (with multiplicities), so its
range lies inside the probe's: each resample is built directly in the probe's reduced
coordinates (k = rank(H) <= n r dimensions instead of d), sharing one reduction.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._estimate import BootstrapEstimate, Cost, Estimate
from ._engine import check_family, reduced
from ._threads import limited_blas
from .family import HessianFamily

__all__ = ["BootstrapEstimate", "Estimate", "estimate", "INTERVAL_METHODS", "probe_indices", "select_probe"]

INTERVAL_METHODS = ("percentile", "basic", "bca")
"""Accepted values of ``estimate``'s ``interval``."""

_JACKKNIFE_GROUPS = 100  # BCa's acceleration from a grouped jackknife of at most this many groups


def estimate(function, family, *args, resamples=200, level=0.95, seed=0, client=None,
             interval="percentile", reuse_reduction=True, **kwargs) -> BootstrapEstimate:
    """Bootstrap estimate of ``function(family, *args, **kwargs)`` for the training set a probe
    family stands for.

    ``family`` holds n probe samples drawn uniformly from a training set of N =
    ``family.population_size`` samples; the batch law of every engine is the training set's
    (N in THEORY section 2's coefficients). The plug-in ``function(family, ...)`` estimates the
    training set's answer with a bias (the top eigenvalue of a noisy operator is biased up, so
    the critical learning rate is biased down). Each of ``resamples`` bootstrap families draws n
    of the probe's samples with replacement (``population_size`` kept) and is evaluated; the
    spread of the replicates gives the interval and their mean the bias (specification page,
    section "A probe subset of a large training set").

    Parameters
    ----------
    function : callable
        ``function(family, *args, **kwargs)`` returning a real number, or an object with a
        real ``value`` attribute (``Bracket``, ``Coherence``...): ``fastsgdstab.critical_lr``,
        ``critical_batch_size``, ``spectral_radius``, or any function of a family that is
        invariant under rotations of parameter space (see ``reuse_reduction``).
    family : HessianFamily
        The probe, at least 2 samples (or ``family_from_model``'s result, whose ``family`` is
        used).
    *args, **kwargs
        Passed to ``function`` (e.g. the batch size, ``sampling=``).
    resamples : int, default 200
        Bootstrap resamples, >= 2. An interval at level 0.95 needs about 200 (its ends are the
        2.5% and 97.5% quantiles of the replicates: with 40, the second smallest and largest);
        fewer serve quick looks and tests.
    level : float, default 0.95
        Nominal coverage of the interval, in (0, 1).
    seed : int, default 0
        Seed of the resampling (an int >= 0); the result does not depend on the number of
        threads or on ``client``.
    client : dask.distributed.Client, optional
        Evaluate the resamples on a Dask cluster (a few tasks per worker thread); by default
        they run on a thread pool of this process, one thread per available core, with BLAS
        limited to one thread meanwhile and one Numba thread per pool thread (no
        oversubscription; the caller's settings restored).
    interval : {"percentile", "basic", "bca"}, default "percentile"
        ``"percentile"`` (default): the replicates' ``(1 - level) / 2`` and ``(1 + level) / 2``
        quantiles (order statistics, the lower rounded down and the upper up). ``"basic"``: the
        percentile interval reflected about the plug-in value, ``[2 value - q_hi, 2 value -
        q_lo]``. ``"bca"``: bias-corrected and accelerated percentiles (Efron 1987), the
        acceleration from a grouped jackknife (the probe without each of at most 100 groups of
        samples: that many extra evaluations; the delete-one jackknife when n <= 100). The
        coverage study in docs/probe.md measured the three: at n >= 300 probe samples all
        covered the whole training set's eta* in at least 92 of 100 probes at level 0.95; the
        percentile interval is the default (the cheapest; basic fell to 0.89 at n = 100).
    reuse_reduction : bool, default True
        Build every resample in the probe's reduced coordinates (k = rank(H) dimensions; see the
        module notes), valid for functions that are invariant under rotations of parameter
        space (all of the library's). Pass False for a function that reads the parameter
        coordinates (an ``init`` vector of length d, say): resamples then keep the d-dimensional
        factors.

    Returns
    -------
    BootstrapEstimate
        ``value`` (the plug-in), ``bias_corrected``, ``interval`` at ``level`` (``method`` says
        which), ``standard_error``, ``replicates`` and ``intervals`` (every method's interval
        from the same replicates), ``cost`` (``cost.elapsed_seconds``: wall seconds) and ``evaluations``.

    Raises
    ------
    TypeError
        ``function`` not callable, ``family`` not a HessianFamily, ``resamples`` or ``seed`` not
        an integer, ``function`` returning something other than a real number (or an object
        with a real ``value``).
    ValueError
        ``resamples`` < 2, ``level`` outside (0, 1), ``seed`` < 0, an unknown ``interval``, a
        ``function`` returning NaN; the errors of ``function`` itself (checked on the plug-in
        first, so bad arguments fail before any resample).

    Examples
    --------
    >>> import numpy as np
    >>> import fastsgdstab as fs
    >>> rng = np.random.default_rng(0)
    >>> probe = fs.HessianFamily.from_features(rng.standard_normal((40, 3)), population_size=4000)
    >>> result = fs.estimate(fs.critical_lr, probe, 8, sampling="without_replacement",
    ...                      resamples=40)
    >>> bool(result.interval[0] <= result.value <= result.interval[1]), result.method
    (True, 'percentile')
    >>> result.level, result.resamples
    (0.95, 40)
    """
    started = time.perf_counter()
    if not callable(function):
        raise TypeError(f"function must be callable (e.g. fastsgdstab.critical_lr); got {function!r}")
    if not isinstance(family, HessianFamily) and isinstance(getattr(family, "family", None), HessianFamily):
        family = family.family  # family_from_model's ModelFamily: its family
    family = check_family(family)
    resamples = _check_int(resamples, "resamples", 2)
    seed = _check_int(seed, "seed", 0)
    level = _check_level(level)
    if not isinstance(interval, str) or interval not in INTERVAL_METHODS:
        raise ValueError(f"interval must be one of {', '.join(repr(m) for m in INTERVAL_METHODS)}; "
                         f"got {interval!r}")
    if not isinstance(reuse_reduction, (bool, np.bool_)):
        raise TypeError(f"reuse_reduction must be True or False; got {reuse_reduction!r}")
    if client is not None:
        from ._distributed import check_client

        client = check_client(client)

    value = _scalar(function(family, *args, **kwargs), "the plug-in")
    base = _base_factors(family, bool(reuse_reduction))
    n = family.n
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(resamples, n))
    jobs = [np.sort(row) for row in indices]
    if interval == "bca":
        jobs += _jackknife_subsets(n)
    results = _evaluate(function, base, family.population_size, jobs, args, kwargs, client)
    replicates = np.asarray(results[:resamples], dtype=float)
    jackknife = np.asarray(results[resamples:], dtype=float) if interval == "bca" else None
    intervals = _intervals(value, replicates, level, jackknife)
    finite = bool(np.all(np.isfinite(replicates))) and math.isfinite(value)
    if finite:
        bias_corrected = 2.0 * value - float(np.mean(replicates))
        standard_error = float(np.std(replicates, ddof=1))
    else:
        bias_corrected = value
        standard_error = math.inf
    return BootstrapEstimate(
        value=value,
        interval=intervals[interval],
        level=level,
        cost=Cost(0, 0, time.perf_counter() - started, 1 + len(jobs)),
        bias_corrected=bias_corrected,
        resamples=resamples,
        method=interval,
        standard_error=standard_error,
        replicates=replicates,
        intervals=intervals,
        evaluations=1 + len(jobs),
    )


# ------------------------------------------------------------------------------ resampling
def _base_factors(family: HessianFamily, reuse: bool) -> np.ndarray:
    """The (n, k, r) factors the resamples select rows of: the probe's factors in H's eigenbasis
    on its range when that is smaller than d (and representable), else the factors themselves."""
    if reuse:
        reduction = reduced(family)
        k = reduction.k
        if 0 < k < family.d:
            with np.errstate(over="ignore", under="ignore"):
                rows = reduction.rows
            if np.all(np.isfinite(rows)):
                return np.ascontiguousarray(rows.reshape(family.n, reduction.rank, k).transpose(0, 2, 1))
    return family.factors


def _jackknife_subsets(n: int) -> list:
    """Delete-a-group jackknife: the probe without each of ``g = min(n, 100)`` contiguous groups."""
    groups = min(n, _JACKKNIFE_GROUPS)
    edges = np.linspace(0, n, groups + 1).round().astype(int)
    everything = np.arange(n)
    return [np.concatenate([everything[:a], everything[b:]]) for a, b in zip(edges[:-1], edges[1:])]


def _evaluate_one(function, base, population_size, rows, args, kwargs) -> float:
    factors = base[rows]
    if factors.shape[0] < 2:  # (a jackknife of 2 samples) a family needs 2: duplicate
        factors = np.concatenate([factors, factors])
    resampled = HessianFamily(factors, population_size=max(population_size, factors.shape[0]))
    return _scalar(function(resampled, *args, **kwargs), "a resample")


def _evaluate_block(function, base, population_size, jobs, args, kwargs) -> list:
    return [_evaluate_one(function, base, population_size, rows, args, kwargs) for rows in jobs]


def _evaluate(function, base, population_size, jobs, args, kwargs, client) -> list:
    """Every job's value, in job order: on a Dask cluster or on a local thread pool."""
    if client is not None:
        from ._distributed import reissue, run_task, share, split, task_slots

        slots = task_slots(client)
        parts = max(1, min(len(jobs), 4 * sum(slots.values())))
        shared = share(client, base)
        futures = [client.submit(run_task, slots, _evaluate_block, function, shared, population_size,
                                 jobs[a:b], args, kwargs, pure=False) for a, b in split(len(jobs), parts)]
        values = []
        for future in futures:
            block, caught = future.result()
            reissue(caught)
            values.extend(block)
        return values
    workers = max(1, min(_cores(), len(jobs)))
    # BLAS limited to one thread while the pool's threads run (restored afterwards): each
    # evaluation is a small dense problem, and workers x BLAS threads must not exceed the cores.
    with limited_blas(parallel=True):
        if workers == 1:
            return _evaluate_block(function, base, population_size, jobs, args, kwargs)
        chunks = np.array_split(np.arange(len(jobs)), workers)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_pool_block, function, base, population_size,
                                   [jobs[j] for j in chunk], args, kwargs) for chunk in chunks]
            return [value for future in futures for value in future.result()]


def _pool_block(function, base, population_size, jobs, args, kwargs) -> list:
    """``_evaluate_block`` in a pool thread, with one Numba thread for this thread (a function
    that simulates would otherwise launch all of Numba's threads from every pool thread).
    ``numba.set_num_threads`` is thread-local: the caller's setting is untouched."""
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return _evaluate_block(function, base, population_size, jobs, args, kwargs)
    finally:
        numba.set_num_threads(previous)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------- intervals
def _quantiles(values: np.ndarray, probabilities) -> list:
    """Order-statistic quantiles (no interpolation, so infinite replicates give no NaN): the
    lower end rounds down, the upper end up."""
    ordered = np.sort(values)
    count = ordered.size
    out = []
    for p in probabilities:
        p = min(max(float(p), 0.0), 1.0)
        index = math.floor(p * (count - 1)) if p <= 0.5 else math.ceil(p * (count - 1))
        out.append(float(ordered[index]))
    return out


def _intervals(value: float, replicates: np.ndarray, level: float, jackknife=None) -> dict:
    """Every interval the replicates give, by method name (THEORY section 17; Efron & Tibshirani
    1993, chapters 13-14)."""
    from scipy.stats import norm

    alpha = 1.0 - level
    low, high = _quantiles(replicates, (alpha / 2, 1 - alpha / 2))
    intervals = {"percentile": (low, high)}
    with np.errstate(invalid="ignore", over="ignore"):
        basic = (2.0 * value - high, 2.0 * value - low)
    intervals["basic"] = basic if all(math.isfinite(x) or math.isinf(x) for x in basic) else (low, high)
    if jackknife is not None:
        finite = np.all(np.isfinite(jackknife)) and np.all(np.isfinite(replicates)) and math.isfinite(value)
        if not finite:
            intervals["bca"] = (low, high)
        else:
            below = (np.sum(replicates < value) + 0.5 * np.sum(replicates == value)) / replicates.size
            below = min(max(below, 0.5 / replicates.size), 1.0 - 0.5 / replicates.size)
            z0 = float(norm.ppf(below))
            centred = jackknife.mean() - jackknife
            spread = float(np.sum(centred**2))
            acceleration = float(np.sum(centred**3)) / (6.0 * spread**1.5) if spread > 0 else 0.0
            ends = []
            for z in (norm.ppf(alpha / 2), norm.ppf(1 - alpha / 2)):
                shifted = z0 + z
                denominator = 1.0 - acceleration * shifted
                ends.append(float(norm.cdf(z0 + shifted / denominator)) if denominator > 0 else
                            (0.0 if z < 0 else 1.0))
            intervals["bca"] = tuple(_quantiles(replicates, ends))
    return intervals


# ------------------------------------------------------------------------------- arguments
def _scalar(result, where: str) -> float:
    """A real number from a function's result: the number itself or its ``value`` attribute."""
    candidate = getattr(result, "value", result)
    if isinstance(candidate, (bool, np.bool_)) or not isinstance(candidate, (numbers.Real, np.ndarray)):
        raise TypeError(f"function must return a real number or an object with a real 'value' "
                        f"attribute; {where} returned {type(result).__name__}")
    candidate = np.asarray(candidate)
    if candidate.shape != () or candidate.dtype.kind not in "iuf":
        raise TypeError(f"function must return a real number (a scalar); {where} returned an array "
                        f"of shape {candidate.shape}")
    value = float(candidate)
    if math.isnan(value):
        raise ValueError(f"function returned NaN on {where}")
    return value


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}")
    return int(value)


def _check_level(level) -> float:
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, numbers.Real):
        raise TypeError(f"level must be a real number in (0, 1); got {level!r}")
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1) (e.g. 0.95); got {level}")
    return level


def select_probe(inputs, targets, probe, seed=0):
    """``(inputs[probe], targets[probe], N)``: a probe of a dataset (``probe_indices``) and the
    dataset's length N, for ``family_from_model(..., probe=)``. Works on anything with a length
    and numpy-style integer-array indexing (torch tensors, numpy arrays); other sequences are
    converted with ``numpy.asarray``. Nothing is imported here (no torch)."""
    try:
        population, other = len(inputs), len(targets)
    except TypeError as exc:
        raise TypeError(f"inputs and targets must have a length (a sample axis) to take a probe of "
                        f"them; {exc}") from None
    if population != other:
        raise ValueError(f"inputs and targets must have the same number of samples (axis 0); got "
                         f"{population} and {other}")
    chosen = probe_indices(probe, population, seed)

    def pick(value):
        if hasattr(value, "shape") and hasattr(value, "__getitem__"):
            return value[chosen]
        return np.asarray(value)[chosen]

    return pick(inputs), pick(targets), population


def probe_indices(probe, n: int, seed=0) -> np.ndarray:
    """The sorted sample indices of a probe of a dataset of n samples.

    ``probe`` is an integer m (a uniform subset of m distinct samples, drawn with
    ``numpy.random.default_rng(seed)``) or a sequence of distinct indices in [0, n). At least 2
    samples (a family needs 2) and at most n.

    Examples
    --------
    >>> probe_indices(3, 10, seed=1).tolist()
    [3, 4, 7]
    >>> probe_indices([7, 2], 10).tolist()
    [2, 7]
    """
    if isinstance(probe, numbers.Integral) and not isinstance(probe, (bool, np.bool_)):
        count = int(probe)
        if not 2 <= count <= n:
            raise ValueError(f"probe must be an integer in [2, n] = [2, {n}] (the number of samples "
                             f"to draw) or a sequence of indices; got {count}")
        seed = _check_int(seed, "seed", 0)
        return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))
    try:
        indices = np.asarray(probe)
    except Exception as exc:  # ragged input
        raise TypeError(f"probe must be an integer or a sequence of integer indices; got {probe!r}") from exc
    if indices.ndim != 1 or indices.dtype.kind not in "iu":
        raise TypeError(f"probe must be an integer or a 1-d sequence of integer indices; got "
                        f"{type(probe).__name__} of dtype {indices.dtype} and shape {indices.shape}")
    if indices.size < 2:
        raise ValueError(f"probe must select at least 2 samples; got {indices.size}")
    if indices.min() < 0 or indices.max() >= n:
        bad = indices[(indices < 0) | (indices >= n)][0]
        raise ValueError(f"probe indices must lie in [0, n) = [0, {n}); got {int(bad)}")
    ordered = np.sort(indices)
    if np.any(ordered[1:] == ordered[:-1]):
        repeated = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
        raise ValueError(f"probe indices must be distinct (a uniform subset); {repeated} repeats")
    return ordered.astype(np.int64)
