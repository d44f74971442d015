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
from scipy.linalg.blas import daxpy, ddot, dgemv, dnrm2


@dataclass(frozen=True)
class Eigenpair:
    value: float
    vector: np.ndarray
    residual: float  # ||A x - value x|| for the unit-norm Ritz vector x
    error: float  # estimated bound on |value - lambda_max|: min(residual, residual^2 / gap)
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
        Stop when the error bound of the top Ritz value, ``min(residual, residual^2 / gap)``
        (Kato-Temple, with the gap estimated from the Ritz values), is at most ``rtol`` times
        its magnitude.
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
        norm = dnrm2(vector)
        if norm == 0:
            raise ValueError("start vector is zero")
        # Krylov vectors are the columns of a Fortran-ordered array, so that every slice
        # basis[:, :j] goes to BLAS without a copy.
        basis = np.empty((size, basis_length + 1), order="F")
        basis[:, 0] = vector / norm
        alphas, betas = [], []
        ritz_vector = None
        for j in range(basis_length):
            w = np.asarray(apply(basis[:, j].reshape(shape)), dtype=np.float64).ravel()
            products += 1
            alpha = float(ddot(basis[:, j], w))
            w = daxpy(basis[:, j], w, a=-alpha)
            if j > 0:
                w = daxpy(basis[:, j - 1], w, a=-betas[-1])
            # Full reorthogonalisation, twice ("twice is enough", Parlett). Every vector operation
            # goes through scipy's BLAS, the library the compiled kernels call: numpy links its
            # own OpenBLAS, whose idle threads spin after each call and made every operator
            # product about 2x slower when the two pools were mixed.
            for _ in range(2):
                coefficients = dgemv(1.0, basis[:, : j + 1], w, trans=1)
                w = dgemv(-1.0, basis[:, : j + 1], coefficients, beta=1.0, y=w, overwrite_y=1)
            beta = float(dnrm2(w))
            alphas.append(alpha)
            if j > 0:
                values, vectors = eigh_tridiagonal(
                    np.array(alphas), np.array(betas), select="i", select_range=(j - 1, j))
            else:
                values, vectors = np.array([alpha]), np.ones((1, 1))
            theta = float(values[-1])
            s = vectors[:, -1]
            residual = abs(beta * s[-1])
            scale = max(abs(theta), float(np.max(np.abs(alphas))) * 1e-6, np.finfo(float).tiny)
            # Two error bounds for theta: the residual itself (rigorous: some eigenvalue lies
            # within it) and Kato-Temple's residual^2 / gap, with the gap to the rest of the
            # spectrum estimated by the two top Ritz values (halved for safety, and trusted only
            # once the residual is below 1e-4 of the eigenvalue).
            error = residual
            if j > 0 and residual <= 1e-4 * scale:
                gap = 0.5 * (theta - float(values[0]))
                if gap > 0:
                    error = min(error, residual * residual / gap)
            invariant = beta <= 1e-14 * max(scale, abs(alpha))
            done = error <= rtol * scale or invariant or j + 1 >= dimension
            if done or j == basis_length - 1 or products >= max_products:
                ritz_vector = dgemv(1.0, basis[:, : j + 1], s)
                best = Eigenpair(theta, ritz_vector.reshape(shape), residual, error, products)
                if done:
                    return best
                break
            betas.append(beta)
            basis[:, j + 1] = w / beta
        if products >= max_products:
            raise ConvergenceError(
                f"Lanczos did not converge in {products} operator products "
                f"(eigenvalue {best.value:.12g}, error bound {best.error:.3g})"
            )
        vector = ritz_vector
