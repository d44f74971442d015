"""Proven bounds on floating-point rounding, for the certificates (the specification page,
section "Certified answers and scale").

Every bound here rests on the standard model of floating-point arithmetic (IEEE double, round to
nearest, ``u = 2^-53``): a computed sum of m products ``fl(sum_i a_i b_i)`` differs from the exact
sum by at most ``gamma(m) sum_i |a_i b_i|`` with ``gamma(m) = m u / (1 - m u)``, for *every* order
of summation, with or without fused multiply-adds (Higham, "Accuracy and Stability of Numerical
Algorithms", section 3.1). That is what makes these bounds hold whatever the BLAS kernel, its
blocking, its thread count or the CPU: they never assume an order of operations. (Fast matrix
multiplication, Strassen's, would need other bounds; the BLAS libraries numpy and scipy link do
not use it.)
"""

from __future__ import annotations

import math

import numpy as np

UNIT_ROUNDOFF = 2.0 ** -53


def gamma(m: float) -> float:
    """``m u / (1 - m u)``: the relative error bound of a length-m sum of products."""
    mu = m * UNIT_ROUNDOFF
    if mu >= 0.5:
        return math.inf
    return mu / (1.0 - mu)


def down(value):
    """The next float below ``value`` (elementwise): a final operation rounded towards -inf."""
    return np.nextafter(np.nextafter(value, -np.inf), -np.inf)


def up(value):
    """The next float above ``value`` (elementwise): a final operation rounded towards +inf."""
    return np.nextafter(np.nextafter(value, np.inf), np.inf)


def operator_chain(k: int, m: int, rank: int) -> int:
    """Longest chain of rounded operations behind one entry of ``T(X)`` (``sandwich_error``):
    the symmetrisation and scaling of X (3), ``rows Y`` (a sum of k products), ``V_i^T Y V_i``
    (k more) and its symmetrisation (2), ``C_i V_i^T`` (r), ``rows^T (C V)`` (m), the factor
    1/n and the symmetrisation of the result (2), ``S o (F o Y + beta N)`` (4), with margin."""
    return 2 * k + m + 2 * rank + 16


def sandwich_error(rows: np.ndarray, rank: int, scaling, multiplier, noise_weight: float) -> float:
    """A constant c with ``||fl(T(X)) - T(X)||_F <= c ||X||_F`` for the compiled operator
    ``T(X) = S o (F o Y + beta N(Y))``, ``Y = S o sym(X)``, ``N(Y) = (1/n) sum_i R_i R_i^T Y R_i R_i^T``.

    Each computed entry is the exact one with every term perturbed by at most ``gamma(K)``
    relative, K the longest chain of operations (``operator_chain``: 2 k + n r + 2 r + 16), so the error is at most
    ``gamma(K) T_abs(|X|)`` entrywise, where ``T_abs`` is T with every quantity replaced by its
    absolute value; and ``||N_abs(|Y|)||_F <= (1/n) sum_i ||R_i||_F^4 ||Y||_F``.
    """
    k = rows.shape[1]
    m = rows.shape[0]
    n = m // max(rank, 1)
    if k == 0:
        return 0.0
    s_max = float(np.max(np.abs(scaling)))
    f_max = float(np.max(np.abs(multiplier)))
    row_norms = np.einsum("ij,ij->i", rows, rows).reshape(n, rank).sum(axis=1)
    noise_norm = float(np.sum(row_norms * row_norms)) / n
    # 1.01: the computation of the bound itself (a few roundings of nonnegative terms).
    return 1.01 * gamma(operator_chain(k, m, rank)) * s_max * s_max * (f_max + abs(noise_weight) * noise_norm)
