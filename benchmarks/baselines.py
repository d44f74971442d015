"""Baselines written with numpy/scipy alone: the best a user would write without fastsgdstab.

Every speed claim of the project is a ratio against one of these, measured in the same run.
"""

from __future__ import annotations

import os

import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh


QUICK = os.environ.get("FASTSGDSTAB_ASV_QUICK", "").strip() not in ("", "0")
"""Quick mode (``FASTSGDSTAB_ASV_QUICK=1``, docs/performance.md): every benchmark class keeps
its smallest case, so that ``asv run --quick`` covers every engine in under 3 minutes."""


def sizes(full, quick=None):
    """``full`` (a list of parameter values), or in quick mode ``quick`` (default: its first)."""
    if not QUICK:
        return list(full)
    return list(quick) if quick is not None else list(full)[:1]


def lognormal_features(n: int, d: int, seed: int = 0) -> np.ndarray:
    """The benchmarks' seeded test problem: Gaussian features with lognormal per-sample scales
    (samples of unequal curvature, as in real data), shared by engine and baseline."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * rng.lognormal(0.0, 0.5, (n, 1))


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


def simulate_numpy_baseline(factors: np.ndarray, lr: float, batch_size: float, steps: int, runs: int,
                            seed: int = 0, divergence_factor: float = 1000.0):
    """Linearised SGD with Bernoulli sampling for all runs at once, numpy only.

    The honest vectorised method: every step draws an (runs, n) inclusion mask and applies
    ``W <- W - (lr / B) ((W U^T) * Z) U`` as two BLAS-3 products over all n samples (rank r:
    U is (n r, d), each mask entry covers a sample's r columns), into preallocated buffers.
    Like ``simulate`` it renormalises every run every step (exact log ||w_t||^2) and applies
    the divergence rule at every step. Work per step: 4 runs n r d flops (n / B times the
    sparse kernel's), plus runs n random numbers.

    Returns ``(log_sq_norm, diverged)``: ``log ||w_steps||^2`` and the rule's verdict per run.
    """
    factors = np.asarray(factors, dtype=np.float64)
    if factors.ndim == 2:
        factors = factors[:, :, None]
    n, d, r = factors.shape
    U = np.ascontiguousarray(factors.transpose(0, 2, 1)).reshape(n * r, d)
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((runs, d))
    sq = np.einsum("ij,ij->i", W, W)
    log_scale = np.log(sq)
    W /= np.sqrt(sq)[:, None]
    log_threshold = log_scale + np.log(divergence_factor)
    diverged = np.zeros(runs, dtype=bool)
    p, step_size = batch_size / n, lr / batch_size
    uniforms = np.empty((runs, n))
    mask = np.empty((runs, n), dtype=bool)
    projections = np.empty((runs, n * r))
    update = np.empty((runs, d))
    for _ in range(steps):
        rng.random(out=uniforms)
        np.less(uniforms, p, out=mask)
        np.matmul(W, U.T, out=projections)
        projections.reshape(runs, n, r)[...] *= mask[:, :, None]
        np.matmul(projections, U, out=update)
        update *= step_size
        W -= update
        np.einsum("ij,ij->i", W, W, out=sq)
        log_scale += np.log(sq)
        diverged |= log_scale >= log_threshold
        W /= np.sqrt(sq)[:, None]
    return log_scale, diverged
