"""``HessianFamily``: the one input type of the library.

A family holds the per-sample factors ``U`` of shape ``(n, d, r)`` with ``H_i = U_i U_i^T``
(see the specification page, section "Setting"). It is validated once, on construction; every engine
takes a family and trusts it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ._config import RANGE_RTOL
from ._validation import as_real_array, check_finite, check_real_scalar


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

    Parameters
    ----------
    factors : array_like, shape (n, d, r)
        The factors ``U_i``; any real array ``np.asarray`` accepts. Copied and stored read-only
        as float64.

    Attributes
    ----------
    n, d, rank : int
        Number of samples, parameter dimension, columns per factor.
    factors : ndarray, shape (n, d, rank)
        Read-only copy of the factors.

    Raises
    ------
    TypeError
        Non-numeric data.
    ValueError
        Wrong number of dimensions, fewer than 2 samples, an empty axis, NaN or inf.

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

    def __init__(self, factors):
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

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_features(cls, features) -> "HessianFamily":
        """Mean-squared error with scalar output: ``H_i = x_i x_i^T``.

        The loss convention: sample i's loss is ``(1/2) (x_i . w - y_i)^2`` and SGD steps on
        the mean over the batch, so every learning rate the library reports is for that loss.
        ``torch.nn.MSELoss()`` on a scalar output has no 1/2: its Hessians are twice these and
        its critical learning rate half (use ``from_features(sqrt(2) * X)`` for it).

        Parameters
        ----------
        features : array_like, shape (n, d)
            One feature (or NTK gradient) vector per sample.

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
        return cls(features[:, :, None])

    @classmethod
    def from_dense(cls, hessians, tol: float = 1e-9) -> "HessianFamily":
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
        return cls(factors)

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write the factors to ``path`` in ``.npz`` format (key ``factors``), readable by :meth:`load`.

        The file is written at exactly ``path`` (no ``.npz`` suffix is appended).
        """
        with open(path, "wb") as handle:
            np.savez(handle, factors=self._factors)

    @classmethod
    def load(cls, path) -> "HessianFamily":
        """Read a family from an ``.npz`` file.

        The file holds exactly one of ``factors`` (n, d, r), as written by :meth:`save`,
        ``hessians`` (n, d, d), or ``features`` (n, d), of real numbers (bool, int or float).
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
        from ._io import read_family_arrays

        key, array = read_family_arrays(path)
        try:
            if key == "factors":
                return cls(array)
            if key == "hessians":
                return cls.from_dense(array)
            return cls.from_features(array)
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)}: {exc}") from None

    # ------------------------------------------------------------------ attributes
    @property
    def factors(self) -> np.ndarray:
        return self._factors

    @property
    def n(self) -> int:
        return self._factors.shape[0]

    @property
    def d(self) -> int:
        return self._factors.shape[1]

    @property
    def rank(self) -> int:
        return self._factors.shape[2]

    def __repr__(self) -> str:
        return f"HessianFamily(n={self.n}, d={self.d}, rank={self.rank})"

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
        in units of the sharpness, so its answers stay correct even then.
        """
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
        return _reduce(self._columns(), self.n, self.rank)

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
        rows = columns @ basis[:, keep]
        eigenvalues = eigenvalues[keep]
    elif method == "gram":
        gram_eigenvalues, gram_vectors = np.linalg.eigh(columns @ columns.T)
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
    return Reduction(
        unit_eigenvalues=np.ascontiguousarray(unit_eigenvalues),
        unit_rows=np.ascontiguousarray(rows / root),
        root_sharpness=scale * root,
        rank=rank,
        scaled_sharpness=top,
        scale=scale,
    )


def _kept(eigenvalues: np.ndarray) -> np.ndarray:
    top = eigenvalues[0] if eigenvalues.size else 0.0
    if top <= 0:
        return np.zeros(eigenvalues.shape, dtype=bool)
    return eigenvalues > RANGE_RTOL * top


def _check_sizes(shape, name: str) -> None:
    if shape[0] < 2:
        raise ValueError(f"{name} must describe at least 2 samples (axis 0); got {shape[0]}")
    if any(s == 0 for s in shape[1:]):
        raise ValueError(f"{name} has an empty axis: shape {shape}; d and r must be >= 1")
