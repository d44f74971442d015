"""Exact Lyapunov exponent of linearised SGD in d = 1 by enumerating every batch (an independent
reference for ``fastsgdstab.typical``): gamma(lr) = E log|1 - lr h_B| per step, with
h_B = (1/B) sum_{i in batch} h_i (Bernoulli: the nominal B), and its first root above eta*."""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.optimize import brentq


def batch_distribution(h, batch_size, sampling):
    """``(values, probabilities)`` of h_B over every batch of the scheme (THEORY section 1)."""
    h = np.asarray(h, dtype=float)
    n = h.size
    values, weights = [], []
    if sampling == "bernoulli":
        p = batch_size / n
        for mask in itertools.product((0, 1), repeat=n):
            k = sum(mask)
            values.append(float(np.dot(mask, h)) / batch_size)
            weights.append(p ** k * (1 - p) ** (n - k))
    elif sampling == "without_replacement":
        for subset in itertools.combinations(range(n), int(batch_size)):
            values.append(float(h[list(subset)].sum()) / batch_size)
            weights.append(1.0)
    elif sampling == "with_replacement":
        for draws in itertools.product(range(n), repeat=int(batch_size)):
            values.append(float(h[list(draws)].sum()) / batch_size)
            weights.append(1.0)
    else:
        raise ValueError(sampling)
    weights = np.array(weights)
    return np.array(values), weights / weights.sum()


def exact_exponent(lr, values, probabilities):
    """gamma(lr) = E log|1 - lr h_B| (natural log, per step, of |w_t|)."""
    with np.errstate(divide="ignore"):
        return float(np.dot(probabilities, np.log(np.abs(1.0 - lr * values))))


def exact_mean_square_lr(values, probabilities):
    """The root of E (1 - lr h_B)^2 = 1: lr = 2 E h_B / E h_B^2 (d = 1, closed form)."""
    return 2.0 * float(np.dot(probabilities, values)) / float(np.dot(probabilities, values ** 2))


def exact_typical_lr(values, probabilities, *, grid=20000, top=50.0):
    """The first root of gamma above the mean-square lr: a fine scan from eta* (where gamma <= 0
    by Jensen) to ``top`` eta*, then Brent on the first sign change."""
    start = exact_mean_square_lr(values, probabilities)
    points = start * np.geomspace(1.0, top, grid)
    previous = points[0]
    for point in points[1:]:
        if exact_exponent(point, values, probabilities) >= 0.0:
            return brentq(exact_exponent, previous, point, args=(values, probabilities),
                          xtol=1e-14, rtol=1e-13)
        previous = point
    return math.inf


def theorem2_typical_lr(n, sigma, sharpness, batch_size, sampling):
    """Exact typical critical lr of ``theorem2_family(n, sigma, sharpness)``: the family is
    diagonal (H_i = m e_k e_k^T, m = n sharpness / sigma, samples 0..sigma-1 on e_1, the others
    one coordinate each), so every coordinate is a d = 1 problem and gamma = max over them.
    Coordinate 1 sees h_B = m K / B with K the number of batch members among the first sigma
    samples; any other coordinate h_B = m K' / B with K' the count of its one sample."""
    from scipy.stats import binom, hypergeom

    m = n * sharpness / sigma
    B = batch_size

    def counts(members):
        if sampling == "bernoulli":
            k = np.arange(members + 1)
            return k, binom.pmf(k, members, B / n)
        if sampling == "without_replacement":
            k = np.arange(min(members, int(B)) + 1)
            return k, hypergeom.pmf(k, n, members, int(B))
        k = np.arange(int(B) + 1)
        return k, binom.pmf(k, int(B), members / n)

    k1, p1 = counts(sigma)
    parts = [(m * k1 / B, p1)]
    if sigma < n:
        k2, p2 = counts(1)
        parts.append((m * k2 / B, p2))

    def gamma(lr):
        return max(exact_exponent(lr, v, p) for v, p in parts)

    # eta* of the whole family is not a d = 1 formula; scan from a small lr instead: gamma < 0
    # there, and the first sign change is the first crossing.
    points = np.geomspace(1e-3, 100.0, 200001) / sharpness
    values = np.array([gamma(x) for x in points[::50]])
    coarse = points[::50]
    k = int(np.argmax(values >= 0))
    lo, hi = coarse[max(k - 1, 0)], coarse[k]
    fine = np.linspace(lo, hi, 2001)
    for a, b in zip(fine[:-1], fine[1:]):
        if gamma(b) >= 0:
            return brentq(gamma, a, b, xtol=1e-14, rtol=1e-13) if gamma(a) < 0 else a
    return hi


class IIDIncrements:
    """An exact stand-in for ``typical._Exponent`` in d = 1: each run's rate at lr is the mean
    of log|1 - lr h_B| over ``steps`` batches drawn from the enumerated law (numpy's generator,
    not the library's streams), the same batches at every lr (common random numbers). The
    interval logic (``typical._locate``) can be checked on it over many seeds in little time."""

    def __init__(self, values, probabilities, runs, steps, seed):
        rng = np.random.default_rng([seed, 23])
        self.h_batch = rng.choice(np.asarray(values), p=np.asarray(probabilities),
                                  size=(runs, steps))
        self.runs = runs
        self.rates = {}

    def per_run(self, lr):
        lr = float(lr)
        if lr not in self.rates:
            with np.errstate(divide="ignore"):
                self.rates[lr] = np.maximum(np.log(np.abs(1.0 - lr * self.h_batch)), -1e3).mean(axis=1)
        return self.rates[lr]

    def __call__(self, lr):
        return float(np.mean(self.per_run(lr)))

    def stderr(self, lr):
        rates = self.per_run(lr)
        return float(np.std(rates, ddof=1)) / math.sqrt(rates.size)
