"""simulate at a million samples: the batches are right and nothing of size n is allocated per
run (issue 12, item 1). The per-step cost and the fixed cost are measured by
benchmarks/run_simulate_ratio.py --scale and the asv class SimulateLargeN."""

import math
import time
import warnings

import numpy as np
import pytest
from scipy import stats

from fastsgdstab import HessianFamily, SimulationWarning, second_moment, simulate
from fastsgdstab._kernels import sgd
from fastsgdstab.sampling import bernoulli_tables

from kernels_for_tests import SCHEME_CODES, sample_batches

N = 10**6
SE_MULTIPLE = 5.0


def chi_square_pvalue(observed, expected):
    observed = np.asarray(observed, dtype=float)
    expected = np.asarray(expected, dtype=float)
    return stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


@pytest.fixture(scope="module")
def large_family():
    rng = np.random.default_rng(0)
    return HessianFamily.from_features(rng.standard_normal((N, 2)))


@pytest.mark.parametrize("scheme", ["bernoulli", "without_replacement", "with_replacement"])
def test_batches_at_a_million_samples_are_uniform(scheme):
    runs, steps, bins, batch_size = 100, 100, 50, 32
    cdf, guide = bernoulli_tables(N, batch_size / N)
    capacity = cdf.shape[0] - 1 if scheme == "bernoulli" else batch_size  # the largest batch
    sizes, indices = sample_batches(SCHEME_CODES[scheme], N, batch_size, cdf, guide, 3, runs,
                                    steps, capacity)
    drawn = np.sort(indices, axis=2)
    used = drawn >= 0  # unused slots are -1
    assert np.all(used.sum(axis=2) == sizes) and np.all(drawn < N)
    # no repeat within a batch (with replacement: about B^2 / 2n = 5e-4 per batch, a handful)
    repeats = int(np.sum((drawn[:, :, 1:] == drawn[:, :, :-1]) & used[:, :, 1:]))
    assert repeats <= (10 if scheme == "with_replacement" else 0)
    # each of 50 ranges of 20,000 samples is hit in proportion (chi-square)
    inclusions = np.bincount(drawn[used] * bins // N, minlength=bins)
    assert chi_square_pvalue(inclusions, np.ones(bins)) > 1e-4
    if scheme == "bernoulli":
        # batch sizes ~ Binomial(n, B / n), tails pooled
        values = sizes.ravel()
        edges = np.arange(16, 50)
        observed = np.histogram(values, bins=np.concatenate([[-0.5], edges + 0.5, [N + 0.5]]))[0]
        cdf = stats.binom.cdf(np.concatenate([[-1], edges, [N]]), N, batch_size / N)
        assert chi_square_pvalue(observed, np.diff(cdf)) > 1e-4
        assert abs(values.mean() - batch_size) < 5 * math.sqrt(batch_size / values.size)
    else:
        assert np.all(sizes == batch_size)


def test_scratch_is_of_the_batch_size_not_of_n():
    marks, table, slots = sgd.index_set(N, 32)
    assert marks.shape == (0,) and table.shape == (64,) and slots.shape == (32,)
    marks, table, slots = sgd.index_set(1000, 32)  # small n: a mark per index
    assert marks.shape == (1000,) and table.shape == (0,)
    assert sgd.shuffle_scratch(N, 32).shape == (0,)  # only n < 2 B needs a permutation
    assert sgd.shuffle_scratch(50, 32).shape == (50,)
    cdf, guide = bernoulli_tables(N, 32 / N)
    assert cdf.shape[0] < 200 and guide.shape == cdf.shape and cdf[-1] == 1.0
    # the cut table gives the draws of the full one: same values where both are defined
    full = stats.binom.cdf(np.arange(cdf.shape[0] - 1), N, 32 / N)
    np.testing.assert_array_equal(cdf[:-1], full)


@pytest.mark.parametrize("scheme", ["bernoulli", pytest.param("without_replacement", marks=pytest.mark.slow),
                                    pytest.param("with_replacement", marks=pytest.mark.slow)])
def test_many_runs_at_a_million_samples_need_no_memory_of_size_n(large_family, scheme):
    # 100,000 runs x 10^6 samples: one byte per sample and run would be 100 GB, and the
    # kernel before issue 12 cleared 9 MB per run and chunk (900 GB of writes here)
    started = time.perf_counter()
    result = simulate(large_family, 0.1, 32, 2, 100_000, seed=1, sampling=scheme, progress=False)
    assert time.perf_counter() - started < 60
    assert result.log_sq_norm.shape == (100_000, 3) and np.all(np.isfinite(result.log_sq_norm))


def exact_log_mean_sq(family, lr, batch_size, sampling, steps):
    """log E||w_t||^2 from w_0 ~ N(0, I) by the second-moment map (the specification page,
    section "Setting"), ``Q(X) = X - lr (H X + X H) + lr^2 (a H X H + b N(X))`` with
    ``N(X) = (1/n) sum_i H_i X H_i``, as a dense d^2 x d^2 matrix (d = 2 here)."""
    n, d, B = family.n, family.d, float(batch_size)
    a, b = {"bernoulli": (1.0, 1.0 / B - 1.0 / n),
            "without_replacement": (1.0 - (n - B) / (B * (n - 1)), (n - B) / (B * (n - 1))),
            "with_replacement": (1.0 - 1.0 / B, 1.0 / B)}[sampling]
    factors = np.asarray(family._factors)[:, :, 0]  # rank 1: H_i = u_i u_i^T
    H = factors.T @ factors / n
    u_u = np.einsum("ni,nj->nij", factors, factors).reshape(n, d * d)
    N = u_u.T @ u_u / n  # vec(H_i X H_i) = (H_i kron H_i) vec(X), summed
    I = np.eye(d)
    Q = (np.eye(d * d) - lr * (np.kron(H, I) + np.kron(I, H))
         + lr ** 2 * (a * np.kron(H, H) + b * N))
    x = I.reshape(-1)
    out = [math.log(np.trace(I))]
    for _ in range(steps):
        x = Q @ x
        out.append(math.log(np.trace(x.reshape(d, d))))
    return np.array(out)


@pytest.mark.parametrize("scheme", ["bernoulli", "without_replacement", "with_replacement"])
def test_mean_square_at_a_million_samples_matches_the_exact_map(large_family, scheme):
    factors = np.asarray(large_family._factors)[:, :, 0]
    lr = 1.5 / np.linalg.eigvalsh(factors.T @ factors / N)[-1]
    steps = 6
    exact = exact_log_mean_sq(large_family, lr, 4, scheme, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulationWarning)
        result = simulate(large_family, lr, 4, steps, 20_000, seed=2, sampling=scheme,
                          record_every=1, progress=False)
    for t in range(1, steps + 1):
        error = abs(result.log_mean_sq[t] - exact[t])
        assert error <= SE_MULTIPLE * result.log_mean_sq_stderr[t], (t, error)


def test_the_exact_map_agrees_with_second_moment_at_small_n():
    # the dense reference above is the exact engine's map (checked where both are cheap)
    rng = np.random.default_rng(1)
    family = HessianFamily.from_features(rng.standard_normal((50, 2)))
    lr = 1.2 / family.sharpness()
    for scheme in ("bernoulli", "without_replacement", "with_replacement"):
        np.testing.assert_allclose(exact_log_mean_sq(family, lr, 4, scheme, 5),
                                   second_moment(family, lr, 4, 5, sampling=scheme).log_mean_sq,
                                   rtol=0, atol=1e-10)
