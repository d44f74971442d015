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

Scale: the caller scales ``rows`` so that its largest absolute entry is at most 1 and multiplies
the step size back (``simulate`` uses a power of two, so ordinary inputs give the same bits as
unscaled ones: only ``step_size ||u||^2`` matters). A step whose update could leave the float
range (``step_size sum_j |u_j^T W|`` above 1e140, with ``||W|| <= 1e50``: it takes
``step_size ||u||^2`` of order 1e89 / (m sqrt(d)) or more, m rows in the batch) is carried in
log form instead: ``apply_rows`` returns ``w_{t+1}`` divided by a known factor and the log of
its square (specification page, section "Certified answers and scale"). Ordinary steps never take
that path, so their results are bit for bit those of the plain update.

Every random number of run ``run`` comes from its own counter-based stream (``rng.py``), and each
run is processed by exactly one thread with no shared writes, so the result does not depend on
the number of threads or on how the steps are split into chunks.
"""

import math

import numpy as np
from numba import prange

from ._jit import jit, jit_parallel
from .rng import fill_normal, fill_uniform, next_index, next_uniform, stream_key

BERNOULLI = 0
WITHOUT_REPLACEMENT = 1
WITH_REPLACEMENT = 2
SCHEME_CODES = {"bernoulli": BERNOULLI, "without_replacement": WITHOUT_REPLACEMENT,
                "with_replacement": WITH_REPLACEMENT}

INIT_NORMAL = 0
INIT_UNIFORM = 1
INIT_FIXED = 2

# Renormalise W when ||W||^2 leaves [_LOW, _HIGH]: far from overflow and from the subnormal range.
_HIGH = 1e100
_LOW = 1e-100
# With |W_k| <= 1e50 and rows at most 1 in absolute value, an update whose coefficients sum (in
# absolute value) to at most _SAFE_UPDATE keeps every entry below 1e141 and ||W||^2 finite; a
# larger one is applied in log form (``_apply_rows_in_log_form``).
_SAFE_UPDATE = 1e140
# initialise_runs sums squares directly when the sum lies in this range (no entry's square can
# then have overflowed, and underflowed squares are negligible); otherwise it scales first.
_SQUARES_LOW = 1e-280
_SQUARES_HIGH = 1e280
_LOG_2 = math.log(2.0)


# ---------------------------------------------------------------------------------- sampling
@jit
def sample_distinct(key, counter, n, k, marks, permutation, batch):
    """k distinct uniform indices in [0, n) (a uniform k-subset) into ``batch[:k]``, O(k).

    For k <= n / 2, draw uniform indices and reject repeats, marked in ``marks`` (expected
    draws below 1.4 k); otherwise partial Fisher-Yates on ``permutation``. Both scratch arrays
    are all-zero / the identity on entry and again on return, so no state survives a step.
    Returns the counter.
    """
    if 2 * k <= n:
        j = 0
        while j < k:
            i, counter = next_index(key, counter, n)
            if marks[i] == 0:
                marks[i] = 1
                batch[j] = i
                j += 1
        for j in range(k):
            marks[batch[j]] = 0
        return counter
    for j in range(k):
        i, counter = next_index(key, counter, n - j)
        i += j
        chosen = permutation[i]
        permutation[i] = permutation[j]
        permutation[j] = chosen
        batch[j] = chosen
    # every position the shuffle touched is below k or holds an index now in the batch
    for j in range(k):
        permutation[batch[j]] = batch[j]
        permutation[j] = j
    return counter


@jit
def sample_bernoulli(key, counter, n, cdf, guide, marks, permutation, batch):
    """Each of the n samples independently with probability p: K ~ Binomial(n, p), then a
    uniform K-subset (which is the law of the included set given its size).

    K + 1 random numbers (plus rare rejections) for a batch of size K. This replaced geometric
    skipping (``floor(log u / log(1 - p))`` per included sample), which is exact too but
    spends a logarithm per draw: 1.6x slower sampling, about 12% of a step at n = 1000,
    d = 64, B = 32. Returns ``(K, counter)``; the indices ``batch[:K]`` are in random order.
    """
    u, counter = next_uniform(key, counter)
    bins = guide.shape[0]
    b = int(u * bins)
    if b >= bins:
        b = bins - 1
    count = guide[b]
    while count < n and cdf[count] <= u:
        count += 1
    counter = sample_distinct(key, counter, n, count, marks, permutation, batch)
    return count, counter


@jit
def sample_with_replacement(key, counter, n, batch_size, batch):
    """batch_size independent uniform indices. Returns ``(batch_size, counter)``."""
    for j in range(batch_size):
        batch[j], counter = next_index(key, counter, n)
    return batch_size, counter


@jit
def draw_batch(scheme, key, counter, n, batch_size, cdf, guide, marks, permutation, batch):
    """One batch of the given scheme; the only sampler the simulation (and the tests' replays,
    ``tests/kernels_for_tests.py``) call. ``cdf`` and ``guide``: ``sampling.bernoulli_tables``."""
    if scheme == BERNOULLI:
        return sample_bernoulli(key, counter, n, cdf, guide, marks, permutation, batch)
    if scheme == WITHOUT_REPLACEMENT:
        return batch_size, sample_distinct(key, counter, n, batch_size, marks, permutation, batch)
    return sample_with_replacement(key, counter, n, batch_size, batch)


# ---------------------------------------------------------------------------------- one step
@jit
def apply_rows(rows, row_index, m, step_size, coefficients, w):
    """``w <- w - step_size sum_{j < m} u_j (u_j^T w)``, u_j = ``rows[row_index[j]]``.

    Returns ``(sq, log_factor)``: afterwards ``w`` holds ``w_new / f`` with ``log f^2 =
    log_factor`` and ``sq = ||w_new / f||^2``. ``f = 1`` (``log_factor = 0``, exactly the plain
    update) unless the update could overflow (rows at most 1 in absolute value and ``||w||^2
    <= 1e100`` assumed, as ``simulate_chunk`` keeps them); then the step is carried in log form
    (``_apply_rows_in_log_form``). All projections use the old w, so they are all taken first
    (``coefficients`` is scratch of length >= m). Rows are processed eight at a time: one pass
    over w serves eight dot products, and one load and store of w serves eight updates (the
    kernel is bound by loads and stores, not by multiplications; eight measured 8% faster than
    four at d = 64).
    """
    d = w.shape[0]
    j = 0
    while j + 8 <= m:
        r0 = row_index[j]
        r1 = row_index[j + 1]
        r2 = row_index[j + 2]
        r3 = row_index[j + 3]
        r4 = row_index[j + 4]
        r5 = row_index[j + 5]
        r6 = row_index[j + 6]
        r7 = row_index[j + 7]
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        s4 = 0.0
        s5 = 0.0
        s6 = 0.0
        s7 = 0.0
        for k in range(d):
            x = w[k]
            s0 += rows[r0, k] * x
            s1 += rows[r1, k] * x
            s2 += rows[r2, k] * x
            s3 += rows[r3, k] * x
            s4 += rows[r4, k] * x
            s5 += rows[r5, k] * x
            s6 += rows[r6, k] * x
            s7 += rows[r7, k] * x
        coefficients[j] = step_size * s0
        coefficients[j + 1] = step_size * s1
        coefficients[j + 2] = step_size * s2
        coefficients[j + 3] = step_size * s3
        coefficients[j + 4] = step_size * s4
        coefficients[j + 5] = step_size * s5
        coefficients[j + 6] = step_size * s6
        coefficients[j + 7] = step_size * s7
        j += 8
    while j < m:
        r0 = row_index[j]
        s0 = 0.0
        for k in range(d):
            s0 += rows[r0, k] * w[k]
        coefficients[j] = step_size * s0
        j += 1
    # |update entry| <= sum_j |coefficient_j| (rows at most 1): decide before w is overwritten
    bound = 0.0
    for j in range(m):
        bound += abs(coefficients[j])
    if bound > _SAFE_UPDATE:  # also an overflowed (infinite) coefficient
        return _apply_rows_in_log_form(rows, row_index, m, step_size, coefficients, w)
    j = 0
    while j + 8 <= m:
        r0 = row_index[j]
        r1 = row_index[j + 1]
        r2 = row_index[j + 2]
        r3 = row_index[j + 3]
        r4 = row_index[j + 4]
        r5 = row_index[j + 5]
        r6 = row_index[j + 6]
        r7 = row_index[j + 7]
        a0 = coefficients[j]
        a1 = coefficients[j + 1]
        a2 = coefficients[j + 2]
        a3 = coefficients[j + 3]
        a4 = coefficients[j + 4]
        a5 = coefficients[j + 5]
        a6 = coefficients[j + 6]
        a7 = coefficients[j + 7]
        for k in range(d):
            w[k] -= (((a0 * rows[r0, k] + a1 * rows[r1, k]) + (a2 * rows[r2, k] + a3 * rows[r3, k]))
                     + ((a4 * rows[r4, k] + a5 * rows[r5, k]) + (a6 * rows[r6, k] + a7 * rows[r7, k])))
        j += 8
    while j < m:
        r0 = row_index[j]
        a0 = coefficients[j]
        for k in range(d):
            w[k] -= a0 * rows[r0, k]
        j += 1
    sq = 0.0
    for k in range(d):
        sq += w[k] * w[k]
    return sq, 0.0


@jit
def _apply_rows_in_log_form(rows, row_index, m, step_size, coefficients, w):
    """``apply_rows`` for a step whose update could overflow: ``w_new`` divided by a factor.

    With ``w = b w_hat`` (``b = max |w_k|``), ``s_j = u_j^T w_hat`` and ``S = sum_j |s_j| > 0``,

        w_new / (b step_size S) = w_hat / (step_size S) - sum_j (s_j / S) u_j,

    every term of which is at most 1 in absolute value (rows at most 1), whatever step_size
    (up to the largest float) and S: the per-step factor ``b step_size S`` goes into the log,
    never into a product. Returns ``(sq, log_factor)`` as ``apply_rows`` does.
    """
    d = w.shape[0]
    biggest = 0.0
    for k in range(d):
        biggest = max(biggest, abs(w[k]))
    log_factor = 2.0 * math.log(biggest)
    for k in range(d):
        w[k] /= biggest
    total = 0.0
    for j in range(m):
        r0 = row_index[j]
        s0 = 0.0
        for k in range(d):
            s0 += rows[r0, k] * w[k]
        coefficients[j] = s0
        total += abs(s0)
    if total > 0.0:
        log_factor += 2.0 * (math.log(step_size) + math.log(total))
        product = step_size * total
        if product < 1e300:
            for k in range(d):
                w[k] /= product
        else:  # the product is at (or past) the top of the float range: divide in two steps
            for k in range(d):
                w[k] = w[k] / total / step_size
        for j in range(m):
            r0 = row_index[j]
            a0 = coefficients[j] / total
            for k in range(d):
                w[k] -= a0 * rows[r0, k]
    sq = 0.0
    for k in range(d):
        sq += w[k] * w[k]
    return sq, log_factor


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
def initialise_runs(seed, first_run, init_kind, init_vector, W, counters, log_scale):
    """Draw or copy w_0 for every run into ``W`` (unit norm) and ``log_scale`` (log ||w_0||^2).

    Row ``run`` of ``W`` is the global run ``first_run + run`` (the key of its stream), so a
    block of runs computed alone has the bits of the same rows of the whole simulation. Normal
    and uniform draws come from the run's own stream, which then continues in the steps.
    """
    runs, d = W.shape
    for run in prange(runs):
        # np.uint64: Numba types a prange index as int64 here and as uint64 in simulate_chunk,
        # which compiled stream_key twice
        key = stream_key(seed, np.uint64(first_run) + np.uint64(run))
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
        log_sq = math.log(sq) if sq > 0.0 else -math.inf
        if not _SQUARES_LOW <= sq <= _SQUARES_HIGH:
            # squares overflowed or underflowed (|w_0| of 1e200 or 1e-300): scale by a power
            # of two to a largest entry in [0.5, 1) first, as a careful hypot does
            biggest = 0.0
            for k in range(d):
                biggest = max(biggest, abs(w[k]))
            if biggest > 0.0:
                exponent = math.frexp(biggest)[1]
                sq = 0.0
                for k in range(d):
                    w[k] = math.ldexp(w[k], -exponent)
                    sq += w[k] * w[k]
                log_sq = math.log(sq) + 2.0 * exponent * _LOG_2
        if sq > 0.0:
            scale = 1.0 / math.sqrt(sq)
            for k in range(d):
                w[k] *= scale
        log_scale[run] = log_sq
        counters[run] = counter


@jit_parallel
def simulate_chunk(rows, rank, scheme, batch_size, step_size, cdf, guide, seed, first_run,
                   first_step, last_step, steps, record_every, log_threshold,
                   W, log_scale, counters, first_diverged, log_sq_norm):
    """Advance every run from step ``first_step`` to ``last_step`` (t = first_step + 1 .. last_step).

    ``rows`` at most 1 in absolute value (see the module docstring; ``step_size`` carries the
    scale).

    Records ``log ||w_t||^2`` into ``log_sq_norm[run, t // record_every]`` when record_every
    divides t, and into the last column at t = steps. ``first_diverged[run]`` (-1 until then) is
    the first t with ``log ||w_t||^2 >= log_threshold[run]``, checked at every step.
    ``cdf`` and ``guide`` are the Bernoulli tables (``sampling.bernoulli_tables``; unused
    otherwise).
    """
    runs, d = W.shape
    n = rows.shape[0] // rank
    capacity = n if scheme == BERNOULLI else batch_size
    last_column = log_sq_norm.shape[1] - 1
    for run in prange(runs):
        key = stream_key(seed, np.uint64(first_run) + np.uint64(run))  # (as in initialise_runs)
        counter = counters[run]
        batch = np.empty(capacity, dtype=np.int64)
        row_index = np.empty(capacity * rank, dtype=np.int64)
        coefficients = np.empty(capacity * rank)
        marks = np.zeros(n, dtype=np.uint8)
        permutation = np.arange(n)
        w = W[run]
        scale = log_scale[run]
        diverged_at = first_diverged[run]
        # ||w_t||^2 >= threshold  <=>  ||W||^2 >= exp(log_threshold - scale)
        threshold = math.exp(log_threshold[run] - scale)
        # the next recorded step and its column (a countdown instead of a division per step)
        column = first_step // record_every + 1
        next_record = column * record_every
        for t in range(first_step + 1, last_step + 1):
            count, counter = draw_batch(scheme, key, counter, n, batch_size, cdf, guide, marks,
                                        permutation, batch)
            if rank == 1:
                sq, log_factor = apply_rows(rows, batch, count, step_size, coefficients, w)
            else:
                m = batch_rows(batch, count, rank, row_index)
                sq, log_factor = apply_rows(rows, row_index, m, step_size, coefficients, w)
            if log_factor != 0.0:
                # a step too large for floats, carried in log form: W is w_t / exp(scale / 2)
                scale += log_factor
                threshold = math.exp(log_threshold[run] - scale)
            # (sq > 0: when a step jumps e^745 past the threshold, threshold underflows to 0)
            if diverged_at < 0 and sq >= threshold and sq > 0.0:
                diverged_at = t
            if (sq > _HIGH or sq < _LOW) and sq > 0.0 and sq < math.inf:
                factor = 1.0 / math.sqrt(sq)
                for k in range(d):
                    w[k] *= factor
                scale += math.log(sq)
                sq = 1.0
                threshold = math.exp(log_threshold[run] - scale)
            if t == next_record:
                log_sq_norm[run, column] = scale + math.log(sq)
                column += 1
                next_record += record_every
            elif t == steps:
                log_sq_norm[run, last_column] = scale + math.log(sq)
        log_scale[run] = scale
        counters[run] = counter
        first_diverged[run] = diverged_at
