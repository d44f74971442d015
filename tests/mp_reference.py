"""Higher-precision references (mpmath, 30 digits) for the certified brackets of plain SGD.

Independent of the library and of float64 BLAS: every operator is built entry by entry from the
family's factors in 30-digit arithmetic, on an orthonormal basis of the symmetric matrices over
the range of H (the range as the library defines it: eigenvalues above RANGE_RTOL lambda_1),
and solved by mpmath's symmetric eigensolver. For d <= 4 (operators of dimension <= 10).
"""

from __future__ import annotations

import mpmath as mp

from fastsgdstab._config import RANGE_RTOL

DIGITS = 30


def coefficients(sampling, n, batch):
    batch = mp.mpf(batch)
    if sampling == "bernoulli":
        return mp.mpf(1), 1 / batch - mp.mpf(1) / n
    if sampling == "without_replacement":
        p = (n - batch) / (batch * (n - 1))
        return 1 - p, p
    return 1 - 1 / batch, 1 / batch


class Family:
    """Per-sample Hessians, their mean and a basis of the range, in mpmath."""

    def __init__(self, factors):
        n, d, r = factors.shape
        self.n, self.d = n, d
        self.hessians = []
        # Work with factors / s (s the largest |entry|, exact in mpmath): every answer depends on
        # lr and the H_i only through lr H_i, and 30 digits keep their relative accuracy.
        s = max(abs(mp.mpf(float(v))) for v in factors.ravel()) or mp.mpf(1)
        self.scale2 = s * s
        for i in range(n):
            U = mp.matrix([[mp.mpf(float(factors[i, a, c])) / s for c in range(r)] for a in range(d)])
            self.hessians.append(U * U.T)
        H = mp.matrix(d, d)
        for Hi in self.hessians:
            H += Hi
        self.mean = H / n
        values, vectors = mp.eigsy(self.mean)
        top = max(values)
        keep = [j for j in range(d) if values[j] > RANGE_RTOL * top]
        self.basis = [vectors[:, j] for j in keep]
        # Orthonormal basis of symmetric matrices over the range: v_a v_b^T symmetrised.
        self.sym = []
        k = len(self.basis)
        for a in range(k):
            for b in range(a, k):
                E = self.basis[a] * self.basis[b].T
                E = (E + E.T) / 2
                scale = 1 if a == b else mp.sqrt(2)
                self.sym.append(E * scale)

    def matrix(self, operator):
        m = len(self.sym)
        M = mp.matrix(m, m)
        images = [operator(E) for E in self.sym]
        for i in range(m):
            for j in range(m):
                total = mp.mpf(0)
                Ei, Tj = self.sym[i], images[j]
                for a in range(self.d):
                    for b in range(self.d):
                        total += Ei[a, b] * Tj[a, b]
                M[i, j] = total
        return (M + M.T) / 2

    def noise(self, X):
        out = mp.matrix(self.d, self.d)
        for Hi in self.hessians:
            out += Hi * X * Hi
        return out / self.n

    def L(self, X):
        return self.mean * X + X * self.mean

    def D(self, X, a, b):
        return a * self.mean * X * self.mean + b * self.noise(X)


def spectral_radius(family: Family, lr, sampling, batch):
    a, b = coefficients(sampling, family.n, batch)
    lr = mp.mpf(lr) * family.scale2
    M = family.matrix(lambda X: X - lr * family.L(X) + lr ** 2 * family.D(X, a, b))
    return max(abs(v) for v in mp.eigsy(M)[0])


def _pencil_top(A, W):
    # max eigenvalue of W^{-1/2} A W^{-1/2} (W positive definite).
    C = mp.cholesky(W)
    Ci = C ** -1
    return max(mp.eigsy((Ci * A * Ci.T + (Ci * A * Ci.T).T) / 2)[0])


def critical_lr(family: Family, sampling, batch):
    a, b = coefficients(sampling, family.n, batch)
    W = family.matrix(family.L)
    A = family.matrix(lambda X: family.D(X, a, b))
    return 1 / _pencil_top(A, W) / family.scale2


def critical_noise(family: Family, sampling, lr):
    """q* (section 4): the largest stable noise scalar at this lr (inf if every q is)."""
    lr = mp.mpf(lr) * family.scale2
    interaction = 0 if sampling == "bernoulli" else -1
    W = family.matrix(lambda X: family.L(X) - lr * family.mean * X * family.mean)
    A = family.matrix(lambda X: family.noise(X) + interaction * family.mean * X * family.mean)
    top = _pencil_top(A, W)
    return mp.inf if top <= 0 else 1 / (lr * top)
