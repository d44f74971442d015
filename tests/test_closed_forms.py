"""The closed forms of theory.py in the (batch size, coherence) plane, each against an
independent computation: the exact engine's critical lr (and Theorem 1's threshold) on
Theorem 2's family, exact rational arithmetic written here at boundary cells, and the dense
references of tests/reference_theory.py."""

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastsgdstab as fs
from fastsgdstab.theory import (
    theorem1,
    theorem1_closed_form_diverges,
    theorem1_sigma_boundary,
    theorem2_bernoulli_diverges,
    theorem2_critical_lr,
    theorem2_family,
    theorem2_sigma_boundary,
)

import reference_theory

N, SHARPNESS = 100, 2.0
LRS = [0.2, 0.5, 0.8]
# Boundary values are O(1..100) and computed with a handful of roundings; the engine's critical
# lr is certified to about 1e-12 relative. 1e-9 leaves three orders of margin on both.
RTOL = 1e-9


# --------------------------------------------------------------------------- Theorem 2
@pytest.mark.parametrize("sigma", [1, 2, 7, 23, 50, 99])
@pytest.mark.parametrize("batch_size", [1, 3, 10, 49, 99])
def test_theorem2_boundary_passes_through_the_engines_critical_lr(sigma, batch_size):
    # At lr = eta* of the engine (rho = 1 exactly), the boundary in sigma is the family's sigma.
    eta = fs.critical_lr(theorem2_family(N, sigma, SHARPNESS), batch_size)
    assert theorem2_sigma_boundary(eta, SHARPNESS, N, batch_size) == pytest.approx(sigma, rel=RTOL)
    assert theorem2_critical_lr(N, sigma, SHARPNESS, batch_size) == pytest.approx(eta, rel=RTOL)


@pytest.mark.parametrize("lr", LRS + [0.95, 1.0, 1.3])
def test_theorem2_verdict_agrees_with_the_engine(lr):
    ties = checked = 0
    for sigma in range(1, 51, 4):
        family = theorem2_family(N, sigma, SHARPNESS)
        for batch_size in range(1, 50, 3):
            eta = fs.critical_lr(family, batch_size)
            if abs(lr / eta - 1.0) < RTOL:
                ties += 1
                continue  # on the boundary: decided by the exact arithmetic test below
            engine = lr > eta
            assert theorem2_bernoulli_diverges(lr, SHARPNESS, N, sigma, batch_size) == engine
            assert theorem2_bernoulli_diverges(lr, SHARPNESS, N, sigma, batch_size, exact=False) == engine
            # the same verdict read off the boundary curve (lr lambda_1 < 2 here, or inf)
            assert (sigma < theorem2_sigma_boundary(lr, SHARPNESS, N, batch_size)) == engine
            checked += 1
    assert checked > 100


def theorem2_boundary_cells(lr_decimal: str):
    """Cells (sigma, B) of the experiment's grid exactly on the boundary, by integer arithmetic:
    with lr lambda_1 = p / q, rho = 1 iff p (sigma B + n - B) = 2 q sigma B."""
    x = Fraction(lr_decimal) * Fraction(repr(SHARPNESS))
    p, q = x.numerator, x.denominator
    return [(sigma, b) for sigma in range(1, 51) for b in range(1, 50)
            if p * (sigma * b + N - b) == 2 * q * sigma * b]


@pytest.mark.parametrize("lr", LRS)
def test_theorem2_cells_on_the_boundary_are_not_divergent(lr):
    cells = theorem2_boundary_cells(repr(lr))
    if lr == 0.8:
        # e.g. sigma = 46, B = 8: 1.6 (368 + 92) = 736 = 2 * 46 * 8
        assert (46, 8) in cells
    for sigma, batch_size in cells:
        assert not theorem2_bernoulli_diverges(lr, SHARPNESS, N, sigma, batch_size)
        assert theorem2_sigma_boundary(lr, SHARPNESS, N, batch_size) == pytest.approx(sigma, rel=1e-12)
        if sigma > 1:
            assert theorem2_bernoulli_diverges(lr, SHARPNESS, N, sigma - 1, batch_size)
        assert fs.critical_lr(theorem2_family(N, sigma, SHARPNESS), batch_size) == pytest.approx(lr, rel=RTOL)


def test_theorem2_boundary_cells_exist_on_the_grid():
    assert sum(len(theorem2_boundary_cells(repr(lr))) for lr in LRS) > 0


def test_theorem2_exact_reads_the_decimals():
    # 0.1 + 0.2 is 0.30000000000000004 as a float: the decimals of the float, not 3/10.
    lr = 0.1 + 0.2
    x = Fraction(repr(lr)) * 2
    p, q = x.numerator, x.denominator
    # no sigma can sit exactly on the boundary here, but the exact and float verdicts still agree
    for sigma, batch_size in [(1, 1), (10, 5), (50, 49)]:
        expected = p * (sigma * batch_size + N - batch_size) > 2 * q * sigma * batch_size
        assert theorem2_bernoulli_diverges(lr, SHARPNESS, N, sigma, batch_size) == expected


def test_theorem2_boundary_at_and_beyond_gradient_descents_edge():
    assert theorem2_sigma_boundary(1.5, SHARPNESS, N, 10) == math.inf        # lr lambda_1 > 2
    assert theorem2_sigma_boundary(1.0, SHARPNESS, N, [10, N]).tolist() == [math.inf, 0.0]
    assert theorem2_sigma_boundary(0.5, SHARPNESS, N, N) == 0.0
    assert theorem2_bernoulli_diverges(1.5, SHARPNESS, N, 50, 10)
    assert theorem2_bernoulli_diverges(1.0, SHARPNESS, N, 50, 10)
    assert not theorem2_bernoulli_diverges(1.0, SHARPNESS, N, 50, N)           # GD at lr = 2 / lambda_1


# --------------------------------------------------------------------------- Theorem 1
def theorem1_boundary_cells(lr_decimal: str):
    """(sigma, B) with sigma = lr lambda_1 sqrt(n/B - 1) exactly: sigma^2 B q^2 = p^2 (n - B)."""
    x = Fraction(lr_decimal) * Fraction(repr(SHARPNESS))
    p, q = x.numerator, x.denominator
    return [(sigma, b) for sigma in range(1, 51) for b in range(1, 50)
            if sigma * sigma * b * q * q == p * p * (N - b)]


@pytest.mark.parametrize("lr", LRS)
def test_theorem1_cells_on_the_curve_are_inconclusive(lr):
    cells = theorem1_boundary_cells(repr(lr))
    for sigma, batch_size in cells:
        assert not theorem1_closed_form_diverges(lr, SHARPNESS, N, sigma, batch_size)
        assert theorem1_sigma_boundary(lr, SHARPNESS, N, batch_size) == pytest.approx(sigma, rel=1e-12)
        if sigma > 1:
            assert theorem1_closed_form_diverges(lr, SHARPNESS, N, sigma - 1, batch_size)


def test_theorem1_boundary_cells_exist_on_the_grid():
    assert (3, 10) in theorem1_boundary_cells("0.5")   # 1 * sqrt(90 / 10) = 3
    assert (2, 20) in theorem1_boundary_cells("0.5")


@pytest.mark.parametrize("sigma", [1, 3, 7, 20, 50])
def test_theorem1_curve_passes_through_the_threshold_of_theorem1(sigma):
    # theorem1's eta_T1 uses the coherence from an eigensolve, an independent route to sigma.
    family = theorem2_family(N, sigma, SHARPNESS)
    for batch_size in [1, 2, 10, 20, 49, 99]:
        eta_t1 = theorem1(family, 0.1, batch_size).lr_threshold
        assert theorem1_sigma_boundary(eta_t1, SHARPNESS, N, batch_size) == pytest.approx(sigma, rel=RTOL)


def test_theorem1_curve_against_the_dense_reference():
    # small n: the dense reference computes sigma and lambda_1 from the Hessians themselves
    n = 8
    for sigma in [1, 2, 3, 5, 8]:
        family = theorem2_family(n, sigma, SHARPNESS)
        hessians = reference_theory.dense(family.factors)
        for batch_size in [1, 2, 3.5, 7]:
            eta_t1 = reference_theory.theorem1_threshold(hessians, batch_size)
            assert theorem1_sigma_boundary(eta_t1, SHARPNESS, n, batch_size) == pytest.approx(sigma, rel=1e-8)


def test_theorem1_verdict_agrees_with_theorem1_off_the_curve():
    checked = 0
    for sigma in [1, 3, 7, 20, 50]:
        family = theorem2_family(N, sigma, SHARPNESS)
        for batch_size in [1, 2, 10, 20, 49]:
            for lr in [0.2, 0.5, 0.8, 1.2]:
                growth = Fraction(repr(lr)) ** 2 * 4 * (N - batch_size) / (batch_size * sigma ** 2)
                if abs(growth - 1) < Fraction(1, 10**6):
                    continue  # on the curve: theorem1 keeps a margin, the closed form is exact
                expected = theorem1(family, lr, batch_size).diverges is True
                assert theorem1_closed_form_diverges(lr, SHARPNESS, N, sigma, batch_size) == expected
                assert theorem1_closed_form_diverges(lr, SHARPNESS, N, sigma, batch_size, exact=False) == expected
                checked += 1
    assert checked > 90


@pytest.mark.parametrize("lr", np.linspace(0.05, 1.1, 8).tolist())
def test_float_and_exact_verdicts_agree_off_the_boundaries(lr):
    # Every cell of the experiment's grid; cells within 1e-12 of a boundary (in exact arithmetic
    # written here) are where rounding may legitimately decide either way.
    x = Fraction(repr(lr)) * 2
    near = 0
    for sigma in range(1, 51):
        for b in range(1, 50):
            growth = x * x * (N - b) / (b * sigma * sigma)        # Theorem 1's g
            margin = x * (sigma * b + N - b) / (2 * sigma * b)    # > 1 iff Theorem 2's family diverges
            if abs(growth - 1) > Fraction(1, 10**12):
                expected = x > 2 or growth > 1
                assert theorem1_closed_form_diverges(lr, SHARPNESS, N, sigma, b, exact=False) == expected
                assert theorem1_closed_form_diverges(lr, SHARPNESS, N, sigma, b) == expected
            if abs(margin - 1) > Fraction(1, 10**12):
                expected = margin > 1
                assert theorem2_bernoulli_diverges(lr, SHARPNESS, N, sigma, b, exact=False) == expected
                assert theorem2_bernoulli_diverges(lr, SHARPNESS, N, sigma, b) == expected
            near += abs(growth - 1) < Fraction(1, 100) or abs(margin - 1) < Fraction(1, 100)
    assert near > 0   # the grid comes within 1% of the curves: a 1% error in a closed form shows


def test_theorem1_condition_i_and_full_batch():
    assert theorem1_closed_form_diverges(1.5, SHARPNESS, N, 50, 99)      # lr lambda_1 = 3 > 2
    assert theorem1_closed_form_diverges(1.5, SHARPNESS, N, 50, N)       # also at B = n
    assert not theorem1_closed_form_diverges(0.9, SHARPNESS, N, 1, N)    # B = n: no noise
    assert theorem1_sigma_boundary(0.9, SHARPNESS, N, N) == 0.0


# --------------------------------------------------------------------------- numerics and API
def exact_noise_ratio(batch_size: float) -> Fraction:
    """(n - B) / B of the float B itself (not of its decimals)."""
    b = Fraction(batch_size)
    return (N - b) / b


def test_no_cancellation_just_below_full_batch():
    # n/B - 1 as a float loses most digits at B = n (1 - 2^-52): (n - B) / B keeps them.
    batch_size = float(np.nextafter(float(N), 0.0))
    for _ in range(3):
        ratio = exact_noise_ratio(batch_size)
        x = Fraction(0.5) * 2
        expected_t1 = float(x) * math.sqrt(float(ratio))
        expected_t2 = float(x * ratio / (2 - x))
        assert theorem1_sigma_boundary(0.5, SHARPNESS, N, batch_size) == pytest.approx(expected_t1, rel=1e-14)
        assert theorem2_sigma_boundary(0.5, SHARPNESS, N, batch_size) == pytest.approx(expected_t2, rel=1e-14)
        batch_size = float(np.nextafter(batch_size, 0.0))


@given(st.floats(0.01, 0.99), st.floats(1.0, 100.0))
def test_vectorised_matches_scalar_calls(lr, batch_size):
    batch_sizes = np.array([1.0, batch_size, 50.0, 100.0])
    for boundary in (theorem1_sigma_boundary, theorem2_sigma_boundary):
        vector = boundary(lr, SHARPNESS, N, batch_sizes)
        assert isinstance(vector, np.ndarray) and vector.shape == (4,)
        scalars = [boundary(lr, SHARPNESS, N, float(b)) for b in batch_sizes]
        assert all(isinstance(value, float) for value in scalars)
        assert vector.tolist() == scalars


@given(st.floats(0.01, 0.99), st.integers(1, 99), st.floats(1.0, 99.0))
def test_theorem2_boundary_solves_the_stability_condition(lr, sigma, batch_size):
    # lr lambda_1 (sigma* B + n - B) = 2 sigma* B at sigma* = the boundary; and it agrees with
    # theorem2_critical_lr solved for lr (exact rational arithmetic on the floats).
    boundary = theorem2_sigma_boundary(lr, SHARPNESS, N, batch_size)
    x, b = Fraction(lr) * 2, Fraction(batch_size)
    expected = x * (N - b) / b / (2 - x)
    assert boundary == pytest.approx(float(expected), rel=1e-12)
    eta = theorem2_critical_lr(N, sigma, SHARPNESS, batch_size)
    exact_eta = 2 * sigma / (sigma + (N - b) / b) / 2
    assert eta == pytest.approx(float(exact_eta), rel=1e-13)


@pytest.mark.parametrize("call, error, phrase", [
    (lambda: theorem1_sigma_boundary(0.0, 2.0, 100, 10), ValueError, "lr must be > 0"),
    (lambda: theorem1_sigma_boundary(0.5, -2.0, 100, 10), ValueError, "sharpness must be > 0"),
    (lambda: theorem2_sigma_boundary(0.5, 2.0, 100, [1, 101]), ValueError, "batch_size must all lie in [1, n]"),
    (lambda: theorem2_sigma_boundary(0.5, 2.0, 100, [1, math.nan]), ValueError, "batch_size must be finite"),
    (lambda: theorem2_sigma_boundary(0.5, 2.0, 0, 1), ValueError, "n must be an integer >= 1"),
    (lambda: theorem1_closed_form_diverges(0.5, 2.0, 100, 0.5, 10), ValueError, "sigma (the coherence) is at least 1"),
    (lambda: theorem1_closed_form_diverges(0.5, 2.0, 100, 2, 0.5), ValueError, "batch_size must lie in [1, n]"),
    (lambda: theorem2_bernoulli_diverges(0.5, 2.0, 100, 2.5, 10), ValueError, "sigma must be an integer"),
    (lambda: theorem2_bernoulli_diverges("0.5", 2.0, 100, 2, 10), TypeError, "lr must be a real number"),
])
def test_arguments_are_checked(call, error, phrase):
    with pytest.raises(error, match=phrase.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        call()
