"""Blocks of the coherence matrix ``S_ij = ||U_i^T U_j||_F`` from blocks of the factor Gram matrix.

The public layer computes ``G = A_I A_J^T`` with BLAS (``A`` the (n r, k) reduced factor rows,
``I``, ``J`` two blocks of samples), so that ``G[p r + a, q r + b] = (U_i^T U_j)_{ab}`` for the
p-th sample of ``I`` and the q-th of ``J``. These kernels turn such a block into the matching
block of S (rank 1: ``S = |G|`` entrywise) and, for the matrix-free path, multiply it by a vector
without ever storing S.
"""

import numpy as np
from ._jit import jit


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


@jit
def coherence_block_product(G, rank, x_columns, x_rows, y_rows, y_columns, diagonal):
    """Add ``T x_columns`` to ``y_rows`` and ``T^T x_rows`` to ``y_columns``, T the S-block in G.

    T (``|G|`` for rank 1) is formed entry by entry and never stored: one pass over the Gram
    block serves both block (I, J) of S and, transposed, block (J, I), which halves the Gram
    products of a sweep. For a diagonal block (``diagonal``; then the x and y arguments are the
    same arrays) only the upper triangle of G is read, so the operator is symmetric to the bit
    even though BLAS need not return ``A A^T`` exactly symmetric. Serial: the caller's BLAS
    product dominates the cost, and this loop is memory-bound.
    """
    rows = y_rows.shape[0]
    columns = x_columns.shape[0]
    for p in range(rows):
        xp = x_rows[p]
        s = 0.0
        first = p if diagonal else 0
        for q in range(first, columns):
            if rank == 1:
                t = abs(G[p, q])
            else:
                u = 0.0
                for a in range(rank):
                    for b in range(rank):
                        g = G[p * rank + a, q * rank + b]
                        u += g * g
                t = np.sqrt(u)
            if diagonal and q == p:
                s += t * xp
            else:
                s += t * x_columns[q]
                y_columns[q] += t * xp
        y_rows[p] += s
