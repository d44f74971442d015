"""Monte-Carlo kernels for linearised SGD, ``w <- (I - lr H_batch) w``, many runs at once.

Layout: ``rows`` is the (n r, d) array whose row ``i r + c`` is column c of ``U_i`` (contiguous,
so a sampled sample's factor is r contiguous rows of length d). A step touches only the sampled
rows: ``H_batch w = (1/B) sum_{i in batch} U_i (U_i^T w)`` with B the nominal batch size (also
under Bernoulli sampling, where the realised batch size is random and may be 0).

State of a run, all held by the caller so that a chunk of steps either completes or leaves it
untouched from Python's point of view: the direction ``W[run]`` (some positive multiple of w_t),
``log_scale[run]`` with ``||w_t||^2 = exp(log_scale) ||W[run]||^2``, the stream counter, and the
first step at which the divergence rule fired. Renormalisation is lazy (only when ``||W||^2``
leaves [1e-100, 1e100]): exact logs without a division and a logarithm in every step.

Every random number of run ``run`` comes from its own counter-based stream (``rng.py``), and each
run is processed by exactly one thread with no shared writes, so the result does not depend on
the number of threads or on how the steps are split into chunks.
"""

import math

import numpy as np
from numba import prange

from ._jit import jit, jit_parallel
from .rng import fill_normal, fill_uniform, next_index, next_uniform_open, stream_key

BERNOULLI = 0
WITHOUT_REPLACEMENT = 1
WITH_REPLACEMENT = 2
SCHEME_CODES = {"bernoulli": BERNOULLI, "without_replacement": WITHOUT_REPLACEMENT,
                "with_replacement": WITH_REPLACEMENT}

INIT_NORMAL = 0
INIT_UNIFORM = 1
INIT_FIXED = 2

# Renormalise W when ||W||^2 leaves [_LOW, _HIGH]: far from overflow (one step would have to grow
# ||w||^2 by 1e208 to overflow) and from the subnormal range.
_HIGH = 1e100
_LOW = 1e-100


# ---------------------------------------------------------------------------------- sampling
@jit
def sample_bernoulli(key, counter, n, inverse_log_keep, batch):
    """Each of the n samples independently with probability p, by geometric skipping.

    The gap before the next included index is Geometric(p): ``floor(log u / log(1 - p))`` with u
    uniform in (0, 1) has P(gap >= g) = (1 - p)^g. ``inverse_log_keep = 1 / log1p(-p)``
    (``-0.0`` when p = 1: every gap is 0). Uses K + 1 random numbers for a batch of size K.
    (A guide-table inversion without the logarithm was tried: no faster, because of the
    data-dependent branch of the table search.) Returns ``(K, counter)``; the indices are
    ``batch[:K]``, increasing.
    """
    count = 0
    position = -1
    while True:
        u, counter = next_uniform_open(key, counter)
        gap = math.log(u) * inverse_log_keep
        if gap >= n - 1 - position:  # compared as floats: a gap may exceed any integer type
            break
        position += 1 + int(gap)
        batch[count] = position
        count += 1
    return count, counter


def bernoulli_skip_constant(probability):
    """``1 / log(1 - p)`` for ``sample_bernoulli`` (-0.0 at p = 1: include everything)."""
    return 1.0 / math.log1p(-probability) if probability < 1.0 else -0.0


@jit
def sample_without_replacement(key, counter, n, batch_size, permutation, batch):
    """A uniform batch_size-subset in O(batch_size): partial Fisher-Yates on ``permutation``.

    ``permutation`` must be the identity on entry and is the identity again on return (every
    position the shuffle touched is either below batch_size or holds an index now in the
    batch), so no state survives between steps. Returns ``(batch_size, counter)``.
    """
    for j in range(batch_size):
        k, counter = next_index(key, counter, n - j)
        k += j
        chosen = permutation[k]
        permutation[k] = permutation[j]
        permutation[j] = chosen
        batch[j] = chosen
    for j in range(batch_size):
        permutation[batch[j]] = batch[j]
        permutation[j] = j
    return batch_size, counter


@jit
def sample_with_replacement(key, counter, n, batch_size, batch):
    """batch_size independent uniform indices. Returns ``(batch_size, counter)``."""
    for j in range(batch_size):
        batch[j], counter = next_index(key, counter, n)
    return batch_size, counter


@jit
def draw_batch(scheme, key, counter, n, batch_size, inverse_log_keep, permutation, batch):
    """One batch of the given scheme; the only sampler the simulation and the tests call."""
    if scheme == BERNOULLI:
        return sample_bernoulli(key, counter, n, inverse_log_keep, batch)
    if scheme == WITHOUT_REPLACEMENT:
        return sample_without_replacement(key, counter, n, batch_size, permutation, batch)
    return sample_with_replacement(key, counter, n, batch_size, batch)


# ---------------------------------------------------------------------------------- one step
@jit
def apply_rows(rows, row_index, m, step_size, coefficients, w):
    """``w <- w - step_size sum_{j < m} u_j (u_j^T w)``, u_j = ``rows[row_index[j]]``.

    Returns the new ``||w||^2``. All projections use the old w, so they are all taken first
    (``coefficients`` is scratch of length >= m). Rows are processed four at a time: one pass
    over w serves four dot products, and one load and store of w serves four updates (the
    kernel is bound by loads and stores, not by multiplications).
    """
    d = w.shape[0]
    j = 0
    while j + 4 <= m:
        r0 = row_index[j]
        r1 = row_index[j + 1]
        r2 = row_index[j + 2]
        r3 = row_index[j + 3]
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        for k in range(d):
            x = w[k]
            s0 += rows[r0, k] * x
            s1 += rows[r1, k] * x
            s2 += rows[r2, k] * x
            s3 += rows[r3, k] * x
        coefficients[j] = step_size * s0
        coefficients[j + 1] = step_size * s1
        coefficients[j + 2] = step_size * s2
        coefficients[j + 3] = step_size * s3
        j += 4
    while j < m:
        r0 = row_index[j]
        s0 = 0.0
        for k in range(d):
            s0 += rows[r0, k] * w[k]
        coefficients[j] = step_size * s0
        j += 1
    j = 0
    while j + 4 <= m:
        r0 = row_index[j]
        r1 = row_index[j + 1]
        r2 = row_index[j + 2]
        r3 = row_index[j + 3]
        a0 = coefficients[j]
        a1 = coefficients[j + 1]
        a2 = coefficients[j + 2]
        a3 = coefficients[j + 3]
        for k in range(d):
            w[k] -= (a0 * rows[r0, k] + a1 * rows[r1, k]) + (a2 * rows[r2, k] + a3 * rows[r3, k])
        j += 4
    while j < m:
        r0 = row_index[j]
        a0 = coefficients[j]
        for k in range(d):
            w[k] -= a0 * rows[r0, k]
        j += 1
    sq = 0.0
    for k in range(d):
        sq += w[k] * w[k]
    return sq


@jit
def batch_rows(batch, count, rank, row_index):
    """Rows ``i r + c`` (c < r) of the sampled samples; returns their number, count * r."""
    m = 0
    for j in range(count):
        base = batch[j] * rank
        for c in range(rank):
            row_index[m] = base + c
            m += 1
    return m


# ---------------------------------------------------------------------------------- kernels
@jit_parallel
def initialise_runs(seed, init_kind, init_vector, W, counters, log_scale):
    """Draw or copy w_0 for every run into ``W`` (unit norm) and ``log_scale`` (log ||w_0||^2).

    Normal and uniform draws come from the run's own stream, which then continues in the steps.
    """
    runs, d = W.shape
    for run in prange(runs):
        key = stream_key(seed, run)
        counter = np.uint64(0)
        w = W[run]
        if init_kind == INIT_NORMAL:
            counter = fill_normal(key, counter, w)
        elif init_kind == INIT_UNIFORM:
            counter = fill_uniform(key, counter, w)
        else:
            for k in range(d):
                w[k] = init_vector[k]
        sq = 0.0
        for k in range(d):
            sq += w[k] * w[k]
        if sq > 0.0:
            scale = 1.0 / math.sqrt(sq)
            for k in range(d):
                w[k] *= scale
        log_scale[run] = math.log(sq) if sq > 0.0 else -math.inf
        counters[run] = counter


@jit_parallel
def simulate_chunk(rows, rank, scheme, batch_size, step_size, inverse_log_keep, seed,
                   first_step, last_step, steps, record_every, log_threshold,
                   W, log_scale, counters, first_diverged, log_sq_norm):
    """Advance every run from step ``first_step`` to ``last_step`` (t = first_step + 1 .. last_step).

    Records ``log ||w_t||^2`` into ``log_sq_norm[run, t // record_every]`` when record_every
    divides t, and into the last column at t = steps. ``first_diverged[run]`` (-1 until then) is
    the first t with ``log ||w_t||^2 >= log_threshold[run]``, checked at every step.
    ``inverse_log_keep`` is ``1 / log(1 - B / n)`` (used by Bernoulli sampling only).
    """
    runs, d = W.shape
    n = rows.shape[0] // rank
    capacity = n if scheme == BERNOULLI else batch_size
    last_column = log_sq_norm.shape[1] - 1
    for run in prange(runs):
        key = stream_key(seed, run)
        counter = counters[run]
        batch = np.empty(capacity, dtype=np.int64)
        row_index = np.empty(capacity * rank, dtype=np.int64)
        coefficients = np.empty(capacity * rank)
        if scheme == WITHOUT_REPLACEMENT:
            permutation = np.arange(n)
        else:
            permutation = np.empty(0, dtype=np.int64)
        w = W[run]
        scale = log_scale[run]
        diverged_at = first_diverged[run]
        # ||w_t||^2 >= threshold  <=>  ||W||^2 >= exp(log_threshold - scale)
        threshold = math.exp(log_threshold[run] - scale)
        for t in range(first_step + 1, last_step + 1):
            count, counter = draw_batch(scheme, key, counter, n, batch_size, inverse_log_keep,
                                        permutation, batch)
            if rank == 1:
                sq = apply_rows(rows, batch, count, step_size, coefficients, w)
            else:
                m = batch_rows(batch, count, rank, row_index)
                sq = apply_rows(rows, row_index, m, step_size, coefficients, w)
            if diverged_at < 0 and sq >= threshold:
                diverged_at = t
            if (sq > _HIGH or sq < _LOW) and sq > 0.0 and sq < math.inf:
                factor = 1.0 / math.sqrt(sq)
                for k in range(d):
                    w[k] *= factor
                scale += math.log(sq)
                sq = 1.0
                threshold = math.exp(log_threshold[run] - scale)
            if t % record_every == 0:
                log_sq_norm[run, t // record_every] = scale + math.log(sq)
            elif t == steps:
                log_sq_norm[run, last_column] = scale + math.log(sq)
        log_scale[run] = scale
        counters[run] = counter
        first_diverged[run] = diverged_at


@jit_parallel
def sample_batches(scheme, n, batch_size, inverse_log_keep, seed, runs, steps, capacity):
    """The batches the simulation would draw from a fresh stream: for the tests.

    Returns ``(counts, indices)`` of shapes (runs, steps) and (runs, steps, capacity), unused
    index slots -1. Streams start at counter 0 and call the same ``draw_batch`` as the kernel.
    """
    counts = np.zeros((runs, steps), dtype=np.int64)
    indices = np.full((runs, steps, capacity), -1, dtype=np.int64)
    for run in prange(runs):
        key = stream_key(seed, run)
        counter = np.uint64(0)
        batch = np.empty(capacity, dtype=np.int64)
        permutation = np.arange(n)
        for t in range(steps):
            count, counter = draw_batch(scheme, key, counter, n, batch_size, inverse_log_keep,
                                        permutation, batch)
            counts[run, t] = count
            for j in range(count):
                indices[run, t, j] = batch[j]
    return counts, indices
