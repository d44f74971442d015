"""Matrix-free symmetric eigensolver shared by the engines.

A plain Lanczos iteration with full reorthogonalisation and explicit restarts, stopped by the
Ritz residual. It is used instead of ARPACK (``scipy.sparse.linalg.eigsh``) because it needs one
eigenpair only, stops as soon as the residual bound is met (ARPACK works in restart cycles of
``ncv`` products) and starts from a vector the caller chooses: for the cone-preserving operators
of the second-moment theory the identity matrix, which has a positive inner product with their
PSD top eigenvector, so the top eigenvalue cannot be missed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh_tridiagonal


@dataclass(frozen=True)
class Eigenpair:
    value: float
    vector: np.ndarray
    residual: float  # ||A x - value x|| for the unit-norm Ritz vector x
    products: int  # operator applications used


class ConvergenceError(RuntimeError):
    pass


def largest_eigenpair(
    apply,
    start: np.ndarray,
    *,
    dimension: int | None = None,
    rtol: float = 1e-11,
    memory_bytes: float = 4e8,
    max_products: int = 5000,
) -> Eigenpair:
    """Largest algebraic eigenvalue of a symmetric operator, matrix-free.

    Parameters
    ----------
    apply : callable
        Maps an array shaped like ``start`` to an array of the same shape; must be symmetric
        for the Euclidean inner product of the flattened arrays.
    start : ndarray
        Starting vector (any shape, not zero).
    dimension : int, optional
        Dimension of the invariant subspace the iteration lives in (for symmetric-matrix
        operators k (k + 1) / 2); the Krylov basis never exceeds it.
    rtol : float
        Stop when the Ritz residual is at most ``rtol`` times the largest Ritz value in
        magnitude. The eigenvalue error is then at most the residual (and usually its square
        over the spectral gap).
    memory_bytes : float
        Budget for the stored Krylov basis; a longer iteration restarts from the Ritz vector.
    """
    shape = start.shape
    size = start.size
    dimension = size if dimension is None else min(dimension, size)
    basis_length = int(max(8, min(dimension, 300, memory_bytes // (8 * size))))
    vector = np.asarray(start, dtype=np.float64).ravel().copy()
    products = 0
    best = None
    while True:
        norm = np.linalg.norm(vector)
        if norm == 0:
            raise ValueError("start vector is zero")
        basis = np.empty((basis_length + 1, size))
        basis[0] = vector / norm
        alphas, betas = [], []
        ritz_vector = None
        for j in range(basis_length):
            w = np.asarray(apply(basis[j].reshape(shape)), dtype=np.float64).ravel()
            products += 1
            alpha = float(basis[j] @ w)
            w -= alpha * basis[j]
            if j > 0:
                w -= betas[-1] * basis[j - 1]
            # Full reorthogonalisation, twice ("twice is enough", Parlett).
            for _ in range(2):
                w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
            beta = float(np.linalg.norm(w))
            alphas.append(alpha)
            values, vectors = eigh_tridiagonal(np.array(alphas), np.array(betas), select="i",
                                               select_range=(j, j)) if j > 0 else (
                np.array([alpha]), np.ones((1, 1)))
            theta = float(values[-1])
            s = vectors[:, -1]
            residual = abs(beta * s[-1])
            scale = max(abs(theta), float(np.max(np.abs(alphas))) * 1e-6, np.finfo(float).tiny)
            invariant = beta <= 1e-14 * max(scale, abs(alpha))
            done = residual <= rtol * scale or invariant or j + 1 >= dimension
            if done or j == basis_length - 1 or products >= max_products:
                ritz_vector = basis[: j + 1].T @ s
                best = Eigenpair(theta, ritz_vector.reshape(shape), residual, products)
                if done:
                    return best
                break
            betas.append(beta)
            basis[j + 1] = w / beta
        if products >= max_products:
            raise ConvergenceError(
                f"Lanczos did not converge in {products} operator products "
                f"(eigenvalue {best.value:.12g}, residual {best.residual:.3g})"
            )
        vector = ritz_vector
