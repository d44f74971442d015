"""The three batch-sampling schemes and the coefficients of their second-moment maps.

See the theory page, sections "Setting" and "The exact second-moment map":
``Q(X) = X - lr (H X + X H) + lr^2 (a H X H + b N(X))``, and section "Exact critical batch
size" for the noise scalar ``q`` through which the batch size enters.
"""

from __future__ import annotations

import math

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


def noise_scalar(sampling: str, n: int, batch_size: float) -> float:
    """The scalar q through which the batch size enters ``Q = I - lr R + lr^2 q V``."""
    return map_coefficients(sampling, n, batch_size)[1]


def batch_size_from_noise(sampling: str, n: int, q: float) -> float:
    """Inverse of :func:`noise_scalar` (q may be ``inf``: batch size 0, i.e. no constraint)."""
    if math.isinf(q):
        return 0.0
    if sampling == "bernoulli":
        return 1.0 / (q + 1.0 / n)
    if sampling == "without_replacement":
        return n / (q * (n - 1) + 1.0)
    if sampling == "with_replacement":
        return math.inf if q <= 0 else 1.0 / q
    raise ValueError(f"unknown sampling {sampling!r}")
