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

Every random number of run ``run`` comes from its own counter-based stream (``rng.py``) keyed by
its global index (``first_run`` plus its row), and each run is processed by exactly one thread
with no shared writes, so the result does not depend on the number of threads, on how the
steps are split into chunks, or on how the runs are split into blocks.

Two serial kernels that release the GIL: ``chunk_linear`` and ``chunk_affine`` (families with
per-sample gradients), each compiled per sampling scheme (``SCHEME_*``) with or without momentum
(``linear_kernel``, ``affine_kernel``; the block of variants below), each variant once, with one
signature, whatever the family: a cold start compiles the variant it runs (and the
``initialise_runs`` of its kind of w_0), not a ``parallel=True`` kernel per scheme (whose
compilation was most of the first ``simulate``'s 20 s) nor the code of the other paths. The caller
(``fastsgdstab._blocks``) runs parts of the runs (slices of the state) on its own threads. The
step (the batch product and, with momentum, the second state vector ``Z[run]``, renormalised
with ``W[run]``) is written out in the kernels; its helpers (``after_step``, ``apply_rows``,
``batch_rows``, ``bernoulli_count``, ``sample_distinct``) are inlined at Numba IR level
(``jit_inline``), each at one call site per kernel: as separate functions, every call increfed
and decrefed each array argument, about 30 per step, which cost 15-20% of the throughput at
n = 1000, d = 64, B = 32. Scratch is allocated by the caller (``scratch``: no numpy allocator
is compiled into a kernel) and reused run after run: O(B) whatever n (``index_set``,
``shuffle_scratch``, Binomial tables cut where the cdf
reaches 1); only reshuffling keeps O(n) per run, its permutation.
"""

import math
import threading

import numpy as np

from ._jit import jit, jit_inline
from .rng import fill_normal, fill_uniform, next_index, next_uniform, stream_key

MOMENTUM_NONE = 0
HEAVY_BALL = 1
NESTEROV = 2

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
# index_set gives a mark per index (n bytes) for n up to this, a hash set beyond
_DIRECT_INDICES = 4096


# ---------------------------------------------------------------------------------- variants
# Each kernel is a closure over the choices its caller makes once per simulation (the sampling
# scheme, momentum or not, the kind of w_0): Numba reads a closure's integers and booleans as
# constants and prunes the branches they rule out before typing, so a kernel compiles only the
# code of its own path (the first plain Bernoulli simulation compiles neither the momentum
# update, nor shuffling, nor sampling with replacement). The same source serves every path, so
# a path's arithmetic is that of the single kernel it replaced, bit for bit. Numba's disk cache
# keys a closure by the values of its cells: every variant has its own entry.
_VARIANTS = {}
_VARIANTS_LOCK = threading.Lock()


def _variant(factory, *key):
    """``factory(*key)`` (a kernel), made once per process: one dispatcher per variant, so a
    variant compiles (or loads from the cache) once."""
    kernel = _VARIANTS.get((factory, key))
    if kernel is None:
        with _VARIANTS_LOCK:
            kernel = _VARIANTS.get((factory, key))
            if kernel is None:
                kernel = _VARIANTS[(factory, key)] = factory(*key)
    return kernel


# ---------------------------------------------------------------------------------- sampling
def index_set(n, capacity):
    """Scratch for ``sample_distinct``: ``(marks, table, slots)`` for up to ``capacity``
    distinct indices in [0, n).

    For n up to ``_DIRECT_INDICES``, a mark per index (``marks``, n bytes, at most 4 kB: the
    fastest membership test, 1.5-2.5x faster sampling than a table of int64 at n = 1000,
    B = 32), and empty ``table`` and ``slots``. Beyond, an empty ``marks`` and an
    open-addressing hash set ``table`` (-1 = empty) of a power-of-two size at least 2 capacity,
    addressed by the index's low bits (the indices are uniform, so their low bits are too),
    with ``slots`` recording where each index went, to empty the table in O(k). Either way
    O(capacity) memory whatever n (plus at most 4 kB). Plain numpy, called by the kernels'
    callers (``scratch``): an allocation inside a kernel compiles numpy's allocators into it.
    """
    if n <= _DIRECT_INDICES:
        return (np.zeros(n, dtype=np.uint8), np.empty(0, dtype=np.int64),
                np.empty(0, dtype=np.int64))
    size = 2
    while size < 2 * capacity:
        size *= 2
    return (np.zeros(0, dtype=np.uint8), np.full(size, -1, dtype=np.int64),
            np.empty(max(capacity, 1), dtype=np.int64))


def shuffle_scratch(n, capacity):
    """The identity permutation of [0, n) when ``sample_distinct`` may need it (2 k > n for
    some k <= capacity, so n < 2 capacity: O(capacity)); otherwise an empty array."""
    return np.arange(n if 2 * capacity > n else 0)


def scratch(n, capacity, rank, d):
    """Scratch of the chunk kernels for one block of runs, allocated by the caller and reused
    run after run (every array is overwritten, or left empty / the identity, by each step):
    ``(marks, table, slots, permutation, batch, row_index, coefficients, saved)`` for batches
    of at most ``capacity`` samples out of n, rank-``rank`` factors in dimension d."""
    marks, table, slots = index_set(n, capacity)
    size = max(capacity, 1)
    return (marks, table, slots, shuffle_scratch(n, capacity), np.empty(size, dtype=np.int64),
            np.empty(size * rank, dtype=np.int64), np.empty(size * rank), np.empty(d))


@jit_inline
def sample_distinct(key, counter, n, k, marks, table, slots, permutation, batch):
    """k distinct uniform indices in [0, n) (a uniform k-subset) into ``batch[:k]``, O(k).

    For k <= n / 2, draw uniform indices and reject repeats, found in ``marks`` or the hash
    set ``table`` (``index_set``; expected draws below 1.4 k); otherwise partial Fisher-Yates
    on ``permutation`` (``shuffle_scratch``, of size n < 2 k). The scratch arrays are empty /
    the identity on entry and again on return, so no state survives a step. The batch depends
    only on the random numbers, not on the membership test (the mark array of size n that the
    hash set replaced at large n gave the same bits). Returns the counter.
    """
    if 2 * k <= n:
        if marks.shape[0] > 0:
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
        mask = table.shape[0] - 1
        j = 0
        while j < k:
            i, counter = next_index(key, counter, n)
            slot = i & mask
            held = table[slot]
            while held >= 0 and held != i:
                slot = (slot + 1) & mask
                held = table[slot]
            if held < 0:  # not a repeat
                table[slot] = i
                slots[j] = slot
                batch[j] = i
                j += 1
        for j in range(k):
            table[slots[j]] = -1
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


@jit_inline
def bernoulli_count(key, counter, n, cdf, guide):
    """Bernoulli sampling, each of the n samples independently with probability p, is drawn as
    K ~ Binomial(n, p), here, then a uniform K-subset (``sample_distinct``), which is the law
    of the included set given its size: K + 1 random numbers (plus rare rejections) for a batch
    of size K. (This replaced geometric skipping, ``floor(log u / log(1 - p))`` per included
    sample, exact too but a logarithm per draw: 1.6x slower sampling, about 12% of a step at
    n = 1000, d = 64, B = 32.) K is one uniform looked up in ``cdf`` from the bin ``guide``
    gives; ``cdf`` may stop where it reaches 1 (``sampling.bernoulli_tables``): K is at most
    ``cdf.shape[0] - 1``, the capacity of the scratch. Returns ``(K, counter)``."""
    u, counter = next_uniform(key, counter)
    bins = guide.shape[0]
    b = int(u * bins)
    if b >= bins:
        b = bins - 1
    count = guide[b]
    while count < n and cdf[count] <= u:
        count += 1
    return count, counter


@jit
def sample_with_replacement(key, counter, n, batch_size, batch):
    """batch_size independent uniform indices. Returns ``(batch_size, counter)``."""
    for j in range(batch_size):
        batch[j], counter = next_index(key, counter, n)
    return batch_size, counter


@jit
def shuffle(key, counter, permutation):
    """Fisher-Yates: a uniform random permutation of the entries of ``permutation``, in place
    (n - 1 random numbers). Returns the counter."""
    n = permutation.shape[0]
    for j in range(n - 1):
        i, counter = next_index(key, counter, n - j)
        i += j
        chosen = permutation[i]
        permutation[i] = permutation[j]
        permutation[j] = chosen
    return counter


# ---------------------------------------------------------------------------------- one step
@jit_inline
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
        size = abs(w[k])
        if size > biggest:  # max(biggest, size), written out: Numba compiles max() on its own
            biggest = size
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


@jit_inline
def batch_rows(batch, count, rank, row_index):
    """Rows ``i r + c`` (c < r) of the sampled samples; returns their number, count * r."""
    m = 0
    for j in range(count):
        base = batch[j] * rank
        for c in range(rank):
            row_index[m] = base + c
            m += 1
    return m


# ---------------------------------------------------------------------------------- start
def _make_initialise_runs(init_kind):
    """``initialise_runs`` for one ``INIT_*`` code, compiled with only that branch."""

    @jit
    def initialise_runs(seed, first_run, init_vector, W, counters, log_scale):
        """Draw (``init_kind``) or copy w_0 for every run into ``W`` (unit norm) and ``log_scale``
        (log ||w_0||^2).

        Row ``run`` of ``W`` is the global run ``first_run + run`` (the key of its stream), so a
        block of runs computed alone has the bits of the same rows of the whole simulation. Normal
        and uniform draws come from the run's own stream, which then continues in the steps.
        Serial: d normal draws per run cost less than one step, and a parallel kernel's
        compilation (about 15% of a cold start) is not worth it.
        """
        runs, d = W.shape
        for run in range(runs):
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
                    size = abs(w[k])
                    if size > biggest:  # max(biggest, size), as in _apply_rows_in_log_form
                        biggest = size
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

    return initialise_runs


def initial_kernel(init_kind):
    """The kernel that draws or copies w_0 (``initialise_runs(seed, first_run, init_vector, W,
    counters, log_scale)``) for the ``INIT_*`` code ``init_kind``: one compiled kernel per code,
    made once per process (``_variant``)."""
    return _variant(_make_initialise_runs, int(init_kind))


# ---------------------------------------------------------------------------------- per-run steps
# The step of a run on the sampled ``batch[:count]`` (written out in the kernels):
# ``w`` (and the momentum state ``z``) updated in place, giving ``||w||^2``,
# ``||w||^2 + ||z||^2`` (what renormalisation watches) and ``apply_rows``'s log factor, by
# which ``w`` and ``z`` are both divided. Plain SGD (``MOMENTUM_NONE``): ``apply_rows`` alone,
# so the bits do not depend on the momentum code. Heavy ball: ``z`` is ``w_{t-1}`` and
# ``w_{t+1} = w_t - lr H_B w_t + mu (w_t - w_{t-1})``. Nesterov (torch's convention): ``z`` is
# ``lr v`` and ``v_t = mu v_{t-1} + H_B w_t``, ``w_{t+1} = w_t - lr (H_B w_t + mu v_t)``.
# ``saved`` is scratch of length d. One call site of apply_rows per kernel (inlined: two sites
# would compile its loops twice).
@jit
def momentum_update(w, z, saved, log_factor, momentum_kind, momentum):
    """The step's momentum part (``saved`` holds w_t); returns ``(sq, sq + sq_z)``.

    Not inlined, on purpose: inlined into the kernels, LLVM contracted Nesterov's update
    differently (other bits than the previous version, which compiled it as a function of its
    own); a separate function keeps its bits, and plain SGD never calls it.
    """
    # w now holds (w_t - lr H_B w_t) / f with log f^2 = log_factor: bring w_t and z to that scale
    inverse = 1.0 if log_factor == 0.0 else math.exp(-0.5 * log_factor)
    sq = 0.0
    sq_z = 0.0
    if momentum_kind == HEAVY_BALL:
        for k in range(w.shape[0]):
            current = saved[k] * inverse
            w[k] += momentum * (current - z[k] * inverse)
            z[k] = current
            sq += w[k] * w[k]
            sq_z += current * current
    else:
        for k in range(w.shape[0]):
            # lr H_B w_t = w_t - (w_t - lr H_B w_t)
            velocity = momentum * (z[k] * inverse) + (saved[k] * inverse - w[k])
            z[k] = velocity
            w[k] -= momentum * velocity
            sq += w[k] * w[k]
            sq_z += velocity * velocity
    return sq, sq + sq_z


@jit_inline
def after_step(t, sq, total, log_factor, w, z, momentum_kind, scale, threshold, log_threshold,
               diverged_at, column, next_record, record_every, steps, records):
    """The bookkeeping of step t of a run: log-form factor, divergence rule, lazy
    renormalisation of ``w`` and ``z`` together, records into ``records`` (the run's row of
    ``log_sq_norm``). Returns ``(scale, threshold, diverged_at, column, next_record)``."""
    if log_factor != 0.0:
        # a step too large for floats, carried in log form: W is w_t / exp(scale / 2)
        scale += log_factor
        threshold = math.exp(log_threshold - scale)
    # (sq > 0: when a step jumps e^745 past the threshold, threshold underflows to 0)
    if diverged_at < 0 and sq >= threshold and sq > 0.0:
        diverged_at = t
    if (total > _HIGH or total < _LOW) and total > 0.0 and total < math.inf:
        factor = 1.0 / math.sqrt(total)
        for k in range(w.shape[0]):
            w[k] *= factor
        if momentum_kind != MOMENTUM_NONE:
            for k in range(z.shape[0]):
                z[k] *= factor
        scale += math.log(total)
        sq = sq / total  # exactly 1 without momentum
        threshold = math.exp(log_threshold - scale)
    if t == next_record:
        records[column] = scale + math.log(sq)
        column += 1
        next_record += record_every
    elif t == steps:
        records[records.shape[0] - 1] = scale + math.log(sq)
    return scale, threshold, diverged_at, column, next_record


# ---------------------------------------------------------------------------------- kernels
# Sampling schemes, passed to the kernels as an integer: one compiled kernel serves them all.
SCHEME_BERNOULLI = 0
SCHEME_WITHOUT_REPLACEMENT = 1
SCHEME_WITH_REPLACEMENT = 2
SCHEME_RESHUFFLE = 3

# The kernels' common arguments: ``rows`` at most 1 in absolute value (module docstring;
# ``step_size`` carries the scale); ``first_run`` the global index of row 0 of the state (the
# stream key); steps t = first_step + 1 .. last_step; ``momentum_kind``, ``momentum`` and the
# momentum state ``Z`` (runs, d), or (runs, 0) without momentum; ``W``, ``log_scale``,
# ``counters``, ``first_diverged`` the runs' state. Each records ``log ||w_t||^2`` into
# ``log_sq_norm[run, t // record_every]`` when record_every divides t, and into the last column
# at t = steps; ``first_diverged[run]`` (-1 until then) is the first t with ``log ||w_t||^2 >=
# log_threshold[run]``, checked at every step. The kernels are serial and release the GIL: the
# caller runs blocks of runs (slices of the state arrays, with ``first_run`` their first global
# run) on several threads at once.


def _make_chunk_linear(scheme, with_momentum):
    """``chunk_linear`` for one sampling scheme, with or without momentum (module docstring)."""

    @jit
    def chunk_linear(rows, rank, batch_size, steps_per_epoch, step_size, cdf, guide, seed,
                     first_run, first_step, last_step, steps, record_every, log_threshold,
                     momentum_kind, momentum, W, Z, log_scale, counters, first_diverged, log_sq_norm,
                     order, marks, table, slots, permutation, batch, row_index, coefficients, saved):
        """Advance every run of the block under sampling ``scheme`` (a ``SCHEME_*`` code).

        Bernoulli: ``cdf``, ``guide`` from ``sampling.bernoulli_tables`` (the batch size is at most
        ``cdf.shape[0] - 1``); without and with replacement: ``batch_size`` samples; reshuffle:
        ``order[run]`` (length n) is the run's current epoch's permutation, reshuffled
        (``shuffle``, from the run's stream) at the first step of every epoch; step t uses batch
        ``(t - 1) % steps_per_epoch`` of the epoch, the consecutive entries ``[j B, min((j + 1) B,
        n))``. A short last batch (n not a multiple of B, when the caller keeps it:
        ``steps_per_epoch = ceil(n / B)``) is averaged over its own size: its step size is
        ``step_size B / size``. Arguments a scheme does not use may be empty arrays. The last
        eight are ``scratch(n, capacity, rank, d)``, capacity ``cdf.shape[0] - 1`` (Bernoulli) or
        ``batch_size``.
        """
        runs = W.shape[0]
        n = rows.shape[0] // rank
        for run in range(runs):
            key = stream_key(seed, np.uint64(first_run) + np.uint64(run))  # (as in initialise_runs)
            counter = counters[run]
            w = W[run]
            z = Z[run]
            shuffled = order[run]
            # views and values taken once per run, not per step
            records = log_sq_norm[run]
            limit = log_threshold[run]
            scale = log_scale[run]
            diverged_at = first_diverged[run]
            # ||w_t||^2 >= threshold  <=>  ||W||^2 >= exp(log_threshold - scale)
            threshold = math.exp(limit - scale)
            # the next recorded step and its column (a countdown instead of a division per step)
            column = first_step // record_every + 1
            next_record = column * record_every
            for t in range(first_step + 1, last_step + 1):
                size = step_size
                if scheme <= SCHEME_WITHOUT_REPLACEMENT:  # (one inlined copy of sample_distinct)
                    if scheme == SCHEME_BERNOULLI:
                        count, counter = bernoulli_count(key, counter, n, cdf, guide)
                    else:
                        count = batch_size
                    counter = sample_distinct(key, counter, n, count, marks, table, slots,
                                              permutation, batch)
                elif scheme == SCHEME_WITH_REPLACEMENT:
                    count, counter = sample_with_replacement(key, counter, n, batch_size, batch)
                else:
                    position = (t - 1) % steps_per_epoch
                    if position == 0:
                        counter = shuffle(key, counter, shuffled)
                    start = position * batch_size
                    count = batch_size if batch_size < n - start else n - start  # (min, written out)
                    for j in range(count):
                        batch[j] = shuffled[start + j]
                    if count != batch_size:
                        size = step_size * batch_size / count
                # the step (``take_step``, written out here: one level of inlining less to compile)
                if with_momentum:
                    for k in range(w.shape[0]):
                        saved[k] = w[k]
                if rank == 1:
                    indices = batch
                    m = count
                else:
                    indices = row_index
                    m = batch_rows(batch, count, rank, row_index)
                sq, log_factor = apply_rows(rows, indices, m, size, coefficients, w)
                total = sq
                if with_momentum:
                    sq, total = momentum_update(w, z, saved, log_factor, momentum_kind, momentum)
                scale, threshold, diverged_at, column, next_record = after_step(
                    t, sq, total, log_factor, w, z, momentum_kind, scale, threshold,
                    limit, diverged_at, column, next_record, record_every, steps, records)
            log_scale[run] = scale
            counters[run] = counter
            first_diverged[run] = diverged_at

    return chunk_linear


def linear_kernel(scheme, with_momentum):
    """``chunk_linear`` for the ``SCHEME_*`` code ``scheme``, with momentum (heavy ball or
    Nesterov, ``momentum_kind``) or without: one compiled kernel per pair, made once per process."""
    return _variant(_make_chunk_linear, int(scheme), bool(with_momentum))


# ---------------------------------------------------------------------------------- affine steps
# A family with per-sample gradients g_i (a minimum that does not interpolate; specification
# page, section "Non-interpolating minima: stationary covariance and the loss floor"): every step
# adds ``-lr g_B``, g_B the batch mean of the g_i with the batch and normalisation of H_B. The
# iteration is affine, so runs cannot be renormalised: W holds w_t itself in plain floats, and a
# run whose ||w_t||^2 leaves the safe range (or is no longer finite) is stopped there, flagged
# (``first_diverged`` and ``overflowed``) and recorded as +inf from that step on, never NaN.
# ||w||^2 above this stops an affine run (entries below 1e125: the next products cannot yet
# overflow to inf - inf = NaN before the check)
_AFFINE_LIMIT = 1e250


def _make_chunk_affine(scheme, with_momentum):
    """``chunk_affine`` for one sampling scheme, with or without momentum."""

    @jit
    def chunk_affine(rows, rank, gradients, loss_factor, batch_size, steps_per_epoch,
                     step_size, gradient_step, cdf, guide, seed, first_run, first_step, last_step,
                     steps, record_every, log_threshold, momentum_kind, momentum, burn_in,
                     loss_batches, W, Z, counters, first_diverged, overflowed, log_sq_norm,
                     loss_sums, order, marks, table, slots, permutation, batch, row_index,
                     coefficients, saved):
        """Advance every run of the affine iteration ``w <- w - step_size sum_j u_j (u_j^T w) -
        gradient_step sum_{i in batch} g_i`` (plus momentum, torch's conventions as
        ``take_step``), for any sampling ``scheme`` (the ``SCHEME_*`` codes; the samplers and the
        stream of the linear kernels, so a run draws the same batches as there). ``step_size``
        and ``gradient_step`` are ``lr / B`` (B the nominal batch size, also under Bernoulli) up to
        the rows' power-of-two scale; reshuffle's short last batch is averaged over its own size.

        The last eight arguments are ``scratch(n, max(capacity, 1), rank, d)`` (capacity as
        ``chunk_linear``; ``row_index`` unused). ``loss_factor`` (d, k) is C with ``H = C C^T``: after each step t > ``burn_in`` the run adds
        ``(1/2) ||C^T w_t||^2`` to ``loss_sums[run, q]``, q = (t - burn_in - 1) * loss_batches //
        (steps - burn_in) (consecutive batches of time, for batch means). ``W`` holds w_t (not
        renormalised), ``Z`` the momentum state (w_{t-1}, or lr v_{t-1} for Nesterov) or (runs, 0).
        """
        runs, d = W.shape
        n = rows.shape[0] // rank
        k = loss_factor.shape[1]
        window = steps - burn_in
        for run in range(runs):
            if overflowed[run]:
                continue
            key = stream_key(seed, np.uint64(first_run) + np.uint64(run))
            counter = counters[run]
            w = W[run]
            z = Z[run]
            records = log_sq_norm[run]
            sums = loss_sums[run]
            limit = log_threshold[run]
            diverged_at = first_diverged[run]
            column = first_step // record_every + 1
            next_record = column * record_every
            for t in range(first_step + 1, last_step + 1):
                size = step_size
                gsize = gradient_step
                if scheme <= SCHEME_WITHOUT_REPLACEMENT:  # (one inlined copy of sample_distinct)
                    if scheme == SCHEME_BERNOULLI:
                        count, counter = bernoulli_count(key, counter, n, cdf, guide)
                    else:
                        count = batch_size
                    counter = sample_distinct(key, counter, n, count, marks, table, slots,
                                              permutation, batch)
                elif scheme == SCHEME_WITH_REPLACEMENT:
                    count, counter = sample_with_replacement(key, counter, n, batch_size, batch)
                else:
                    position = (t - 1) % steps_per_epoch
                    shuffled = order[run]
                    if position == 0:
                        counter = shuffle(key, counter, shuffled)
                    start = position * batch_size
                    count = batch_size if batch_size < n - start else n - start  # (min, written out)
                    for j in range(count):
                        batch[j] = shuffled[start + j]
                    if count != batch_size:
                        size = step_size * batch_size / count
                        gsize = gradient_step * batch_size / count
                if with_momentum:
                    for q in range(d):
                        saved[q] = w[q]
                # all projections on the old w first
                m = 0
                for j in range(count):
                    base = batch[j] * rank
                    for c in range(rank):
                        s = 0.0
                        for q in range(d):
                            s += rows[base + c, q] * w[q]
                        coefficients[m] = size * s
                        m += 1
                m = 0
                for j in range(count):
                    base = batch[j] * rank
                    for c in range(rank):
                        a = coefficients[m]
                        for q in range(d):
                            w[q] -= a * rows[base + c, q]
                        m += 1
                    g = batch[j]
                    for q in range(d):
                        w[q] -= gsize * gradients[g, q]
                sq = 0.0
                if not with_momentum:
                    for q in range(d):
                        sq += w[q] * w[q]
                elif momentum_kind == HEAVY_BALL:
                    for q in range(d):
                        current = saved[q]
                        w[q] += momentum * (current - z[q])
                        z[q] = current
                        sq += w[q] * w[q]
                else:  # NESTEROV
                    for q in range(d):
                        velocity = momentum * z[q] + (saved[q] - w[q])
                        z[q] = velocity
                        w[q] -= momentum * velocity
                        sq += w[q] * w[q]
                if not sq <= _AFFINE_LIMIT:  # too large for the next step, or not finite
                    overflowed[run] = True
                    if diverged_at < 0:
                        diverged_at = t
                    for c in range(column, records.shape[0]):
                        records[c] = math.inf
                    break
                log_sq = math.log(sq) if sq > 0.0 else -math.inf
                if diverged_at < 0 and log_sq >= limit:
                    diverged_at = t
                if t > burn_in:
                    quadratic = 0.0
                    for c in range(k):
                        s = 0.0
                        for q in range(d):
                            s += loss_factor[q, c] * w[q]
                        quadratic += s * s
                    sums[(t - burn_in - 1) * loss_batches // window] += 0.5 * quadratic
                if t == next_record:
                    records[column] = log_sq
                    column += 1
                    next_record += record_every
                elif t == steps:
                    records[records.shape[0] - 1] = log_sq
            counters[run] = counter
            first_diverged[run] = diverged_at

    return chunk_affine


def affine_kernel(scheme, with_momentum):
    """``chunk_affine`` for the ``SCHEME_*`` code ``scheme``, with momentum or without: one
    compiled kernel per pair, made once per process."""
    return _variant(_make_chunk_affine, int(scheme), bool(with_momentum))
