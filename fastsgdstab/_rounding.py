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


# ----------------------------------------------------------------------------- verified products
# A product whose rounding is proven far below the a priori ``gamma(L) |A| |B|`` (which grows like
# L, the inner length, and is what made the reduction's backward error dominate the certified
# brackets at k = 2,000): the splitting of Ozaki, Ogita and Oishi ("Error-free transformations of
# matrix multiplication", 2012), one level. ``A = A1 + Ar`` exactly, with each row of A1 on the
# grid ``2^(e_i - bits)`` (``|A_i| < 2^e_i``) and at most ``bits`` significant bits, and the same
# for the columns of B; with ``L 2^(2 bits) <= 2^53`` every partial sum of ``A1 B1`` (entry (i, j))
# is an integer multiple of ``2^(e_i + f_j - 2 bits)`` below ``2^53`` of them, so representable:
# BLAS computes ``A1 B1`` EXACTLY, in any order of summation, with or without FMA, with any
# blocking or thread count. The rest ``A1 Br + Ar B`` is ``2^-bits`` smaller, so its a priori
# rounding bound is ``2^-bits`` times smaller too, and the final two additions cost ``2 u`` of the
# result's own size: in all, ``|fl - A B| <~ 2 u |A B| + 2^-bits gamma(L) |A| |B|``.

SPLIT_EXPONENT_FLOOR = -400
"""Row/column exponents are floored here, so that the grids ``2^(e + f - 2 bits)`` stay normal
(no product underflows to a subnormal); entries below a floored grid go to the rest."""


def split_bits(length: int) -> int:
    """The most bits per slice with which a length-``length`` product of slices is exact:
    ``length 2^(2 bits) <= 2^53``."""
    return max(1, (53 - math.ceil(math.log2(max(int(length), 2)))) // 2)


def _exponents(array: np.ndarray, axis: int) -> np.ndarray:
    largest = np.max(np.abs(array), axis=axis) if array.size else np.zeros(array.shape[1 - axis])
    exponents = np.frexp(largest)[1].astype(np.int64)  # largest < 2^e (0 for a zero row)
    return np.maximum(exponents, SPLIT_EXPONENT_FLOOR)


def split(array: np.ndarray, exponents: np.ndarray, bits: int):
    """``(high, low)`` with ``array == high + low`` exactly, ``high`` on the grid
    ``2^(e - bits)`` (``exponents`` broadcast against ``array``), ``|low| <= 2^(e - bits - 1)``."""
    shift = bits - exponents
    # Scaling by powers of two is exact (no entry overflows: |array| 2^(bits - e) <= 2^bits, and
    # the grid 2^(e - bits) >= 2^(SPLIT_EXPONENT_FLOOR - 53) is normal); rint is exact; so is the
    # difference (a multiple of ulp(a), at most |a|, see Ozaki et al.).
    high = np.ldexp(np.rint(np.ldexp(array, shift)), -shift)
    return high, array - high


def verified_product(A: np.ndarray, B: np.ndarray | None = None, *,
                     chunk_bytes: float = 2.0 ** 27):
    """``(P, E)``: ``P`` a floating-point ``A @ B`` (``A @ A.T`` when B is None) and ``E`` an
    entrywise bound on ``|P - A B|`` that holds for every BLAS (see above); ``E`` is about
    ``2 u |A B|`` plus ``2^-bits gamma(L)`` times the a priori bound. Cost: three products of
    the shape of ``A @ B``. The inner dimension is taken in chunks of at most ``chunk_bytes`` of
    A's slices (every partial sum of the exact part is still on its grid, so the sum of the
    chunks' exact products is exact too; the rest is one more order of summation)."""
    A = np.asarray(A, dtype=np.float64)
    symmetric = B is None
    B = A.T if symmetric else np.asarray(B, dtype=np.float64)
    m, length = A.shape
    k = B.shape[1]
    bits = split_bits(length)
    eA = _exponents(A, 1)
    eB = eA if symmetric else _exponents(B, 0)
    g = gamma(length)
    exact = np.zeros((m, k))
    rest = np.zeros((m, k))
    a1 = np.zeros(m)
    b1 = np.zeros(k)
    rest_a = np.zeros(m)
    rest_b = np.zeros(k)
    step = max(1, int(chunk_bytes // (8 * max(m + k, 1))))
    for c0 in range(0, length, step):
        c1 = min(c0 + step, length)
        A1, Ar = split(A[:, c0:c1], eA[:, None], bits)
        if symmetric:
            B1, Br, Bc = A1.T, Ar.T, A[:, c0:c1].T
        else:
            Bc = B[c0:c1]
            B1, Br = split(Bc, eB[None, :], bits)
        exact += A1 @ B1                      # exact, and so is the sum over chunks
        rest += A1 @ Br
        rest += Ar @ Bc
        # |A1| |Br| <= ||A1_i||_1 max_l |Br_lj| (at most ||A1_i||_1 2^(f_j - bits - 1)), and
        # |Ar| |B| the same way; the 1-norms (sums of nonnegative terms) carry a relative
        # rounding of gamma(length), the maxima none.
        a1 += np.sum(np.abs(A1), axis=1)
        b1 += np.sum(np.abs(Bc), axis=0)
        np.maximum(rest_a, np.max(np.abs(Ar), axis=1), out=rest_a)
        np.maximum(rest_b, np.max(np.abs(Br), axis=0), out=rest_b)
    P = exact + rest
    # rest: a sum of 2 length products in some order, so within gamma(2 length) of
    # |A1| |Br| + |Ar| |B|; then the final addition (u of both terms), products that underflow
    # (at most 2^-1074 each, 2 length of them), and the rounding of this bound's evaluation.
    error = gamma(2 * length) * (1.0 + 2.0 * g) * (np.multiply.outer(a1, rest_b)
                                                   + np.multiply.outer(rest_a, b1))
    error += UNIT_ROUNDOFF * (np.abs(exact) + np.abs(rest))
    error += 2.0 * length * 2.0 ** -1074
    error *= 1.0 + gamma(8)
    return P, error
