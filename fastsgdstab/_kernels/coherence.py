"""Blocks of the coherence matrix ``S_ij = ||U_i^T U_j||_F`` from blocks of the factor Gram matrix.

The public layer computes ``G = A_I A_J^T`` with BLAS (``A`` the (n r, k) reduced factor rows,
``I``, ``J`` two blocks of samples), so that ``G[p r + a, q r + b] = (U_i^T U_j)_{ab}`` for the
p-th sample of ``I`` and the q-th of ``J``. These kernels turn such a block into the matching
block of S (rank 1: ``S = |G|`` entrywise) and, for the matrix-free path, multiply it by a vector
without ever storing S.
"""

import numpy as np
from numba import prange

from ._jit import jit, jit_parallel


@jit
def coherence_block(G, rank, out):
    """``out[p, q] = sqrt(sum_{a,b} G[p r + a, q r + b]^2)`` (for rank 1: ``|G[p, q]|``)."""
    rows, columns = out.shape
    if rank == 1:
        for p in range(rows):
            for q in range(columns):
                out[p, q] = abs(G[p, q])
        return
    for p in range(rows):
        for q in range(columns):
            s = 0.0
            for a in range(rank):
                for b in range(rank):
                    g = G[p * rank + a, q * rank + b]
                    s += g * g
            out[p, q] = np.sqrt(s)


@jit_parallel
def coherence_block_product(G, rank, x_columns, x_rows, y_rows, y_columns, both, chunk):
    """Add ``T x_columns`` to ``y_rows`` and, if ``both``, ``T^T x_rows`` to ``y_columns``.

    ``T`` is the block of S held (as Gram entries) in ``G``; it is formed entry by entry and never
    stored, so a pass over S reads each Gram entry once. ``both`` is the symmetric trick: an
    off-diagonal block (I, J) of S also serves as block (J, I), which halves the Gram products.
    The rows are split into chunks of ``chunk`` samples processed in parallel; each chunk keeps
    its own partial ``T^T x_rows`` (no shared writes), summed afterwards in a fixed order so the
    result does not depend on the thread count.
    """
    rows = y_rows.shape[0]
    columns = x_columns.shape[0]
    chunks = (rows + chunk - 1) // chunk
    partial = np.zeros((chunks, columns))
    for c in prange(chunks):
        start = c * chunk
        stop = min(start + chunk, rows)
        acc = partial[c]
        for p in range(start, stop):
            xp = x_rows[p]
            s = 0.0
            if rank == 1:
                for q in range(columns):
                    t = abs(G[p, q])
                    s += t * x_columns[q]
                    acc[q] += t * xp
            else:
                for q in range(columns):
                    u = 0.0
                    for a in range(rank):
                        for b in range(rank):
                            g = G[p * rank + a, q * rank + b]
                            u += g * g
                    t = np.sqrt(u)
                    s += t * x_columns[q]
                    acc[q] += t * xp
            y_rows[p] += s
    if both:
        for c in range(chunks):
            for q in range(columns):
                y_columns[q] += partial[c, q]
