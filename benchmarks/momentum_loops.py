"""Main's momentum ``second_moment`` before the compiled kernels (release 0.1.0): a Python loop
per step over numpy blocks, kept verbatim as the baseline of ``run_momentum_trajectory.py`` and of
the asv class ``MomentumTrajectory``, and as the reference of tests/test_momentum_kernel.py.

``python_loops()`` swaps these loops into ``fastsgdstab.moments`` for the duration of a ``with``
block, so that ``second_moment`` computes the old way (same validation and assembly).
"""

import contextlib
import math

import numpy as np

from fastsgdstab import moments
from fastsgdstab._engine import MomentumDynamics, momentum_noise_operator


@contextlib.contextmanager
def python_loops():
    """``fastsgdstab.moments`` with the Python loops of release 0.1.0 inside the block."""
    saved = moments._momentum_iterate, moments._affine_momentum_trajectory
    moments._momentum_iterate = _momentum_iterate
    moments._affine_momentum_trajectory = _affine_momentum_trajectory
    try:
        yield
    finally:
        moments._momentum_iterate, moments._affine_momentum_trajectory = saved


_affine_start = moments._affine_start


def _affine_momentum_trajectory(family, reduction, init, lr, a, b, steps, momentum, nesterov):
    """``(log E||w_t||^2, (1/2) tr(H Sigma_11(t)))`` for t = 0..steps of momentum SGD with
    per-sample gradients (specification page, sections "Momentum" and "Non-interpolating
    minima: stationary covariance and the loss floor"), exactly: ``z_{t+1} = A_t z_t + c_t``,
    ``A_t = P (x) I + (q e_1^T) (x) H_B``, ``c_t = q (x) g_B``, so with ``Abar = E A_t`` and the
    mean ``m_t = E z_t``

        Sigma' = Abar Sigma Abar^T + (q q^T) (x) (V(Sigma_11) + a gbar gbar^T + b S_g)
                 + C + C^T,
        C = Abar m (q (x) gbar)^T + (q q^T) (x) ((a - 1) H m_1 gbar^T + b (1/n) sum_i H_i m_1 g_i^T),
        m' = Abar m + q (x) gbar,

    ``V(X) = (a - 1) H X H + b N(X)``, on the range of H in its eigenbasis (dense 2k x 2k
    blocks: O(k^3 + n r k^2) per step). Along the flat directions (``H_i`` vanish there) z moves
    by ``P`` plus ``q (x) g_B``: the 2 x 2 matrix of the blocks' traces and the mean suffice.
    Plain floats, not renormalised (the additive term breaks linearity). Start as torch:
    heavy ball ``w_{-1} = w_0``, Nesterov ``v_{-1} = 0``."""
    n, k = family.n, reduction.k
    basis, inside_gradients, outside_gradients, sigma0, mean0, rest0, mean_rest0 = _affine_start(
        family, reduction, init)
    if nesterov:
        P = np.array([[1.0, -lr * momentum * momentum], [0.0, momentum]])
        q = np.array([-lr * (1.0 + momentum), 1.0])
        start = np.array([[1.0, 0.0], [0.0, 0.0]])
        mean_start = np.array([1.0, 0.0])
    else:
        P = np.array([[1.0 + momentum, -momentum], [1.0, 0.0]])
        q = np.array([-lr, 0.0])
        start = np.ones((2, 2))
        mean_start = np.ones(2)
    qq = np.outer(q, q)
    lam = reduction.sharpness * np.asarray(reduction.unit_eigenvalues, dtype=np.float64)
    rows = (np.asarray(reduction.unit_rows, dtype=np.float64).reshape(n, reduction.rank, k)
            * math.sqrt(reduction.sharpness))
    first = np.zeros((2, 2))
    first[0, 0] = 1.0
    A = np.kron(P, np.eye(k)) + np.kron(np.outer(q, [1.0, 0.0]), np.diag(lam))
    gbar = inside_gradients.mean(axis=0)
    constant = a * np.outer(gbar, gbar) + b * inside_gradients.T @ inside_gradients / n
    q_gbar = np.kron(q, gbar)
    sigma = np.kron(start, sigma0)
    mean = np.kron(mean_start, mean0)
    gbar_rest = outside_gradients.mean(axis=0)
    rest_noise = (a * float(gbar_rest @ gbar_rest)
                  + b * float(np.sum(outside_gradients * outside_gradients)) / n)
    traces = rest0 * start
    means_rest = np.outer(mean_start, mean_rest0)
    log_mean_sq = np.empty(steps + 1)
    excess = np.empty(steps + 1)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for t in range(steps + 1):
            X = sigma[:k, :k]
            total = float(np.trace(X)) + traces[0, 0]
            log_mean_sq[t] = math.log(total) if total > 0 else -math.inf
            excess[t] = 0.5 * float(lam @ np.diag(X)) if k else 0.0
            if t == steps:
                break
            if k:
                # N(X) = (1/n) sum_i H_i X H_i, H_i = R_i^T R_i
                inner = np.einsum("iak,kl,ibl->iab", rows, X, rows)
                noise = np.einsum("iak,iab,ibl->kl", rows, inner, rows) / n
                V = (a - 1.0) * lam[:, None] * X * lam[None, :] + b * noise
                new = A @ sigma @ A.T + np.kron(qq, V + constant)
                if np.any(mean):
                    m1 = mean[:k]
                    per_sample = np.einsum("iak,ia->ik", rows, rows @ m1)  # H_i m_1
                    E1 = ((a - 1.0) * np.outer(lam * m1, gbar)
                          + b * per_sample.T @ inside_gradients / n)
                    cross = np.outer(A @ mean, q_gbar) + np.kron(qq, E1)
                    new = new + cross + cross.T
                sigma = 0.5 * (new + new.T)
                mean = A @ mean + q_gbar
            projections = P @ (means_rest @ gbar_rest)
            traces = (P @ traces @ P.T + np.outer(projections, q) + np.outer(q, projections)
                      + qq * rest_noise)
            means_rest = P @ means_rest + np.outer(q, gbar_rest)
    return log_mean_sq, excess


def _momentum_iterate(reduction, sampling, X, x, b, momentum, nesterov, steps) -> np.ndarray:
    """``log tr(Sigma_11(t)) - log tr(X)`` for t = 1..steps (X has trace 1), iterating the three
    blocks of ``Sigma = E[z z^T]`` from torch's start (heavy ball ``w_{-1} = w_0``: every block
    is X; Nesterov ``v_{-1} = 0``: only ``Sigma_11``). Renormalised by ``tr Sigma`` each step."""
    dynamics = MomentumDynamics(reduction.unit_eigenvalues, x, momentum, nesterov)
    weight = (x / dynamics.scale) ** 2 * b
    noise = momentum_noise_operator(reduction, sampling) if weight != 0.0 else None
    qq = np.outer(dynamics.q, dynamics.q)
    S11 = np.array(X, dtype=np.float64)
    S12 = S11.copy() if not nesterov else np.zeros_like(S11)
    S22 = S11.copy() if not nesterov else np.zeros_like(S11)
    out = np.full(steps, -math.inf)
    log_scale = 0.0
    for t in range(steps):
        W = weight * noise(S11) if noise is not None else None
        S11, S12, S22 = dynamics.propagate(S11, S12, S22)
        if W is not None:
            S11 = S11 + qq[0, 0] * W
            S12 = S12 + qq[0, 1] * W
            S22 = S22 + qq[1, 1] * W
        norm = float(np.trace(S11) + np.trace(S22))
        if not norm > 0.0:  # z vanished exactly: E||w||^2 is 0 from here on
            break
        S11, S12, S22 = S11 / norm, S12 / norm, S22 / norm
        log_scale += math.log(norm) + dynamics.log_factor
        trace = float(np.trace(S11))
        out[t] = log_scale + math.log(trace) if trace > 0.0 else -math.inf
    return out
