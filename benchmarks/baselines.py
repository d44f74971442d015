"""Baselines written with numpy/scipy alone: the best a user would write without fastsgdstab.

Every speed claim of the project is a ratio against one of these, measured in the same run.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh


def critical_lr_numpy_baseline(features: np.ndarray, batch_size: float, tol: float = 0.0) -> float:
    """Exact Bernoulli critical learning rate of a rank-1 family, numpy/scipy only.

    The honest matrix-free method: eigendecompose H, work in its eigenbasis where L^{-1/2} is an
    entrywise multiplier, apply N(X) = (1/n) U^T diag(u_i^T X u_i) U with two BLAS-3 products,
    and ask ARPACK (eigsh) for the largest eigenvalue of L^{-1/2} D L^{-1/2}.
    """
    n, d = features.shape
    lam, vec = np.linalg.eigh(features.T @ features / n)
    keep = lam > 1e-12 * lam[-1]
    lam, U = lam[keep], features @ vec[:, keep]
    k = lam.size
    a, b = 1.0, 1.0 / batch_size - 1.0 / n
    M = 1.0 / np.sqrt(np.add.outer(lam, lam))
    HH = a * np.multiply.outer(lam, lam)

    def matvec(x):
        X = x.reshape(k, k)
        Y = M * (0.5 * (X + X.T))
        s = np.einsum("ij,ij->i", U @ Y, U)
        N = (U.T * s) @ U / n
        return (M * (HH * Y + b * N)).ravel()

    op = LinearOperator((k * k, k * k), matvec=matvec, dtype=float)
    top = eigsh(op, k=1, which="LA", tol=tol, v0=np.eye(k).ravel(), return_eigenvectors=False)[0]
    return 1.0 / top


def coherence_numpy_baseline(features: np.ndarray, block_rows: int = 2048, tol: float = 0.0) -> float:
    """Coherence sigma of a rank-1 family (S = |X X^T| entrywise), numpy/scipy only.

    What a careful user writes when S (n^2 floats) does not fit in memory: ARPACK (eigsh) on a
    LinearOperator whose product sweeps S in row blocks, ``y_I = |X_I X^T| v`` (one BLAS-3
    product per block, S never stored), started from the all-ones vector; sigma is the Perron
    root over max_i ||x_i||^2.
    """
    features = np.ascontiguousarray(features, dtype=np.float64)
    n = features.shape[0]

    def matvec(v):
        v = np.ravel(v)
        y = np.empty(n)
        for start in range(0, n, block_rows):
            block = np.abs(features[start : start + block_rows] @ features.T)
            y[start : start + block_rows] = block @ v
        return y

    op = LinearOperator((n, n), matvec=matvec, dtype=float)
    top = eigsh(op, k=1, which="LA", tol=tol, v0=np.ones(n), return_eigenvectors=False)[0]
    return float(top) / float(np.max(np.einsum("ij,ij->i", features, features)))
