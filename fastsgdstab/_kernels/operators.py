"""The noise operator ``N(X) = (1/n) sum_i H_i X H_i`` and the maps built from it.

Everything works in H's eigenbasis on the range of H (see ``HessianFamily._reduced``): ``rows``
is the (n r, k) array whose row ``i r + c`` is column c of the reduced factor ``V_i``, so
``N(X) = (1/n) sum_i V_i (V_i^T X V_i) V_i^T`` is two matrix products (BLAS-3) and an
O(n r^2 k) middle step. ``H X H`` is the entrywise product with ``lam lam^T``.
"""

import numpy as np

from ._jit import jit


@jit
def noise_operator(rows, rank, X, work, out):
    """``out <- N(X)`` for a symmetric (k, k) ``X``; ``work`` is an (n r, k) scratch array.

    The caller owns the buffers: a fresh n r x k array per call costs page faults comparable
    to the matrix products themselves.
    """
    m, k = rows.shape
    n = m // rank
    np.dot(rows, X, work)  # row (i, c) is (X V_i[:, c])^T
    if rank == 1:
        for i in range(m):
            s = 0.0
            for j in range(k):
                s += work[i, j] * rows[i, j]
            for j in range(k):
                work[i, j] = s * rows[i, j]
    else:
        C = np.empty((rank, rank))
        for i in range(n):
            base = i * rank
            for a in range(rank):
                for b in range(rank):
                    s = 0.0
                    for j in range(k):
                        s += work[base + a, j] * rows[base + b, j]
                    C[a, b] = s
            for a in range(rank):
                for b in range(a + 1, rank):
                    C[a, b] = C[b, a] = 0.5 * (C[a, b] + C[b, a])
            # V_i C_i: overwrite the block of work only after C_i is complete.
            for a in range(rank):
                for j in range(k):
                    s = 0.0
                    for b in range(rank):
                        s += C[a, b] * rows[base + b, j]
                    work[base + a, j] = s
    np.dot(rows.T, work, out)
    scale = 0.5 / n
    for j in range(k):
        for l in range(j, k):
            v = scale * (out[j, l] + out[l, j])
            out[j, l] = v
            out[l, j] = v


@jit
def sandwich_operator(rows, rank, X, scaling, multiplier, noise_weight, work, out):
    """``out <- S o (F o Y + beta N(Y))`` with ``Y = S o sym(X)`` (o: entrywise product).

    With ``S = scaling``, ``F = multiplier``, ``beta = noise_weight`` this is each operator the
    engine needs: the second-moment map Q (S = 1), the critical-learning-rate operator
    ``L^{-1/2} D L^{-1/2}`` and the critical-batch-size operator ``R^{-1/2} V R^{-1/2}``.
    The result is symmetric, and the map is self-adjoint for the Frobenius inner product.
    ``work`` is (n r, k) scratch; ``out`` must not alias ``X``.
    """
    k = X.shape[0]
    Y = np.empty((k, k))
    for j in range(k):
        for l in range(k):
            Y[j, l] = 0.5 * (X[j, l] + X[l, j]) * scaling[j, l]
    noise_operator(rows, rank, Y, work, out)
    for j in range(k):
        for l in range(k):
            out[j, l] = scaling[j, l] * (multiplier[j, l] * Y[j, l] + noise_weight * out[j, l])


@jit
def second_moment_iteration(rows, rank, X, multiplier, noise_weight, log_growth):
    """Apply ``X <- F o X + beta N(X)`` ``log_growth.size`` times to a PSD ``X`` with trace 1.

    The iterate is renormalised to trace 1 after every step (the map is linear) and the log of
    each step's trace factor is written to ``log_growth``, so ``log tr(X_t)`` is its cumulative
    sum exactly, with no overflow however far the iteration grows or shrinks. ``X`` is updated
    in place (the caller runs long trajectories in chunks).
    """
    k = X.shape[0]
    steps = log_growth.shape[0]
    Y = np.empty((k, k))
    work = np.empty(rows.shape)
    for t in range(steps):
        noise_operator(rows, rank, X, work, Y)
        trace = 0.0
        for j in range(k):
            for l in range(k):
                Y[j, l] = multiplier[j, l] * X[j, l] + noise_weight * Y[j, l]
            trace += Y[j, j]
        if not trace > 0.0:
            # Q maps a non-zero PSD matrix to a PSD one; a zero trace means the iterate vanished
            # exactly (e.g. lr = 1/lam with no noise): E||w||^2 is 0 from here on.
            for s in range(t, steps):
                log_growth[s] = -np.inf
            return
        inverse = 1.0 / trace
        for j in range(k):
            for l in range(k):
                X[j, l] = Y[j, l] * inverse
        log_growth[t] = np.log(trace)

