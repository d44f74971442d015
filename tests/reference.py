"""Slow, obviously-correct references for the exact engine.

Nothing here imports the library's engines: only plain numpy/scipy on dense d^2 x d^2
Kronecker operators, built either from THEORY.md's formulas or by enumerating every batch.
Use for d <= ~6 and (for enumeration) n <= ~8.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import scipy.linalg


def dense_from_factors(factors) -> np.ndarray:
    factors = np.asarray(factors, dtype=float)
    return np.einsum("idr,ier->ide", factors, factors)


def batch_distribution(n: int, batch_size: int, sampling: str):
    """Every batch with its probability: yields (probability, counts) with counts[i] the number
    of times sample i is in the batch."""
    if sampling == "bernoulli":
        p = batch_size / n
        for z in itertools.product((0, 1), repeat=n):
            k = sum(z)
            yield p**k * (1 - p) ** (n - k), np.array(z, dtype=float)
    elif sampling == "without_replacement":
        subsets = list(itertools.combinations(range(n), batch_size))
        for subset in subsets:
            counts = np.zeros(n)
            counts[list(subset)] = 1
            yield 1.0 / len(subsets), counts
    elif sampling == "with_replacement":
        for draws in itertools.product(range(n), repeat=batch_size):
            counts = np.bincount(draws, minlength=n).astype(float)
            yield float(n) ** (-batch_size), counts
    else:
        raise ValueError(sampling)


def kron_moments_enumerated(hessians, batch_size: int, sampling: str):
    """(E[H_b], E[H_b (x) H_b]) by enumerating every batch; H_b = (1/B) sum counts_i H_i."""
    hessians = np.asarray(hessians, dtype=float)
    n, d, _ = hessians.shape
    mean = np.zeros((d, d))
    second = np.zeros((d * d, d * d))
    total = 0.0
    for probability, counts in batch_distribution(n, batch_size, sampling):
        batch = np.tensordot(counts, hessians, axes=1) / batch_size
        mean += probability * batch
        second += probability * np.kron(batch, batch)
        total += probability
    assert abs(total - 1) < 1e-12
    return mean, second


def coefficients(sampling: str, n: int, batch_size: float):
    """(a, b) of THEORY.md section 2, written out independently of the library."""
    B = batch_size
    if sampling == "bernoulli":
        return 1.0, 1.0 / B - 1.0 / n
    if sampling == "without_replacement":
        p = (n - B) / (B * (n - 1))
        return 1.0 - p, p
    if sampling == "with_replacement":
        return 1.0 - 1.0 / B, 1.0 / B
    raise ValueError(sampling)


def kron_moments_formula(hessians, batch_size: float, sampling: str):
    """(E[H_b], E[H_b (x) H_b]) = (H, a H(x)H + b (1/n) sum H_i (x) H_i) from THEORY.md."""
    hessians = np.asarray(hessians, dtype=float)
    n = hessians.shape[0]
    mean = hessians.mean(axis=0)
    a, b = coefficients(sampling, n, batch_size)
    noise = sum(np.kron(h, h) for h in hessians) / n
    return mean, a * np.kron(mean, mean) + b * noise


def second_moment_operator(mean, second, lr: float) -> np.ndarray:
    """Q = E[(I - lr H_b) (x) (I - lr H_b)] as a d^2 x d^2 matrix acting on vec(X)."""
    d = mean.shape[0]
    eye = np.eye(d)
    return np.kron(eye, eye) - lr * (np.kron(mean, eye) + np.kron(eye, mean)) + lr * lr * second


def range_basis(hessians, rtol: float = 1e-10) -> np.ndarray:
    """Orthonormal basis (d, k) of the range of H = mean of the H_i, by SVD of H."""
    mean = np.asarray(hessians, dtype=float).mean(axis=0)
    u, s, _ = np.linalg.svd(mean)
    if s[0] <= 0:
        return np.zeros((mean.shape[0], 0))
    return u[:, s > rtol * s[0]]


def symmetric_basis(basis: np.ndarray) -> np.ndarray:
    """Columns: vec(P E_jl P^T) for an orthonormal basis E_jl of symmetric k x k matrices."""
    d, k = basis.shape
    columns = []
    for j in range(k):
        for l in range(j, k):
            e = np.zeros((k, k))
            if j == l:
                e[j, j] = 1.0
            else:
                e[j, l] = e[l, j] = 1.0 / math.sqrt(2.0)
            columns.append((basis @ e @ basis.T).ravel())
    return np.array(columns).T


def restrict(operator: np.ndarray, hessians) -> np.ndarray:
    """Matrix of an operator on vec(d x d) restricted to symmetric matrices on the range of H."""
    sym = symmetric_basis(range_basis(hessians))
    return sym.T @ operator @ sym


def spectral_radius(hessians, lr, batch_size, sampling, enumerate_batches=False) -> float:
    mean, second = (kron_moments_enumerated if enumerate_batches else kron_moments_formula)(
        hessians, batch_size, sampling)
    q = restrict(second_moment_operator(mean, second, lr), hessians)
    eigenvalues = np.linalg.eigvalsh(0.5 * (q + q.T))
    return float(np.max(np.abs(eigenvalues)))


def critical_lr(hessians, batch_size, sampling, enumerate_batches=False) -> float:
    """1 / max generalized eigenvalue of (D, L) on symmetric matrices on the range of H."""
    mean, second = (kron_moments_enumerated if enumerate_batches else kron_moments_formula)(
        hessians, batch_size, sampling)
    d = mean.shape[0]
    eye = np.eye(d)
    lin = restrict(np.kron(mean, eye) + np.kron(eye, mean), hessians)
    quad = restrict(second, hessians)
    mu = scipy.linalg.eigh(0.5 * (quad + quad.T), 0.5 * (lin + lin.T), eigvals_only=True)
    return 1.0 / float(mu[-1])


def critical_lr_bisection(hessians, batch_size, sampling, enumerate_batches=True, iterations=80):
    """eta* as the largest lr with spectral radius <= 1, by bisection on (0, 2 / lambda_1]."""
    top = np.linalg.eigvalsh(np.asarray(hessians).mean(axis=0))[-1]
    lo, hi = 0.0, 2.0 / top * (1 + 1e-12)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if spectral_radius(hessians, mid, batch_size, sampling, enumerate_batches) <= 1.0:
            lo = mid
        else:
            hi = mid
    return lo


def log_mean_sq_trajectory(hessians, lr, batch_size, sampling, steps, sigma0=None):
    """log tr(Sigma_t) for t = 0..steps by iterating the dense Q on vec(Sigma)."""
    mean, second = kron_moments_formula(hessians, batch_size, sampling)
    q = second_moment_operator(mean, second, lr)
    d = mean.shape[0]
    vec = (np.eye(d) if sigma0 is None else np.asarray(sigma0, dtype=float)).ravel()
    out = []
    for _ in range(steps + 1):
        out.append(math.log(np.trace(vec.reshape(d, d))))
        vec = q @ vec
    return np.array(out)


# ----------------------------------------------------------------------------- momentum
# THEORY.md section "Momentum", written out from torch.optim.SGD's update (dampening 0) in the
# original variables: heavy ball z = (w_t, w_{t-1}); Nesterov z = (w_t, v_{t-1}) with
# v_t = mu v_{t-1} + H_B w_t and w_{t+1} = w_t - lr (H_B w_t + mu v_t). No closed form is used:
# the (2d)^2 x (2d)^2 operator E[A_B (x) A_B] is summed over every batch (or, for a real batch
# size of the schemes that draw exactly B samples, formed from E[H_B (x) H_B] of section 2).


def momentum_step(batch_hessian, lr: float, momentum: float, nesterov: bool) -> np.ndarray:
    """The (2d, 2d) matrix A_B of one momentum step for one batch Hessian."""
    d = batch_hessian.shape[0]
    eye, zero = np.eye(d), np.zeros((d, d))
    if nesterov:
        return np.block([[eye - lr * (1 + momentum) * batch_hessian, -lr * momentum**2 * eye],
                         [batch_hessian, momentum * eye]])
    return np.block([[(1 + momentum) * eye - lr * batch_hessian, -momentum * eye], [eye, zero]])


def momentum_operator(hessians, lr, batch_size, sampling, momentum, nesterov,
                      enumerate_batches=True, basis=None) -> np.ndarray:
    """E[A_B (x) A_B] acting on vec(Sigma), Sigma = E[z z^T] of size 2k (z restricted to
    ``basis`` (d, k), by default the range of H, an invariant subspace of every H_i)."""
    hessians = np.asarray(hessians, dtype=float)
    n, d, _ = hessians.shape
    basis = range_basis(hessians) if basis is None else basis
    reduced_h = np.einsum("da,ide,eb->iab", basis, hessians, basis)
    k = basis.shape[1]
    size = 2 * k
    if enumerate_batches:
        operator = np.zeros((size * size, size * size))
        for probability, counts in batch_distribution(n, int(batch_size) if sampling != "bernoulli"
                                                      else batch_size, sampling):
            batch = np.tensordot(counts, reduced_h, axes=1) / batch_size
            A = momentum_step(batch, lr, momentum, nesterov)
            operator += probability * np.kron(A, A)
        return operator
    mean, second = kron_moments_formula(reduced_h, batch_size, sampling)
    base = momentum_step(np.zeros((k, k)), lr, momentum, nesterov)

    def linear(H):  # A(H) - A(0): linear in H
        return momentum_step(H, lr, momentum, nesterov) - base

    operator = np.kron(base, base) + np.kron(base, linear(mean)) + np.kron(linear(mean), base)
    units = []
    for p in range(k):
        for q in range(k):
            E = np.zeros((k, k))
            E[p, q] = 1.0
            units.append(linear(E))
    for p in range(k):
        for q in range(k):
            for r in range(k):
                for s in range(k):
                    weight = second[p * k + r, q * k + s]
                    if weight != 0.0:
                        operator += weight * np.kron(units[p * k + q], units[r * k + s])
    return operator


def _symmetric_full_basis(size: int) -> np.ndarray:
    """Columns: vec of an orthonormal basis of symmetric size x size matrices."""
    columns = []
    for j in range(size):
        for l in range(j, size):
            e = np.zeros((size, size))
            if j == l:
                e[j, j] = 1.0
            else:
                e[j, l] = e[l, j] = 1.0 / math.sqrt(2.0)
            columns.append(e.ravel())
    return np.array(columns).T


def momentum_spectral_radius(hessians, lr, batch_size, sampling, momentum, nesterov,
                             enumerate_batches=True) -> float:
    """Spectral radius of the second-moment map of z on symmetric matrices (range of H)."""
    operator = momentum_operator(hessians, lr, batch_size, sampling, momentum, nesterov,
                                 enumerate_batches)
    size = int(round(math.sqrt(operator.shape[0])))
    sym = _symmetric_full_basis(size)
    return float(np.max(np.abs(np.linalg.eigvals(sym.T @ operator @ sym))))


def momentum_critical_lr(hessians, batch_size, sampling, momentum, nesterov,
                         enumerate_batches=True, iterations=60) -> float:
    """The smallest lr with spectral radius > 1, by bisection on (0, cap / lambda_1], with the
    stable set assumed an interval (0, eta*] (the specification's observation)."""
    top = np.linalg.eigvalsh(np.asarray(hessians).mean(axis=0))[-1]
    cap = 2 * (1 + momentum) / ((1 + 2 * momentum) if nesterov else 1.0)
    lo, hi = 0.0, cap / top
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if momentum_spectral_radius(hessians, mid, batch_size, sampling, momentum, nesterov,
                                    enumerate_batches) <= 1.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def momentum_log_mean_sq(hessians, lr, batch_size, sampling, momentum, nesterov, steps,
                         w0=None, sigma0=None):
    """log E||w_t||^2 for t = 0..steps, iterating E[A_B (x) A_B] on the full R^{2d} (no range
    restriction) from torch's start: w_{-1} = w_0 (heavy ball), v_{-1} = 0 (Nesterov)."""
    hessians = np.asarray(hessians, dtype=float)
    d = hessians.shape[1]
    operator = momentum_operator(hessians, lr, batch_size, sampling, momentum, nesterov,
                                 enumerate_batches=sampling == "bernoulli"
                                 or float(batch_size) == int(batch_size), basis=np.eye(d))
    if w0 is not None:
        w0 = np.asarray(w0, dtype=float)
        sigma0 = np.outer(w0, w0)
    sigma0 = np.eye(d) if sigma0 is None else np.asarray(sigma0, dtype=float)
    if nesterov:
        sigma = np.block([[sigma0, np.zeros((d, d))], [np.zeros((d, d)), np.zeros((d, d))]])
    else:
        sigma = np.block([[sigma0, sigma0], [sigma0, sigma0]])
    vec = sigma.ravel()
    out = []
    for _ in range(steps + 1):
        out.append(math.log(np.trace(vec.reshape(2 * d, 2 * d)[:d, :d])))
        vec = operator @ vec
    return np.array(out)


# ----------------------------------------------------------------------------- high precision
# The same momentum operator in mpmath arithmetic (default 50 digits), from the float Hessians
# taken as exact: a reference for certified brackets, whose ends are proofs to the last bits.
# E[A_B Sigma A_B^T] = A(H) Sigma A(H)^T + E[L(H_B - H) Sigma L(H_B - H)^T], A affine in H_B
# with linear part L(Delta) = (l e_1^T) (x) Delta, l the first-column coefficients of H_B in A;
# E[(H_B - H) Y (H_B - H)] = (a - 1) H Y H + b N(Y) with a, b of section 2 in exact rationals.


def _exact_coefficients(sampling, n, batch_size):
    from fractions import Fraction
    B = Fraction(float(batch_size))  # the float batch size, exactly (a real one too)
    if sampling == "bernoulli":
        return Fraction(1), 1 / B - Fraction(1, n)
    if sampling == "without_replacement":
        p = (n - B) / (B * (n - 1)) if n > 1 else Fraction(0)
        return 1 - p, p
    return 1 - 1 / B, 1 / B


def momentum_operator_mp(hessians, lr, batch_size, sampling, momentum, nesterov, digits=50):
    """The map on symmetric 2d x 2d matrices (orthonormal basis) as an mpmath matrix."""
    import mpmath
    mp = mpmath.mp
    mp.dps = digits
    hessians = np.asarray(hessians, dtype=float)
    n, d, _ = hessians.shape
    Hs = [mpmath.matrix([[mpmath.mpf(float(v)) for v in row] for row in h]) for h in hessians]
    H = sum(Hs[1:], Hs[0]) / n
    a_frac, b_frac = _exact_coefficients(sampling, n, batch_size)
    a = mpmath.mpf(a_frac.numerator) / a_frac.denominator
    b = mpmath.mpf(b_frac.numerator) / b_frac.denominator
    eta, mu = mpmath.mpf(float(lr)), mpmath.mpf(float(momentum))
    I, Z = mpmath.eye(d), mpmath.zeros(d, d)

    def block(A11, A12, A21, A22):
        out = mpmath.zeros(2 * d, 2 * d)
        for i in range(d):
            for j in range(d):
                out[i, j], out[i, j + d] = A11[i, j], A12[i, j]
                out[i + d, j], out[i + d, j + d] = A21[i, j], A22[i, j]
        return out

    if nesterov:
        A = block(I - eta * (1 + mu) * H, -eta * mu * mu * I, H, mu * I)
        l = (-eta * (1 + mu), mpmath.mpf(1))
    else:
        A = block((1 + mu) * I - eta * H, -mu * I, I, Z)
        l = (-eta, mpmath.mpf(0))
    basis = []
    size = 2 * d
    for j in range(size):
        for k in range(j, size):
            E = mpmath.zeros(size, size)
            if j == k:
                E[j, j] = 1
            else:
                E[j, k] = E[k, j] = 1 / mpmath.sqrt(2)
            basis.append(E)
    columns = []
    for E in basis:
        out = A * E * A.T
        Y = mpmath.zeros(d, d)
        for i in range(d):
            for j in range(d):
                Y[i, j] = E[i, j]
        noise = (a - 1) * H * Y * H + b * sum((h * Y * h for h in Hs[1:]), Hs[0] * Y * Hs[0]) / n
        for p in range(2):
            for q in range(2):
                for i in range(d):
                    for j in range(d):
                        out[p * d + i, q * d + j] += l[p] * l[q] * noise[i, j]
        columns.append([sum(out[i, j] * F[i, j] for i in range(size) for j in range(size))
                        for F in basis])
    m = len(basis)
    return mpmath.matrix([[columns[c][r] for c in range(m)] for r in range(m)])


def momentum_spectral_radius_mp(hessians, lr, batch_size, sampling, momentum, nesterov,
                                digits=50):
    """Spectral radius of the momentum map (full R^{2d}) in mpmath arithmetic; for families
    whose H has full rank (then it equals the library's radius on the range of H)."""
    import mpmath
    operator = momentum_operator_mp(hessians, lr, batch_size, sampling, momentum, nesterov, digits)
    return perron_root_mp(operator)


def perron_root_mp(operator, iterations=40):
    """The spectral radius of a cone-preserving mpmath matrix (a real eigenvalue, the Perron
    root): located among all eigenvalues in float, then refined by shifted inverse iteration
    with Rayleigh-type shift updates in mpmath (full precision; a check that it stays the one of
    largest modulus)."""
    import mpmath
    m = operator.rows
    dense = np.array([[float(operator[i, j]) for j in range(m)] for i in range(m)])
    values, vectors = np.linalg.eig(dense)
    top = float(np.max(np.abs(values)))
    # The spectral radius of a cone-preserving map is itself an eigenvalue (real, >= 0): start
    # from the largest real eigenvalue (others of the same modulus may be complex).
    real = np.flatnonzero(np.abs(values.imag) <= 1e-7 * max(top, 1e-300))
    index = int(real[np.argmax(values.real[real])]) if real.size else int(np.argmax(np.abs(values)))
    sigma = mpmath.mpf(float(values[index].real))
    if top == 0.0:
        return mpmath.mpf(0)
    x = mpmath.matrix([float(v) for v in np.abs(vectors[:, index])]) if np.all(
        np.isfinite(vectors[:, index])) else mpmath.matrix([1] * m)
    eye = mpmath.eye(m)
    tolerance = mpmath.mpf(10) ** (-mpmath.mp.dps + 5)
    for _ in range(iterations):
        shift = sigma
        try:
            y = mpmath.lu_solve(operator - shift * eye, x)
        except ZeroDivisionError:
            return sigma
        xy = sum(x[i] * y[i] for i in range(m))
        xx = sum(x[i] * x[i] for i in range(m))
        if xy == 0:
            return sigma
        new = shift + xx / xy
        norm = mpmath.sqrt(sum(v * v for v in y))
        x = y / norm
        if abs(new - sigma) <= tolerance * abs(new):
            sigma = new
            break
        sigma = new
    if not (abs(abs(float(sigma)) - top) <= 1e-9 * max(top, 1e-300)
            and abs(mpmath.im(sigma)) == 0):
        # Inverse iteration went to another eigenvalue: all of them, in full precision.
        return max(abs(v) for v in mpmath.eig(operator, left=False, right=False))
    return abs(sigma)
