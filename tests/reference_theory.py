"""Slow, obviously-correct references for the theory module, from dense Hessians only.

Nothing here imports the library: every quantity is written from THEORY.md sections 5-7 with
dense (d, d) Hessians and, for kappa, the dense d^2 x d^2 matrix sum_i H_i (x) H_i.
Use for n <= ~12, d <= ~6.
"""

from __future__ import annotations

import math

import numpy as np


def dense(factors) -> np.ndarray:
    factors = np.asarray(factors, dtype=float)
    return np.einsum("idr,ier->ide", factors, factors)


def coherence_matrix_squared(hessians) -> np.ndarray:
    """S_ij^2 = tr(H_i H_j), with no square root (so no round-off amplification near 0)."""
    hessians = np.asarray(hessians, dtype=float)
    return np.einsum("iab,jba->ij", hessians, hessians)


def coherence_matrix(hessians) -> np.ndarray:
    """S_ij = sqrt(tr(H_i H_j)) (sqrtm-free: tr(H_i H_j) >= 0 for PSD H_i, clipped for round-off)."""
    return np.sqrt(np.maximum(coherence_matrix_squared(hessians), 0.0))


def perron_root(matrix) -> float:
    return float(np.linalg.eigvalsh(matrix)[-1])


def sample_sharpness(hessians) -> np.ndarray:
    return np.linalg.eigvalsh(np.asarray(hessians, dtype=float))[:, -1]


def sigma(hessians) -> float:
    """THEORY.md section 5: lambda_1(S) / max_i lambda_1(H_i)."""
    return perron_root(coherence_matrix(hessians)) / float(np.max(sample_sharpness(hessians)))


def sharpness(hessians) -> float:
    return float(np.linalg.eigvalsh(np.mean(hessians, axis=0))[-1])


def non_uniformity(hessians) -> float:
    """Wu, Ma & E: lambda_1((1/n) sum_i H_i^2 - H^2)^(1/2)."""
    hessians = np.asarray(hessians, dtype=float)
    mean = hessians.mean(axis=0)
    variance = np.mean(hessians @ hessians, axis=0) - mean @ mean
    return math.sqrt(max(float(np.linalg.eigvalsh(0.5 * (variance + variance.T))[-1]), 0.0))


def kappa(hessians) -> float:
    """lambda_1(sum_i H_i (x) H_i), the dense d^2 x d^2 matrix."""
    kron = sum(np.kron(h, h) for h in np.asarray(hessians, dtype=float))
    return float(np.linalg.eigvalsh(0.5 * (kron + kron.T))[-1])


def bernoulli_c(lr: float, n: int, batch_size: float) -> float:
    """c = lr^2 (n - B) / (n^2 B)."""
    return lr * lr * (n - batch_size) / (n * n * batch_size)


def theorem1_threshold(hessians, batch_size: float) -> float:
    """eta_T1 = sigma / (lambda_1(H) sqrt(n/B - 1))."""
    n = len(hessians)
    return sigma(hessians) / (sharpness(hessians) * math.sqrt(n / batch_size - 1))


def theorem1_growth(hessians, lr: float, batch_size: float) -> float:
    """g = (lr / sigma)^2 (n/B - 1) lambda_1(H)^2."""
    n = len(hessians)
    return (lr / sigma(hessians)) ** 2 * (n / batch_size - 1) * sharpness(hessians) ** 2


def rayleigh_bounds(hessians, batch_size: float, a: float, b: float):
    """M&M (15) with X = v v^T (v the top eigenvector of H; returns also the eigengap) and (16)."""
    hessians = np.asarray(hessians, dtype=float)
    mean = hessians.mean(axis=0)
    values, vectors = np.linalg.eigh(mean)
    lam, v = values[-1], vectors[:, -1]
    gap = values[-1] - values[-2] if values.size > 1 else math.inf
    along = np.einsum("a,iab,b->i", v, hessians, v)
    top_direction = 2 * lam / (a * lam**2 + b * np.mean(along**2))
    identity = 2 * np.trace(mean) / (a * np.sum(mean**2) + b * np.mean(np.sum(hessians**2, axis=(1, 2))))
    return float(top_direction), float(identity), float(gap)
