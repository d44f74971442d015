"""Matrix-free symmetric eigensolver shared by the engines, and its certificate.

``largest_eigenpair`` is a plain Lanczos iteration with full reorthogonalisation and explicit
restarts, stopped by the Ritz residual. It is used instead of ARPACK (``scipy.sparse.linalg.eigsh``)
because it needs one eigenpair only, stops as soon as the residual bound is met (ARPACK works in
restart cycles of ``ncv`` products) and starts from a vector the caller chooses.

A Lanczos residual proves only that *some* eigenvalue is near the Ritz value. Every operator
the engines solve maps the cone of positive semi-definite (PSD) matrices into itself and is
self-adjoint for the Frobenius inner product, so its largest eigenvalue is its spectral radius
and two classical facts prove where the *top* eigenvalue is (the specification page, section "Certified
answers and scale"):

* lower bound: any Rayleigh quotient, in particular the Ritz value, is at most lambda_max;
* upper bound (Collatz-Wielandt): for every positive definite X,
  ``rho(T) <= lambda_max(X^{-1/2} T(X) X^{-1/2})``.

``certify_by_cholesky`` proves both ends from a positive definite Ritz vector X with Cholesky
factorisations verified by their residuals (``T(X) <= c X``), at the cost of a few k x k
triangular products; when X is not positive definite, ``certify_top_eigenvalue`` builds X from the Ritz vector (its PSD part plus a multiple delta of
the identity, delta searched over a few values) without any further operator product: ``T`` of
the Ritz vector comes from the Lanczos relation and ``T(I)`` from the first product of the solve
(which starts from the identity). ``certified_top_eigenvalue`` runs both and refines (a longer
Lanczos run from the certificate's X) until the bracket is tight or the budget is spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy.linalg import eigh, eigh_tridiagonal
from scipy.linalg.blas import daxpy, ddot, dgemv, dnrm2

from ._config import (
    CERTIFY_RTOL,
    DENSE_DIMENSION,
    LANCZOS_MAX_PRODUCTS,
    LANCZOS_MEMORY_BYTES,
    POWER_STEPS,
    ROUNDING_RTOL,
)
from ._rounding import UNIT_ROUNDOFF, down, gamma, up


@dataclass(frozen=True)
class Eigenpair:
    """Top Ritz pair of a Lanczos run.

    ``image`` is ``T(vector)`` from the Lanczos relation ``T Q s = theta Q s + beta s_m q_{m+1}``
    (no extra product); ``start_image`` is ``T(start)`` from the first product of the first cycle.
    """

    value: float
    vector: np.ndarray
    image: np.ndarray
    start_image: np.ndarray
    residual: float  # ||T x - value x|| for the unit-norm Ritz vector x
    error: float  # estimated bound on |value - lambda|: min(residual, residual^2 / gap) (heuristic)
    products: int  # operator applications used


@dataclass(frozen=True)
class Bracket:
    """A certified enclosure of the top eigenvalue: ``lower <= lambda_max <= upper``.

    ``value`` is the best estimate (the Ritz value, inside the bracket). ``certified`` is True
    when the bracket met the tolerance of the quantity it encloses (``CERTIFY_RTOL`` relative to
    the value, or for a spectral radius near 1, relative to ``|1 - rho|``); only then does an
    engine return it without a ``CertificationWarning``. ``products`` counts the operator
    applications of the solve.
    """

    value: float
    lower: float
    upper: float
    products: int = 0
    error: float = 0.0  # the Lanczos error estimate of value (heuristic, not part of the proof)
    certified: bool = True  # an exact bracket (no solve) is certified

    @property
    def width(self) -> float:
        return self.upper - self.lower


class ConvergenceError(RuntimeError):
    """The Lanczos iteration did not meet its tolerance within its budget of products.

    ``pair`` holds the last Ritz pair (its value is still a Rayleigh quotient, and a certificate
    can still bracket the top eigenvalue from it).
    """

    def __init__(self, message: str, pair=None):
        super().__init__(message)
        self.pair = pair


class CertificationWarning(RuntimeWarning):
    """An eigenvalue could be enclosed only in a bracket wider than the certification tolerance.

    The bracket is still true (it is proven); the value inside it may be less accurate than the
    usual 1e-12.
    """


class CertificationError(ArithmeticError):
    """No bracket around the top eigenvalue could be proven (the operator broke an assumption)."""


def largest_eigenpair(
    apply,
    start: np.ndarray,
    *,
    dimension: int | None = None,
    rtol: float = 1e-11,
    memory_bytes: float = LANCZOS_MEMORY_BYTES,
    max_products: int = LANCZOS_MAX_PRODUCTS,
    accept=None,
    tightenings: int = 3,
    min_basis: int = 8,
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
        Stop when the error estimate of the top Ritz value, ``min(residual, residual^2 / gap)``
        (Kato-Temple, with the gap estimated from the Ritz values), is at most ``rtol`` times
        its magnitude.
    memory_bytes : float
        Budget for the stored Krylov basis; a longer iteration restarts from the Ritz vector.
    max_products : int
        Budget of operator applications; beyond it, ``ConvergenceError``.
    accept : callable, optional
        Called with each Eigenpair that meets the tolerance; if it returns False the same
        iteration continues (nothing is recomputed) with a 100x tighter tolerance, at most
        ``tightenings`` times. The certificate uses this to sharpen a Ritz vector whose
        Collatz-Wielandt bracket is too wide: a few more products shrink it tenfold each.
    """
    shape = start.shape
    size = start.size
    dimension = size if dimension is None else min(dimension, size)
    basis_length = int(min(dimension, max(min_basis, 8, min(300, memory_bytes // (8 * size)))))
    vector = np.asarray(start, dtype=np.float64).ravel().copy()
    start_image = None
    products = 0
    best = None
    while True:
        norm = dnrm2(vector)
        if not norm > 0:
            raise ValueError("start vector is zero")
        # Krylov vectors are the columns of a Fortran-ordered array, so that every slice
        # basis[:, :j] goes to BLAS without a copy.
        basis = np.empty((size, basis_length + 1), order="F")
        basis[:, 0] = vector / norm
        alphas, betas = [], []
        ritz_vector = None
        for j in range(basis_length):
            w = np.asarray(apply(basis[:, j].reshape(shape)), dtype=np.float64).ravel()
            if not np.all(np.isfinite(w)):
                raise ArithmeticError("the operator produced inf or NaN (its scale overflows)")
            if start_image is None:  # T(start) = norm T(start / norm), from the first product
                start_image = w * norm
            products += 1
            alpha = float(ddot(basis[:, j], w))
            w = daxpy(basis[:, j], w, a=-alpha)
            if j > 0:
                w = daxpy(basis[:, j - 1], w, a=-betas[-1])
            # Full reorthogonalisation, twice ("twice is enough", Parlett). Every vector operation
            # goes through scipy's BLAS, the library the compiled kernels call: numpy links its
            # own OpenBLAS, whose idle threads spin after each call and made every operator
            # product about 2x slower when the two pools were mixed.
            # The second pass only when the first removed most of w (Daniel, Gragg, Kaufman and
            # Stewart's criterion): otherwise w is orthogonal to working accuracy already.
            before = float(dnrm2(w))
            for _ in range(2):
                coefficients = dgemv(1.0, basis[:, : j + 1], w, trans=1)
                w = dgemv(-1.0, basis[:, : j + 1], coefficients, beta=1.0, y=w, overwrite_y=1)
                beta = float(dnrm2(w))
                if beta > 0.7071 * before:
                    break
                before = beta
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
            # Two error estimates for theta: the residual itself (rigorous: some eigenvalue lies
            # within it) and Kato-Temple's residual^2 / gap, with the gap to the rest of the
            # spectrum estimated by the two top Ritz values (halved for safety, and trusted only
            # once the residual is below 1e-4 of the eigenvalue). Neither says the eigenvalue
            # is the top one: that is certify_top_eigenvalue's job.
            error = residual
            if j > 0 and residual <= 1e-4 * scale:
                gap = 0.5 * (theta - float(values[0]))
                if gap > 0:
                    error = min(error, residual * residual / gap)
            invariant = beta <= 1e-14 * max(scale, abs(alpha))
            done = error <= rtol * scale or invariant or j + 1 >= dimension
            if done or j == basis_length - 1 or products >= max_products:
                ritz_vector = dgemv(1.0, basis[:, : j + 1], s)
                # T(Q s) = Q T_j s + w s_j = theta Q s + s_j w (Lanczos relation; w is the
                # reorthogonalised remainder, of norm beta).
                image = theta * ritz_vector + s[-1] * w
                best = Eigenpair(theta, ritz_vector.reshape(shape), image.reshape(shape),
                                 start_image.reshape(shape), residual, error, products)
                if done:
                    final = invariant or j + 1 >= dimension or tightenings <= 0
                    if accept is None or final or accept(best):
                        return best
                    tightenings -= 1
                    rtol *= 1e-2
                    if j < basis_length - 1 and products < max_products:
                        betas.append(beta)
                        basis[:, j + 1] = w / beta
                        continue
                break
            betas.append(beta)
            basis[:, j + 1] = w / beta
        if products >= max_products:
            raise ConvergenceError(
                f"Lanczos did not converge in {products} operator products "
                f"(eigenvalue {best.value:.12g}, error estimate {best.error:.3g})", best
            )
        vector = ritz_vector


def _psd_part(matrices: np.ndarray):
    """Eigen-decompositions of sym(matrices) (stacked, (m, k, k)), each sign-fixed so that its
    largest |eigenvalue| is positive: ``(values, rotations, signs)``."""
    symmetric = 0.5 * (matrices + np.swapaxes(matrices, -1, -2))
    values, rotation = np.linalg.eigh(symmetric)
    flip = -values[:, 0] > values[:, -1]
    values[flip] = -values[flip][:, ::-1]
    rotation[flip] = rotation[flip][:, :, ::-1]
    return values, rotation, np.where(flip, -1.0, 1.0)


# Where to look for the best delta (log10, relative to the Ritz vector's largest eigenvalue):
# first guesses in order, then a finer search around the best. The best delta balances the Ritz
# vector's error (which enters the bound to first order) against the weight of the identity.
_DELTA_GUESSES = (-6.0, -9.0, -3.0, -12.0, 0.0)
_DELTA_STEPS = (1.5, 0.75)


def _rayleigh_lower(vectors, images, image_errors):
    """Proven lower bounds of ``<V, T(V)> / <sym V, sym V>`` (a Rayleigh quotient of the exact
    operator, hence at most its top eigenvalue) from computed images ``fl(T(V))`` whose error
    has Frobenius norm at most ``image_errors`` (T acts on ``sym V``: ``<V, T(sym V)> =
    <sym V, T(sym V)>`` exactly, T's images being symmetric)."""
    m, k = vectors.shape[0], vectors.shape[1]
    flat_v = vectors.reshape(m, -1)
    flat_t = images.reshape(m, -1)
    g = gamma(k * k + 2)
    numerator = np.einsum("ij,ij->i", flat_v, flat_t)
    size = np.einsum("ij,ij->i", np.abs(flat_v), np.abs(flat_t))
    norms = np.sqrt(np.einsum("ij,ij->i", flat_v, flat_v))
    error = up(np.sqrt(1.0 + g) * norms * image_errors + g * size) * (1.0 + 4 * UNIT_ROUNDOFF)
    low = numerator - error
    symmetric = 0.5 * (vectors + np.swapaxes(vectors, -1, -2))
    sym_sq = np.einsum("ij,ij->i", symmetric.reshape(m, -1), symmetric.reshape(m, -1))
    # <sym V, sym V> <= <V, V>: the larger denominator for a positive numerator, the smaller
    # (with its own rounding) for a negative one.
    big = up(np.einsum("ij,ij->i", flat_v, flat_v) * (1.0 + g))
    small = down(sym_sq * (1.0 - gamma(k * k + 4)))
    return down(np.where(low >= 0, low / big, low / np.maximum(small, np.finfo(float).tiny)))


def _verified_top(matrices):
    """Proven ``(upper, lower)`` bounds of the largest eigenvalue of each (stacked) symmetric
    matrix as computed: LAPACK's eigenpairs verified by their residual (Bauer-Fike with the computed
    eigenvectors' departure from orthonormality), every rounding of the check bounded."""
    values, vectors = np.linalg.eigh(matrices)
    k = matrices.shape[-1]
    g = gamma(k + 2)
    residual = matrices @ vectors - vectors * values[:, None, :]
    abs_size = np.abs(matrices) @ np.abs(vectors) + np.abs(vectors) * np.abs(values)[:, None, :]
    residual_norm = up(np.sqrt(np.sum(residual * residual, axis=(1, 2))) * (1 + g)
                       + g * np.sqrt(np.sum(abs_size * abs_size, axis=(1, 2))) * (1 + g))
    gram = np.swapaxes(vectors, -1, -2) @ vectors - np.eye(k)
    abs_gram = np.swapaxes(np.abs(vectors), -1, -2) @ np.abs(vectors)
    psi = up(np.sqrt(np.sum(gram * gram, axis=(1, 2))) * (1 + g)
             + g * np.sqrt(np.sum(abs_gram * abs_gram, axis=(1, 2))))
    bound = np.where(psi < 0.5, np.sqrt(1.0 + psi) / np.maximum(1.0 - psi, 0.5) * residual_norm, np.inf)
    # Lower: the top computed pair's own residual (a symmetric matrix has an eigenvalue within
    # ||K z - lam z|| / ||z|| of lam), with ||z|| >= sqrt(1 - psi).
    top_residual = np.sqrt(np.sum(residual[:, :, -1] ** 2, axis=1)) * (1 + g) + g * np.sqrt(
        np.sum(abs_size[:, :, -1] ** 2, axis=1))
    below = np.where(psi < 0.5, top_residual / np.sqrt(np.maximum(1.0 - psi, 0.5)), np.inf)
    return up(values[:, -1] + bound * (1 + 4 * UNIT_ROUNDOFF)), down(values[:, -1] - below * (1 + 4 * UNIT_ROUNDOFF))


def certify_top_eigenvalues(thetas, vectors, images, identity_images, *,
                            image_errors=0.0, identity_errors=0.0,
                            target_rtol: float = CERTIFY_RTOL) -> tuple[np.ndarray, np.ndarray]:
    """Proven brackets ``(lower, upper)`` around the top eigenvalues of cone-preserving operators.

    For each of m operators T (k x k symmetric matrices, PSD cone into itself, self-adjoint):
    ``vectors[i]`` an approximate top eigenvector (any sign), ``images[i]`` the computed
    ``T(vectors[i])`` and ``identity_images[i]`` the computed ``T(I)``, whose errors (Frobenius
    norm) are at most ``image_errors[i]`` and ``identity_errors[i]``; ``thetas[i]`` the Ritz
    value (reported, not trusted).

    Lower bound: the Rayleigh quotient of ``vectors[i]``, recomputed from its image with every
    rounding bounded (:func:`_rayleigh_lower`), never the Ritz value, whose projected matrix
    carries the rounding of a whole Krylov run.

    Upper bound (Collatz-Wielandt): with ``sym V = R diag(lam) R^T + E`` (LAPACK's
    eigen-decomposition, E its residual, R not exactly orthogonal: ``||R^T R - I|| <= phi``)
    and ``X = R^{-T} diag(max(lam, 0) + delta) R^{-1}`` (positive definite),
    ``X <= V + c I`` with ``c = ||E|| + (nu + delta)(1 + phi) + ||X - R diag(.) R^T||``, so
    ``T(X) <= T(V) + c T(I)`` (T is monotone) and, since ``R^T X R`` is diagonal,
    ``rho(T) <= lambda_max(S R^T (T(V) + c T(I)) R S)`` with ``S = diag(max(lam, 0) + delta)^{-1/2}``;
    the computed images' errors enter as multiples of the identity, every product's rounding is
    bounded, and the final eigenvalue is verified by its residual (:func:`_verified_top`). A few
    delta are tried and the smallest bound kept. So both ends hold for the exact operator whatever
    the BLAS, its threads or the CPU (``_rounding``).
    """
    thetas = np.asarray(thetas, dtype=np.float64)
    m, k = vectors.shape[0], vectors.shape[1]
    image_errors = np.broadcast_to(np.asarray(image_errors, dtype=np.float64), (m,))
    identity_errors = np.broadcast_to(np.asarray(identity_errors, dtype=np.float64), (m,))
    lower = _rayleigh_lower(vectors, images, image_errors)
    symmetric = 0.5 * (vectors + np.swapaxes(vectors, -1, -2))
    values, rotation = np.linalg.eigh(symmetric)
    flip = -values[:, 0] > values[:, -1]
    values[flip] = -values[flip][:, ::-1]
    rotation[flip] = rotation[flip][:, :, ::-1]
    signs = np.where(flip, -1.0, 1.0)
    top = values[:, -1]
    if not np.all(top > 0):
        raise CertificationError("a Ritz vector has no positive part")
    g = gamma(k + 4)
    # Residual of the decomposition of the normalised, signed sym V (in units of its top value).
    unit_values = values / top[:, None]
    unit_v = (signs / top)[:, None, None] * symmetric
    rebuilt = (rotation * unit_values[:, None, :]) @ np.swapaxes(rotation, -1, -2)
    abs_rebuilt = (np.abs(rotation) * np.abs(unit_values)[:, None, :]) @ np.swapaxes(np.abs(rotation), -1, -2)
    e_dec = up(_frobenius(unit_v - rebuilt) * (1 + g) + g * (_frobenius(abs_rebuilt) + _frobenius(unit_v)))
    gram = np.swapaxes(rotation, -1, -2) @ rotation - np.eye(k)
    phi = up(_frobenius(gram) * (1 + g) + g * _frobenius(np.swapaxes(np.abs(rotation), -1, -2) @ np.abs(rotation)))
    if not np.all(phi < 0.25):
        raise CertificationError("the eigenvectors of a Ritz vector are not orthonormal")
    phi_inv = phi / (1.0 - phi)
    negative = np.maximum(-unit_values[:, 0], 0.0)
    positive = np.maximum(unit_values, 0.0)
    rotation_t = np.swapaxes(rotation, -1, -2)
    scaled_images = (signs / top)[:, None, None] * images
    A = rotation_t @ scaled_images @ rotation
    A = 0.5 * (A + np.swapaxes(A, -1, -2))
    B = rotation_t @ identity_images @ rotation
    B = 0.5 * (B + np.swapaxes(B, -1, -2))
    abs_rt = np.swapaxes(np.abs(rotation), -1, -2)
    g2 = gamma(2 * k + 4)
    # ||R^T Y R - fl(R^T Y R)|| for the two products, and the images' own errors carried through
    # R (||R^T E R|| <= (1 + phi) ||E||).
    error_a = up(g2 * _frobenius(abs_rt @ np.abs(scaled_images) @ np.abs(rotation))
                 + (1 + phi) * (image_errors / top * (1 + g) + 2 * UNIT_ROUNDOFF * _frobenius(scaled_images)))
    error_b = up(g2 * _frobenius(abs_rt @ np.abs(identity_images) @ np.abs(rotation)) + (1 + phi) * identity_errors)
    tight = 0.5 * target_rtol * np.maximum(np.abs(thetas), np.finfo(float).tiny)
    floor = np.maximum(np.log10(np.maximum(negative, 1e-15)), -15.0)
    best = np.full(m, np.inf)
    best_point = np.zeros(m)

    def constant(delta, which):
        # c = ||E|| + (nu + delta)(1 + phi) + ||X - R diag(max(lam, 0) + delta) R^T||
        size = 1.0 + delta
        return e_dec[which] + (negative[which] + delta) * (1 + phi[which]) + \
            (1 + phi[which]) * size * (2 * phi_inv[which] + phi_inv[which] ** 2)

    def matrix(points, which):
        delta = 10.0 ** points
        c = constant(delta, which)
        scale = 1.0 / np.sqrt(positive[which] + delta[:, None])
        core = A[which] + c[:, None, None] * B[which]
        M = scale[:, :, None] * core * scale[:, None, :]
        # Errors of the core matrix, bounded in the Loewner order by a multiple of the identity,
        # which S o turns into a diagonal; the entrywise products add gamma(4) relative.
        slack = error_a[which] + c * error_b[which]
        M = M + (slack[:, None] * scale * scale)[:, :, None] * np.eye(k)
        extra = up(gamma(6) * _frobenius(np.abs(scale[:, :, None] * core * scale[:, None, :])))
        return M, extra

    def evaluate(points, which):
        points = np.clip(points, floor[which], 0.0)
        M, extra = matrix(points, which)
        bound = np.linalg.eigvalsh(M)[:, -1] + extra
        bound = np.where(np.isfinite(bound), bound, np.inf)
        better = bound < best[which]
        best[which[better]] = bound[better]
        best_point[which[better]] = points[better]

    pending = np.arange(m)
    for guess in _DELTA_GUESSES:
        evaluate(np.full(pending.size, guess), pending)
        pending = pending[best[pending] - lower[pending] > tight[pending]]
        if pending.size == 0:
            break
    for step in _DELTA_STEPS:
        if pending.size == 0:
            break
        centre = best_point[pending].copy()
        evaluate(centre - step, pending)
        evaluate(centre + step, pending)
        pending = pending[best[pending] - lower[pending] > tight[pending]]
    # The chosen delta's bound, verified: LAPACK's top eigenvalue checked by its residual.
    everyone = np.arange(m)
    finite = np.isfinite(best)
    upper = np.full(m, np.inf)
    if np.any(finite):
        which = everyone[finite]
        M, extra = matrix(np.clip(best_point[which], floor[which], 0.0), which)
        upper[which] = up(_verified_top(M)[0] + extra)
    upper = np.maximum(upper, lower)
    if not np.all(np.isfinite(upper)):
        raise CertificationError("the Collatz-Wielandt bound is not finite")
    return lower, upper


def _frobenius(matrices):
    return np.sqrt(np.sum(np.asarray(matrices) ** 2, axis=(-2, -1)))


def certify_top_eigenvalue(theta: float, vector: np.ndarray, image: np.ndarray,
                           identity_image: np.ndarray, *, image_error: float = 0.0,
                           identity_error: float = 0.0,
                           target_rtol: float = CERTIFY_RTOL) -> Bracket:
    """:func:`certify_top_eigenvalues` for one operator, as a ``Bracket``. ``image_error`` and
    ``identity_error`` bound the Frobenius norm of the errors of the computed ``image`` and
    ``identity_image`` (0: they are exact, e.g. a dense matrix's products in a test)."""
    lower, upper = certify_top_eigenvalues(np.array([theta]), vector[None], image[None],
                                           identity_image[None], image_errors=image_error,
                                           identity_errors=identity_error, target_rtol=target_rtol)
    return Bracket(value=float(theta), lower=float(lower[0]), upper=float(upper[0]),
                   certified=bool(upper[0] - lower[0] <= target_rtol * abs(theta)))


def _residual_floor(matrix: np.ndarray, factor: np.ndarray) -> float:
    """A proven ``e >= 0`` with ``matrix >= factor^T factor - e I >= -e I`` (``factor`` upper
    triangular, from a floating-point Cholesky factorisation of the float matrix ``matrix``):
    ``e`` bounds ``||R^T R - matrix||_2`` by the computed residual plus the rounding of
    ``fl(R^T R)`` (``gamma(k) |R^T| |R|`` entrywise, any summation order, Frobenius norm at most
    ``gamma(k) ||R||_F^2``) and of the subtraction and the norms."""
    from scipy.linalg.blas import dtrmm
    k = matrix.shape[0]
    residual = dtrmm(1.0, factor, factor, trans_a=1)          # R^T R (R upper triangular)
    # Against matrix^T (for a C-ordered matrix the Fortran-ordered view, so no strided pass):
    # v^T matrix v = v^T matrix^T v, so the Loewner bound for matrix^T is one for matrix.
    residual -= matrix.T
    g = gamma(k * k + 4)
    size = float(np.einsum("ij,ij->", factor, factor))
    return float(up((float(np.linalg.norm(residual)) * (1.0 + UNIT_ROUNDOFF) + gamma(k + 2) * size)
                    * (1.0 + g) * (1.0 + 4 * UNIT_ROUNDOFF)))


def proven_cholesky(matrix: np.ndarray):
    """``(factor, e)`` of :func:`_residual_floor` for a symmetric float ``matrix``, or None when
    the floating-point Cholesky factorisation breaks down (not numerically positive definite)."""
    from scipy.linalg.lapack import dpotrf
    # The upper triangle of matrix^T (a Fortran-ordered view of a C-ordered matrix: no transposing
    # copy); _residual_floor measures against matrix^T as well.
    factor, info = dpotrf(matrix.T, lower=0, clean=1, overwrite_a=0)
    if info != 0 or not np.all(np.isfinite(np.diagonal(factor))):
        return None
    return factor, _residual_floor(matrix, factor)


def top_of_pencil(factor: np.ndarray, difference: np.ndarray, steps: int = 24) -> float:
    """Estimate (Lanczos, floating point, not a proof) of the largest eigenvalue of
    ``R^-T difference R^-1`` for an upper triangular R: what the Collatz-Wielandt bound adds to
    the Ritz value. Used only to choose the shift that the Cholesky test then proves."""
    from scipy.linalg import solve_triangular
    k = factor.shape[0]

    def apply(v):
        w = solve_triangular(factor, v, lower=False, check_finite=False)
        w = difference @ w
        return solve_triangular(factor, w, lower=False, trans=1, check_finite=False)

    rng = np.random.default_rng(12345)
    v = rng.standard_normal(k)
    v /= np.linalg.norm(v)
    basis, alphas, betas = [v], [], []
    top = 0.0
    for j in range(min(steps, k)):
        w = apply(basis[-1])
        alpha = float(basis[-1] @ w)
        alphas.append(alpha)
        Q = np.array(basis)
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)
        beta = float(np.linalg.norm(w))
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        top = float(np.linalg.eigvalsh(T)[-1])
        if not beta > 1e-14 * max(abs(top), 1e-300) or j == steps - 1:
            break
        betas.append(beta)
        basis.append(w / beta)
    return top


def certify_by_cholesky(theta: float, vector: np.ndarray, image: np.ndarray, *,
                        image_error: float, target_rtol: float = CERTIFY_RTOL):
    """A proven bracket around the top eigenvalue of a cone-preserving operator T on k x k
    symmetric matrices from a positive definite approximate top eigenvector, with no eigen-
    decomposition: only Cholesky factorisations, each verified by its residual. Returns a
    ``Bracket`` or None when ``vector`` is not (provably) positive definite.

    ``vector`` X must be exactly symmetric (as a float matrix) and ``image`` the computed T(X),
    ``||image - T(X)||_F <= image_error``. Then (Collatz-Wielandt):

    * ``X >= x I`` with ``x > 0`` is proven by a verified Cholesky factorisation of ``X - x' I``
      (:func:`_residual_floor`: ``x = x' - e``);
    * for a shift s, a verified Cholesky factorisation of ``fl(s X - image)`` proves
      ``s X - T(X) >= -tau I >= -(tau / x) X`` (tau: its residual, the rounding of forming it and
      ``image_error``), so ``T(X) <= (s + tau / x) X`` and ``rho(T) <= s + tau / x``;
    * the lower end is the Rayleigh quotient of X, recomputed with every rounding bounded
      (:func:`_rayleigh_lower`).

    The shift is chosen from an estimate of the top eigenvalue of the pencil
    ``(image - theta X, X)`` (a short Lanczos run on k-vectors); a failed factorisation raises it.
    Cost: about three Cholesky factorisations and two triangular products of k x k matrices,
    against two full symmetric eigen-decompositions for :func:`certify_top_eigenvalues`.
    """
    k = vector.shape[0]
    X = vector
    lower = float(_rayleigh_lower(X[None], image[None], np.array([image_error]))[0])
    from scipy.linalg.lapack import dpotrf
    factor, info = dpotrf(X.T, lower=0, clean=1, overwrite_a=0)  # X is exactly symmetric
    if info != 0 or not np.all(np.isfinite(np.diagonal(factor))):
        return None
    # Smallest eigenvalue of X, estimated by inverse iteration with its Cholesky factor.
    from scipy.linalg import cho_solve
    v = np.ones(k) / math.sqrt(k)
    estimate = math.inf
    for _ in range(12):
        w = cho_solve((factor, False), v, check_finite=False)
        norm = float(np.linalg.norm(w))
        if not (norm > 0 and math.isfinite(norm)):
            return None
        new = 1.0 / norm
        v = w / norm
        if abs(new - estimate) <= 1e-3 * new:
            estimate = new
            break
        estimate = new
    x_min = -math.inf
    shift = 0.5 * estimate
    for _ in range(4):
        shifted = X.copy()
        shifted[np.diag_indices(k)] -= shift  # the same floats as X - shift I, in one pass
        proof = proven_cholesky(shifted)
        if proof is not None:
            # X - shift I = fl(X - shift I) + D (diagonal, |D| <= u |diag|).
            rounding = UNIT_ROUNDOFF * float(np.max(np.abs(np.diagonal(shifted))))
            x_min = float(down(shift - proof[1] - rounding))
            break
        shift *= 0.25
    if not x_min > 0:
        return None
    scale = max(abs(theta), np.finfo(float).tiny)
    difference = image - theta * X
    excess = max(top_of_pencil(factor, 0.5 * (difference + difference.T)), 0.0)
    x_norm = _frobenius(X)
    image_norm = _frobenius(image)
    g2 = gamma(4)
    best = math.inf
    margin = 0.25 * excess + 1e-13 * scale
    for _ in range(5):
        s = theta + excess + margin
        B = s * X - image
        proof = proven_cholesky(B)
        if proof is not None:
            # The Frobenius norms themselves carry a relative rounding of gamma(k^2 + 2).
            tau = proof[1] + g2 * (abs(s) * x_norm + image_norm) * (1.0 + g2) * (
                1.0 + gamma(k * k + 2)) + image_error
            best = float(up(up(s) + up(up(tau * (1.0 + 4 * UNIT_ROUNDOFF)) / x_min)))
            break
        margin *= 8.0
    if not math.isfinite(best):
        return None
    upper = max(best, lower)
    return Bracket(value=float(theta), lower=lower, upper=upper,
                   certified=bool(upper - lower <= target_rtol * abs(theta)))


def certify_with_complement(theta: float, vector: np.ndarray, image: np.ndarray,
                            complement: np.ndarray, complement_image: np.ndarray,
                            identity_image: np.ndarray, *, error: float = 0.0,
                            lower: float = -math.inf) -> Bracket:
    """A Collatz-Wielandt bracket with ``X = V+ + delta W'``, W a PSD matrix chosen by the caller.

    The fast certificate uses ``W = I``, whose bound on the part of the space that the Ritz
    vector V leaves empty is ``lambda_max(T(I))`` there, which can exceed the top eigenvalue
    when the top eigenvector is singular (decoupled blocks of samples, for instance). A power
    iterate ``W = T^m(I)`` (PSD) has a bound that decreases towards the spectral radius of that
    part as m grows. With ``W = W+ - W-`` and ``W' = W+ + eps I`` (PD),
    ``T(X) <= T(V) + nu_V T(I) + delta (T(W) + (nu_W + eps) T(I))``; the bound is the top
    eigenvalue of that matrix relative to X (a definite pencil), minimised over a few delta.

    ``error`` bounds the Frobenius error of each computed image per unit Frobenius norm of its
    argument; it enters, with the residuals of the PSD-part decompositions, as a multiple of the
    identity, divided by the smallest eigenvalue of X; the pencil's eigenvalue is given a
    relative allowance of ``gamma(4 k)`` times its condition. ``lower`` is the caller's proven
    lower bound (a Rayleigh quotient).
    """
    k = vector.shape[0]
    g = gamma(4 * k + 8)

    def parts(matrix):
        values, rotation, sign = _psd_part(matrix[None])
        top = values[0, -1]
        if not top > 0:
            raise CertificationError("a certificate matrix has no positive part")
        positive = (rotation[0] * np.maximum(values[0], 0.0)) @ rotation[0].T / top
        negative = (rotation[0] * np.maximum(-values[0], 0.0)) @ rotation[0].T / top
        unit = sign[0] / top * 0.5 * (matrix + matrix.T)
        # positive - negative = unit + residual; T(positive) <= T(unit) + (nu + ||residual||
        # + rounding) T(I), with nu = ||negative||_2 <= its Frobenius norm.
        residual = float(np.linalg.norm(positive - negative - unit)) + g * (
            float(np.linalg.norm(np.abs(rotation[0]) * np.abs(values[0]) @ np.abs(rotation[0]).T)) / top
            + float(np.linalg.norm(unit)))
        nu = float(np.linalg.norm(negative)) * (1 + g) + residual
        return positive, nu, sign[0] / top, float(np.linalg.norm(matrix)) / top

    V, nu_v, v_scale, v_norm = parts(vector)
    W, nu_w, w_scale, w_norm = parts(complement)
    TV = v_scale * image
    TW = w_scale * complement_image
    eps = max(nu_w, 1e-15)
    W = W + eps * np.eye(k)
    identity_error = error * math.sqrt(k)
    best = math.inf
    for log_delta in (-12.0, -9.0, -6.0, -4.0, -2.0, 0.0, 2.0):
        delta = 10.0 ** log_delta
        X = 0.5 * (V + delta * W)
        X = X + X.T
        bound = TV + nu_v * identity_image + delta * (TW + (nu_w + eps) * identity_image)
        bound = 0.5 * (bound + bound.T)
        slack = (error * v_norm + nu_v * identity_error + delta * (error * w_norm + (nu_w + eps) * identity_error)
                 + g * (float(np.linalg.norm(TV)) + nu_v * float(np.linalg.norm(identity_image))
                        + delta * (float(np.linalg.norm(TW)) + (nu_w + eps) * float(np.linalg.norm(identity_image)))))
        try:
            values = eigh(bound, X, eigvals_only=True, check_finite=False)
            floor = float(np.linalg.eigvalsh(X)[0]) - g * float(np.linalg.norm(X))
        except np.linalg.LinAlgError:  # X not numerically positive definite at this delta
            continue
        if not floor > 0 or not math.isfinite(values[-1]):
            continue
        condition = float(np.linalg.norm(X)) / floor
        candidate = float(values[-1]) + slack / floor + g * condition * (
            abs(float(values[-1])) + float(np.linalg.norm(bound)) / floor)
        best = min(best, candidate)
    if not math.isfinite(best):
        raise CertificationError("the Collatz-Wielandt bound is not finite")
    return Bracket(value=float(theta), lower=float(min(lower, theta)), upper=float(up(max(best, lower))))


def dense_top_eigenvalue(apply, k: int) -> Bracket:
    """The top eigenvalue of a self-adjoint operator on k x k symmetric matrices from its dense
    matrix (k (k + 1) / 2 products and one dense symmetric eigensolve), with a proven bracket.

    Every eigenvalue is computed, so "top" is unambiguous. The matrix's error is bounded by the
    operator's rounding (``apply.rounding``, per unit Frobenius norm of the argument, when the
    operator states one), and the eigensolve is verified by its residual (Weyl and Bauer-Fike,
    with the computed eigenvectors' departure from orthonormality), so the bracket holds for the
    exact operator. For clustered spectra (eigenvalues within 1e-9 of each other near 1, from
    directions of tiny curvature) this is far tighter than a Collatz-Wielandt bound from an
    approximate eigenvector.
    """
    rounding = float(getattr(apply, "rounding", 0.0))
    rows, columns = np.triu_indices(k)
    weights = np.where(rows == columns, 1.0, math.sqrt(2.0))
    m = rows.size
    matrix = np.empty((m, m))
    for index in range(m):
        E = np.zeros((k, k))
        E[rows[index], columns[index]] = E[columns[index], rows[index]] = 1.0 / weights[index]
        image = np.asarray(apply(E), dtype=np.float64)
        matrix[:, index] = image[rows, columns] * weights
    # Each column's error: the product's (||E||_F = 1) times the weights (<= sqrt 2), plus the
    # weighting's rounding; the exact matrix is symmetric, so symmetrising adds no error.
    g = gamma(4)
    column_error = math.sqrt(2.0) * rounding * (1 + g) + g * np.sqrt(np.sum(matrix * matrix, axis=0))
    matrix_error = float(up(math.sqrt(float(np.sum(column_error ** 2))) * (1 + g)))
    symmetric = 0.5 * (matrix + matrix.T)
    upper, lower = _verified_top(symmetric[None])
    top = float(np.linalg.eigvalsh(symmetric)[-1])
    return Bracket(value=top, lower=float(down(lower[0] - matrix_error)),
                   upper=float(up(upper[0] + matrix_error)), products=m)


LANCZOS_MIN_BASIS = 24
"""Fewest Krylov vectors kept before a restart, whatever the memory budget (a restart from one
Ritz vector loses the rest of the basis: at k = 2,000 the budget alone allowed 12, and the solve
took half again as many products)."""


class Packing:
    """The packed form of k x k symmetric matrices: the upper triangle, row by row, with the
    off-diagonal entries times sqrt(2), so that Euclidean inner products of packed vectors are
    Frobenius inner products of the matrices."""

    def __init__(self, k: int):
        self.k = k
        self._mask = np.triu(np.ones((k, k), dtype=bool))  # row-major: the packed order
        rows, columns = np.nonzero(self._mask)
        self._weights = np.where(rows == columns, 1.0, math.sqrt(2.0))
        # Start of each row's segment (row i holds columns i .. k - 1).
        self._starts = np.concatenate([[0], np.cumsum(np.arange(k, 0, -1))]).tolist()

    def pack(self, matrix: np.ndarray) -> np.ndarray:
        """Packed sym(matrix) (the upper triangle of an exactly symmetric matrix)."""
        matrix = np.asarray(matrix, dtype=np.float64).reshape(self.k, self.k)
        return matrix[self._mask] * self._weights

    def unpack(self, vector: np.ndarray) -> np.ndarray:
        """The exactly symmetric k x k matrix of a packed vector."""
        out = np.empty((self.k, self.k))
        values = vector / self._weights
        starts = self._starts
        for i in range(self.k):  # row by row: ~3x faster than fancy indexing at k = 2,000
            segment = values[starts[i]:starts[i + 1]]
            out[i, i:] = segment
            out[i:, i] = segment
        return out


def _takes_out(apply) -> bool:
    return getattr(apply, "accepts_out", False)


def certified_top_eigenvalue(apply, k: int, *, rtol: float, start: np.ndarray | None = None,
                             certify_rtol=CERTIFY_RTOL, scale_hint: float = 0.0,
                             power_steps: int = POWER_STEPS) -> Bracket:
    """Top eigenvalue of a cone-preserving self-adjoint operator on k x k symmetric matrices,
    with a proven bracket.

    Lanczos starts from the identity (interior of the PSD cone: it overlaps the PSD top
    eigenvector, so the top eigenvalue cannot be missed in exact arithmetic) unless ``start`` is
    given (Lanczos runs on packed upper triangles, :class:`Packing`). Each time it meets its
    tolerance, the Ritz vector's image is computed directly (one product, and one more for its
    proven rounding) and :func:`certify_by_cholesky` (verified Cholesky factorisations, no
    eigen-decomposition; for a positive definite Ritz vector), else
    :func:`certify_top_eigenvalue` (eigen-decomposition of the Ritz vector, with T(I)) tries to
    prove a bracket at most ``certify_rtol`` wide; if it cannot, the same Lanczos run
    continues with a tighter tolerance (a sharper Ritz vector gives a sharper bound), a few
    times. Only if that fails too (a singular top eigenvector: samples acting on decoupled
    blocks of parameters; or eigenvalues clustered within 1e-9 near 1), a small operator
    (``k (k + 1) / 2 <= DENSE_DIMENSION``) is solved densely (:func:`dense_top_eigenvalue`),
    and a larger one gets power iterates of the identity, which sharpen the bound where the
    Ritz vector is empty (:func:`certify_with_complement`, at most ``power_steps`` products).
    Returns the tightest bracket found, with ``certified`` saying whether it met
    ``certify_rtol``, which may be a function of the value (the spectral radius asks for a
    tolerance relative to ``|1 - rho|`` near 1).
    """
    tolerance = certify_rtol if callable(certify_rtol) else (lambda value: certify_rtol)
    identity = np.eye(k)
    products = 0
    identity_image = None
    if start is not None:
        identity_image = np.asarray(apply(identity), dtype=np.float64)
        products += 1
    found = {}
    packing = Packing(k)

    rounding = float(getattr(apply, "rounding", 0.0))
    error_of = getattr(apply, "error_of", None)
    if error_of is None:
        def error_of(X):
            return rounding * float(np.linalg.norm(X))
    identity_errors = {}

    def identity_error():
        # T(I) from the first product (of I / ||I||, times ||I||) or from a product of I itself;
        # its error is needed only by the eigen-decomposition certificate (one more product).
        if "value" not in identity_errors:
            identity_errors["value"] = error_of(identity) * (1.0 + 4 * UNIT_ROUNDOFF) \
                if (rounding or error_of) else 0.0
            found["products"] = found.get("products", 0) + 1
        return identity_errors["value"]

    def accept(pair: Eigenpair) -> bool:
        image_of_identity = packing.unpack(pair.start_image) if identity_image is None \
            else identity_image
        # The Lanczos relation's image carries the rounding of the whole run: the certificate
        # takes a direct product of the Ritz vector instead, whose error is proven (one product).
        # The vector is an exactly symmetric float matrix (unpacked), with a nonnegative trace.
        vector = packing.unpack(pair.vector)
        if np.trace(vector) < 0:
            vector = -vector
        image = np.asarray(apply(vector), dtype=np.float64)
        found["products"] = found.get("products", 0) + 2
        image_error = error_of(vector)
        found["image"] = image
        found["vector"] = pair.vector
        found["full_vector"] = vector
        found["identity_image"] = image_of_identity
        target = tolerance(pair.value)
        bracket = certify_by_cholesky(pair.value, vector, image, image_error=image_error,
                                      target_rtol=target)
        if bracket is None or not good(bracket):
            # A Ritz vector that is not positive definite (singular top eigenvector) or a bound
            # too wide: the eigen-decomposition certificate, with the PSD part and T(I).
            full = certify_top_eigenvalue(pair.value, vector, image, image_of_identity,
                                          image_error=image_error,
                                          identity_error=identity_error(), target_rtol=target)
            if bracket is None or full.width < bracket.width:
                bracket = full
        bracket = replace(bracket, error=float(pair.error))
        if "best" not in found or bracket.width < found["best"].width:
            found["best"] = bracket
        return good(bracket)

    def good(bracket):
        # Relative to the value, plus twice the rounding allowance (a value near 0 formed by
        # cancellation of terms of size scale_hint is known only to that).
        allowance = 2.0 * ROUNDING_RTOL * math.sqrt(k) * scale_hint
        return bracket.width <= tolerance(bracket.value) * abs(bracket.value) + allowance + np.finfo(float).tiny

    dimension = k * (k + 1) // 2
    # Beyond `dimension` products the dense solve (below) is cheaper than more Lanczos.
    budget = LANCZOS_MAX_PRODUCTS if dimension > DENSE_DIMENSION else max(dimension, 32)
    # Lanczos on the packed upper triangle (off-diagonal entries times sqrt 2: Euclidean inner
    # products are Frobenius ones), half the memory and work of full k x k vectors.
    out = np.empty((k, k))

    symmetric = {"symmetric": True} if getattr(apply, "accepts_symmetric", False) else {}

    def packed_apply(vector):
        return packing.pack(apply(packing.unpack(vector), out, **symmetric) if _takes_out(apply)
                            else apply(packing.unpack(vector)))

    try:
        pair = largest_eigenpair(packed_apply, packing.pack(identity if start is None else start),
                                 dimension=dimension, rtol=rtol, accept=accept, max_products=budget,
                                 min_basis=LANCZOS_MIN_BASIS)
    except ConvergenceError as exc:
        # Clustered spectra can stall Lanczos; its last Ritz pair still gives a proven bracket,
        # which the fallbacks below tighten (and the caller reports if they cannot).
        pair = exc.pair
        accept(pair)
    if found.get("vector") is not pair.vector:  # the final pair was not certified yet
        accept(pair)
    products += pair.products + found["products"]
    best = found["best"]
    identity_image = found["identity_image"]
    pair = replace(pair, vector=found["full_vector"])

    if good(best):
        return replace(best, products=products, certified=True)
    if k * (k + 1) // 2 <= DENSE_DIMENSION:
        dense = dense_top_eigenvalue(apply, k)
        products += dense.products
        return replace(dense, products=products, error=0.0, certified=good(dense))
    complement, complement_image = identity, identity_image
    for step in range(1, power_steps + 1):
        complement = complement_image / np.trace(complement_image)
        complement_image = np.asarray(apply(complement), dtype=np.float64)
        products += 1
        if step % 8 and step != power_steps:
            continue
        bracket = certify_with_complement(pair.value, pair.vector, found["image"], complement,
                                          complement_image, identity_image, error=rounding,
                                          lower=best.lower)
        if bracket.width < best.width:
            best = replace(bracket, error=float(pair.error))
        if good(best):
            break
    return replace(best, products=products, certified=good(best))


# ----------------------------------------------------------------------------- momentum
# The momentum operators are X -> g o V(X): V a fixed self-adjoint map that preserves the PSD cone
# (the noise operator) and g a symmetric k x k matrix (the gain of the deterministic part, a
# Gram matrix, so that g o preserves the PSD cone by Schur's theorem) that changes with the
# learning rate. g may have negative entries, so g o V is not self-adjoint in any inner product
# that is known for all three sampling schemes (<X, V Y> is one only where V is positive on all
# symmetric matrices, Bernoulli's N, not N - H(x)H). So the solver is a Krylov (Arnoldi-type)
# Rayleigh-Ritz iteration for non-symmetric operators, with the Perron root (the largest real
# eigenvalue, which is the spectral radius for a cone-preserving map) taken from the projected
# matrix and certified by Collatz-Wielandt bounds on both sides, which need only cone
# preservation. The basis and its images under V are shared by every g: a root finder over the
# learning rate (or over a growth factor) changes g only, and most of its steps cost no product
# of V at all.


class ConeKrylov:
    """A shared basis for the Perron roots of ``X -> g o V(X)`` (V fixed, g varying).

    Orthonormal symmetric k x k matrices with their images under V, stored packed (the upper
    triangle, off-diagonal entries times sqrt(2), so that dot products are Frobenius products
    and ``g o X`` is an entrywise product of packed vectors): half the memory and half the
    work of full k x k storage. The identity is the first vector (the interior of the PSD cone,
    so the Perron vector is never missed). ``products`` counts applications of V. The
    projected matrix ``W diag(g) VW^T`` of the last g is kept and extended by a row and a column
    when the basis grows (O(m k^2) instead of O(m^2 k^2)). Vectors in and out are full
    (flattened k x k) matrices.
    """

    def __init__(self, apply, k: int, *, capacity: int, enclosure=None):
        self.apply = apply
        # ``enclosure(X) -> (mid, radius)``: a proven enclosure of V(X) (``_verified``); with it
        # ``certify``'s bounds are proofs that survive floating point, not estimates.
        self.enclosure = enclosure
        self.k = k
        self.capacity = int(max(2, min(capacity, k * (k + 1) // 2)))
        rows, columns = np.triu_indices(k)
        self._rows, self._columns = rows, columns
        self._weights = np.where(rows == columns, 1.0, math.sqrt(2.0))
        size = rows.size
        self.W = np.empty((self.capacity, size))
        self.VW = np.empty((self.capacity, size))
        self.size = 0
        self.products = 0
        self._gain = None
        self._projected = np.empty((self.capacity, self.capacity))
        self._projected_size = 0
        identity = np.eye(k)
        self.identity_image = self._apply(identity).ravel()
        self.add(identity.ravel(), self.identity_image)

    def pack(self, matrix: np.ndarray) -> np.ndarray:
        """Packed form of sym(matrix) (any shape with k * k entries)."""
        matrix = matrix.reshape(self.k, self.k)
        return 0.5 * (matrix[self._rows, self._columns] + matrix[self._columns, self._rows]) \
            * self._weights

    def unpack(self, vector: np.ndarray) -> np.ndarray:
        """The flattened k x k symmetric matrix of a packed vector."""
        out = np.empty((self.k, self.k))
        values = vector / self._weights
        out[self._rows, self._columns] = values
        out[self._columns, self._rows] = values
        return out.ravel()

    def _apply(self, matrix: np.ndarray) -> np.ndarray:
        image = np.asarray(self.apply(matrix.reshape(self.k, self.k)), dtype=np.float64)
        self.products += 1
        if not np.all(np.isfinite(image)):
            raise ArithmeticError("the operator produced inf or NaN (its scale overflows)")
        return image

    def add(self, vector: np.ndarray, image: np.ndarray | None = None) -> bool:
        """Orthogonalise (twice) and append a full matrix; ``image = V(vector)`` if known (no
        product)."""
        v = self.pack(vector)
        original = float(np.linalg.norm(v))
        if original == 0.0 or self.size >= self.capacity:
            return False
        m = self.size
        coefficients = np.zeros(m)
        for _ in range(2):
            if m:
                c = self.W[:m] @ v
                v = v - c @ self.W[:m]
                coefficients += c
        norm = float(np.linalg.norm(v))
        if norm <= 1e-10 * original:
            return False
        if image is None:
            v = v / norm
            image = self.pack(self._apply(self.unpack(v)))
        else:
            image = self.pack(image)
            if m:
                image = image - coefficients @ self.VW[:m]
            v, image = v / norm, image / norm
        self.W[m], self.VW[m] = v, image
        self.size = m + 1
        return True

    def restart(self, vectors, images) -> None:
        """Replace the basis by the span of packed ``vectors`` (rows in the current span, packed
        images known)."""
        vectors = np.asarray(vectors)
        images = np.asarray(images)
        gram = vectors @ vectors.T
        values, rotation = np.linalg.eigh(0.5 * (gram + gram.T))
        keep = values > 1e-12 * values[-1]
        transform = rotation[:, keep] / np.sqrt(values[keep])
        W, VW = transform.T @ vectors, transform.T @ images
        self.size = W.shape[0]
        self.W[: self.size], self.VW[: self.size] = W, VW
        self._gain = None

    def _project(self, g: np.ndarray) -> np.ndarray:
        """``P_ij = <W_i, g o VW_j>`` for packed g."""
        m = self.size
        P = self._projected
        if self._gain is None or not np.array_equal(self._gain, g):
            P[:m, :m] = (self.W[:m] * g) @ self.VW[:m].T
            self._gain = g.copy()
        else:
            for j in range(self._projected_size, m):
                P[:j + 1, j] = self.W[:j + 1] @ (g * self.VW[j])
                P[j, :j] = self.VW[:j] @ (g * self.W[j])
        self._projected_size = m
        return P[:m, :m]

    def ritz(self, gain: np.ndarray):
        """Perron Ritz pair of ``g o V`` in the basis: ``(theta, vector, image, residual_norm,
        noise_image)``, full flattened matrices: ``vector`` unit-norm (trace >= 0),
        ``image = g o V(vector)`` and ``noise_image = V(vector)`` (no product)."""
        m = self.size
        g = self.pack(gain) / self._weights
        values, vectors = np.linalg.eig(self._project(g))
        real = np.abs(values.imag) <= 1e-9 * np.maximum(np.abs(values), np.finfo(float).tiny)
        candidates = np.flatnonzero(real) if np.any(real) else np.arange(m)
        index = candidates[np.argmax(values.real[candidates])]
        theta = float(values[index].real)
        c = vectors[:, index].real
        if not np.any(c):
            c = vectors[:, index].imag
        packed = c @ self.W[:m]
        packed_noise = c @ self.VW[:m]
        norm = float(np.linalg.norm(packed))
        vector = self.unpack(packed)
        trace = float(np.sum(vector[:: self.k + 1]))
        scale = (-1.0 if trace < 0 else 1.0) / norm
        vector, noise_image = vector * scale, self.unpack(packed_noise) * scale
        packed, packed_noise = packed * scale, packed_noise * scale
        residual = float(np.linalg.norm(g * packed_noise - theta * packed))
        self._last = (packed, packed_noise)
        return theta, vector, gain.ravel() * noise_image, residual, noise_image

    def solve(self, gain: np.ndarray, *, rtol: float, max_products: int = LANCZOS_MAX_PRODUCTS):
        """Expand the basis (residual vectors, one product each) until the Perron Ritz pair of
        ``g o V`` has residual <= ``rtol |theta|``, or the basis spans an invariant subspace."""
        start = self.products
        while True:
            pair = self.ritz(gain)
            theta, vector, image, residual = pair[:4]
            scale = max(abs(theta), np.finfo(float).tiny)
            if residual <= rtol * scale or self.products - start >= max_products:
                return pair
            if self.size >= self.capacity:
                # Keep the identity and the Ritz vector (images known: no product), then go on.
                packed, packed_noise = self._last
                self.restart(np.vstack([self.W[0], packed]), np.vstack([self.VW[0], packed_noise]))
            if not self.add(image - theta * vector):
                return pair

    def _certify_proven(self, g, theta, positive, target_rtol, upper_goal, lower_goal):
        """``certify`` with proven bounds (``enclosure`` given): Collatz-Wielandt on
        ``X = Y+ + delta I`` (and on Y+ itself for the lower bound) through ``_verified``'s
        enclosures of ``g o V(X)`` and its Gershgorin test on a congruence."""
        return _certify_proven_impl(self, g, float(theta), positive, target_rtol, upper_goal,
                                    lower_goal)

    def certify(self, gain: np.ndarray, theta: float, vector: np.ndarray, *,
                target_rtol: float, scale_hint: float = 0.0, upper_goal: float = -math.inf,
                lower_goal: float = math.inf) -> Bracket:
        """A proven bracket around the Perron root of ``T = g o V`` (Collatz-Wielandt, both sides).

        ``X = Y+ + delta I`` with Y+ the PSD part of the Ritz vector (eigenvalues below 1e-10 of
        the largest set to 0): ``T(X) = g o V(Y+) + delta g o V(I)`` is computed exactly (one
        product of V), and for positive definite X, ``lambda_min(X^-1/2 T(X) X^-1/2) <= rho(T)
        <= lambda_max(X^-1/2 T(X) X^-1/2)``, for every cone-preserving T (no self-adjointness).
        A singular Perron vector (decoupled blocks) makes the lower bound from delta > 0 loose,
        so ``delta = 0`` is also tried: ``T(Y+) >= c Y+`` proves ``rho >= c``, with the block
        inequality ``[[A, B], [B^T, C]] >= 0 <= A - B B^T / t >= 0, C >= t I``. The search over
        delta stops once the bracket is ``target_rtol / 2`` tight on both sides, or once the
        upper bound is at most ``upper_goal`` or the lower bound at least ``lower_goal`` (what a
        caller needs to prove).
        """
        k = self.k
        g = gain.reshape(k, k)
        Y = vector.reshape(k, k)
        values, rotation = eigh(0.5 * (Y + Y.T), check_finite=False)
        if -values[0] > values[-1]:
            values = -values
        top = values.max()
        if not top > 0:
            raise CertificationError("a Ritz vector has no positive part")
        values = np.where(values > 1e-10 * top, values / top, 0.0)
        positive = (rotation * values) @ rotation.T
        image_positive = self._apply(positive)
        self.add(positive.ravel(), image_positive)
        if self.enclosure is not None:
            return self._certify_proven(g, theta, positive, target_rtol, upper_goal, lower_goal)
        Z = rotation.T @ (g * image_positive) @ rotation
        Z = 0.5 * (Z + Z.T)
        TI = rotation.T @ (g * self.identity_image.reshape(k, k)) @ rotation
        TI = 0.5 * (TI + TI.T)
        rounding = ROUNDING_RTOL * math.sqrt(k) * max(abs(theta), scale_hint)
        tight = 0.5 * target_rtol * max(abs(theta), np.finfo(float).tiny)
        lower, upper = -math.inf, math.inf

        goal = math.isfinite(upper_goal) or math.isfinite(lower_goal)

        def done():
            if goal:  # only the goal matters (a bracket "tight enough" may still fall short)
                return upper + rounding <= upper_goal or max(lower, 0.0) - rounding >= lower_goal
            return upper - theta <= tight and theta - lower <= tight

        support = values > 0
        if np.any(~support) and np.any(support):
            scale = 1.0 / np.sqrt(values[support])
            A = Z[np.ix_(support, support)]
            Bm = Z[np.ix_(support, ~support)]
            if not np.any(Bm):
                lower = float(_eigenvalues(scale[:, None] * A * scale)[0])
            else:
                t = float(_eigenvalues(Z[np.ix_(~support, ~support)])[0])
                if t > 0:
                    S = A - Bm @ Bm.T / t
                    lower = float(_eigenvalues(scale[:, None] * S * scale)[0])

        def evaluate(log_delta):
            delta = 10.0 ** log_delta
            scale = 1.0 / np.sqrt(values + delta)
            M = scale[:, None] * (Z + delta * TI) * scale[None, :]
            eigenvalues = _eigenvalues(0.5 * (M + M.T))
            return float(eigenvalues[0]), float(eigenvalues[-1])

        tried = {}
        for log_delta in (-6.0, -9.0, -3.0, -12.0, -14.0, 0.0):
            low, high = tried[log_delta] = evaluate(log_delta)
            lower, upper = max(lower, low), min(upper, high)
            if done():
                break
        else:
            best = min(tried, key=lambda key: tried[key][1])
            for step in (1.5, 0.75):
                for point in (best - step, best + step):
                    if point <= 0.0 and point not in tried:
                        low, high = tried[point] = evaluate(point)
                        lower, upper = max(lower, low), min(upper, high)
                best = min(tried, key=lambda key: tried[key][1])
        if not math.isfinite(upper):
            raise CertificationError("the Collatz-Wielandt bound is not finite")
        lower = max(lower, 0.0) - rounding
        upper = upper + rounding
        value = min(max(theta, lower), upper)
        return Bracket(value=value, lower=lower, upper=upper,
                       certified=bool(upper - lower <= target_rtol * abs(value) + 2 * rounding))


def _proven_gain_image(enclosure, g, X):
    """Enclosure ``(mid, radius)`` of ``g o V(X)`` for an exact float X and exact float g."""
    from ._verified import safe_radius
    V, rV = enclosure(X)
    mid = g * V
    absg = np.abs(g)
    radius = safe_radius(absg * rV + UNIT_ROUNDOFF * np.abs(mid), 2, absg * (np.abs(V) + rV) > 0.0)
    return mid, radius


def _certify_proven_impl(krylov, g, theta, positive, target_rtol, upper_goal, lower_goal):
    from ._verified import congruences, lower_bound, upper_bound
    k = krylov.k
    lower, upper = -math.inf, math.inf
    tight = 0.5 * target_rtol * max(abs(theta), np.finfo(float).tiny)
    for log_delta in (None, -12.0, -9.0, -6.0, -3.0, 0.0):
        # X is the float matrix itself (the enclosure is of V at exactly that matrix).
        X = positive if log_delta is None else positive + 10.0 ** log_delta * np.eye(k)
        TX, rTX = _proven_gain_image(krylov.enclosure, g, X)
        if not (np.all(np.isfinite(TX)) and np.all(np.isfinite(rTX))):
            continue
        S = congruences(X, TX)
        if S is None:
            lower = max(lower, lower_bound(X, TX, rTX))
        else:
            upper = min(upper, upper_bound(X, TX, rTX, S))
            lower = max(lower, lower_bound(X, TX, rTX, S))
        if upper <= upper_goal or lower >= lower_goal:
            break
        if upper - theta <= tight and theta - lower <= tight:
            break
    lower = max(lower, 0.0)
    value = min(max(theta, lower), upper) if math.isfinite(upper) else max(theta, lower)
    certified = math.isfinite(upper) and upper - lower <= target_rtol * abs(value)
    return Bracket(value=value, lower=lower, upper=upper, certified=bool(certified))


def _eigenvalues(matrix: np.ndarray) -> np.ndarray:
    """All eigenvalues of a symmetric matrix (scipy's LAPACK: numpy's own OpenBLAS threads
    slowed these solves tenfold beside the compiled kernels)."""
    return eigh(matrix, eigvals_only=True, check_finite=False)
