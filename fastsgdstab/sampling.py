"""The batch-sampling schemes: the coefficients of their second-moment maps and the tables from
which the simulation draws Bernoulli batch sizes.

The exact engine knows the three i.i.d. schemes (``SAMPLING_SCHEMES``); the simulation knows
random reshuffling too (``SIMULATION_SAMPLING_SCHEMES``), whose batches are not independent from
step to step, so that no one-step second-moment map exists (the specification page, section
"Random reshuffling").

See the specification page, sections "Setting" and "The exact second-moment map":
``Q(X) = X - lr (H X + X H) + lr^2 (a H X H + b N(X))``, and section "Exact critical batch
size" for the noise scalar ``q`` through which the batch size enters.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLING_SCHEMES = ("bernoulli", "without_replacement", "with_replacement")
"""Accepted values of every ``sampling`` argument; ``"bernoulli"`` is the paper's model."""


SIMULATION_SAMPLING_SCHEMES = SAMPLING_SCHEMES + ("reshuffle",)
"""Accepted values of ``simulate``'s ``sampling``: the exact engine's schemes and ``"reshuffle"``
(each epoch a uniform permutation, consecutive batches of B, as ``DataLoader(shuffle=True)``)."""


def check_sampling(sampling) -> str:
    """``sampling`` if the exact engine knows it; a ValueError naming the accepted schemes (and,
    for ``"reshuffle"``, pointing to ``simulate``) otherwise."""
    if isinstance(sampling, str) and sampling == "reshuffle":
        raise ValueError(
            "sampling='reshuffle' (random reshuffling: epochs of a random permutation) has no exact "
            "one-step second-moment map, so the exact engine cannot analyse it; use "
            "fastsgdstab.simulate(..., sampling='reshuffle') to simulate it, or one of "
            f"{', '.join(repr(s) for s in SAMPLING_SCHEMES)} here"
        )
    if not isinstance(sampling, str) or sampling not in SAMPLING_SCHEMES:
        raise ValueError(
            f"sampling must be one of {', '.join(repr(s) for s in SAMPLING_SCHEMES)}; got {sampling!r}"
        )
    return sampling


def check_simulation_sampling(sampling) -> str:
    """``sampling`` if ``simulate`` knows it (``SIMULATION_SAMPLING_SCHEMES``); a ValueError
    otherwise."""
    if not isinstance(sampling, str) or sampling not in SIMULATION_SAMPLING_SCHEMES:
        raise ValueError(
            f"sampling must be one of {', '.join(repr(s) for s in SIMULATION_SAMPLING_SCHEMES)}; "
            f"got {sampling!r}"
        )
    return sampling


def map_coefficients(sampling: str, n: int, batch_size: float) -> tuple[float, float]:
    """``(a, b)`` of the second-moment map for a scheme, n samples and a (real) batch size.

    ``n`` is the size of the set the batches are drawn from: the family's ``population_size``
    N (its n samples, unless they are a probe of a larger training set; specification page,
    section "A probe subset of a large training set"). Every engine passes
    ``family.population_size`` here, never the probe's n.

    | scheme | a | b |
    | bernoulli | 1 | 1/B - 1/n |
    | without_replacement | 1 - p | p, p = (n - B) / (B (n - 1)) |
    | with_replacement | 1 - 1/B | 1/B |
    """
    B = float(batch_size)
    if sampling == "bernoulli":
        # (n - B) / (n B): n - B is exact near B = n (no cancellation), and 0 at B = n.
        return 1.0, max((n - B) / (n * B), 0.0)
    if sampling == "without_replacement":
        p = max((n - B) / (B * (n - 1)), 0.0)
        return 1.0 - p, p
    if sampling == "with_replacement":
        return 1.0 - 1.0 / B, 1.0 / B
    raise ValueError(f"unknown sampling {sampling!r}")


def batch_size_from_noise(sampling: str, n: int, q: float) -> float:
    """The batch size whose noise scalar ``q`` (the ``b`` of :func:`map_coefficients`, through
    which the batch size enters ``Q = I - lr R + lr^2 q V``) is the given one; q may be ``inf``
    (batch size 0, i.e. no constraint). ``n`` is the population size N, as in
    :func:`map_coefficients`."""
    if math.isinf(q):
        return 0.0
    if sampling == "bernoulli":
        return 1.0 / (q + 1.0 / n)
    if sampling == "without_replacement":
        return n / (q * (n - 1) + 1.0)
    if sampling == "with_replacement":
        return math.inf if q <= 0 else 1.0 / q
    raise ValueError(f"unknown sampling {sampling!r}")


def bernoulli_tables(n: int, probability: float):
    """``(cdf, guide)``: the Binomial(n, p) distribution function up to where it reaches 1, and
    its guide table.

    What the simulation kernel needs to draw Bernoulli batch sizes by table inversion.
    ``cdf[k] = P(K <= k)`` for k up to the first k at which the computed value is 1 (or n),
    set to exactly 1: no uniform draw u < 1 can give a larger K, so the table, the largest batch
    and the kernel's scratch are O(B + sqrt(B)) whatever n (about B + 40 sqrt(B) entries, not
    n + 1; the entries kept are those of the full table, so the draws are too). ``guide[b]``
    is a lower bound of the smallest k with ``cdf[k] > u`` for every u in [b / m, (b + 1) / m),
    m the table's length, so inverting the cdf costs a look-up and about one comparison. Fresh,
    writable, C-contiguous float64 and int64 arrays (one kernel signature).
    """
    from scipy.stats import binom

    probability = min(probability, 1.0)
    mean = n * probability
    # the upper tail is below 2^-53 (cdf rounds to 1) far before mean + 40 sd + 40; if not, double
    top = min(n, int(mean + 40.0 * math.sqrt(mean * (1.0 - probability)) + 40.0))
    while True:
        cdf = np.array(binom.cdf(np.arange(top + 1), n, probability), dtype=np.float64)
        reached = np.flatnonzero(cdf >= 1.0)
        if reached.size or top == n:
            break
        top = min(n, 2 * top)
    last = int(reached[0]) if reached.size else n
    cdf = np.ascontiguousarray(cdf[:last + 1])
    cdf[last] = 1.0
    bins = last + 1
    # one less than the exact start, as a margin against rounding of u * bins at a bin edge
    guide = np.searchsorted(cdf, np.arange(bins) / bins, side="right") - 1
    return cdf, np.maximum(guide, 0).astype(np.int64)
