"""Issue 17 item 1: every certified bracket of plain SGD holds against a 30-digit reference.

The references (tests/mp_reference.py) are built from the factors in mpmath, independent of
float64 and of the BLAS; the brackets must contain them exactly (no slack). Random and
degenerate families: rank-deficient, identical and nearly identical samples, a zero sample,
ill-conditioned, extreme scales, Theorem-2 constructions, lrs far beyond the critical one.
Run under a second BLAS kernel too: OPENBLAS_CORETYPE=Haswell (or Prescott, Zen) python -m pytest
tests/test_hostile_precision.py --runslow.
"""

from __future__ import annotations

import math
import warnings

import mpmath as mp
import numpy as np
import pytest

import fastsgdstab as fs
from fastsgdstab import HessianFamily
from fastsgdstab.theory import theorem2_family

import mp_reference as ref

mp.mp.dps = ref.DIGITS
SCHEMES = ("bernoulli", "without_replacement", "with_replacement")


def family_of(case: int) -> HessianFamily:
    rng = np.random.default_rng(10_000 + case)
    kind = case % 8
    if kind == 0:  # random, mixed sample scales
        n, d, r = int(rng.integers(2, 13)), int(rng.integers(2, 5)), int(rng.integers(1, 3))
        return HessianFamily(rng.standard_normal((n, d, r)) * rng.uniform(0.1, 3, (n, 1, 1)))
    if kind == 1:  # rank-deficient: n r < d
        return HessianFamily(rng.standard_normal((int(rng.integers(2, 4)), 4, 1)))
    if kind == 2:  # identical samples, and nearly identical ones
        base = rng.standard_normal(int(rng.integers(1, 5)))
        eps = float(10.0 ** rng.uniform(-8, -2))
        rows = [base, base, base * (1 + eps)] + [base] * int(rng.integers(0, 3))
        return HessianFamily.from_features(np.array(rows))
    if kind == 3:  # one zero sample among random ones
        factors = rng.standard_normal((int(rng.integers(3, 9)), 3, 1))
        factors[0] = 0.0
        return HessianFamily(factors)
    if kind == 4:  # ill-conditioned: eigenvalues over 6 to 10 decades
        d = int(rng.integers(2, 5))
        decades = float(rng.uniform(3, 5))
        return HessianFamily.from_features(rng.standard_normal((int(rng.integers(d, 12)), d))
                                           * np.logspace(0, -decades, d))
    if kind == 5:  # extreme scales of the loss
        scale = float(10.0 ** rng.choice([-120, -40, 40, 120]))
        return HessianFamily(rng.standard_normal((int(rng.integers(3, 9)), 3, 1)) * scale)
    if kind == 6:  # Theorem 2's construction (coherence sigma exactly), small
        n = int(rng.integers(3, 7))
        sigma = int(rng.integers(1, n))
        return theorem2_family(n, sigma, float(rng.uniform(0.5, 4)))
    # decoupled blocks: samples acting on disjoint parameters (a singular Perron vector)
    factors = np.zeros((4, 4, 1))
    factors[:2, :2, 0] = rng.standard_normal((2, 2))
    factors[2:, 2:, 0] = rng.standard_normal((2, 2)) * float(rng.uniform(0.3, 3))
    return HessianFamily(factors)


def inside(bracket_lower, bracket_upper, exact) -> bool:
    return mp.mpf(float(bracket_lower)) <= exact <= mp.mpf(float(bracket_upper))


def check_case(case: int) -> None:
    family = family_of(case)
    exact_family = ref.Family(family._factors)
    rng = np.random.default_rng(case)
    sampling = SCHEMES[case % 3]
    n = family.n
    batch = float(rng.integers(1, n + 1)) if sampling != "bernoulli" else float(rng.uniform(1, n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.CertificationWarning)  # a wide bracket must still be true
        eta = fs.critical_lr(family, batch, sampling=sampling, bounds=True)
        eta_exact = ref.critical_lr(exact_family, sampling, batch)
        assert inside(eta.lower, eta.upper, eta_exact), (case, eta, eta_exact)
        assert mp.mpf(eta.value) <= eta_exact  # errs on the stable side
        factors = (0.3, 0.97, 1.03, 3.0, 40.0)
        for factor in factors:
            lr = factor * eta.value
            bracket = fs.spectral_radius(family, lr, batch, sampling=sampling, bounds=True)
            exact = ref.spectral_radius(exact_family, lr, sampling, batch)
            assert inside(bracket.lower, bracket.upper, exact), (case, factor, bracket, exact)
        if case % 2 == 0:
            lrs = np.array(factors[:4]) * eta.value
            grid = fs.stability_map(family, lrs, [batch], sampling=sampling)
            for j, lr in enumerate(lrs):
                exact = ref.spectral_radius(exact_family, lr, sampling, batch)
                assert inside(grid.radius_lower[0, j], grid.radius_upper[0, j], exact), (case, j)
        if sampling == "bernoulli":
            lr = 0.5 * eta.value * float(rng.uniform(0.5, 1.9))
            found = fs.critical_batch_size(family, lr, bounds=True)
            q = ref.critical_noise(exact_family, sampling, lr)
            exact_batch = mp.mpf(1) if q == mp.inf else 1 / (q + mp.mpf(1) / n)
            exact_batch = max(exact_batch, mp.mpf(1))
            if exact_batch <= n:
                assert inside(found.lower, found.upper, exact_batch), (case, found, exact_batch)


@pytest.mark.parametrize("case", range(24))
def test_certified_brackets_hold_in_30_digits(case):
    check_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(12))
def test_certified_brackets_hold_in_30_digits_thorough(block):
    """528 more cases (24 .. 551), in 12 blocks."""
    for case in range(24 + block * 44, 24 + (block + 1) * 44):
        check_case(case)


@pytest.mark.parametrize("seed", range(12))
def test_no_noise_radius_is_gradient_descents_in_30_digits(seed):
    """Issue 17 item 1, second case: Bernoulli at B = n has no noise, so rho = max_j (1 - lr l_j)^2
    exactly (l_j the eigenvalues of H, here in 30 digits); at lr = 2 .. 12 x critical the
    reduction's eigen-decomposition error is amplified by lr and must be inside the bracket."""
    rng = np.random.default_rng(500 + seed)
    n, d = int(rng.integers(3, 12)), int(rng.integers(2, 6))
    family = HessianFamily(rng.standard_normal((n, d, 1)) * rng.uniform(0.2, 2, (n, 1, 1)))
    exact_family = ref.Family(family._factors)
    eigenvalues = mp.eigsy(exact_family.mean)[0]
    lc = fs.critical_lr(family, float(n))
    for factor in (2.0, 5.0, 12.0):
        lr = factor * lc
        scaled = mp.mpf(lr) * exact_family.scale2
        exact = max((1 - scaled * lam) ** 2 for lam in eigenvalues)
        bracket = fs.spectral_radius(family, lr, float(n), bounds=True)
        assert inside(bracket.lower, bracket.upper, exact), (seed, factor, bracket, exact)
        grid = fs.stability_map(family, [lr], [float(n)])
        assert inside(grid.radius_lower[0, 0], grid.radius_upper[0, 0], exact), (seed, factor)



def _cone_operator(seed, k=3, terms=4):
    """T(X) = sum_i A_i X A_i with symmetric A_i: self-adjoint and cone-preserving; its dense
    matrix on symmetric k x k matrices in 30 digits, and its top eigenvalue."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((terms, k, k))
    A = 0.5 * (A + A.transpose(0, 2, 1))

    def apply(X):
        return sum(a @ X @ a for a in A)

    basis = []
    for i in range(k):
        for j in range(i, k):
            E = mp.matrix(k, k)
            E[i, j] = E[j, i] = 1 if i == j else 1 / mp.sqrt(2)
            basis.append(E)
    As = [mp.matrix(a.tolist()) for a in A]
    images = [sum((a * E * a for a in As[1:]), As[0] * E * As[0]) for E in basis]
    m = len(basis)
    M = mp.matrix(m, m)
    for p in range(m):
        for q in range(m):
            M[p, q] = sum(basis[p][i, j] * images[q][i, j] for i in range(k) for j in range(k))
    top = max(mp.eigsy((M + M.T) / 2)[0])
    dense = np.array([[float(M[p, q]) for q in range(m)] for p in range(m)])
    values, vectors = np.linalg.eigh(dense)
    vector = np.zeros((k, k))
    for p, E in enumerate(basis):
        vector += vectors[p, -1] * np.array(E.tolist(), dtype=float)
    return apply, vector, top


@pytest.mark.parametrize("seed", range(6))
def test_lower_end_never_trusts_a_ritz_value(seed):
    """The cause of issue 17 item 1: the map's lower end was its Ritz value (from projected
    matrices carrying a whole Krylov run's rounding) minus an allowance. A Ritz value 1e-9 too
    high must not move the proven lower end above the truth."""
    from fastsgdstab._linalg import certify_top_eigenvalue
    apply, vector, top = _cone_operator(seed)
    k = vector.shape[0]
    theta = float(top) * (1 + 1e-9)
    bracket = certify_top_eigenvalue(theta, vector, apply(vector), apply(np.eye(k)))
    assert inside(bracket.lower, bracket.upper, top)


@pytest.mark.parametrize("seed", range(6))
def test_image_errors_enter_both_ends(seed):
    """Images known only to within a stated error (a product's rounding): the bracket must hold
    for every operator consistent with them. The error is placed where it hurts: along the
    vector (moving the Rayleigh quotient) and along the identity (moving the Collatz-Wielandt
    bound)."""
    from fastsgdstab._linalg import certify_top_eigenvalue
    apply, vector, top = _cone_operator(100 + seed)
    k = vector.shape[0]
    error = 1e-4 * float(top)  # far above the Collatz-Wielandt slack of an exact eigenvector
    unit = vector / np.linalg.norm(vector)
    for sign in (1.0, -1.0):
        image = apply(vector) + sign * error * np.linalg.norm(vector) * unit
        identity_image = apply(np.eye(k)) - sign * error * np.eye(k) / np.sqrt(k)
        bracket = certify_top_eigenvalue(float(top), vector, image, identity_image,
                                         image_error=error * np.linalg.norm(vector),
                                         identity_error=error)
        assert inside(bracket.lower, bracket.upper, top), (sign, bracket, top)


@pytest.mark.parametrize("seed", range(4))
def test_brackets_hold_for_an_inaccurate_eigensolver(seed):
    """The reduction's backward error enters every bracket: a reduction whose eigenvalues are
    off by 1e-8 (an eigensolver far less accurate than LAPACK's), with that error stated in its
    backward-error fields, must still give brackets that contain the 30-digit truth of the
    user's family (the engine's operator itself is then 1e-8 away from the truth)."""
    from dataclasses import replace

    rng = np.random.default_rng(700 + seed)
    n, d = int(rng.integers(4, 10)), int(rng.integers(2, 5))
    family = HessianFamily(rng.standard_normal((n, d, 1)) * rng.uniform(0.3, 2, (n, 1, 1)))
    exact_family = ref.Family(family._factors)
    sampling = SCHEMES[seed % 3]
    lc = fs.critical_lr(family, 2.0, sampling=sampling)
    reduction = family._reduced
    m = reduction.unit_eigenvalues
    shift = 1e-8 * rng.choice([-1.0, 1.0], size=m.size)
    shifted = m * (1 + shift)
    shifted[0] = 1.0
    error = float(np.max(np.abs(shifted - m)))
    bad = replace(reduction, unit_eigenvalues=shifted,
                  mean_error=reduction.mean_error + error,
                  relative_mean_error=reduction.relative_mean_error + float(np.max(np.abs(shifted - m) / m)))
    family.__dict__["_reduced"] = bad   # the cached reduction, as if LAPACK had returned it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.CertificationWarning)
        eta = fs.critical_lr(family, 2.0, sampling=sampling, bounds=True)
        assert inside(eta.lower, eta.upper, ref.critical_lr(exact_family, sampling, 2.0))
        for factor in (0.5, 3.0, 10.0):
            lr = factor * lc
            bracket = fs.spectral_radius(family, lr, 2.0, sampling=sampling, bounds=True)
            exact = ref.spectral_radius(exact_family, lr, sampling, 2.0)
            assert inside(bracket.lower, bracket.upper, exact)
            grid = fs.stability_map(family, [lr], [2.0], sampling=sampling)
            assert inside(grid.radius_lower[0, 0], grid.radius_upper[0, 0], exact)


# ----------------------------------------------------------------------------- issue 19
# The certificate from verified Cholesky factorisations (``certify_by_cholesky``), which the
# engine tries before the eigen-decomposition one, must give true brackets for every positive
# definite vector, whatever its quality, and refuse (None) a vector that is not one.

@pytest.mark.parametrize("seed", range(6))
def test_cholesky_certificate_holds_for_any_positive_definite_vector(seed):
    from fastsgdstab._linalg import certify_by_cholesky
    apply, vector, top = _cone_operator(200 + seed)
    k = vector.shape[0]
    rng = np.random.default_rng(seed)
    sign = 1.0 if np.trace(vector) >= 0 else -1.0
    candidates = [sign * vector, np.eye(k)]
    for scale in (1e-8, 1e-4, 1e-1):  # Ritz vectors of decreasing quality, and random PD ones
        noise = rng.standard_normal((k, k))
        candidates.append(sign * vector + scale * 0.5 * (noise + noise.T))
    B = rng.standard_normal((k, k))
    candidates.append(B @ B.T + 0.1 * np.eye(k))
    proven = 0
    for X in candidates:
        X = 0.5 * (X + X.T)
        image = apply(X)
        theta = float(np.sum(X * image) / np.sum(X * X))
        bracket = certify_by_cholesky(theta, X, image, image_error=0.0)
        if bracket is None:
            continue
        proven += 1
        assert inside(bracket.lower, bracket.upper, top), (seed, bracket, top)
    assert proven >= 3
    # The exact top eigenvector (when positive definite) certifies to the tolerance.
    X = 0.5 * (sign * vector + (sign * vector).T)
    if np.all(np.linalg.eigvalsh(X) > 1e-3 * np.max(np.abs(X))):
        bracket = certify_by_cholesky(float(top), X, apply(X), image_error=0.0)
        assert bracket is not None and bracket.certified


@pytest.mark.parametrize("seed", range(6))
def test_cholesky_certificate_lower_end_never_trusts_a_ritz_value(seed):
    from fastsgdstab._linalg import certify_by_cholesky
    apply, vector, top = _cone_operator(seed)
    X = vector if np.trace(vector) >= 0 else -vector
    X = 0.5 * (X + X.T) + 1e-3 * np.eye(X.shape[0]) * np.max(np.abs(X))
    bracket = certify_by_cholesky(float(top) * (1 + 1e-9), X, apply(X), image_error=0.0)
    if bracket is not None:
        assert inside(bracket.lower, bracket.upper, top)


@pytest.mark.parametrize("seed", range(6))
def test_cholesky_certificate_image_errors_enter_both_ends(seed):
    """An image known only to within a stated error, the error placed along the vector (moving
    the Rayleigh quotient) and against it: the bracket must hold for the true operator."""
    from fastsgdstab._linalg import certify_by_cholesky
    apply, vector, top = _cone_operator(100 + seed)
    k = vector.shape[0]
    X = vector if np.trace(vector) >= 0 else -vector
    X = 0.5 * (X + X.T) + 1e-2 * np.eye(k) * np.max(np.abs(X))
    error = 1e-4 * float(top)
    unit = X / np.linalg.norm(X)
    for sign in (1.0, -1.0):
        image = apply(X) + sign * error * np.linalg.norm(X) * unit
        bracket = certify_by_cholesky(float(top), X, image, image_error=error * np.linalg.norm(X))
        assert bracket is not None
        assert inside(bracket.lower, bracket.upper, top), (sign, bracket, top)


def test_cholesky_certificate_refuses_an_indefinite_vector():
    from fastsgdstab._linalg import certify_by_cholesky
    apply, vector, top = _cone_operator(5)
    X = np.diag([1.0, -1e-3, 0.5])
    assert certify_by_cholesky(1.0, X, apply(X), image_error=0.0) is None


@pytest.mark.parametrize("k, rank", [(520, 4), (300, 1), (257, 2)])
def test_blas_noise_operator_matches_the_compiled_kernel(k, rank):
    """The engine's operator (two BLAS products, the symmetric one by upper column blocks, then
    mirrored) against the compiled kernel ``sandwich_operator`` that ``phase`` uses, on sizes
    with several blocks and a last partial one; the result is exactly symmetric."""
    from fastsgdstab._engine import SandwichOperator, pair_product, pair_sum, reduced
    from fastsgdstab._kernels.operators import sandwich_operator
    rng = np.random.default_rng(k)
    n = -(-k // rank) + 2
    family = HessianFamily(rng.standard_normal((n, k, rank)) / np.sqrt(k))
    reduction = reduced(family)
    m = reduction.unit_eigenvalues
    operator = SandwichOperator(reduction, 1.0 / np.sqrt(pair_sum(m)), 0.7 * pair_product(m), 0.3)
    X = rng.standard_normal((reduction.k, reduction.k))
    expected = np.empty_like(X)
    sandwich_operator(operator.rows, operator.rank, X, operator.scaling, operator.multiplier,
                      operator.noise_weight, np.empty(operator.rows.shape), expected)
    out = operator(X)
    assert np.array_equal(out, out.T)
    assert np.linalg.norm(out - expected) <= 1e-13 * np.linalg.norm(expected)
    # Its rounding bound covers the difference to the kernel (both within it of the truth).
    assert np.linalg.norm(out - expected) <= 2 * operator.error_of(X)


@pytest.mark.parametrize("k", [3, 40])
def test_cholesky_certificate_counts_the_image_error_against_the_vector(k):
    """T(X) = c X (every positive definite X is a top eigenvector, rho = c): an image lowered by
    its stated error along X itself, with a Ritz value a little low, would, if the error were
    left out, prove rho <= c (1 - 1e-5)."""
    from fastsgdstab._linalg import certify_by_cholesky
    rng = np.random.default_rng(k)
    B = rng.standard_normal((k, k))
    X = B @ B.T / k + np.eye(k)
    X = 0.5 * (X + X.T)
    c = 3.0
    error = 1e-4 * c * np.linalg.norm(X)
    image = c * X - error * X / np.linalg.norm(X)
    bracket = certify_by_cholesky(c * (1 - 1e-5), X, image, image_error=error)
    assert bracket is not None and inside(bracket.lower, bracket.upper, c), bracket


def test_packed_lanczos_coordinates_keep_frobenius_products():
    """Lanczos runs on packed upper triangles: the operator is symmetric there only if Euclidean
    products of packed vectors are the Frobenius products of the matrices."""
    from fastsgdstab._linalg import Packing
    rng = np.random.default_rng(3)
    k = 7
    packing = Packing(k)
    A, B = rng.standard_normal((2, k, k))
    A, B = A + A.T, B + B.T
    assert float(packing.pack(A) @ packing.pack(B)) == pytest.approx(float(np.sum(A * B)), rel=1e-14)
    assert np.array_equal(packing.unpack(packing.pack(A)), packing.unpack(packing.pack(A)).T)
    np.testing.assert_allclose(packing.unpack(packing.pack(A)), A, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------- issue 19 item 1
# The reduction's backward error is now proven with products whose rounding is bounded by an
# error-free splitting (``_rounding.verified_product``) instead of the a priori gamma(L) |A| |B|
# (which grew like L and made the k = 2,000 bracket 2.2e-5 wide). Checked here exactly (Fraction)
# and against 40-digit arithmetic, on hostile inputs: wide row scales, subnormal entries, zero
# rows, heavy cancellation, ill-conditioned Gram matrices.
def _exact_product(A, B):
    from fractions import Fraction
    Af = [[Fraction(float(x)) for x in row] for row in A]
    Bf = [[Fraction(float(x)) for x in row] for row in B.T]
    return [[sum((a * b for a, b in zip(row, col)), Fraction(0)) for col in Bf] for row in Af]


def _hostile_matrix(rng, m, length, kind):
    A = rng.standard_normal((m, length))
    if kind == "scales":
        A *= 10.0 ** rng.uniform(-30, 30, (m, 1))
    elif kind == "subnormal":
        A[0] *= 1e-310
        A[1] = 0.0
        A[2, ::2] *= 1e-300
    elif kind == "row_range":  # one entry per row 1e8 times the rest
        A[:, 0] = 1e8
    return A


@pytest.mark.parametrize("kind", ["plain", "scales", "subnormal", "cancel", "row_range"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("chunk_bytes", [2.0 ** 27, 8 * 11 * 37])  # one chunk; chunks of ~37
def test_verified_product_bound_holds_exactly_and_is_sharp(kind, symmetric, chunk_bytes):
    from fractions import Fraction
    from fastsgdstab._rounding import UNIT_ROUNDOFF, gamma, split_bits, verified_product
    rng = np.random.default_rng(hash((kind, symmetric)) % 2**32)
    m, length, k = 6, 300, 5
    A = _hostile_matrix(rng, m, length, kind)
    B = None
    if not symmetric:
        B = rng.standard_normal((length, k))
        if kind == "cancel":  # columns of B nearly orthogonal to the rows of A: A B ~ 1e-15 |A| |B|
            B -= np.linalg.pinv(A) @ (A @ B)
    P, E = verified_product(A, B, chunk_bytes=chunk_bytes)
    bits = split_bits(length)
    exact = _exact_product(A, A.T if symmetric else B)
    scale = float(np.max(np.abs(A))) * float(np.max(np.abs(A if symmetric else B)))
    for i in range(P.shape[0]):
        for j in range(P.shape[1]):
            truth = exact[i][j]
            assert abs(Fraction(float(P[i, j])) - truth) <= Fraction(float(E[i, j])), (i, j)
            # Sharp: a few units of roundoff of the entry itself (not gamma(L) |A| |B|), plus a
            # 2^-bits-smaller a priori part, and (rows below 2^-400, SPLIT_EXPONENT_FLOOR) an
            # absolute part far below the product's scale.
            size = float(abs(truth))
            abs_size = float(np.abs(A[i]) @ np.abs((A.T if symmetric else B)[:, j]))
            a_priori = gamma(length) * abs_size
            assert E[i, j] <= 1.01 * a_priori + length * 2.0 ** -380 * scale  # never worse
            if kind != "row_range":  # rows of moderate range: far sharper
                column = (A.T if symmetric else B)[:, j]
                spread = (np.sum(np.abs(A[i])) * np.max(np.abs(column))
                          + np.max(np.abs(A[i])) * np.sum(np.abs(column)))
                assert E[i, j] <= (4 * UNIT_ROUNDOFF * size
                                   + 2.0 ** -bits * 2 * (gamma(length) + 4 * UNIT_ROUNDOFF) * spread
                                   + length * 2.0 ** -380 * scale)


@pytest.mark.parametrize("route", ["gram", "covariance"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reduction_backward_error_bounds_hold_in_40_digits(route, seed):
    """The congruence bound beta >= ||C^T C - I||_F and the rows' entrywise error bounds of both
    reduction routes hold against the same quantities in 40-digit arithmetic."""
    from fastsgdstab import family as family_module
    from fastsgdstab._rounding import verified_product
    rng = np.random.default_rng(900 + seed)
    m, d = (6, 40) if route == "gram" else (40, 6)
    columns = rng.standard_normal((m, d)) * 10.0 ** rng.uniform(-3, 3, (m, 1))
    columns[:, 0] *= 1e-4  # ill-conditioned
    columns, _ = family_module.power_of_two_scale(columns)
    with mp.workdps(40):
        A = mp.matrix(columns.tolist())
        if route == "gram":
            gram, gram_error = verified_product(columns)
            values, vectors = np.linalg.eigh(gram)
            root = math.sqrt(values[-1] / 3.0)
            beta, row_errors = family_module._gram_backward_error(gram, gram_error, vectors, values, root)
            rows = vectors * np.sqrt(values)
            E = mp.matrix(vectors.tolist())
            C = A.T * E * mp.diag([1 / mp.sqrt(mp.mpf(float(v))) for v in values])
        else:
            values, basis = np.linalg.eigh(columns.T @ columns / 3)
            root = math.sqrt(values[-1])
            rows, rows_error = verified_product(columns, basis)
            beta, row_errors = family_module._covariance_backward_error(basis, rows_error, root)
            C = mp.matrix(basis.tolist())
        gap = C.T * C - mp.eye(C.cols)
        frobenius = mp.sqrt(sum(gap[i, j] ** 2 for i in range(gap.rows) for j in range(gap.cols)))
        assert frobenius <= beta
        assert beta <= 100 * frobenius + 1e-12  # sharp (the a priori bound: ~1e-12 k L)
        AC = A * C
        for i in range(m):
            for j in range(C.cols):
                assert abs(mp.mpf(float(rows[i, j])) / root - AC[i, j] / root) <= row_errors[i, j]
