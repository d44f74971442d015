"""``HessianFamily``: the one input type of the library.

A family holds the per-sample factors ``U`` of shape ``(n, d, r)`` with ``H_i = U_i U_i^T``
(see the specification page, section "Setting"). It is validated once, on construction; every engine
takes a family and trusts it.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.linalg

from ._config import GRADIENT_MEAN_RTOL, JACOBIAN_RTOL, RANGE_RTOL
from ._rounding import verified_product
from ._threads import limited_blas
from ._validation import as_real_array, check_finite, check_positive_int, check_real_scalar
from ._warnings import warn as _warn_caller


class NotAMinimumWarning(UserWarning):
    """The per-sample gradients given to a family do not average to zero: the point is not a
    minimum of the loss (specification page, section "Non-interpolating minima: stationary covariance and the loss floor")."""


@dataclass(frozen=True)
class Reduction:
    """The family restricted to the range of H and written in H's eigenbasis.

    Stored in *units of the sharpness* so that every engine works at every scale floats can
    represent (specification page, section "Certified answers and scale"): ``unit_eigenvalues`` are the
    k positive eigenvalues of H divided by ``lambda_1(H)`` (descending, the first is 1) and
    ``unit_rows`` is the (n * r, k) array whose row ``i * r + c`` is column c of ``B^T U_i`` divided
    by ``sqrt(lambda_1(H))``, with B the (d, k) eigenvector basis. ``root_sharpness`` is
    ``sqrt(lambda_1(H))``, representable whenever the factors are (lambda_1 itself may not be).
    ``eigenvalues`` and ``rows`` are the same at the family's own scale (they overflow to inf or
    underflow to 0 only when lambda_1(H) itself is outside the float range).
    """

    unit_eigenvalues: np.ndarray
    unit_rows: np.ndarray
    root_sharpness: float
    rank: int  # r, the number of factor columns per sample
    scaled_sharpness: float = 0.0  # lambda_1(H) / scale^2 (scale a power of two)
    scale: float = 1.0
    # Backward error of the reduction (units of lambda_1), for the certificates: a family
    # congruent to the user's (projected on the kept range) has per-sample Hessians within
    # ``sample_errors[i]`` of ``R_i R_i^T`` (R_i the sample's rows), and its mean H within
    # ``mean_error`` of ``diag(unit_eigenvalues)`` (spectral norms). See ``reduction_error``.
    sample_errors: np.ndarray | None = None
    mean_error: float = 0.0
    # In H's own metric: ||P - I|| of the congruence; ``||D^{-1/2} (H_true - D) D^{-1/2}||``
    # (D the engine's diagonal H); and r with ``|<Z, (N_true - N) Z>| <= r <Z, D Z D>...``, see
    # ``_engine.widen_ratio``.
    congruence: float = 0.0
    relative_mean_error: float = 0.0
    relative_noise_error: float = 0.0

    @property
    def k(self) -> int:
        return self.unit_eigenvalues.shape[0]

    @cached_property
    def sharpness(self) -> float:
        """``lambda_1(H)`` (``inf`` if it exceeds the float range, 0.0 if there is no curvature)."""
        with np.errstate(over="ignore", under="ignore"):
            # scale is a power of two: exact unless the result leaves the float range.
            return float(np.float64(self.scaled_sharpness) * self.scale * self.scale) if self.k else 0.0

    @cached_property
    def eigenvalues(self) -> np.ndarray:
        with np.errstate(over="ignore", under="ignore"):
            return self.unit_eigenvalues * self.sharpness

    @cached_property
    def rows(self) -> np.ndarray:
        with np.errstate(over="ignore", under="ignore"):
            return self.unit_rows * self.root_sharpness

    def unit_lr(self, lr: float) -> float:
        """``lr * lambda_1(H)``: the learning rate in units of the sharpness (inf on overflow)."""
        with np.errstate(over="ignore", under="ignore"):
            sharpness = self.sharpness
            if np.finfo(float).tiny <= sharpness < math.inf:
                return float(np.float64(lr) * sharpness)
            # lambda_1 itself is outside the normal range: (lr scale)(scale lambda_1 / scale^2 ...)
            return float(np.float64(lr) * self.scale * (self.scale * self.scaled_sharpness))


class HessianFamily:
    """Per-sample Hessians ``H_i = U_i U_i^T`` near an interpolating minimum.

    Every function that takes a family also takes any object whose ``.family`` attribute is a
    HessianFamily, such as the ``ModelFamily`` that :func:`fastsgdstab.torch.family_from_model`
    returns: ``fs.critical_lr(family_from_model(model, X, Y, loss), 8)`` works as
    ``fs.critical_lr(result.family, 8)`` does (duck typing, see :func:`family_of`; the core never
    imports torch).

    Parameters
    ----------
    factors : array_like, shape (n, d, r)
        The factors ``U_i``; any real array ``np.asarray`` accepts. Copied and stored read-only
        as float64.
    population_size : int, optional (keyword only)
        N, the size of the training set the batches are drawn from, when the n samples are a
        uniform probe subset of it (specification page, section "A probe subset of a large
        training set"): the family is the probe's mean curvature and noise, the batch law the
        training set's (N in place of n in the coefficients of section "The exact
        second-moment map"; batch sizes range over [1, N]). An integer >= n; default n (the
        samples are the whole training set). Kept by every transformation, ``save`` and
        ``load``.
    gradients : array_like, shape (n, d), optional, keyword-only
        The per-sample gradients ``g_i`` of the loss at the point (specification page, section
        "Non-interpolating minima: stationary covariance and the loss floor"): at a minimum that does not interpolate (label noise, a
        model too small) they do not vanish and SGD settles at a loss floor
        (:func:`fastsgdstab.stationary`). Checked finite and of shape (n, d); a
        ``NotAMinimumWarning`` when the norm of their mean exceeds ``GRADIENT_MEAN_RTOL``
        (1e-6) times their root-mean-square norm. Kept by every transformation (the reduction
        to the range of H, ``preconditioned``, pickling, ``save``/``load``).

    Attributes
    ----------
    n, d, rank : int
        Number of samples, parameter dimension, columns per factor.
    population_size : int
        N, the training-set size of the batch law (n unless given).
    factors : ndarray, shape (n, d, rank)
        Read-only copy of the factors.
    gradients : ndarray, shape (n, d), or None
        Read-only copy of the per-sample gradients, if given.

    Raises
    ------
    TypeError
        Non-numeric data.
    ValueError
        Wrong number of dimensions, fewer than 2 samples, an empty axis, NaN or inf;
        ``population_size`` below n.

    Examples
    --------
    >>> import numpy as np
    >>> from fastsgdstab import HessianFamily
    >>> family = HessianFamily.from_features([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    >>> family.n, family.d, family.rank
    (3, 2, 1)
    >>> round(family.sharpness(), 6)   # (7 + sqrt(13)) / 6
    1.767592
    """

    def __init__(self, factors, *, population_size=None, gradients=None):
        factors = as_real_array(factors, "factors")
        if factors.ndim != 3:
            hint = " (use HessianFamily.from_features for an (n, d) array)" if factors.ndim == 2 else ""
            raise ValueError(
                f"factors must have shape (n, d, r), 3 dimensions; got {factors.ndim} "
                f"dimension(s) with shape {factors.shape}{hint}"
            )
        _check_sizes(factors.shape, "factors")
        check_finite(factors, "factors")
        factors = factors.copy()
        factors.setflags(write=False)
        self._factors = factors
        self._population_size = _check_population_size(population_size, factors.shape[0])
        self._gradients = _checked_gradients(gradients, factors.shape[0], factors.shape[1])

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_features(cls, features, *, population_size=None, gradients=None) -> "HessianFamily":
        """Mean-squared error with scalar output: ``H_i = x_i x_i^T``.

        The loss convention: sample i's loss is ``(1/2) (x_i . w - y_i)^2`` and SGD steps on
        the mean over the batch, so every learning rate the library reports is for that loss.
        ``torch.nn.MSELoss()`` on a scalar output has no 1/2: its Hessians are twice these and
        its critical learning rate half (use ``from_features(sqrt(2) * X)`` for it).

        Parameters
        ----------
        features : array_like, shape (n, d)
            One feature (or NTK gradient) vector per sample.
        gradients : array_like, shape (n, d), optional
            Per-sample gradients at the point (see the class); for this loss
            ``g_i = (x_i . w* - y_i) x_i``, the residual times the feature vector.

        Examples
        --------
        >>> HessianFamily.from_features([[1.0, 2.0], [3.0, 4.0]]).mean()
        array([[ 5.,  7.],
               [ 7., 10.]])
        """
        features = as_real_array(features, "features")
        if features.ndim != 2:
            raise ValueError(
                f"features must have shape (n, d), 2 dimensions; got {features.ndim} "
                f"dimension(s) with shape {features.shape}"
            )
        _check_sizes(features.shape, "features")
        check_finite(features, "features")
        return cls(features[:, :, None], population_size=population_size, gradients=gradients)

    @classmethod
    def from_dense(cls, hessians, tol: float = 1e-9, *, population_size=None,
                   gradients=None) -> "HessianFamily":
        """Factor dense per-sample Hessians.

        Each ``H_i`` must be symmetric and positive semi-definite within ``tol`` relative to the
        family's scale (the largest absolute eigenvalue over all samples): asymmetry
        ``max|H_i - H_i^T| <= tol * scale`` and smallest eigenvalue ``>= -tol * scale``. Each is
        then factored as ``V diag(sqrt(lam))`` keeping eigenvalues above ``tol * scale``; the
        rank r of the family is the largest kept count (smaller factors are padded with zeros).

        Parameters
        ----------
        hessians : array_like, shape (n, d, d)
        tol : float, default 1e-9
            Relative tolerance. Hessians computed in float32 need about 1e-5.
        gradients : array_like, shape (n, d), optional
            Per-sample gradients at the point (see the class).

        Raises
        ------
        ValueError
            Wrong shape, NaN or inf, or a sample that is not symmetric or not PSD (the message
            names the sample and its smallest eigenvalue).

        Examples
        --------
        >>> family = HessianFamily.from_dense([np.diag([2.0, 0.0]), np.diag([0.0, 1.0])])
        >>> family.rank
        1
        >>> family.mean()
        array([[1. , 0. ],
               [0. , 0.5]])
        """
        hessians = as_real_array(hessians, "hessians")
        if hessians.ndim != 3 or hessians.shape[1] != hessians.shape[2]:
            raise ValueError(
                f"hessians must have shape (n, d, d); got shape {hessians.shape}"
            )
        _check_sizes(hessians.shape, "hessians")
        check_finite(hessians, "hessians")
        tol = check_real_scalar(tol, "tol")
        if not (0 <= tol < 1):
            raise ValueError(f"tol must be in [0, 1); got {tol}")
        # Work with the Hessians divided by a power of two near their largest entry (exact), so
        # that H + H^T, H - H^T and the eigensolver stay in range at every scale.
        units, unit = power_of_two_scale(hessians.reshape(hessians.shape[0], -1))
        units = units.reshape(hessians.shape)
        eigenvalues, eigenvectors = np.linalg.eigh(0.5 * units + 0.5 * units.transpose(0, 2, 1))
        scale = float(np.max(np.abs(eigenvalues))) if eigenvalues.size else 0.0
        asymmetry = np.max(np.abs(units - units.transpose(0, 2, 1)), axis=(1, 2))
        worst = int(np.argmax(asymmetry))
        if asymmetry[worst] > tol * scale:
            raise ValueError(
                f"hessians must be symmetric: sample {worst} has max|H - H^T| = "
                f"{asymmetry[worst] * unit:.3g}, above tol * scale = {tol * scale * unit:.3g} "
                f"(pass a larger tol if this is round-off)"
            )
        smallest = eigenvalues[:, 0]
        worst = int(np.argmin(smallest))
        if smallest[worst] < -tol * scale:
            raise ValueError(
                f"hessians must be positive semi-definite: sample {worst} has smallest "
                f"eigenvalue {smallest[worst] * unit:.6g} (largest in the family {scale * unit:.6g}); "
                f"accepted down to -tol * scale = {-tol * scale * unit:.3g}"
            )
        keep = eigenvalues > tol * scale
        rank = max(int(keep.sum(axis=1).max()), 1)
        n, d = hessians.shape[:2]
        factors = np.zeros((n, d, rank))
        for i in range(n):
            lam, vec = eigenvalues[i][keep[i]], eigenvectors[i][:, keep[i]]
            factors[i, :, : lam.size] = vec * (np.sqrt(lam) * math.sqrt(unit))
        return cls(factors, population_size=population_size, gradients=gradients)

    @classmethod
    def from_jacobians(cls, jacobians, output_hessians=None, *, tol: float = JACOBIAN_RTOL,
                       population_size=None, gradients=None) -> "HessianFamily":
        """Gauss-Newton family from per-sample Jacobians: ``H_i = J_i^T Lambda_i J_i``.

        For a model f with C outputs and a per-sample loss ``ell(f(x_i), y_i)``, ``J_i`` is the
        (C, d) Jacobian of the outputs with respect to the parameters and ``Lambda_i`` the (C, C)
        Hessian of the loss with respect to the outputs (specification page, section "From a
        network to a family"). At an interpolating minimum ``H_i`` is the per-sample Hessian
        exactly. The factors are ``U_i = J_i^T Lambda_i^{1/2}``, rotated so that their columns
        are orthogonal; columns whose squared norm (an eigenvalue of ``H_i``) is at most ``tol``
        times the largest in the family are dropped (they change every H_i by at most that
        much), and the rank is the largest count kept (shorter factors are padded with zeros).
        Framework-free: any model (JAX, TensorFlow, hand-written) through numpy arrays. The
        learning rates reported are for SGD on the mean over the batch of the loss whose
        output Hessians these are.

        Parameters
        ----------
        jacobians : array_like, shape (n, C, d)
            Per-sample Jacobians of the C outputs (an (n, d) array is read as C = 1).
        output_hessians : array_like, shape (n, C, C) or (C, C), optional
            Per-sample loss Hessians in output space, symmetric positive semi-definite; one
            (C, C) matrix is shared by every sample. Default: the identity (the loss
            ``(1/2) ||f - y||^2``; ``torch.nn.MSELoss()`` is ``(2/C) I``).
        tol : float, default ``JACOBIAN_RTOL`` (1e-10)
            Relative tolerance: of the symmetry and PSD check of ``output_hessians`` (relative to
            the largest absolute eigenvalue over all samples), and of the directions dropped.
            Jacobians or output Hessians computed in float32 need about 1e-5.
        gradients : array_like, shape (n, d), optional
            Per-sample gradients at the point (see the class): ``g_i = J_i^T grad_f ell_i``.

        Returns
        -------
        HessianFamily
            Factors of shape (n, d, r) with r <= C.

        Raises
        ------
        ValueError
            Wrong shapes (the message gives both), NaN or inf, fewer than 2 samples, or an
            output Hessian that is not symmetric or not positive semi-definite (the message
            names the sample and its smallest eigenvalue).
        TypeError
            Non-numeric data.

        Examples
        --------
        >>> J = np.array([[[1.0, 0.0]], [[0.0, 2.0]]])          # n = 2, C = 1, d = 2
        >>> HessianFamily.from_jacobians(J).mean()
        array([[0.5, 0. ],
               [0. , 2. ]])
        >>> family = HessianFamily.from_jacobians(J, output_hessians=[[2.0]])
        >>> round(family.sharpness(), 12)
        4.0
        """
        jacobians = as_real_array(jacobians, "jacobians")
        if jacobians.ndim == 2:
            jacobians = jacobians[:, None, :]
        if jacobians.ndim != 3:
            raise ValueError(f"jacobians must have shape (n, C, d) (or (n, d) for C = 1); got shape "
                             f"{jacobians.shape}")
        _check_sizes(jacobians.shape, "jacobians")
        check_finite(jacobians, "jacobians")
        tol = check_real_scalar(tol, "tol")
        if not (0 <= tol < 1):
            raise ValueError(f"tol must be in [0, 1); got {tol}")
        n, outputs, d = jacobians.shape
        if output_hessians is None:
            columns = jacobians.transpose(0, 2, 1)  # U_i = J_i^T
        else:
            roots = _psd_roots(output_hessians, n, outputs, tol)
            columns = np.einsum("icd,ick->idk", jacobians, roots)
        gradients = _checked_gradients(gradients, n, d)
        return cls._trusted(_orthogonal_columns(columns, tol),
                            _check_population_size(population_size, n), gradients=gradients)

    @classmethod
    def from_gram(cls, gram, outputs_per_sample: int = 1, *,
                  population_size=None, gradient_products=None) -> "HessianFamily":
        """A family in reduced coordinates from the Gram matrix of its factor columns.

        ``gram[i r + a, j r + b] = U_i[:, a] . U_j[:, b]`` (for a network: the per-sample NTK
        blocks ``Lambda_i^{1/2} J_i J_j^T Lambda_j^{1/2}``), shape (n r, n r) with
        ``r = outputs_per_sample``. Every quantity the library computes is invariant under
        rotations of parameter space, so it depends on the factors only through this matrix: the
        family returned has dimension ``d' = rank of the Gram matrix <= n r`` (the coordinates of
        the factors in an orthonormal basis of their span, eigenvalues below ``RANGE_RTOL`` times
        the largest dropped as round-off) and gives the same critical learning rate, spectral
        radius, sharpness and coherence as the full family. This is the route for models whose
        (n, d, r) factors do not fit in memory (the Gram matrix can be accumulated by chunks).

        One decomposition (specification page, section "From a network to a family"): the
        eigendecomposition of the Gram matrix gives the coordinates in H's eigenbasis
        directly, and the family's reduction is set from it (no second eigendecomposition).
        From ``GRAM_PIVOTED_MIN`` = 2,048 rows a pivoted Cholesky factorisation (LAPACK
        ``dpstrf``, in place) reveals the rank first; when it is at most half the size (d < n r,
        repeated samples, cross-entropy's rank C - 1), only a rank x rank eigendecomposition
        follows. The part it discards (the Schur complement of the pivots) has trace below
        ``RANGE_RTOL`` times the largest eigenvalue, the same cut as the eigenvalues dropped
        above; it is bounded per sample and added to the reduction's backward error, which the
        certified answers include. A full-rank Gram matrix (a network with d >> n C) from
        ``GRAM_CHOLESKY_MIN`` = 2,048 rows needs no eigendecomposition at all: its Cholesky
        factor ``G = L L^T`` (LAPACK ``dpotrf``, (n r)^3 / 3 flops) holds the coordinates of the
        factor columns in the orthonormal basis ``Q = A L^{-T}`` of their span (A the columns:
        ``Q^T A = L^T``), so the family's factors are the rows of L (d' = n r, kept as a view, no
        copy). Its sharpness is then the top eigenvalue of ``L L^T / n`` by Lanczos (ARPACK to
        machine precision, triangular products), and the reduction to H's eigenbasis that the
        engines need is computed on their first call, with its own proven backward error, like
        that of any family built from factors. A Gram matrix whose Cholesky factorisation breaks
        down, or has a pivot below ``GRAM_CHOLESKY_PIVOT_RTOL`` times the largest diagonal entry,
        takes the routes above. The family's Gram matrix is the input's to the factorisation's
        rounding, as on every route (the eigendecomposition's, the pivots').

        Parameters
        ----------
        gram : array_like, shape (n r, n r)
            Symmetric positive semi-definite (checked within 1e-9 of its largest eigenvalue).
        outputs_per_sample : int, default 1
            r, the number of consecutive rows and columns that belong to one sample.
        gradient_products : array_like, shape (n, n r), optional
            The per-sample gradients as their projections on the factor columns:
            ``gradient_products[i, j r + a] = U_j[:, a] . g_i`` (for a network,
            ``Lambda_j^{1/2} J_j g_i``). The family's gradients are then the coordinates of the
            projection of each g_i onto the span of the factor columns, in the family's reduced
            coordinates. A part of g_i outside that span is invisible here (and so never
            reported): for a Gauss-Newton family there is none, since ``g_i = J_i^T grad_f ell_i``
            lies in the span. Gradients in the full parameter space need the full factors
            (``HessianFamily(factors, gradients=...)``).

        Returns
        -------
        HessianFamily
            Factors of shape (n, d', r).

        Raises
        ------
        ValueError
            Not square, a size that is not a multiple of ``outputs_per_sample``, fewer than 2
            samples, NaN or inf, not symmetric, not positive semi-definite, or all zero.
        TypeError
            Non-numeric data or a non-integer ``outputs_per_sample``.

        Examples
        --------
        >>> X = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
        >>> full = HessianFamily.from_features(X)
        >>> small = HessianFamily.from_gram(X @ X.T)
        >>> small.d
        2
        >>> bool(np.isclose(small.sharpness(), full.sharpness()))
        True
        """
        return gram_family(cls, gram, outputs_per_sample, population_size, gradient_products,
                            overwrite=False)

    def preconditioned(self, P) -> "HessianFamily":
        """The family of SGD preconditioned by a fixed positive definite P.

        The step ``w <- w - lr P H_B w`` (Adam or RMSprop late in training, with
        ``P = diag(1 / (sqrt(v) + eps))``, or any fixed metric) is plain SGD on the family
        ``P^{1/2} H_i P^{1/2}`` in the coordinates ``u = P^{-1/2} w`` (specification page,
        section "Preconditioned SGD"): the same spectral radius, critical learning rate and
        critical batch size, for the same lr. The factors become ``P^{1/2} U_i``, and the
        gradients (if any) ``P^{1/2} g_i``: the step ``w <- w - lr P (H_B w + g_B)`` is, in
        ``u = P^{-1/2} w``, ``u <- u - lr (P^{1/2} H_B P^{1/2} u + P^{1/2} g_B)``. The excess
        loss ``(1/2) tr(H Sigma)`` is the same in both coordinates.

        Parameters
        ----------
        P : array_like, shape (d,) or (d, d)
            A vector of positive finite numbers (a diagonal preconditioner), or a symmetric
            positive definite matrix (symmetric within 1e-12 of its largest entry).

        Returns
        -------
        HessianFamily
            Same n, d and rank.

        Raises
        ------
        ValueError
            A shape other than (d,) or (d, d), NaN or inf, an entry <= 0 (vector), a matrix
            that is not symmetric or not positive definite (the message gives its smallest
            eigenvalue).
        TypeError
            Non-numeric data.

        Examples
        --------
        >>> family = HessianFamily.from_features([[1.0, 0.0], [0.0, 1.0]])
        >>> family.preconditioned([4.0, 1.0]).mean()
        array([[2. , 0. ],
               [0. , 0.5]])
        """
        P = as_real_array(P, "P")
        d = self.d
        if P.shape == (d,):
            check_finite(P, "P")
            if np.any(P <= 0):
                index = int(np.argmin(P))
                raise ValueError(f"P (a diagonal preconditioner) must be > 0 everywhere; "
                                 f"got {P[index]:g} at index {index}")
            root = np.sqrt(P)
            return type(self)._trusted(root[None, :, None] * self._factors, self.population_size,
                                       gradients=None if self._gradients is None else self._gradients * root)
        if P.shape != (d, d):
            raise ValueError(f"P must have shape (d,) = ({d},) (a diagonal) or (d, d) = ({d}, {d}) "
                             f"(a symmetric positive definite matrix); got shape {P.shape}")
        check_finite(P, "P")
        units, unit = power_of_two_scale(P)
        asymmetry = float(np.max(np.abs(units - units.T)))
        if asymmetry > 1e-12 * float(np.max(np.abs(units))):
            raise ValueError(f"P must be symmetric; max|P - P^T| = {asymmetry * unit:.3g}")
        eigenvalues, vectors = np.linalg.eigh(0.5 * (units + units.T))
        if not eigenvalues[0] > 0:
            raise ValueError(f"P must be positive definite; its smallest eigenvalue is "
                             f"{eigenvalues[0] * unit:.6g} (largest {eigenvalues[-1] * unit:.6g})")
        root = (vectors * np.sqrt(eigenvalues * unit)) @ vectors.T
        return type(self)._trusted(np.einsum("de,ner->ndr", root, self._factors),
                                   self.population_size,
                                   gradients=None if self._gradients is None else self._gradients @ root)

    @classmethod
    def _trusted(cls, factors: np.ndarray, population_size=None, gradients=None) -> "HessianFamily":
        """A family from float64 factors (and gradients) built by the library itself (checked,
        not copied; the gradients' mean was judged when they were first given);
        ``population_size`` already checked (None: n)."""
        _check_sizes(factors.shape, "factors")
        check_finite(factors, "factors")
        family = cls.__new__(cls)
        factors = np.ascontiguousarray(factors, dtype=np.float64)
        factors.setflags(write=False)
        family._factors = factors
        family._population_size = factors.shape[0] if population_size is None else int(population_size)
        if gradients is not None:
            gradients = np.array(gradients, dtype=np.float64, order="C")
            if gradients.shape != factors.shape[:2]:
                raise ValueError(f"gradients must have shape (n, d) = {factors.shape[:2]}; got "
                                 f"{gradients.shape}")
            check_finite(gradients, "gradients")
            gradients.setflags(write=False)
        family._gradients = gradients
        return family

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write the factors to ``path`` in ``.npz`` format (key ``factors``, and ``gradients``
        when the family has them), readable by :meth:`load`.

        The file is written at exactly ``path`` (no ``.npz`` suffix is appended). A
        ``population_size`` other than n is written too (key ``population_size``, a 0-d int64).
        """
        arrays = {"factors": self._factors}
        if self.population_size != self.n:  # population_size (probe of a training set)
            arrays["population_size"] = np.int64(self.population_size)
        if self._gradients is not None:
            arrays["gradients"] = self._gradients
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path) -> "HessianFamily":
        """Read a family from an ``.npz`` file.

        The file holds exactly one of ``factors`` (n, d, r), as written by :meth:`save`,
        ``hessians`` (n, d, d), or ``features`` (n, d), of real numbers (bool, int or float),
        and optionally ``population_size`` (a 0-d integer >= n; default n) and ``gradients``
        (n, d), the per-sample gradients.
        The file is checked before any array data is read (nothing is unpickled, and an array
        declaring more than 8 GiB as float64 is refused; see ``fastsgdstab._io``), and is
        closed again on every path, errors included.

        Raises
        ------
        FileNotFoundError
            No such file.
        IsADirectoryError
            ``path`` is a directory.
        ValueError
            Not an ``.npz`` archive (empty, a bare ``.npy``, text/CSV, truncated or corrupt), not
            exactly one of the three arrays, a non-real dtype, an oversized or inconsistent
            array header; or the array itself is invalid (see the constructors). The message
            names the file.
        """
        from ._io import read_family_arrays, read_optional_array

        from ._io import read_population_size

        key, array = read_family_arrays(path)
        population_size = read_population_size(path)
        gradients = read_optional_array(path, "gradients")
        try:
            if key == "factors":
                return cls(array, population_size=population_size, gradients=gradients)
            if key == "hessians":
                return cls.from_dense(array, population_size=population_size, gradients=gradients)
            return cls.from_features(array, population_size=population_size, gradients=gradients)
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)}: {exc}") from None

    # ------------------------------------------------------------------ attributes
    def __setstate__(self, state) -> None:
        # Unpickled (a Dask worker, a process pool, a file): numpy arrays come back writable;
        # the factors stay read-only, as the cached reductions assume.
        self.__dict__.update(state)
        self._factors.setflags(write=False)
        self.__dict__.setdefault("_population_size", self._factors.shape[0])  # older pickles
        self.__dict__.setdefault("_gradients", None)  # pickled before families had gradients
        if self._gradients is not None:
            self._gradients.setflags(write=False)

    @property
    def factors(self) -> np.ndarray:
        return self._factors

    @property
    def gradients(self):
        """The per-sample gradients ``g_i`` at the point, shape (n, d), read-only; or None."""
        return self._gradients

    @property
    def n(self) -> int:
        return self._factors.shape[0]

    @property
    def d(self) -> int:
        return self._factors.shape[1]

    @property
    def rank(self) -> int:
        return self._factors.shape[2]

    @property
    def population_size(self) -> int:
        """N, the size of the training set the batches are drawn from (n unless the family was
        built with ``population_size=``): the batch law's N (specification page, section "A
        probe subset of a large training set")."""
        return self._population_size

    def with_population_size(self, population_size) -> "HessianFamily":
        """The same samples (shared read-only factors) as a probe of a training set of
        ``population_size`` samples (an integer >= n); see the class parameters.

        Examples
        --------
        >>> family = HessianFamily.from_features([[1.0], [2.0]]).with_population_size(1000)
        >>> family.n, family.population_size
        (2, 1000)
        """
        family = type(self)._trusted(self._factors, _check_population_size(population_size, self.n),
                                     gradients=self._gradients)
        # The reduction to H's eigenbasis depends on the factors and gradients only, not on N:
        # a cached one is shared rather than computed again.
        for cached in ("_reduced", "_reduced_gradients", "_cholesky_rows", "_lanczos_sharpness"):
            if cached in self.__dict__:
                family.__dict__[cached] = self.__dict__[cached]
        return family

    def __repr__(self) -> str:
        population = f", population_size={self.population_size}" if self.population_size != self.n else ""
        return f"HessianFamily(n={self.n}, d={self.d}, rank={self.rank}{population})"

    def mean(self) -> np.ndarray:
        """``H = (1/n) sum_i H_i``, shape (d, d)."""
        columns = self._columns()
        return columns.T @ columns / self.n

    def dense(self) -> np.ndarray:
        """All ``H_i``, shape (n, d, d). Memory n d^2: for small families only."""
        return np.einsum("idr,ier->ide", self._factors, self._factors)

    def sharpness(self) -> float:
        """``lambda_1(H)``, the largest eigenvalue of the mean Hessian (exact, from an eigensolve).

        ``inf`` when it exceeds the largest float (factors above about 1e154); every engine works
        in units of the sharpness, so its answers stay correct even then. A family from
        ``from_gram``'s Cholesky route computes it by Lanczos (to machine precision) without
        its reduction, which waits for the first engine call.
        """
        if "_lanczos_sharpness" in self.__dict__:
            return self.__dict__["_lanczos_sharpness"]
        if self.__dict__.get("_cholesky_rows") and "_reduced" not in self.__dict__:
            value = _lanczos_sharpness(self)
            if value is not None:
                self.__dict__["_lanczos_sharpness"] = value
                return value
        return self._reduced.sharpness

    # ------------------------------------------------------------------ internals
    def _columns(self) -> np.ndarray:
        """All factor columns as rows of an (n * r, d) array (row i * r + c = U_i[:, c])."""
        return np.ascontiguousarray(self._factors.transpose(0, 2, 1)).reshape(self.n * self.rank, self.d)

    @cached_property
    def _reduced(self) -> Reduction:
        """Exact reduction to the range of H, in H's eigenbasis (computed once per family).

        With d <= n r: eigendecompose H (d x d). Otherwise (over-parameterised): the Gram matrix
        G = A^T A of the n r factor columns A = [U_1 ... U_n] has the same non-zero spectrum as
        n H = A A^T, and with G = E diag(g) E^T the coordinates of the columns in H's eigenbasis
        are the rows of E diag(sqrt(g)); nothing of size d x d is formed. Every quantity the
        library computes is invariant under rotations, so it depends on the factors only
        through these coordinates.
        """
        # Under the threading policy (_threads): a small eigendecomposition with two spinning
        # OpenBLAS threads took 20x its one-thread time on a loaded 2-core machine.
        m, d = self.n * self.rank, self.d
        with limited_blas(float(m) * d * min(m, d)):
            return _reduce(self._columns(), self.n, self.rank)

    @cached_property
    def _reduced_gradients(self):
        """``(G, outside)``: the gradients' coordinates in H's eigenbasis on its range, (n, k),
        at the family's own scale (matching ``_range_basis``), and the root-mean-square norm
        of their part outside the range relative to that of the gradients (0.0 if all zero).
        None when the family has no gradients."""
        if self._gradients is None:
            return None
        gradients, unit = power_of_two_scale(self._gradients)
        basis = self._range_basis()
        inside = gradients @ basis
        total = float(np.sum(gradients * gradients))
        rest = gradients - inside @ basis.T
        outside = math.sqrt(float(np.sum(rest * rest)) / total) if total > 0 else 0.0
        return inside * unit, outside

    def _range_basis(self) -> np.ndarray:
        """The (d, k) orthonormal eigenvector basis of the range of H (matching ``_reduced``)."""
        reduced = self._reduced
        if reduced.k == 0:
            return np.zeros((self.d, 0))
        # rows = A^T B up to the layout, so B = A rows diag(1 / (n lam)) with A = columns^T; in
        # units: rows = unit_rows * root, lam = unit_lam * root^2, and the columns scaled by the
        # same power of two as in the reduction.
        columns, scale = power_of_two_scale(self._columns())
        return columns.T @ reduced.unit_rows / (
            self.n * reduced.unit_eigenvalues * (reduced.root_sharpness / scale))


def family_of(value):
    """The HessianFamily that ``value`` stands for, or None.

    ``value`` itself if it is a :class:`HessianFamily`; else ``value.family`` if that attribute
    exists and is a HessianFamily (``fastsgdstab.torch.ModelFamily`` and any wrapper written
    the same way); else None. This is the one rule by which every public function accepts a
    family.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from fastsgdstab import HessianFamily
    >>> family = HessianFamily.from_features([[1.0, 0.0], [0.0, 1.0]])
    >>> family_of(family) is family, family_of(SimpleNamespace(family=family)) is family
    (True, True)
    >>> family_of([[1.0, 0.0], [0.0, 1.0]]) is None
    True
    """
    if isinstance(value, HessianFamily):
        return value
    try:
        inner = getattr(value, "family", None)
    except Exception:  # noqa: BLE001 - a property that raises: not a family
        return None
    return inner if isinstance(inner, HessianFamily) else None


def power_of_two_scale(array: np.ndarray):
    """``(array / s, s)`` with s a power of two within a factor 2 of max |entry| (exact scaling),
    so that products of the entries neither overflow nor underflow whatever the family's units.
    The reduction, ``from_dense`` and the engines' initial states use it."""
    largest = float(np.max(np.abs(array))) if array.size else 0.0
    if not largest > 0:
        return array, 1.0
    # 2^(e - 1) <= largest < 2^e; dividing by 2^(e - 1) (which never overflows) leaves entries < 2.
    exponent = math.frexp(largest)[1] - 1
    return np.ldexp(array, -exponent), math.ldexp(1.0, exponent)


def _reduce(columns: np.ndarray, n: int, rank: int, method: str = "auto") -> Reduction:
    """Reduce factor columns (rows of ``columns``, shape (n r, d)) to H's eigenbasis on its range.

    ``method`` "covariance" eigendecomposes H = A A^T / n (cost n r d^2 + d^3); "gram" the Gram
    matrix A^T A (cost (n r)^2 d + (n r)^3); "auto" takes the smaller. Both give the same
    eigenvalues and the same coordinates up to the sign of each eigenvector. The columns are
    first divided by a power of two near their largest entry (exact), so the products stay in
    range for factors from the smallest to the largest float.
    """
    d = columns.shape[1]
    columns, scale = power_of_two_scale(columns)
    if method == "auto":
        method = "covariance" if d <= columns.shape[0] else "gram"
    if method == "covariance":
        eigenvalues, basis = np.linalg.eigh(columns.T @ columns / n)
        eigenvalues, basis = eigenvalues[::-1], basis[:, ::-1]
        keep = _kept(eigenvalues)
        basis = np.ascontiguousarray(basis[:, keep])
        rows, rows_error = verified_product(columns, basis)
        eigenvalues = eigenvalues[keep]
    elif method == "gram":
        # The Gram matrix with a proven entrywise error (``_rounding.verified_product``): the
        # backward error below needs it against the exact A A^T.
        gram, gram_error = verified_product(columns)
        gram_eigenvalues, gram_vectors = np.linalg.eigh(gram)
        gram_eigenvalues, gram_vectors = gram_eigenvalues[::-1], gram_vectors[:, ::-1]
        keep = _kept(gram_eigenvalues)
        rows = gram_vectors[:, keep] * np.sqrt(gram_eigenvalues[keep])
        eigenvalues = gram_eigenvalues[keep] / n
    else:
        raise ValueError(f"method must be 'auto', 'covariance' or 'gram'; got {method!r}")
    if eigenvalues.size == 0:
        return Reduction(np.zeros(0), np.zeros((columns.shape[0], 0)), 0.0, rank, 0.0, scale)
    top = float(eigenvalues[0])
    unit_eigenvalues = eigenvalues / top
    unit_eigenvalues[0] = 1.0
    root = math.sqrt(top)
    unit_rows = np.ascontiguousarray(rows / root)
    if method == "covariance":
        congruence, row_errors = _covariance_backward_error(basis, rows_error, root)
    else:
        congruence, row_errors = _gram_backward_error(gram, gram_error, gram_vectors[:, keep],
                                                      gram_eigenvalues[keep], root)
    sample_errors, mean_error, congruence, relative_mean, relative_noise = reduction_error(
        columns / root, unit_rows, unit_eigenvalues, n, rank, congruence, row_errors)
    return Reduction(
        unit_eigenvalues=np.ascontiguousarray(unit_eigenvalues),
        unit_rows=unit_rows,
        root_sharpness=scale * root,
        rank=rank,
        scaled_sharpness=top,
        scale=scale,
        sample_errors=sample_errors,
        mean_error=mean_error,
        congruence=congruence,
        relative_mean_error=relative_mean,
        relative_noise_error=relative_noise,
    )


# ----------------------------------------------------------------------------- backward error
# The reduction is computed in floating point, so the engines solve a family that differs from
# the user's by rounding (an eigendecomposition that is exact only for a nearby matrix). These
# functions bound that difference rigorously (``_rounding``: bounds that hold for any order of
# summation, so for any BLAS), so that a certified bracket can be widened to hold for the user's
# family itself (restricted to the kept range: eigenvalues above RANGE_RTOL lambda_1).
#
# The rows R = A C / root (A the columns, C a d x k matrix: the eigenbasis B, or the Gram route's
# implied basis A^T E g^{-1/2}) with C = O P (polar: O orthonormal, P symmetric, ||P - I|| <=
# beta = ||C^T C - I||) are, up to the rotation O, the user's factors projected on the range
# and congruent by P: each H_i -> P H_i P moves by at most (2 beta + beta^2) ||H_i||; and the
# computed rows differ from A C / root by the rows' rounding.


def _frobenius_error(matrix, abs_product, g):
    return float(np.linalg.norm(matrix)) * (1 + g) + g * float(np.linalg.norm(abs_product))


def _frobenius_up(matrix) -> float:
    """An upper bound on the Frobenius norm of a float matrix (its own rounding included)."""
    from ._rounding import gamma
    return float(np.linalg.norm(matrix)) * (1.0 + gamma(matrix.size + 4))


def _covariance_backward_error(basis, rows_error, root):
    """``(beta, row_errors)`` of the covariance route: ``beta >= ||B^T B - I||`` (B the computed
    eigenbasis) and entrywise bounds on the rounding of the rows ``fl(A B)`` (proven products,
    ``_rounding.verified_product``), divided by root."""
    from ._rounding import UNIT_ROUNDOFF
    k = basis.shape[1]
    inner, inner_error = verified_product(basis.T, basis)
    inner[np.diag_indices(k)] -= 1.0  # one rounding each, of at most u |entry|
    beta = _frobenius_up(np.abs(inner) * (1.0 + UNIT_ROUNDOFF) + inner_error * (1.0 + UNIT_ROUNDOFF))
    return beta, rows_error / root * (1.0 + 2.0 * UNIT_ROUNDOFF)


def _gram_backward_error(gram, gram_error, vectors, values, root):
    """``(beta, row_errors)`` of the Gram route, for the computed Gram matrix ``gram``
    (``|gram - A A^T| <= gram_error`` entrywise), eigenvectors E and eigenvalues g (kept).

    The implied basis is ``C = A^T E g^{-1/2}``, so ``A C = G E g^{-1/2}`` (G = A A^T exactly) and
    the rows ``E g^{1/2}`` differ from it by ``-Res g^{-1/2}``, ``Res = G E - E g``, bounded
    entrywise by ``rho`` (the computed residual plus proven roundings). And
    ``C^T C - I = g^{-1/2} F g^{1/2} + g^{-1/2} E^T Res g^{-1/2}`` with ``F = E^T E - I``, so
    ``||C^T C - I|| <= ||(|F| o W)||_F + ||E|| ||rho g^{-1/2}||_F max g^{-1/2}``,
    ``W_jl = sqrt(g_l / g_j)``.
    """
    from ._rounding import UNIT_ROUNDOFF, gamma
    u = UNIT_ROUNDOFF
    m, k = vectors.shape
    vectors = np.ascontiguousarray(vectors)
    product, product_error = verified_product(gram, vectors)          # G~ E
    # (G - G~) E, bounded with |E| (a product of nonnegative terms: rounding gamma(m) relative).
    product_error += (gram_error @ np.abs(vectors)) * (1.0 + 2.0 * gamma(m))
    scaled = vectors * values
    residual = product - scaled
    rho = (np.abs(residual) * (1.0 + u) + product_error + u * (1.0 + 2.0 * u) * np.abs(scaled)) \
        * (1.0 + gamma(6))
    inverse_root = 1.0 / np.sqrt(values)
    row_errors = (rho * inverse_root * (1.0 + gamma(3))
                  + gamma(4) * np.abs(vectors * np.sqrt(values))) / root
    # F = E^T E - I, proven entrywise.
    inner, inner_error = verified_product(vectors.T, vectors)
    inner[np.diag_indices(k)] -= 1.0
    f_bound = (np.abs(inner) + inner_error) * (1.0 + 2.0 * u)
    weights = np.sqrt(values)[None, :] * inverse_root[:, None] * (1.0 + gamma(4))
    first = _frobenius_up(f_bound * weights) * (1.0 + gamma(2))
    norm_e = math.sqrt(1.0 + _frobenius_up(f_bound)) * (1.0 + gamma(4))
    second = norm_e * _frobenius_up(rho * inverse_root * (1.0 + gamma(3))) * float(np.max(inverse_root)) \
        * (1.0 + gamma(4))
    beta = (first + second) * (1.0 + gamma(2))
    return beta, row_errors


def reduction_error(unit_columns, unit_rows, unit_eigenvalues, n, rank, congruence, row_errors):
    """``(sample_errors, mean_error, congruence, relative_mean_error, relative_noise_error)``
    (see ``Reduction``) from the congruence bound beta and entrywise rounding bounds of the rows
    (units of lambda_1)."""
    from ._rounding import UNIT_ROUNDOFF, gamma
    beta = congruence
    if not beta < 0.5:
        return np.full(n, np.inf), math.inf, math.inf, math.inf, math.inf
    # ||U_i||_F^2 (unit) bounds ||H_i|| and ||P O^T U_i||^2 / (1 + beta)^2.
    sizes = np.einsum("ij,ij->i", unit_columns, unit_columns).reshape(n, rank).sum(axis=1) * (1 + 1e-12)
    rows = np.einsum("ij,ij->i", unit_rows, unit_rows).reshape(n, rank).sum(axis=1)
    row_errors = row_errors * (1 + 4 * gamma(4)) + 2 * UNIT_ROUNDOFF * np.abs(unit_rows)
    deltas = np.sqrt(np.einsum("ij,ij->i", row_errors, row_errors).reshape(n, rank).sum(axis=1))
    exact = np.sqrt(sizes) * (1 + beta)
    sample_errors = (2 * beta + beta * beta) * sizes + 2 * np.maximum(exact, np.sqrt(rows)) * deltas + deltas ** 2
    g = gamma(unit_rows.shape[0] + 4)
    # R^T R / n - D, proven entrywise (``verified_product``; then the division by n and the
    # subtraction, one rounding each): ``mean`` bounds its absolute value.
    gram, gram_error = verified_product(unit_rows.T, unit_rows)
    mean = gram / n
    mean[np.diag_indices(mean.shape[0])] -= unit_eigenvalues
    mean = (np.abs(mean) * (1 + UNIT_ROUNDOFF)
            + (gram_error / n + 2 * UNIT_ROUNDOFF * np.abs(gram) / n) * (1 + gamma(4)))
    mean[np.diag_indices(mean.shape[0])] += 2 * UNIT_ROUNDOFF * unit_eigenvalues
    mean_error = _frobenius_up(mean) + float(np.mean(sample_errors))
    # The same in the metric of H itself (relative to the eigenvalues: D^{-1/2} . D^{-1/2}), where
    # small eigenvalues are not swamped by errors of the size of the largest: t_i bounds the
    # whitened rows' error of sample i, w_i its whitened size, and the whitened mean mismatch.
    whiten = 1.0 / np.sqrt(unit_eigenvalues)
    whitened_errors = row_errors * whiten
    t = np.sqrt(np.einsum("ij,ij->i", whitened_errors, whitened_errors).reshape(n, rank).sum(axis=1))
    whitened_rows = unit_rows * whiten
    w = np.einsum("ij,ij->i", whitened_rows, whitened_rows).reshape(n, rank).sum(axis=1)
    s = 2.0 * t * np.sqrt(w) + t * t
    relative_mean = (_frobenius_up(whiten[:, None] * mean * whiten[None, :]) * (1 + 4 * UNIT_ROUNDOFF)
                     + float(np.mean(s)))
    relative_noise = float(np.mean(2.0 * w * s + s * s))
    grow = 1 + 8 * g
    return (sample_errors * grow, mean_error * grow, beta,
            relative_mean * grow, relative_noise * grow)


def _checked_gradients(gradients, n: int, d: int, name: str = "gradients"):
    """The gradients as a read-only float64 (n, d) copy (or None), checked; a
    ``NotAMinimumWarning`` when their mean is not ~0 relative to their size."""
    if gradients is None:
        return None
    array = as_real_array(gradients, name)
    if array.shape != (n, d):
        raise ValueError(f"{name} must have shape (n, d) = ({n}, {d}), one gradient per sample "
                         f"(the loss's gradient at the point); got shape {array.shape}")
    check_finite(array, name)
    array = array.copy()
    units, _ = power_of_two_scale(array)
    rms = math.sqrt(float(np.sum(units * units)) / n)
    mean_norm = float(np.linalg.norm(units.mean(axis=0)))
    if rms > 0 and mean_norm > GRADIENT_MEAN_RTOL * rms:
        _warn_caller(
            f"{name}: the per-sample gradients do not average to zero (|mean| / rms norm = "
            f"{mean_norm / rms:.3g}, above GRADIENT_MEAN_RTOL = {GRADIENT_MEAN_RTOL:g}): the point "
            f"is not a minimum of the loss. The loss floor is then measured from the minimum of "
            f"the quadratic model (see fastsgdstab.stationary)", NotAMinimumWarning)
    array.setflags(write=False)
    return array


# The Gram route (from_gram). Above GRAM_PIVOTED_MIN rows a pivoted Cholesky factorisation
# (LAPACK dpstrf, blocked, in place, m^3 / 3 flops at full rank) reveals the rank first: when the
# Gram matrix is rank deficient (d < n r, repeated samples, cross-entropy's rank C - 1 Lambda),
# only a (rank x rank) eigendecomposition remains. It stops when every remaining pivot is below
# RANGE_RTOL max_j G_jj / m, so the discarded Schur complement S (PSD) has trace, hence norm,
# below RANGE_RTOL lambda_1(G): the same cut as the full eigendecomposition's (eigenvalues below
# RANGE_RTOL lambda_1), and the family kept is the user's projected on the span of the pivot
# columns. S's per-sample traces enter the reduction's backward error (``sample_errors``), so
# the certificates also cover the unprojected family. At rank above GRAM_PIVOTED_MAX_FRACTION m
# the full eigendecomposition of G is cheaper, and is used.
GRAM_PIVOTED_MIN = 2048
GRAM_PIVOTED_MAX_FRACTION = 0.5


def _scaled_symmetric(gram):
    """``(units, unit, asymmetry)``: a copy of ``gram`` divided by a power of two (``unit``),
    symmetrised in place block by block, and the largest asymmetry ``max|G - G^T|`` (units)."""
    m = gram.shape[0]
    units, unit = power_of_two_scale(gram)
    if units is gram:
        units = gram.copy()
    asymmetry = max((float(np.max(np.abs(units[a:a + 512] - units[:, a:a + 512].T)))
                     for a in range(0, m, 512)), default=0.0)
    for a in range(0, m, 512):  # symmetrise in place, block by block
        block = 0.5 * (units[a:a + 512, a:] + units[a:, a:a + 512].T)
        units[a:a + 512, a:] = block
        units[a:, a:a + 512] = block.T
    return units, unit, asymmetry


def _gram_rows(units, asymmetry, unit, gram):
    """``(rows, values, discarded)`` of a scaled, symmetrised Gram matrix ``units`` (overwritten):
    ``rows`` (m, k) the coordinates of the factor columns in H's eigenbasis at the true scale,
    ``values`` (k,) the eigenvalues of G = n lambda(H) at the true scale (descending), and
    ``discarded`` None or the (m,) diagonal of the discarded Schur complement (units of
    ``unit``). Raises the checks of ``from_gram`` (symmetry, positive semi-definiteness)."""
    m = units.shape[0]
    if m >= GRAM_PIVOTED_MIN:
        pivoted = _pivoted_rows(units, asymmetry, unit, gram)
        if pivoted is not None:
            return pivoted
        units, unit, asymmetry = _scaled_symmetric(gram)  # overwritten by dpstrf: again
    # units is exactly symmetric: its transpose (Fortran order) is the same matrix, which LAPACK
    # overwrites in place instead of receiving a Fortran-ordered copy ((n r)^2 doubles fewer).
    eigenvalues, vectors = scipy.linalg.eigh(units.T, overwrite_a=True, check_finite=False,
                                             driver="evr")
    del units
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    top = float(np.max(np.abs(eigenvalues)))
    _check_gram(asymmetry, eigenvalues[-1], top, unit)
    keep = _kept(eigenvalues)  # a prefix: the eigenvalues are in descending order
    if not keep.any():
        raise ValueError("gram is zero: the factors have no curvature")
    kept = int(keep.sum())
    rows = vectors[:, :kept]
    rows *= np.sqrt(eigenvalues[:kept] * unit)  # in place: (n r, d') coordinates
    return rows, eigenvalues[:kept] * unit, None


def _check_gram(asymmetry, smallest, top, unit):
    if asymmetry > 1e-9 * top:
        raise ValueError(f"gram must be symmetric: max|G - G^T| = {asymmetry * unit:.3g}, "
                         f"above 1e-9 times its largest eigenvalue {top * unit:.3g}")
    if smallest < -1e-9 * top:
        raise ValueError(f"gram must be positive semi-definite: smallest eigenvalue "
                         f"{smallest * unit:.6g}, largest {top * unit:.6g}")


def _pivoted_rows(units, asymmetry, unit, gram):
    """``_gram_rows`` by pivoted Cholesky, or None (``units`` then overwritten) when the rank
    exceeds ``GRAM_PIVOTED_MAX_FRACTION`` m or the factorisation cannot vouch for G being
    positive semi-definite (the eigendecomposition then decides, with its message)."""
    m = units.shape[0]
    diagonal = units.diagonal().copy()
    largest = float(np.max(diagonal))
    if not largest > 0 or float(np.min(diagonal)) < -1e-9 * largest:
        return None
    tol = RANGE_RTOL * largest / m
    factor, pivots, rank, info = scipy.linalg.lapack.dpstrf(units.T, lower=0, tol=tol,
                                                              overwrite_a=1)
    # units.T is G (symmetric) in Fortran order; its upper factor U (G[p][:, p] = U^T U) is
    # the lower factor L = U^T of units, in C order: the first `rank` rows of `factor` (upper).
    if info < 0 or rank == 0 or rank > GRAM_PIVOTED_MAX_FRACTION * m:
        return None
    pivots = pivots - 1
    L = np.triu(factor[:rank]).T  # (m, rank), rows in pivot order
    del factor, units
    rest = pivots[rank:]
    L_rest = L[rank:]
    block = np.asarray(gram, dtype=np.float64)[np.ix_(rest, rest)]
    scaled = (0.5 * (block + block.T)) / unit
    schur = scaled - L_rest @ L_rest.T  # the discarded part S (PSD in exact arithmetic)
    size = float(np.linalg.norm(schur)) if rest.size else 0.0
    # G = L L^T + S, so lambda_min(G) >= -||S|| and ||G - L L^T|| = ||S||: within the
    # eigendecomposition's own tolerances, or that route decides.
    if size > 1e-9 * largest or asymmetry > 1e-9 * largest:
        return None
    inner = L.T @ L  # (rank, rank): the same non-zero spectrum as L L^T
    values, vectors = scipy.linalg.eigh(inner, overwrite_a=True, check_finite=False, driver="evr")
    values, vectors = values[::-1], vectors[:, ::-1]
    keep = _kept(values)
    if not keep.any():
        raise ValueError("gram is zero: the factors have no curvature")
    kept = int(keep.sum())
    vectors = vectors[:, :kept]
    rows = np.empty((m, kept))
    rows[pivots] = L @ vectors  # coordinates in H's eigenbasis, rows in the user's order
    rows *= math.sqrt(unit)
    discarded = np.zeros(m)
    # |S_jj| per discarded row, plus ||S||_F spread evenly for the rounding of S itself
    discarded[rest] = np.abs(np.diagonal(schur)) + size / max(rest.size, 1)
    return rows, values[:kept] * unit, discarded * unit


def _eigenbasis_reduction(rows, eigenvalues, n, rank, discarded=None) -> Reduction:
    """The ``Reduction`` of factor columns ``rows`` (n r, k) given in H's eigenbasis, with
    ``eigenvalues`` (k,) the eigenvalues of H (descending, computed with the rows): ``_reduce``
    with the basis the identity (no eigendecomposition), its backward error measured on the
    rows (``R^T R / n`` against the diagonal, by column blocks: no (k, k) array of absolute
    values). ``discarded`` (n r,) bounds ``||(I - P) U_i[:, c]||^2`` of a truncated Gram route
    (the part outside the kept span; true scale): it enters ``sample_errors``."""
    from ._rounding import UNIT_ROUNDOFF, gamma
    columns, scale = power_of_two_scale(np.asarray(rows, dtype=np.float64))
    if columns is rows:
        columns = rows.copy()
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64) / (scale * scale)
    k = columns.shape[1]
    top = float(eigenvalues[0])
    unit_eigenvalues = eigenvalues / top
    unit_eigenvalues[0] = 1.0
    root = math.sqrt(top)
    columns /= root  # in place: the unit rows
    unit_rows = columns
    # reduction_error with congruence 0 (the basis is exactly I) and row errors 2 u |rows|
    # (the division by root), specialised so that no further (n r, k) array is formed.
    g = gamma(unit_rows.shape[0] + 4)
    squares = np.einsum("ij,ij->i", unit_rows, unit_rows)
    rows_size = squares.reshape(n, rank).sum(axis=1)
    whiten = 1.0 / np.sqrt(unit_eigenvalues)
    whitened = np.einsum("ij,ij,j->i", unit_rows, unit_rows, whiten * whiten).reshape(n, rank).sum(axis=1)
    epsilon = 2 * UNIT_ROUNDOFF * (1 + 4 * gamma(4))
    sizes = rows_size * (1 + 1e-12)
    extra = None
    if discarded is not None:
        extra = np.asarray(discarded, dtype=np.float64).reshape(n, rank).sum(axis=1) / (
            scale * scale * top)
        sizes = sizes + extra
    deltas = epsilon * np.sqrt(rows_size)
    exact = np.sqrt(sizes)
    sample_errors = 2 * np.maximum(exact, np.sqrt(rows_size)) * deltas + deltas ** 2
    if extra is not None:  # ||U U^T - P U U^T P|| <= 2 ||U|| ||(I - P) U|| + ||(I - P) U||^2
        sample_errors = sample_errors + 2 * np.sqrt(sizes * extra) + extra
    mean_sq = 0.0
    whitened_sq = 0.0
    block = max(1, min(k, 1024))
    for a in range(0, k, block):
        b = min(a + block, k)
        part = unit_rows.T @ unit_rows[:, a:b] / n
        part[np.arange(a, b), np.arange(b - a)] -= unit_eigenvalues[a:b]
        mean_sq += float(np.sum(part * part))
        part *= whiten[:, None]
        part *= whiten[None, a:b]
        whitened_sq += float(np.sum(part * part))
    # || |R|^T |R| / n + D ||_F <= ||R||_F^2 / n + ||D||_F, the same whitened
    abs_mean = float(np.sum(rows_size)) / n + float(np.linalg.norm(unit_eigenvalues))
    abs_whitened = float(np.sum(whitened)) / n + math.sqrt(k)
    mean_error = (math.sqrt(mean_sq) * (1 + g) + g * abs_mean + float(np.mean(sample_errors)))
    t = epsilon * np.sqrt(whitened)
    s = 2.0 * t * np.sqrt(whitened) + t * t
    relative_mean = (math.sqrt(whitened_sq) * (1 + g) + g * abs_whitened + float(np.mean(s)))
    relative_noise = float(np.mean(2.0 * whitened * s + s * s))
    grow = 1 + 8 * g
    return Reduction(
        unit_eigenvalues=np.ascontiguousarray(unit_eigenvalues),
        unit_rows=np.ascontiguousarray(unit_rows),
        root_sharpness=scale * root,
        rank=rank,
        scaled_sharpness=top,
        scale=scale,
        sample_errors=sample_errors * grow,
        mean_error=mean_error * grow,
        congruence=0.0,
        relative_mean_error=relative_mean * grow,
        relative_noise_error=relative_noise * grow,
    )


def _kept(eigenvalues: np.ndarray) -> np.ndarray:
    top = eigenvalues[0] if eigenvalues.size else 0.0
    if top <= 0:
        return np.zeros(eigenvalues.shape, dtype=bool)
    return eigenvalues > RANGE_RTOL * top


def _check_population_size(population_size, n: int) -> int:
    """``population_size`` checked against the n samples: None means n; otherwise an integer
    >= n (a TypeError for anything but an integer, a ValueError below n)."""
    if population_size is None:
        return int(n)
    if isinstance(population_size, (bool, np.bool_)) or not isinstance(population_size, numbers.Integral):
        raise TypeError(f"population_size must be an integer >= n = {n} (the training set's size, "
                        f"of which the n samples are a probe), or None for n; got {population_size!r}")
    population_size = int(population_size)
    if population_size < n:
        raise ValueError(f"population_size must be an integer >= n = {n} (the training set's size, "
                         f"of which the n samples are a probe); got {population_size}")
    return population_size


def _check_sizes(shape, name: str) -> None:
    if shape[0] < 2:
        raise ValueError(f"{name} must describe at least 2 samples (axis 0); got {shape[0]}")
    if any(s == 0 for s in shape[1:]):
        raise ValueError(f"{name} has an empty axis: shape {shape}; d and r must be >= 1")


def _psd_roots(output_hessians, n: int, outputs: int, tol: float) -> np.ndarray:
    """Factors L_i with L_i L_i^T = Lambda_i, shape (n, C, C), after the symmetry and PSD checks."""
    hessians = as_real_array(output_hessians, "output_hessians")
    if hessians.shape == (outputs, outputs):
        hessians = np.broadcast_to(hessians, (n, outputs, outputs))
    if hessians.shape != (n, outputs, outputs):
        raise ValueError(f"output_hessians must have shape (n, C, C) = ({n}, {outputs}, {outputs}) or "
                         f"(C, C) = ({outputs}, {outputs}) to match jacobians; got shape {hessians.shape}")
    check_finite(hessians, "output_hessians")
    units, unit = power_of_two_scale(hessians.reshape(n, -1))
    units = units.reshape(hessians.shape)
    eigenvalues, vectors = np.linalg.eigh(0.5 * units + 0.5 * units.transpose(0, 2, 1))
    scale = float(np.max(np.abs(eigenvalues)))
    asymmetry = np.max(np.abs(units - units.transpose(0, 2, 1)), axis=(1, 2))
    worst = int(np.argmax(asymmetry))
    if asymmetry[worst] > tol * scale:
        raise ValueError(f"output_hessians must be symmetric: sample {worst} has max|L - L^T| = "
                         f"{asymmetry[worst] * unit:.3g}, above tol * scale = {tol * scale * unit:.3g}")
    worst = int(np.argmin(eigenvalues[:, 0]))
    if eigenvalues[worst, 0] < -tol * scale:
        raise ValueError(f"output_hessians must be positive semi-definite: sample {worst} has smallest "
                         f"eigenvalue {eigenvalues[worst, 0] * unit:.6g} (largest in the family "
                         f"{scale * unit:.6g}); accepted down to -tol * scale = {-tol * scale * unit:.3g} "
                         f"(a loss that is not convex in the outputs has no Gauss-Newton factor)")
    return vectors * np.sqrt(np.maximum(eigenvalues, 0.0) * unit)[:, None, :]


def _orthogonal_columns(columns: np.ndarray, tol: float) -> np.ndarray:
    """Rotate each (d, C) factor so its columns are orthogonal (U_i U_i^T unchanged) and drop the
    columns whose squared norm is at most ``tol`` times the largest in the family."""
    n, d, outputs = columns.shape
    if outputs == 1:
        small = np.einsum("idk,idk->i", columns, columns)
        if not tol * small.max() < small.min():  # some column is negligible: zero it exactly
            columns = np.where((small > tol * small.max())[:, None, None], columns, 0.0)
        return columns
    units, unit = power_of_two_scale(columns.reshape(n, -1))
    units = units.reshape(columns.shape)
    eigenvalues, vectors = np.linalg.eigh(np.einsum("idk,idl->ikl", units, units))
    eigenvalues, vectors = eigenvalues[:, ::-1], vectors[:, :, ::-1]
    top = float(eigenvalues.max())
    keep = eigenvalues > tol * top if top > 0 else np.zeros(eigenvalues.shape, dtype=bool)
    rank = max(int(keep.sum(axis=1).max()), 1)
    rotated = np.einsum("idk,ikl->idl", columns, vectors[:, :, :rank])
    return np.where(keep[:, None, :rank], rotated, 0.0)


# ----------------------------------------------------------------------------- Gram: Cholesky route
# A full-rank Gram matrix G = A^T A (A the (d, m) factor columns, m = n r) factors as G = L L^T;
# Q = A L^{-T} is then an orthonormal basis of the columns' span (Q^T Q = L^{-1} G L^{-T} = I) and
# the coordinates of the columns in it are Q^T A = L^{-1} G = L^T: column j of A has the
# coordinates row j of L. So the family in reduced coordinates is L itself, (m / 3) m^2 flops in
# place, where an eigendecomposition costs about 30x more (and two more (m, m) arrays). From
# GRAM_CHOLESKY_MIN rows this is the route when dpotrf succeeds with every pivot above
# GRAM_CHOLESKY_PIVOT_RTOL times the largest diagonal entry; otherwise (rank deficient, nearly
# so, or not positive definite) the pivoted or eigendecomposition routes above decide.
GRAM_CHOLESKY_MIN = 2048
GRAM_CHOLESKY_PIVOT_RTOL = 1e-10
_BLOCK = 512  # rows per block of the in-place passes over (m, m) arrays


def gram_family(cls, gram, outputs_per_sample, population_size, gradient_products, overwrite):
    """``HessianFamily.from_gram``; ``overwrite=True`` lets the Cholesky route factor ``gram``
    in place (a writable C-ordered float64 array that the caller gives up: its memory becomes
    the family's factors; on the other routes it may be left scaled and symmetrised)."""
    gram = as_real_array(gram, "gram")
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (n r, n r) matrix; got shape {gram.shape}")
    r = check_positive_int(outputs_per_sample, "outputs_per_sample")
    m = gram.shape[0]
    if m % r:
        raise ValueError(f"gram has {m} rows, not a multiple of outputs_per_sample = {r}")
    if m // r < 2:
        raise ValueError(f"gram must describe at least 2 samples; got {m // r} "
                         f"(size {m}, outputs_per_sample = {r})")
    for a in range(0, m, _BLOCK):  # by blocks: no (m, m) temporary
        if not np.all(np.isfinite(gram[a:a + _BLOCK])):
            check_finite(gram, "gram")
    n = m // r
    population = _check_population_size(population_size, n)
    products = None
    if gradient_products is not None:
        products = as_real_array(gradient_products, "gradient_products")
        if products.shape != (n, m):
            raise ValueError(f"gradient_products must have shape (n, n r) = ({n}, {m}) "
                             f"(entry [i, j r + a] = U_j[:, a] . g_i); got shape {products.shape}")
        check_finite(products, "gradient_products")
    if m >= GRAM_CHOLESKY_MIN:
        with limited_blas(float(m) ** 3):
            rows = _cholesky_rows(gram, overwrite)
        if rows is not None:
            return _cholesky_family(cls, rows, n, r, population, products)
    # Memory: the scaled copy, its eigenvectors and the factors, each (n r)^2 doubles (the
    # Gram route serves models too large for anything else); blocks for the asymmetry.
    # The library's threading policy (_threads): one BLAS thread below BLAS_THREADS_MIN_WORK
    # (an m = 600 eigendecomposition took 12 s with two spinning OpenBLAS threads on a
    # loaded 2-core machine), the process's setting above.
    with limited_blas(float(m) ** 3):
        units, unit, asymmetry = _scaled_symmetric(gram)
        rows, values, discarded = _gram_rows(units, asymmetry, unit, gram)
        del units
    kept = rows.shape[1]
    gradients = None
    if products is not None:
        # coordinates E^T g_i with E = A^T V diag(g)^{-1/2}: (V^T A g_i) / sqrt(g)
        # rows is V diag(sqrt(g)) at the true scale, values the g (also at the true scale)
        gradients = (products @ rows) / values
        gradients = _checked_gradients(gradients, n, kept, name="gradient_products")
    family = cls._trusted(np.ascontiguousarray(rows.reshape(n, r, kept).transpose(0, 2, 1)),
                          population, gradients=gradients)
    # The rows are already in H's eigenbasis (n H = A A^T and the Gram matrix A^T A share
    # their spectrum): the family's reduction is set here instead of a second eigh of the
    # (d', d') matrix H, with its backward error measured on the rows.
    with limited_blas(float(m) * kept * kept):
        family.__dict__["_reduced"] = _eigenbasis_reduction(rows, values / n, n, r, discarded)
    return family


def _asymmetry(matrix, m):
    """``max|G - G^T|``, block by block (no (m, m) temporary)."""
    return max((float(np.max(np.abs(matrix[a:a + _BLOCK] - matrix[:, a:a + _BLOCK].T)))
                for a in range(0, m, _BLOCK)), default=0.0)


def _symmetrise(units, m):
    """Symmetrise ``units`` in place, block by block."""
    for a in range(0, m, _BLOCK):
        block = 0.5 * (units[a:a + _BLOCK, a:] + units[a:, a:a + _BLOCK].T)
        units[a:a + _BLOCK, a:] = block
        units[a:, a:a + _BLOCK] = block.T


def _cholesky_rows(gram, overwrite):
    """The lower Cholesky factor L of ``gram`` (C order, true scale, strict upper triangle
    zero), or None when the Cholesky route does not apply: a diagonal entry, or a pivot of the
    factorisation, below ``GRAM_CHOLESKY_PIVOT_RTOL`` times the largest diagonal entry (rank
    deficient or nearly so), a breakdown (not positive definite), or an asymmetry above 1e-9
    times the largest diagonal entry (the other routes then decide, with their messages).
    ``overwrite``: factor ``gram`` itself when it is a writable C-ordered float64 array; when
    None is returned it then holds the symmetrised matrix again (scaled back exactly)."""
    m = gram.shape[0]
    diagonal = np.array(gram.diagonal(), dtype=np.float64)
    largest = float(np.max(diagonal))
    if not largest > 0 or not float(np.min(diagonal)) > GRAM_CHOLESKY_PIVOT_RTOL * largest:
        return None
    if _asymmetry(gram, m) > 1e-9 * largest:  # checked before anything is changed
        return None
    # Work in units of a power of two near the largest diagonal entry (|G_ij| <= sqrt(G_ii G_jj)
    # for a PSD matrix), with an even exponent so that L scales back exactly by 2^(exponent/2).
    exponent = 2 * ((math.frexp(largest)[1] - 1) // 2)
    in_place = (overwrite and gram.dtype == np.float64 and gram.flags.c_contiguous
                and gram.flags.writeable)
    if in_place:
        units = gram
        np.ldexp(units, -exponent, out=units)
    else:
        units = np.empty((m, m))
        np.ldexp(gram, -exponent, out=units)
    scaled_diagonal = np.ldexp(diagonal, -exponent)
    _symmetrise(units, m)
    # units is symmetric, so units.T (Fortran order, no copy) is the same matrix: dpotrf's upper
    # factor U of it (G = U^T U), written over the upper triangle in Fortran order, is L = U^T
    # over the lower triangle of units in C order; the strict upper triangle of units keeps G.
    factor, info = scipy.linalg.lapack.dpotrf(units.T, lower=0, overwrite_a=1, clean=0)
    shared = np.shares_memory(factor, units)
    pivots = np.diagonal(factor)
    if info != 0 or not float(np.min(pivots * pivots)) > GRAM_CHOLESKY_PIVOT_RTOL * float(
            np.max(scaled_diagonal)):
        del factor
        if in_place:  # restore G from its untouched strict upper triangle and the diagonal
            if shared:
                for a in range(0, m, _BLOCK):
                    units[a:a + _BLOCK, :a] = units[:a, a:a + _BLOCK].T
                    block = units[a:a + _BLOCK, a:a + _BLOCK]
                    lower = np.tril_indices(block.shape[0], -1)
                    block[lower] = block.T[lower]
                np.fill_diagonal(units, scaled_diagonal)
            np.ldexp(units, exponent, out=units)
        return None
    rows = factor.T if factor.flags.f_contiguous else np.ascontiguousarray(factor.T)
    del factor, units
    for a in range(0, m, _BLOCK):  # zero the strict upper triangle (it still holds G)
        b = min(a + _BLOCK, m)
        rows[a:b, b:] = 0.0
        block = rows[a:b, a:b]
        block[np.triu_indices(b - a, 1)] = 0.0
    np.ldexp(rows, exponent // 2, out=rows)  # exact: the true scale
    return rows


def _cholesky_family(cls, rows, n, r, population, products):
    """The family whose factors are the rows of the Cholesky factor (a strided view, no copy):
    ``factors[i, :, c] = rows[i r + c]``; gradients ``L^{-1} products^T`` (their coordinates
    in the basis Q, by one triangular solve). The reduction is left to the first engine call
    (``HessianFamily._reduced``) and the sharpness to Lanczos (``_lanczos_sharpness``)."""
    m = rows.shape[0]
    gradients = None
    if products is not None:
        # L X = P^T, with rows.T the upper factor U = L^T in Fortran order: U^T X = P^T.
        solution, info = scipy.linalg.lapack.dtrtrs(rows.T, np.asfortranarray(products.T),
                                                    lower=0, trans=1)
        if info != 0:
            raise ValueError(f"gradient_products: the triangular solve failed (info {info})")
        gradients = _checked_gradients(solution.T, n, m, name="gradient_products")
    rows.setflags(write=False)
    factors = rows.reshape(n, r, m).transpose(0, 2, 1)  # a view: row i r + c is U_i[:, c]
    family = cls.__new__(cls)
    family._factors = factors
    family._population_size = population
    family._gradients = gradients
    family.__dict__["_cholesky_rows"] = True  # rows lower triangular: Lanczos for the sharpness
    return family


def _lanczos_sharpness(family) -> float:
    """``lambda_1(H) = lambda_1(L L^T) / n`` of a Cholesky-route family by Lanczos (ARPACK,
    ``eigsh`` to machine precision; each product two triangular matrix-vector products, about
    m^2 multiply-adds), or None outside the range where the products cannot overflow or
    underflow (the reduction then decides)."""
    from scipy.sparse.linalg import LinearOperator, eigsh
    rows = family._columns()  # (m, m), lower triangular; a view for the family as built
    m = rows.shape[0]
    if rows.shape[1] != m:
        return None
    largest = max(float(np.max(rows)), -float(np.min(rows)))  # no (m, m) temporary
    if not 2.0 ** -300 < largest < 2.0 ** 300:
        return None
    exponent = math.frexp(largest)[1] - 1
    upper = rows.T if rows.flags.c_contiguous else np.asfortranarray(rows.T)  # U = L^T, Fortran
    trmv = scipy.linalg.blas.dtrmv

    def product(x):
        x = np.ldexp(np.asarray(x, dtype=np.float64).reshape(-1), -exponent)
        y = trmv(upper, x, lower=0, trans=0)       # L^T x
        z = trmv(upper, y, lower=0, trans=1, overwrite_x=1)  # L (L^T x)
        return np.ldexp(z, -exponent)

    start = np.random.default_rng(0).standard_normal(m)
    operator = LinearOperator((m, m), matvec=product, dtype=np.float64)
    with limited_blas(float(m) * m):
        value = eigsh(operator, k=1, which="LA", tol=0, v0=start, return_eigenvectors=False)
    top = float(value[0])
    with np.errstate(over="ignore", under="ignore"):
        return float(np.ldexp(top, 2 * exponent) / family.n) if top > 0 else 0.0
