"""The internal API shared by every exact engine (no leading underscores inside).

* ``check_family`` and ``reduced``: the one input type and its exact reduction to H's range, in
  units of the sharpness (``HessianFamily``'s reduction; see the specification page, section "Certified
  answers and scale"). Every engine works with ``x = lr * lambda_1(H)`` and the unit family, so
  an answer never depends on the units of the loss.
* ``SandwichOperator``: ``X -> S o (F o Y + beta N(Y))`` with ``Y = S o sym(X)`` on k x k
  symmetric matrices (the compiled kernel ``sandwich_operator``), which is each operator the
  engines solve: the second-moment map Q, ``L^{-1/2} D L^{-1/2}`` (critical learning rate) and
  ``R^{-1/2} V R^{-1/2}`` (critical batch size). All three map PSD matrices to PSD matrices
  (the entrywise scalings are PSD kernels, so Schur's theorem applies) and are self-adjoint.
* ``top_eigenvalue``: their certified top eigenvalue (a proven bracket, ``_linalg``), with a
  ``CertificationWarning`` when the bracket is wider than ``CERTIFY_RTOL``.
* ``second_moment_multiplier``: the entrywise part of Q, rescaled by ``1 / x^2`` for huge x so
  that nothing overflows (the radius is then ``x^2`` times the scaled one).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ._config import CERTIFY_RTOL, ENGINE_RTOL, HUGE_UNIT_LR, RADIUS_RTOL_FLOOR
from ._kernels.operators import sandwich_operator
from ._linalg import Bracket, CertificationWarning, certified_top_eigenvalue
from .family import HessianFamily

__all__ = ["check_family", "reduced", "range_basis", "factor_rows", "SandwichOperator", "top_eigenvalue",
           "second_moment_multiplier", "second_moment_scale", "radius_tolerance", "pair_sum",
           "pair_product", "safe_upper_value", "Bracket"]


def check_family(family) -> HessianFamily:
    """The family itself, or a TypeError naming what a family is and how to build one."""
    if not isinstance(family, HessianFamily):
        raise TypeError(
            f"family must be a HessianFamily (build one with HessianFamily(factors), "
            f".from_features or .from_dense); got {type(family).__name__}"
        )
    return family


def reduced(family: HessianFamily):
    """The family's exact ``Reduction`` (computed once per family, then cached).

    This module is the one place that reads the family's internals; every engine goes through
    ``reduced``, ``range_basis`` and ``factor_rows``.
    """
    return family._reduced


def range_basis(family: HessianFamily) -> np.ndarray:
    """The (d, k) orthonormal eigenvector basis of the range of H, matching ``reduced``."""
    return family._range_basis()


def factor_rows(family: HessianFamily) -> np.ndarray:
    """All factor columns as rows of an (n r, d) array: row ``i r + c`` is ``U_i[:, c]``."""
    return family._columns()


def pair_sum(values: np.ndarray) -> np.ndarray:
    return np.add.outer(values, values)


def pair_product(values: np.ndarray) -> np.ndarray:
    return np.multiply.outer(values, values)


def radius_tolerance(value: float) -> float:
    """Certification tolerance of a spectral radius, relative to the value: ``CERTIFY_RTOL``
    times ``|1 - rho|`` (near 1 the distance to 1 is the quantity that matters: the rate of
    convergence or divergence), floored at ``RADIUS_RTOL_FLOOR``."""
    return CERTIFY_RTOL * max(min(1.0, abs(1.0 - value)), RADIUS_RTOL_FLOOR / CERTIFY_RTOL)


def second_moment_scale(x: float) -> float:
    """Size of the terms that cancel in the second-moment map's entries (units of lambda_1):
    ``(1 + x)^2``, or ``(1 + 1/x)^2`` once the map is divided by ``x^2`` (huge x)."""
    return (1.0 + 1.0 / x) ** 2 if x > HUGE_UNIT_LR else (1.0 + x) ** 2


def second_moment_multiplier(unit_eigenvalues: np.ndarray, x: float, a: float, b: float):
    """``(F, beta, log_factor)`` with ``Q = exp(log_factor) (F o X + beta N(X))`` in unit terms.

    ``F_jl = (1 - x m_j)(1 - x m_l) + x^2 (a - 1) m_j m_l`` and ``beta = x^2 b`` (m the unit
    eigenvalues); for ``x > HUGE_UNIT_LR`` the map is divided by ``x^2`` first (F and beta then
    use ``1/x``), so that no entry overflows however large the learning rate.
    """
    m = unit_eigenvalues
    if x > HUGE_UNIT_LR:
        factor = 1.0 / x - m
        return (np.multiply.outer(factor, factor) + (a - 1.0) * pair_product(m), b,
                2.0 * math.log(x))
    factor = 1.0 - x * m
    return np.multiply.outer(factor, factor) + x * x * (a - 1.0) * pair_product(m), x * x * b, 0.0


class SandwichOperator:
    """``X -> S o (F o Y + beta N(Y))``, ``Y = S o sym(X)``, on k x k matrices of a unit family."""

    def __init__(self, reduction, scaling, multiplier, noise_weight: float):
        self.rows = reduction.unit_rows
        self.rank = reduction.rank
        self.k = reduction.k
        self.scaling = np.ascontiguousarray(scaling, dtype=np.float64)
        self.multiplier = np.ascontiguousarray(multiplier, dtype=np.float64)
        self.noise_weight = float(noise_weight)
        self._work = np.empty(self.rows.shape)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((self.k, self.k))
        sandwich_operator(self.rows, self.rank, np.ascontiguousarray(X, dtype=np.float64),
                          self.scaling, self.multiplier, self.noise_weight, self._work, out)
        return out


def top_eigenvalue(operator: SandwichOperator, *, what: str, start=None,
                   rtol: float = ENGINE_RTOL, certify_rtol=CERTIFY_RTOL,
                   scale_hint: float = 0.0, warn: bool = True) -> Bracket:
    """Certified top eigenvalue of one of the engine's operators (see ``_linalg``).

    Warns (``CertificationWarning``, naming ``what``) when the proven bracket is wider than
    ``certify_rtol`` (a number, or a function of the value; ``bracket.certified`` is False):
    the bracket is still true and is what the caller reports. ``warn=False`` leaves the
    judgement to a caller whose answer is a function of the eigenvalue (``critical_batch_size``
    judges the batch sizes it brackets).
    """
    bracket = certified_top_eigenvalue(operator, operator.k, rtol=rtol, start=start,
                                       certify_rtol=certify_rtol, scale_hint=scale_hint)
    if warn and not bracket.certified:
        warnings.warn(
            f"{what}: the top eigenvalue is proven only to lie in [{bracket.lower:.12g}, "
            f"{bracket.upper:.12g}] (value {bracket.value:.12g}); the bracket is wider than the "
            f"certification tolerance", CertificationWarning, stacklevel=3,
        )
    return bracket


def safe_upper_value(bracket: Bracket) -> float:
    """The largest value the top eigenvalue can plausibly take: the Ritz value plus its error
    estimate and rounding, never above the proven upper bound. Used where an answer must err on
    the stable side (a critical lr that is never above the true one)."""
    return min(bracket.upper, bracket.value + bracket.error + (bracket.value - bracket.lower))
