"""The three batch-sampling schemes: the coefficients of their second-moment maps and the
tables from which the simulation draws Bernoulli batch sizes.

See the specification page, sections "Setting" and "The exact second-moment map":
``Q(X) = X - lr (H X + X H) + lr^2 (a H X H + b N(X))``, and section "Exact critical batch
size" for the noise scalar ``q`` through which the batch size enters.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLING_SCHEMES = ("bernoulli", "without_replacement", "with_replacement")
"""Accepted values of every ``sampling`` argument; ``"bernoulli"`` is the paper's model."""


def check_sampling(sampling) -> str:
    if not isinstance(sampling, str) or sampling not in SAMPLING_SCHEMES:
        raise ValueError(
            f"sampling must be one of {', '.join(repr(s) for s in SAMPLING_SCHEMES)}; got {sampling!r}"
        )
    return sampling


def map_coefficients(sampling: str, n: int, batch_size: float) -> tuple[float, float]:
    """``(a, b)`` of the second-moment map for a scheme, n samples and a (real) batch size.

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
    (batch size 0, i.e. no constraint)."""
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
    """``(cdf, guide)``: the Binomial(n, p) distribution function and its guide table.

    What the simulation kernel needs to draw Bernoulli batch sizes by table inversion.
    ``cdf[k] = P(K <= k)`` (``cdf[n] = 1`` exactly); ``guide[b]`` is a lower bound of the
    smallest k with ``cdf[k] > u`` for every u in [b / (n + 1), (b + 1) / (n + 1)), so inverting
    the cdf costs a look-up and about one comparison. Fresh, writable, C-contiguous float64 and
    int64 arrays (one kernel signature).
    """
    from scipy.stats import binom

    cdf = np.array(binom.cdf(np.arange(n + 1), n, min(probability, 1.0)), dtype=np.float64)
    cdf[n] = 1.0
    bins = n + 1
    # one less than the exact start, as a margin against rounding of u * bins at a bin edge
    guide = np.searchsorted(cdf, np.arange(bins) / bins, side="right") - 1
    return cdf, np.maximum(guide, 0).astype(np.int64)
