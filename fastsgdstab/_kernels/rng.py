"""Counter-based per-run random streams.

Each Monte-Carlo run has its own stream, keyed by ``(seed, run)``; draw number ``c`` of a stream
is a pure function of ``(key, c)``:

    key     = mix(mix(seed + GOLDEN) + (run + 1) * GOLDEN)
    draw(c) = mix(key + (c + 1) * GOLDEN)

with ``mix`` the SplitMix64 finaliser (Steele, Lea & Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014; the constants are Vigna's ``splitmix64.c``). ``draw(c)`` for
c = 0, 1, ... is exactly the SplitMix64 sequence started at ``key``, which passes BigCrush. A run's
whole state is one ``uint64`` counter, so results depend only on (seed, run), never on which
thread ran the run, on the number of threads, or on how the steps were split into chunks.

Numba trap: mixing ``uint64`` with a signed integer promotes to ``float64``. Every integer
constant below is a ``np.uint64`` and every signed input is converted first.
"""

import math

import numpy as np

from ._jit import jit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_S12 = np.uint64(12)
_ONE = np.uint64(1)
_INV_2_53 = 1.0 / 9007199254740992.0  # 2^-53
_INV_2_52 = 1.0 / 4503599627370496.0  # 2^-52
_TWO_PI = 2.0 * math.pi


@jit
def mix64(z):
    """SplitMix64 finaliser: a bijection of uint64 with full avalanche."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@jit
def stream_key(seed, run):
    """The key of run ``run``'s stream under ``seed`` (both non-negative integers < 2^63)."""
    k = mix64(np.uint64(seed) + _GOLDEN)
    return mix64(k + (np.uint64(run) + _ONE) * _GOLDEN)


@jit
def next_uint64(key, counter):
    """Draw number ``counter`` of the stream; returns ``(bits, counter + 1)``."""
    counter = counter + _ONE
    return mix64(key + counter * _GOLDEN), counter


@jit
def next_uniform(key, counter):
    """Uniform double in [0, 1) on the 2^53 grid (the top 53 bits of a draw)."""
    bits, counter = next_uint64(key, counter)
    return float(bits >> _S11) * _INV_2_53, counter


@jit
def next_uniform_open(key, counter):
    """Uniform double in (0, 1), for draws whose ``log`` is taken.

    The top 52 bits plus one half, times 2^-52: values (k + 1/2) 2^-52, from 2^-53 (log = -36.7)
    to 1 - 2^-53, both exactly representable, so the log is finite and strictly negative. (With
    53 bits, (2^53 - 1/2) 2^-53 would round to exactly 1.)
    """
    bits, counter = next_uint64(key, counter)
    return (float(bits >> _S12) + 0.5) * _INV_2_52, counter


@jit
def next_index(key, counter, m):
    """Uniform integer in [0, m) for 1 <= m < 2^52 (``floor(u m)``; bias at most m 2^-53)."""
    u, counter = next_uniform(key, counter)
    i = int(u * m)
    if i >= m:  # cannot happen for m < 2^52, kept as a guard against rounding
        i = m - 1
    return i, counter


@jit
def fill_normal(key, counter, out):
    """Fill ``out`` with independent N(0, 1) draws (Box-Muller, both outputs of each pair used)."""
    m = out.shape[0]
    j = 0
    while j < m:
        u1, counter = next_uniform_open(key, counter)
        u2, counter = next_uniform(key, counter)
        radius = math.sqrt(-2.0 * math.log(u1))
        angle = _TWO_PI * u2
        out[j] = radius * math.cos(angle)
        if j + 1 < m:
            out[j + 1] = radius * math.sin(angle)
        j += 2
    return counter


@jit
def fill_uniform(key, counter, out):
    """Fill ``out`` with Uniform[0, 1) draws."""
    for j in range(out.shape[0]):
        out[j], counter = next_uniform(key, counter)
    return counter
