"""The loss floor (specification, section "Non-interpolating minima"): per-sample gradients in the
family, and ``stationary`` against references that share nothing with the engine: the
stationary covariance of the affine iteration by exact enumeration of every batch (plain and
momentum, in parameter space), the d = 1 closed form, Monte Carlo of the iteration itself."""

import itertools
import math
import pickle
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastsgdstab as fs
from fastsgdstab import HessianFamily, NoStationaryStateError, NotAMinimumWarning, stationary

from reference import batch_distribution, momentum_step

SCHEMES = ("bernoulli", "without_replacement", "with_replacement")


def centred(rng, n, d, scale=1.0):
    g = scale * rng.standard_normal((n, d))
    return g - g.mean(axis=0)


def random_family(seed, n=4, d=3, r=1, scale=1.0):
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n, d, r))
    gradients = centred(rng, n, d, scale)
    return HessianFamily(factors, gradients=gradients), factors, gradients


# ------------------------------------------------------------------ enumerated reference
def enumerated_stationary(factors, gradients, lr, batch_size, sampling, momentum=0.0,
                          nesterov=False):
    """Sigma_inf of z_{t+1} = A_B z_t + c_B by enumeration of every batch: vec Sigma =
    (I - E[A (x) A])^{-1} vec E[c c^T] (the mean is 0 and E[A z c^T] = E[A] E[z] E[c]^T... = 0).
    Plain SGD: z = w, A = I - lr H_B, c = -lr g_B. Momentum: z = (w_t, w_{t-1}) or (w_t, v_{t-1})
    with A_B from the tests' reference and c = (-lr g_B, 0) or (-lr (1 + mu) g_B, g_B)."""
    hessians = np.einsum("idr,ier->ide", factors, factors)
    n, d, _ = hessians.shape
    size = d if momentum == 0.0 else 2 * d
    T = np.zeros((size * size, size * size))
    C = np.zeros((size, size))
    B = batch_size
    for probability, counts in batch_distribution(n, int(B) if sampling != "bernoulli" else B,
                                                  sampling):
        H_B = np.tensordot(counts, hessians, axes=1) / B
        g_B = counts @ gradients / B
        if momentum == 0.0:
            A = np.eye(d) - lr * H_B
            c = -lr * g_B
        else:
            A = momentum_step(H_B, lr, momentum, nesterov)
            c = (np.concatenate([-lr * (1 + momentum) * g_B, g_B]) if nesterov
                 else np.concatenate([-lr * g_B, np.zeros(d)]))
        T += probability * np.kron(A, A)
        C += probability * np.outer(c, c)
    Sigma = np.linalg.solve(np.eye(size * size) - T, C.ravel()).reshape(size, size)
    Sigma = Sigma[:d, :d]
    H = hessians.mean(axis=0)
    return 0.5 * np.trace(H @ Sigma), Sigma


@pytest.mark.parametrize("sampling", SCHEMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_plain_matches_enumeration(sampling, seed):
    family, factors, gradients = random_family(seed, n=5, d=3, r=2)
    eta = fs.critical_lr(family, 2, sampling=sampling)
    for fraction in (0.3, 0.9):
        lr = fraction * eta
        expected, Sigma = enumerated_stationary(factors, gradients, lr, 2, sampling)
        result = stationary(family, lr, 2, sampling=sampling, covariance=True)
        assert result.excess_loss == pytest.approx(expected, rel=1e-10)
        assert result.lower <= expected * (1 + 1e-12) and expected <= result.upper * (1 + 1e-12)
        np.testing.assert_allclose(result.covariance, Sigma, rtol=1e-9, atol=1e-12 * abs(Sigma).max())
        assert result.relative_residual <= 1e-10
        assert result.eta_star == pytest.approx(eta, rel=1e-9)


@pytest.mark.parametrize("sampling", SCHEMES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_enumeration(sampling, nesterov):
    family, factors, gradients = random_family(3, n=4, d=2, r=1)
    mu = 0.6
    eta = fs.critical_lr(family, 2, sampling=sampling, momentum=mu, nesterov=nesterov)
    for fraction in (0.3, 0.8):
        lr = fraction * eta
        expected, Sigma = enumerated_stationary(factors, gradients, lr, 2, sampling, mu, nesterov)
        result = stationary(family, lr, 2, sampling=sampling, momentum=mu, nesterov=nesterov,
                            covariance=True)
        assert result.excess_loss == pytest.approx(expected, rel=1e-10)
        assert result.lower <= expected * (1 + 1e-12) and expected <= result.upper * (1 + 1e-12)
        np.testing.assert_allclose(result.covariance, Sigma, rtol=1e-8, atol=1e-12 * abs(Sigma).max())


def test_momentum_zero_limit_and_over_parameterised():
    # d > n r: the reduction goes through the Gram matrix; a stationary state lives on range(H).
    rng = np.random.default_rng(7)
    factors = rng.standard_normal((4, 6, 1))
    # gradients in the span of the factor columns (a Gauss-Newton family): g_i = U_i c_i + ...
    coefficients = rng.standard_normal((4, 4))
    gradients = np.einsum("ij,jd->id", coefficients, factors[:, :, 0])
    gradients -= gradients.mean(axis=0)
    family = HessianFamily(factors, gradients=gradients)
    plain = stationary(family, 0.2, 2, sampling="without_replacement", covariance=True)
    tiny = stationary(family, 0.2, 2, sampling="without_replacement", momentum=1e-9)
    assert tiny.excess_loss == pytest.approx(plain.excess_loss, rel=1e-7)
    # the same family through the Gram route with the gradients given as projections
    A = factors[:, :, 0]
    gram_family = HessianFamily.from_gram(A @ A.T, gradient_products=gradients @ A.T)
    assert stationary(gram_family, 0.2, 2, sampling="without_replacement").excess_loss == \
        pytest.approx(plain.excess_loss, rel=1e-9)


def test_d1_closed_form():
    # identical H_i = h: Sigma = lr b S_g / (2 h - lr (a + b) h^2)  (specification)
    h, n = 3.0, 6
    g = np.array([1.0, -2.0, 0.5, 0.5, 1.5, -1.5])[:, None]
    family = HessianFamily.from_features(np.full((n, 1), math.sqrt(h)), gradients=g)
    S = float(np.mean(g**2))
    for sampling, B in (("bernoulli", 2.5), ("without_replacement", 2), ("with_replacement", 3)):
        if sampling == "bernoulli":
            a, b = 1.0, 1 / B - 1 / n
        elif sampling == "without_replacement":
            p = (n - B) / (B * (n - 1))
            a, b = 1 - p, p
        else:
            a, b = 1 - 1 / B, 1 / B
        for lr in (0.01, 0.3, 0.6):
            denominator = 2 * h - lr * (a + b) * h * h
            if denominator <= 0:
                continue
            expected = 0.5 * h * lr * b * S / denominator
            assert stationary(family, lr, B, sampling=sampling).excess_loss == \
                pytest.approx(expected, rel=1e-12)


def test_above_critical_lr_is_an_error_naming_eta_star():
    family, _, _ = random_family(2)
    eta = fs.critical_lr(family, 2)
    with pytest.raises(NoStationaryStateError, match="critical learning rate eta\\*") as info:
        stationary(family, 1.01 * eta, 2)
    assert info.value.eta_star == pytest.approx(eta, rel=1e-9)
    with pytest.raises(NoStationaryStateError, match="eta\\*") as info:
        stationary(family, 1.2 * fs.critical_lr(family, 2, momentum=0.5), 2, momentum=0.5)
    assert math.isfinite(info.value.eta_star)


def test_gradient_outside_range_is_reported_not_a_number():
    rng = np.random.default_rng(0)
    factors = np.zeros((4, 3, 1))
    factors[:, :2, 0] = rng.standard_normal((4, 2))  # H has no curvature along e_3
    gradients = centred(rng, 4, 3)
    family = HessianFamily(factors, gradients=gradients)
    outside = math.sqrt(np.sum(gradients[:, 2] ** 2) / np.sum(gradients**2))
    with pytest.raises(NoStationaryStateError, match="outside the range of H") as info:
        stationary(family, 0.1, 2)
    assert info.value.outside == pytest.approx(outside, rel=1e-9)
    assert f"{outside:.3g}" in str(info.value)
    # within range: fine
    gradients[:, 2] = 0.0
    assert stationary(HessianFamily(factors, gradients=gradients), 0.1, 2).excess_loss > 0


def test_family_without_gradients_is_a_clear_error():
    with pytest.raises(ValueError, match="no per-sample gradients"):
        stationary(HessianFamily.from_features([[1.0], [2.0]]), 0.1, 1)


# ------------------------------------------------------------------ gradients in the family
def test_gradient_validation():
    X = np.eye(3)
    with pytest.raises(ValueError, match=r"gradients must have shape \(n, d\) = \(3, 3\)"):
        HessianFamily.from_features(X, gradients=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="gradients must be finite"):
        HessianFamily.from_features(X, gradients=[[0, 0, np.nan], [0, 0, 0], [0, 0, 0]])
    with pytest.raises(TypeError, match="gradients"):
        HessianFamily.from_features(X, gradients=[["a"] * 3] * 3)
    with pytest.warns(NotAMinimumWarning, match="not a minimum"):
        HessianFamily.from_features(X, gradients=np.ones((3, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HessianFamily.from_features(X, gradients=[[1, 0, 0], [-1, 0, 0], [0, 0, 0]])


def test_gradients_survive_pickle_save_load_and_constructors(tmp_path):
    family, factors, gradients = random_family(4)
    for copy in (pickle.loads(pickle.dumps(family)),):
        np.testing.assert_array_equal(copy.gradients, gradients)
        assert not copy.gradients.flags.writeable
    path = tmp_path / "f.npz"
    family.save(path)
    loaded = HessianFamily.load(path)
    np.testing.assert_array_equal(loaded.gradients, gradients)
    assert stationary(loaded, 0.1, 2).excess_loss == stationary(family, 0.1, 2).excess_loss
    hessians = np.einsum("idr,ier->ide", factors, factors)
    dense = HessianFamily.from_dense(hessians, gradients=gradients)
    jac = HessianFamily.from_jacobians(factors.transpose(0, 2, 1), gradients=gradients)
    for other in (dense, jac):
        assert stationary(other, 0.1, 2).excess_loss == pytest.approx(
            stationary(family, 0.1, 2).excess_loss, rel=1e-10)
    assert HessianFamily(factors).gradients is None


@pytest.mark.parametrize("kind", ["diagonal", "matrix"])
def test_preconditioned_matches_direct_iteration(kind):
    # w <- w - lr P (H_B w + g_B): its stationary covariance in w, by enumeration, against the
    # preconditioned family's (in u = P^{-1/2} w; the excess loss (1/2) tr(H Sigma_w) is the same).
    rng = np.random.default_rng(5)
    n, d = 4, 3
    factors = rng.standard_normal((n, d, 1))
    gradients = centred(rng, n, d)
    if kind == "diagonal":
        P_vector = rng.uniform(0.5, 2.0, d)
        P = np.diag(P_vector)
        argument = P_vector
    else:
        Q = rng.standard_normal((d, d))
        P = Q @ Q.T + np.eye(d)
        argument = P
    family = HessianFamily(factors, gradients=gradients).preconditioned(argument)
    hessians = np.einsum("idr,ier->ide", factors, factors)
    lr, B = 0.3 * fs.critical_lr(family, 2, sampling="without_replacement"), 2
    T = np.zeros((d * d, d * d))
    C = np.zeros((d, d))
    for probability, counts in batch_distribution(n, B, "without_replacement"):
        A = np.eye(d) - lr * P @ np.tensordot(counts, hessians, axes=1) / B
        c = -lr * P @ (counts @ gradients) / B
        T += probability * np.kron(A, A)
        C += probability * np.outer(c, c)
    Sigma = np.linalg.solve(np.eye(d * d) - T, C.ravel()).reshape(d, d)
    expected = 0.5 * np.trace(hessians.mean(axis=0) @ Sigma)
    result = stationary(family, lr, B, sampling="without_replacement")
    assert result.excess_loss == pytest.approx(expected, rel=1e-10)


def test_non_zero_mean_is_measured_from_the_quadratic_minimum():
    # g_i + H_i v for any v: the same dynamics shifted by v (w' = w + v), the same floor.
    family, factors, gradients = random_family(6, n=5, d=3)
    v = np.array([0.3, -1.0, 2.0])
    shifted = gradients + np.einsum("idr,ier,e->id", factors, factors, v)
    with pytest.warns(NotAMinimumWarning):
        moved = HessianFamily(factors, gradients=shifted)
    for sampling in SCHEMES:
        assert stationary(moved, 0.2, 2, sampling=sampling).excess_loss == pytest.approx(
            stationary(family, 0.2, 2, sampling=sampling).excess_loss, rel=1e-9)


# ------------------------------------------------------------------ Monte Carlo
def test_monte_carlo_time_average_agrees_within_its_standard_error():
    # The affine iteration itself, many independent chains, time average after burn-in; the
    # standard error from the spread over chains (independent), bound 5 sigma.
    family, factors, gradients = random_family(8, n=6, d=3)
    hessians = np.einsum("idr,ier->ide", factors, factors)
    H = hessians.mean(axis=0)
    lr = 0.4 * fs.critical_lr(family, 2, sampling="without_replacement")
    rng = np.random.default_rng(1)
    chains, burn, steps = 400, 200, 400
    w = np.zeros((chains, 3))
    totals = np.zeros(chains)
    for t in range(burn + steps):
        batches = np.argsort(rng.random((chains, 6)), axis=1)[:, :2]
        H_B = hessians[batches].mean(axis=1)
        g_B = gradients[batches].mean(axis=1)
        w = w - lr * (np.einsum("cij,cj->ci", H_B, w) + g_B)
        if t >= burn:
            totals += 0.5 * np.einsum("ci,ij,cj->c", w, H, w)
    means = totals / steps
    estimate, error = means.mean(), means.std(ddof=1) / math.sqrt(chains)
    exact = stationary(family, lr, 2, sampling="without_replacement").excess_loss
    # burn-in bias: the start at 0 is (1 - lr lambda_min)^(2 burn) away, negligible here
    assert abs(estimate - exact) <= 5 * error


# ------------------------------------------------------------------ properties
@st.composite
def gradient_families(draw):
    seed = draw(st.integers(0, 10**6))
    n = draw(st.integers(3, 7))
    d = draw(st.integers(1, 4))
    r = draw(st.integers(1, 2))
    rng = np.random.default_rng(seed)
    factors = rng.standard_normal((n, d, r)) * rng.uniform(0.2, 2.0)
    # gradients in the span of the factor columns (in range(H), as for Gauss-Newton families)
    columns = factors.transpose(0, 2, 1).reshape(n * r, d)
    gradients = rng.standard_normal((n, n * r)) @ columns
    return HessianFamily(factors, gradients=gradients - gradients.mean(axis=0)), rng


@settings(max_examples=15)
@given(gradient_families(), st.sampled_from(SCHEMES))
def test_floor_increases_with_lr_and_blows_up_at_eta_star(data, sampling):
    family, _ = data
    B = 2
    eta = fs.critical_lr(family, B, sampling=sampling)
    floors = [stationary(family, f * eta, B, sampling=sampling).excess_loss
              for f in (0.1, 0.3, 0.6, 0.9, 0.99)]
    assert all(x < y for x, y in zip(floors, floors[1:]))
    near = stationary(family, (1 - 1e-4) * eta, B, sampling=sampling).excess_loss
    assert near > 50 * floors[-2]  # ~ 1 / (1 - lr / eta*)


@settings(max_examples=15)
@given(gradient_families(), st.sampled_from(["bernoulli", "without_replacement"]))
def test_floor_decreases_with_batch_size(data, sampling):
    family, _ = data
    n = family.n
    lr = 0.5 * fs.critical_lr(family, 1, sampling=sampling)  # stable for every B >= 1
    floors = [stationary(family, lr, B, sampling=sampling).excess_loss for B in range(1, n + 1)]
    assert all(x >= y * (1 - 1e-9) for x, y in zip(floors, floors[1:]))
    assert floors[-1] == 0.0 and floors[0] > 0.0


@settings(max_examples=15)
@given(gradient_families(), st.floats(0.01, 100.0))
def test_floor_linear_in_gradient_second_moment_and_rotation_invariant(data, c):
    family, rng = data
    lr = 0.5 * fs.critical_lr(family, 2)
    base = stationary(family, lr, 2).excess_loss
    scaled = HessianFamily(family.factors, gradients=math.sqrt(c) * family.gradients)
    assert stationary(scaled, lr, 2).excess_loss == pytest.approx(c * base, rel=1e-9)
    Q, _ = np.linalg.qr(rng.standard_normal((family.d, family.d)))
    rotated = HessianFamily(np.einsum("ed,ndr->ner", Q, family.factors),
                            gradients=family.gradients @ Q.T)
    assert stationary(rotated, lr, 2).excess_loss == pytest.approx(base, rel=1e-9)


def test_scale_covariance():
    # H -> c H, lr -> lr / c, g -> g: (L - lr D) Sigma = lr b S_g gives Sigma -> Sigma / c^2 and
    # the excess (1/2) tr(H Sigma) -> excess / c, at every scale floats represent
    family, factors, gradients = random_family(9)
    lr = 0.4 * fs.critical_lr(family, 2)
    base = stationary(family, lr, 2).excess_loss
    for c in (1e-200, 1e-8, 1e8, 1e200):
        scaled = HessianFamily(math.sqrt(c) * factors, gradients=gradients)
        assert stationary(scaled, lr / c, 2).excess_loss == pytest.approx(base / c, rel=1e-9)


# ------------------------------------------------------------------ inverse questions
def test_max_lr_closed_form_d1():
    # identical h: F(lr) = (1/2) h lr b S / (2 h - lr (a + b) h^2) = target, solved for lr
    h, n, B = 2.0, 5, 2
    g = np.array([1.0, -1.0, 2.0, -2.0, 0.0])[:, None]
    family = HessianFamily.from_features(np.full((n, 1), math.sqrt(h)), gradients=g)
    S = float(np.mean(g**2))
    p = (n - B) / (B * (n - 1))
    a, b = 1 - p, p
    for target in (1e-4, 0.05, 10.0):
        expected = 2 * h * target / (0.5 * h * b * S + target * (a + b) * h * h)
        bracket = fs.max_lr_for_excess_loss(family, B, target, sampling="without_replacement",
                                            bounds=True)
        assert bracket.certified and bracket.lower <= expected <= bracket.upper
        assert bracket.upper - bracket.lower <= 1e-9 * expected


@pytest.mark.parametrize("sampling", SCHEMES)
def test_inverse_questions_are_certified_crossings(sampling):
    family, _, _ = random_family(11, n=6, d=3, r=2)
    eta = fs.critical_lr(family, 2, sampling=sampling)
    target = stationary(family, 0.5 * eta, 2, sampling=sampling).excess_loss
    bracket = fs.max_lr_for_excess_loss(family, 2, target, sampling=sampling, bounds=True)
    assert bracket.certified
    assert bracket.lower <= 0.5 * eta <= bracket.upper
    # the batch-size question at that lr: B = 2 is the threshold
    threshold = fs.min_batch_size_for_excess_loss(family, 0.5 * eta, target, sampling=sampling,
                                                  bounds=True)
    assert threshold.certified and threshold.lower <= 2.0 <= threshold.upper * (1 + 1e-12)
    more = stationary(family, 0.5 * eta, 2, sampling=sampling).excess_loss * 0.7
    answer = fs.min_batch_size_for_excess_loss(family, 0.5 * eta, more, sampling=sampling)
    assert answer > 2
    if sampling != "bernoulli":
        assert stationary(family, 0.5 * eta, answer, sampling=sampling).excess_loss <= more
        assert stationary(family, 0.5 * eta, answer - 1, sampling=sampling).excess_loss > more
    with pytest.raises(ValueError, match="excess_loss must be > 0"):
        fs.max_lr_for_excess_loss(family, 2, 0.0, sampling=sampling)


def test_min_batch_size_is_inf_when_even_full_batch_is_above():
    family, _, _ = random_family(12, n=4, d=2)
    lr = 0.5 * fs.critical_lr(family, 4, sampling="with_replacement")
    floor_n = stationary(family, lr, 4, sampling="with_replacement").excess_loss
    assert fs.min_batch_size_for_excess_loss(family, lr, 0.5 * floor_n,
                                             sampling="with_replacement") == math.inf
    lr = 0.3 * fs.critical_lr(family, 1)
    assert fs.min_batch_size_for_excess_loss(family, lr, 1e300) == 1.0


# ------------------------------------------------------------------ trajectories
def enumerated_trajectory(factors, gradients, lr, B, sampling, steps, sigma0, mean0):
    hessians = np.einsum("idr,ier->ide", factors, factors)
    H = hessians.mean(axis=0)
    batches = list(batch_distribution(len(factors), int(B) if sampling != "bernoulli" else B,
                                      sampling))
    sigma, mean = sigma0.copy(), mean0.copy()
    out, excess = [np.trace(sigma)], [0.5 * np.trace(H @ sigma)]
    for _ in range(steps):
        new_sigma, new_mean = np.zeros_like(sigma), np.zeros_like(mean)
        for probability, counts in batches:
            A = np.eye(len(mean)) - lr * np.tensordot(counts, hessians, axes=1) / B
            c = -lr * counts @ gradients / B
            new_sigma += probability * (A @ sigma @ A.T + np.outer(A @ mean, c)
                                        + np.outer(c, A @ mean) + np.outer(c, c))
            new_mean += probability * (A @ mean + c)
        sigma, mean = new_sigma, new_mean
        out.append(np.trace(sigma))
        excess.append(0.5 * np.trace(H @ sigma))
    return np.array(out), np.array(excess)


@pytest.mark.parametrize("sampling", SCHEMES)
def test_second_moment_with_gradients_matches_enumeration(sampling):
    rng = np.random.default_rng(21)
    n, d = 4, 3
    factors = np.zeros((n, d, 1))
    factors[:, :2, 0] = rng.standard_normal((n, 2))  # e_3 flat: the random walk part too
    gradients = rng.standard_normal((n, d))  # non-zero mean and a part outside range(H)
    with pytest.warns(NotAMinimumWarning):
        family = HessianFamily(factors, gradients=gradients)
    lr = 0.4 * fs.critical_lr(family, 2, sampling=sampling)
    w0 = np.array([0.5, -1.0, 2.0])
    for init, sigma0, mean0 in ((w0, np.outer(w0, w0), w0), ("normal", np.eye(d), np.zeros(d)),
                                ("uniform", np.full((d, d), 0.25) + np.eye(d) / 12,
                                 np.full(d, 0.5))):
        result = fs.second_moment(family, lr, 2, 12, sampling=sampling, init=init)
        expected, excess = enumerated_trajectory(factors, gradients, lr, 2, sampling, 12, sigma0,
                                                 mean0)
        np.testing.assert_allclose(result.mean_sq, expected, rtol=1e-11)
        np.testing.assert_allclose(result.excess_loss, excess, rtol=1e-11, atol=1e-15)


def test_second_moment_tends_to_the_floor():
    family, _, _ = random_family(22, n=5, d=3)
    lr = 0.5 * fs.critical_lr(family, 2, sampling="without_replacement")
    result = fs.second_moment(family, lr, 2, 3000, sampling="without_replacement")
    floor = stationary(family, lr, 2, sampling="without_replacement").excess_loss
    assert result.excess_loss[-1] == pytest.approx(floor, rel=1e-9)
    for nesterov in (False, True):
        lr = 0.5 * fs.critical_lr(family, 2, sampling="without_replacement", momentum=0.5,
                                  nesterov=nesterov)
        result = fs.second_moment(family, lr, 2, 3000, sampling="without_replacement",
                                  momentum=0.5, nesterov=nesterov)
        floor = stationary(family, lr, 2, sampling="without_replacement", momentum=0.5,
                           nesterov=nesterov).excess_loss
        assert result.excess_loss[-1] == pytest.approx(floor, rel=1e-8)


def enumerated_momentum_trajectory(factors, gradients, lr, B, sampling, steps, w_sigma0, w_mean0,
                                   momentum, nesterov):
    """E||w_t||^2 and (1/2) tr(H Sigma_11) of z_{t+1} = A_B z_t + c_B in R^{2d}, every batch
    enumerated, from torch's start (heavy ball z_0 = (w_0, w_0), Nesterov (w_0, 0))."""
    hessians = np.einsum("idr,ier->ide", factors, factors)
    H = hessians.mean(axis=0)
    d = H.shape[0]
    batches = list(batch_distribution(len(factors), int(B) if sampling != "bernoulli" else B,
                                      sampling))
    if nesterov:
        sigma = np.zeros((2 * d, 2 * d))
        sigma[:d, :d] = w_sigma0
        mean = np.concatenate([w_mean0, np.zeros(d)])
    else:
        sigma = np.kron(np.ones((2, 2)), w_sigma0)
        mean = np.concatenate([w_mean0, w_mean0])
    out, excess = [np.trace(sigma[:d, :d])], [0.5 * np.trace(H @ sigma[:d, :d])]
    for _ in range(steps):
        new_sigma, new_mean = np.zeros_like(sigma), np.zeros_like(mean)
        for probability, counts in batches:
            A = momentum_step(np.tensordot(counts, hessians, axes=1) / B, lr, momentum, nesterov)
            g_B = counts @ gradients / B
            c = (np.concatenate([-lr * (1 + momentum) * g_B, g_B]) if nesterov
                 else np.concatenate([-lr * g_B, np.zeros(d)]))
            new_sigma += probability * (A @ sigma @ A.T + np.outer(A @ mean, c)
                                        + np.outer(c, A @ mean) + np.outer(c, c))
            new_mean += probability * (A @ mean + c)
        sigma, mean = new_sigma, new_mean
        out.append(np.trace(sigma[:d, :d]))
        excess.append(0.5 * np.trace(H @ sigma[:d, :d]))
    return np.array(out), np.array(excess)


@pytest.mark.parametrize("sampling", SCHEMES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_second_moment_with_gradients_and_momentum_matches_enumeration(sampling, nesterov):
    rng = np.random.default_rng(31)
    n, d = 4, 3
    factors = np.zeros((n, d, 2))
    factors[:, :2, :] = rng.standard_normal((n, 2, 2))  # e_3 flat: the random walk part too
    gradients = rng.standard_normal((n, d))  # non-zero mean and a part outside range(H)
    with pytest.warns(NotAMinimumWarning):
        family = HessianFamily(factors, gradients=gradients)
    momentum = 0.6
    lr = 0.4 * fs.critical_lr(family, 2, sampling=sampling, momentum=momentum,
                              nesterov=nesterov)
    w0 = np.array([0.5, -1.0, 2.0])
    for init, sigma0, mean0 in ((w0, np.outer(w0, w0), w0), ("normal", np.eye(d), np.zeros(d)),
                                ("uniform", np.full((d, d), 0.25) + np.eye(d) / 12,
                                 np.full(d, 0.5))):
        result = fs.second_moment(family, lr, 2, 10, sampling=sampling, init=init,
                                  momentum=momentum, nesterov=nesterov)
        expected, excess = enumerated_momentum_trajectory(factors, gradients, lr, 2, sampling, 10,
                                                          sigma0, mean0, momentum, nesterov)
        np.testing.assert_allclose(result.mean_sq, expected, rtol=1e-11)
        np.testing.assert_allclose(result.excess_loss, excess, rtol=1e-11, atol=1e-15)


def test_report_and_analyze_print_the_floor(tmp_path):
    import subprocess
    import sys

    family, _, _ = random_family(30, n=6, d=3)
    lr = 0.3 * fs.critical_lr(family, 2)
    report = fs.report(family, lr, 2)
    floor = stationary(family, lr, 2).excess_loss
    assert report.loss_floor.excess_loss == floor
    assert f"{floor:.10g}" in str(report) and "Loss floor" in str(report)
    above = fs.report(family, 1.5 * fs.critical_lr(family, 2), 2)
    assert above.loss_floor is None and "no stationary state" in str(above)
    assert "Loss floor" not in str(fs.report(HessianFamily(family.factors), lr, 2))
    path = tmp_path / "family.npz"
    family.save(path)
    out = subprocess.run([sys.executable, "-m", "fastsgdstab", "analyze", str(path), "--lr",
                          repr(lr), "--batch-size", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"{floor:.10g}" in out.stdout


def test_sweep_has_an_excess_loss_column_for_families_with_gradients():
    family, _, _ = random_family(31, n=6, d=3)
    eta = fs.critical_lr(family, 2)
    table = fs.sweep([family, HessianFamily(family.factors)],
                     [dict(lr=0.3 * eta, batch_size=2), dict(lr=1.5 * eta, batch_size=2)],
                     progress=False)
    column = list(table["excess_loss"])
    assert column[0] == stationary(family, 0.3 * eta, 2).excess_loss
    assert column[1] == math.inf
    assert all(math.isnan(value) for value in column[2:])
    assert "excess_loss" not in fs.sweep(HessianFamily(family.factors), [dict(lr=0.1, batch_size=2)],
                                         progress=False).columns


@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_bracket_is_proven_for_a_loose_solve(momentum):
    # A loose tolerance leaves a visible error: the bracket must still hold the exact value
    # (from a tight solve, itself checked against enumeration above), and be no tighter than it.
    rng = np.random.default_rng(40)
    n, d = 40, 12
    factors = rng.standard_normal((n, d, 1)) * rng.lognormal(0, 1, (n, 1, 1))
    family = HessianFamily(factors, gradients=centred(rng, n, d))
    lr = 0.9 * fs.critical_lr(family, 4, momentum=momentum)
    exact = stationary(family, lr, 4, momentum=momentum, rtol=1e-13).excess_loss
    for rtol in (1e-2, 1e-4):
        loose = stationary(family, lr, 4, momentum=momentum, rtol=rtol)
        assert loose.lower <= exact <= loose.upper
        assert loose.relative_residual <= rtol


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_family_from_model_carries_the_per_sample_gradients(loss_name):
    torch = pytest.importorskip("torch")
    from torch.func import functional_call, grad, vmap

    from fastsgdstab.torch import family_from_model

    torch.manual_seed(0)
    n, C = 7, 3
    X = torch.randn(n, 4, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, C)).double()
    if loss_name == "mse":
        loss, Y = torch.nn.MSELoss(), torch.randn(n, C, dtype=torch.float64)
    else:
        loss, Y = torch.nn.CrossEntropyLoss(), torch.arange(n) % C
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not a minimum: both the Gauss-Newton and the mean warn
        result = family_from_model(model, X, Y, loss, check_gauss_newton=False)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def sample_loss(p, x, y):
        return loss(functional_call(model, p, (x[None],)), y[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, X, Y)
    expected = torch.cat([per_sample[name].reshape(n, -1) for name in params], dim=1).numpy()
    np.testing.assert_allclose(result.family.gradients, expected, rtol=1e-9,
                               atol=1e-12 * np.abs(expected).max())


def test_stability_map_maps_the_excess_loss():
    family, _, _ = random_family(32, n=6, d=3)
    eta = fs.critical_lr(family, 2)
    lrs = [0.2 * eta, 0.6 * eta, 1.2 * eta]
    grid = fs.stability_map(family, lrs, [2, 6], excess_loss=True)
    for j, lr in enumerate(lrs[:2]):
        assert grid.excess_loss[0, j] == stationary(family, lr, 2).excess_loss
    assert grid.excess_loss[0, 2] == math.inf and np.all(grid.excess_loss[1, :2] == 0.0)
    assert fs.stability_map(family, lrs, [2]).excess_loss is None
    with pytest.raises(ValueError, match="per-sample gradients"):
        fs.stability_map(HessianFamily(family.factors), lrs, [2], excess_loss=True)


# ------------------------------------------------------------------ momentum: the scan
@pytest.mark.parametrize("nesterov", [False, True])
def test_max_lr_with_momentum_is_the_first_crossing_of_a_dense_scan(nesterov):
    # The momentum path does not assume a monotone floor: its answer must be the first lr at
    # which the dense reference floor crosses the target, with every smaller lr below it.
    family, factors, gradients = random_family(21, n=4, d=2, r=1)
    options = dict(sampling="without_replacement", momentum=0.6, nesterov=nesterov)
    eta = fs.critical_lr(family, 2, **options)
    target = enumerated_stationary(factors, gradients, 0.4 * eta, 2, **options)[0]
    bracket = fs.max_lr_for_excess_loss(family, 2, target, bounds=True, **options)
    assert isinstance(bracket, fs.LossFloorBracket) and bracket.certified
    assert "not proven monotone" in bracket.caveat and bracket.scanned >= 2
    assert bracket.monotone_on_grid
    assert bracket.lower <= bracket.upper <= bracket.lower * (1 + 1e-9)
    assert enumerated_stationary(factors, gradients, bracket.lower, 2, **options)[0] \
        <= target * (1 + 1e-9)
    assert enumerated_stationary(factors, gradients, bracket.upper, 2, **options)[0] \
        >= target * (1 - 1e-9)
    # no earlier crossing on a fine grid below the answer (the dense reference, independent)
    for lr in np.linspace(0.01, 1.0, 25) * bracket.lower:
        assert enumerated_stationary(factors, gradients, lr, 2, **options)[0] <= target * (1 + 1e-9)
    assert fs.max_lr_for_excess_loss(family, 2, target, **options) == bracket.lower


def test_max_lr_with_momentum_finds_the_first_of_several_crossings(monkeypatch):
    # A floor that is not monotone (a bump), substituted for the solver: the scan must return
    # the first crossing, not a later one, and say the floor was not monotone on its grid.
    import fastsgdstab.loss_floor as lf

    family, _, _ = random_family(22, n=4, d=2, r=1)
    options = dict(sampling="bernoulli", momentum=0.5, nesterov=False)
    eta = fs.critical_lr(family, 2, **options)

    def bumpy(lr):  # crosses 1.0 upwards at 0.2 eta, down at 0.3125 eta, up again at 0.6 eta
        t = lr / eta
        if t < 0.25:
            return 5.0 * t
        return max(1.25 - 4.0 * (t - 0.25), 0.3) if t < 0.5 else 0.3 + 7.0 * (t - 0.5)

    def fake(family_, lr, batch_size, options_):
        value = bumpy(lr)
        return value * (1 - 1e-12), value, value * (1 + 1e-12), 1

    monkeypatch.setattr(lf, "_floor_or_inf", fake)
    bracket = fs.max_lr_for_excess_loss(family, 2, 1.0, bounds=True, **options)
    assert bracket.certified
    assert bracket.lower == pytest.approx(0.2 * eta, rel=1e-8)
    assert bumpy(bracket.lower) <= 1.0 < bumpy(bracket.upper)
