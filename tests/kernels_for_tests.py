"""Kernels that only the tests call: the batches the simulation draws, for exact replays.

Kept out of ``fastsgdstab/_kernels/`` (which ships only what the library runs). The kernel calls
the library's own samplers (``bernoulli_count``, ``sample_distinct``,
``sample_with_replacement``, with the same scratch) on the same per-run streams as the
simulation kernels, so a replay sees exactly the simulation's batches. Compiled without a disk
cache: a cached copy would hold the samplers compiled in and could outlive a change to
``_kernels/``.
"""

import numba
import numpy as np

from fastsgdstab._kernels import sgd
from fastsgdstab._kernels.rng import stream_key
from fastsgdstab.sampling import bernoulli_tables

BERNOULLI, WITHOUT_REPLACEMENT, WITH_REPLACEMENT = 0, 1, 2
SCHEME_CODES = {"bernoulli": BERNOULLI, "without_replacement": WITHOUT_REPLACEMENT,
                "with_replacement": WITH_REPLACEMENT}


def sample_batches(scheme, n, batch_size, cdf, guide, seed, runs, steps, capacity):
    """The batches the simulation would draw from fresh streams (counter 0, as with a fixed w_0).

    Returns ``(counts, indices)`` of shapes (runs, steps) and (runs, steps, capacity), unused
    index slots -1. The samplers' scratch is the library's (``sgd.scratch``), reused run after
    run as the kernels reuse it.
    """
    marks, table, slots, permutation, batch = sgd.scratch(
        n, cdf.shape[0] - 1 if scheme == BERNOULLI else batch_size, 1, 1)[:5]
    return _sample_batches(scheme, n, batch_size, cdf, guide, seed, runs, steps, capacity, marks,
                           table, slots, permutation, batch)


@numba.njit(cache=False)
def _sample_batches(scheme, n, batch_size, cdf, guide, seed, runs, steps, capacity, marks, table,
                    slots, permutation, batch):
    """The batches the simulation would draw from fresh streams (counter 0, as with a fixed w_0).

    Returns ``(counts, indices)`` of shapes (runs, steps) and (runs, steps, capacity), unused
    index slots -1.
    """
    counts = np.zeros((runs, steps), dtype=np.int64)
    indices = np.full((runs, steps, capacity), -1, dtype=np.int64)
    for run in range(runs):
        key = stream_key(seed, np.uint64(run))  # as the library's kernels pass it
        counter = np.uint64(0)
        for t in range(steps):
            if scheme == BERNOULLI:
                # as the kernels draw a Bernoulli batch: its size, then a uniform subset
                count, counter = sgd.bernoulli_count(key, counter, n, cdf, guide)
                counter = sgd.sample_distinct(key, counter, n, count, marks, table, slots,
                                              permutation, batch)
            elif scheme == WITHOUT_REPLACEMENT:
                count = batch_size
                counter = sgd.sample_distinct(key, counter, n, batch_size, marks, table,
                                              slots, permutation, batch)
            else:
                count, counter = sgd.sample_with_replacement(key, counter, n, batch_size, batch)
            counts[run, t] = count
            for j in range(count):
                indices[run, t, j] = batch[j]
    return counts, indices


def batches(scheme, n, batch_size, runs, steps, seed=0):
    """``sample_batches`` for a scheme name and a batch size, as ``simulate`` passes them."""
    code = SCHEME_CODES[scheme]
    capacity = n if scheme == "bernoulli" else int(batch_size)
    cdf, guide = bernoulli_tables(n, batch_size / n)
    return sample_batches(code, n, int(batch_size), cdf, guide, seed, runs, steps, capacity)

