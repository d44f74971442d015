"""The exact mean-square engine: second-moment map, spectral radius, critical lr and batch size.

Everything here is exact (up to floating point and a Lanczos residual below 1e-11 relative):
the specification page's sections "The exact second-moment map", "Exact critical learning rate" and
"Exact critical batch size". All work happens in H's eigenbasis on the range of H, with
k = rank(H) <= min(d, n r), through one operator kernel; nothing of size d^2 x d^2 is formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ._warnings import warn
from ._config import CERTIFY_RTOL, INTEGER_BATCH_RTOL, ITERATION_CHUNK_FLOPS, MAX_TRAJECTORY_STEPS
from ._engine import (
    MomentumDynamics,
    MomentumSolver,
    SandwichOperator,
    check_family,
    check_momentum,
    momentum_cap,
    momentum_noise_operator,
    pair_product,
    pair_sum,
    radius_tolerance,
    range_basis,
    reduced,
    safe_upper_value,
    second_moment_scale,
    second_moment_multiplier,
    top_eigenvalue,
    widen_radius,
    widen_ratio,
    ratio_tolerance,
    ratio_perturbations,
)
from ._kernels.moments import affine_momentum_trajectory, momentum_iteration
from ._kernels.operators import second_moment_iteration
from ._linalg import Bracket, CertificationWarning
from ._threads import blas_policy, family_work
from ._validation import as_real_array, check_batch_size, check_finite, check_lr, check_positive_int
from .family import HessianFamily, power_of_two_scale
from .sampling import batch_size_from_noise, check_sampling, map_coefficients

__all__ = [
    "SecondMomentResult",
    "second_moment",
    "spectral_radius",
    "critical_lr",
    "critical_batch_size",
]

@dataclass(frozen=True)
class SecondMomentResult:
    """Exact trajectory of the mean squared norm of linearised SGD.

    Attributes
    ----------
    log_mean_sq : ndarray, shape (steps + 1,)
        ``log E||w_t||^2`` for t = 0..steps (natural log; exact, never overflows).
    lr, batch_size, sampling, steps, momentum, nesterov
        The settings that produced it (``momentum = 0``: plain SGD).
    excess_loss : ndarray, shape (steps + 1,), or None
        For a family with per-sample gradients: ``E[L(theta* + w_t)] - L(theta*) =
        (1/2) tr(H Sigma_t)`` of the quadratic model around the point where the gradients were
        taken (the loss's own convention), exact; it tends to :func:`fastsgdstab.stationary`'s
        floor below ``eta*``. None otherwise.
    """

    log_mean_sq: np.ndarray
    lr: float
    batch_size: float
    sampling: str
    steps: int
    momentum: float = 0.0
    nesterov: bool = False
    excess_loss: np.ndarray | None = None  # (1/2) tr(H Sigma_t), families with gradients only

    @property
    def mean_sq(self) -> np.ndarray:
        """``E||w_t||^2`` itself (may overflow to inf where the log exceeds ~709)."""
        with np.errstate(over="ignore"):
            return np.exp(self.log_mean_sq)

    @property
    def growth_rate(self) -> float:
        """Per-step factor of ``E||w_t||^2`` over the last step (tends to the spectral radius)."""
        if self.steps == 0:
            return math.nan
        return float(np.exp(self.log_mean_sq[-1] - self.log_mean_sq[-2]))


def _initial_state(family: HessianFamily, init):
    """Sigma_0 restricted to the range of H, in units: ``(X, log_inside, log_rest)``.

    ``X`` is the k x k block in H's eigenbasis scaled to trace 1 (or None if it is zero),
    ``log_inside`` the log of its true trace and ``log_rest`` the log of the trace of the part in
    the common null space (directions that never move; the cross terms do not enter the trace),
    so ``E||w_t||^2 = exp(log_inside) tr(X_t) + exp(log_rest)`` exactly, for initial states of
    any norm that floats represent.
    """
    reduction = reduced(family)
    k, d = reduction.k, family.d
    if init is None or (isinstance(init, str) and init == "normal"):
        log_rest = math.log(d - k) if d > k else -math.inf
        return (np.eye(k) / k if k else None), (math.log(k) if k else -math.inf), log_rest
    if isinstance(init, str) and init == "uniform":
        # w_0 ~ Uniform[0, 1)^d: E[w w^T] = (1/4) 1 1^T + (1/12) I.
        init = np.full((d, d), 0.25) + np.eye(d) / 12.0
    elif isinstance(init, str):
        raise ValueError(
            f"init must be 'normal' (w_0 ~ N(0, I), the default), 'uniform' (w_0 ~ Uniform[0, 1)^d), "
            f"a vector of shape ({d},) or a PSD matrix of shape ({d}, {d}) (Sigma_0); got {init!r}")
    array = as_real_array(init, "init")
    check_finite(array, "init")
    if array.shape == (d,):
        if not np.any(array):
            raise ValueError("init must not be the zero vector (E||w_t||^2 would be 0 for all t)")
        vector, unit = power_of_two_scale(array)
        log_unit = math.log(unit)
        basis = range_basis(family)
        inside = basis.T @ vector
        rest = vector - basis @ inside
        inside_sq, rest_sq = float(inside @ inside), float(rest @ rest)
        X = np.outer(inside, inside) / inside_sq if inside_sq > 0 else None
        return (X, math.log(inside_sq) + 2 * log_unit if inside_sq > 0 else -math.inf,
                math.log(rest_sq) + 2 * log_unit if rest_sq > 0 else -math.inf)
    if array.shape == (d, d):
        matrix, unit = power_of_two_scale(array)
        log_unit = math.log(unit)
        if np.max(np.abs(matrix - matrix.T)) > 1e-10:
            raise ValueError("init as a matrix is Sigma_0 = E[w_0 w_0^T] and must be symmetric")
        sigma0 = 0.5 * matrix + 0.5 * matrix.T
        smallest = float(np.linalg.eigvalsh(sigma0)[0])
        if smallest < -1e-10:
            raise ValueError(
                f"init as a matrix is Sigma_0 = E[w_0 w_0^T] and must be positive semi-definite; "
                f"its smallest eigenvalue is {smallest * unit:.6g}"
            )
        total = float(np.trace(sigma0))
        if not total > 0:
            raise ValueError("init must not be the zero matrix (E||w_t||^2 would be 0 for all t)")
        basis = range_basis(family)
        inside = basis.T @ sigma0 @ basis
        inside_trace = float(np.trace(inside))
        rest = max(total - inside_trace, 0.0)
        X = inside / inside_trace if inside_trace > 0 else None
        return (X, math.log(inside_trace) + log_unit if inside_trace > 0 else -math.inf,
                math.log(rest) + log_unit if rest > 0 else -math.inf)
    raise ValueError(
        f"init must be 'normal' (w_0 ~ N(0, I), the default), 'uniform' (w_0 ~ Uniform[0, 1)^d), "
        f"a vector of shape ({d},) (w_0) or a PSD matrix of shape ({d}, {d}) (Sigma_0); got "
        f"shape {array.shape}"
    )


def _iterate(reduction, X, multiplier, noise_weight, steps) -> np.ndarray:
    """``log tr`` growth of each of ``steps`` applications of ``F o X + beta N(X)`` from X (trace 1).

    The kernel runs in chunks of about ``ITERATION_CHUNK_FLOPS`` so that Ctrl-C (a
    KeyboardInterrupt between chunks) stops a long trajectory within a fraction of a second.
    """
    log_growth = np.empty(steps)
    k = reduction.k
    per_step = 4.0 * reduction.unit_rows.shape[0] * k * k + 8.0 * k * k
    chunk = max(1, int(ITERATION_CHUNK_FLOPS / per_step))
    X = np.ascontiguousarray(X, dtype=np.float64)
    done = 0
    while done < steps:
        last = min(steps, done + chunk)
        part = np.empty(last - done)  # contiguous: one compiled signature
        second_moment_iteration(reduction.unit_rows, reduction.rank, X, multiplier, noise_weight,
                                part)
        log_growth[done:last] = part
        done = last
        if log_growth[last - 1] == -math.inf:  # the iterate vanished exactly: 0 from here on
            log_growth[last:] = -math.inf
            break
    return log_growth


@blas_policy(size_of=family_work)
def second_moment(family, lr, batch_size, steps, *, sampling="bernoulli", init="normal",
                  momentum=0.0, nesterov=False) -> SecondMomentResult:
    """Exact ``log E||w_t||^2`` of linearised SGD (with or without momentum) for t = 0..steps.

    Iterates the second-moment map ``Sigma_{t+1} = Q(Sigma_t)`` with
    ``Q(X) = X - lr (H X + X H) + lr^2 (a H X H + b N(X))``, ``N(X) = (1/n) sum_i H_i X H_i``
    (section "The exact second-moment map"), renormalising every step so that the logs are exact
    however far the iteration grows, for any ``lr * lambda_1(H)`` and any initial norm that
    floats represent (section "Certified answers and scale"). Long trajectories can be stopped
    with Ctrl-C (KeyboardInterrupt).

    For a family with per-sample gradients (a minimum that does not interpolate, section
    "Non-interpolating minima: stationary covariance and the loss floor") the iteration is
    affine, ``w_{t+1} = (I - lr H_B) w_t - lr g_B``,
    and the trajectory includes the gradients' term and, for a start with non-zero mean (``init``
    a vector, or "uniform"), the cross term; ``excess_loss`` then holds ``(1/2) tr(H Sigma_t)``.
    Exact, one operator product per step, in plain floats (the additive term rules out the
    renormalisation). With momentum too: the three blocks of ``E[z z^T]`` and the mean of z
    move with the additive term ``c_t = q (x) g_B`` (momentum bullet of section
    "Non-interpolating minima: stationary covariance and the loss floor"), on dense 2k x 2k blocks in H's eigenbasis (O(k^3 + n r k^2) per step,
    k the rank of H); its limit is :func:`fastsgdstab.stationary`'s floor with momentum.

    With ``momentum > 0`` (torch.optim.SGD's heavy ball, or Nesterov with ``nesterov=True``;
    dampening 0, and the first step has no momentum: ``w_{-1} = w_0``, ``v_{-1} = 0``) the state
    is ``z = (w_t, w_{t-1})`` (heavy ball) or ``(w_t, lr v_{t-1})`` (Nesterov) and the iteration
    is that of ``Sigma_t = E[z_t z_t^T]`` (section "Momentum"): in H's eigenbasis the three
    blocks ``Sigma_11, Sigma_12, Sigma_22`` move by the 2 x 2 matrices ``M_j`` of each pair of
    eigen-directions, and only ``Sigma_11`` feeds the noise,
    ``(q q^T) (x) lr^2 (E[H_B X H_B] - H X H)``. Renormalised every step, exact in logs; the
    result is ``E||w_t||^2`` (the first block's trace), one noise product per step.

    Parameters
    ----------
    family : HessianFamily
    lr : float
        Learning rate, > 0.
    batch_size : float or int
        In [1, n]: a real number for Bernoulli (each sample is included with probability B / n),
        an integer for "without_replacement" and "with_replacement".
    steps : int
        Number of SGD steps, >= 0.
    sampling : {"bernoulli", "without_replacement", "with_replacement"}
    init : "normal", "uniform", array (d,) or array (d, d), default "normal"
        The same vocabulary as :func:`fastsgdstab.simulate`: "normal" (or None) is
        ``w_0 ~ N(0, I)`` (Sigma_0 = I); "uniform" is ``w_0 ~ Uniform[0, 1)^d`` (the paper's
        experiment; Sigma_0 = 1 1^T / 4 + I / 12); a vector is that ``w_0``; a PSD matrix is
        Sigma_0 itself (a covariance, or any second moment).
    momentum : float, default 0.0
        torch.optim.SGD's ``momentum``, in [0, 1); 0 is plain SGD (the same computation as
        before momentum existed, bit for bit).
    nesterov : bool, default False
        Nesterov momentum (requires ``momentum > 0``, as in torch).

    Returns
    -------
    SecondMomentResult
        ``log_mean_sq`` has shape (steps + 1,).

    Raises
    ------
    TypeError, ValueError
        Invalid arguments; the message names the argument.

    Examples
    --------
    >>> from fastsgdstab import HessianFamily, second_moment
    >>> family = HessianFamily.from_features([[1.0, 0.0], [0.0, 1.0]])
    >>> # lr = 1, one sample per step: each step zeroes the coordinate it draws.
    >>> result = second_moment(family, lr=1.0, batch_size=1, steps=3, sampling="with_replacement")
    >>> result.mean_sq.round(6)
    array([2.  , 1.  , 0.5 , 0.25])
    >>> # Heavy ball on one direction of curvature 1, lr = 1: w_1 = 0, w_2 = -mu w_0, ...
    >>> family = HessianFamily.from_features([[1.0], [1.0]])
    >>> second_moment(family, lr=1.0, batch_size=2, steps=3, momentum=0.5).mean_sq.round(6)
    array([1.    , 0.    , 0.25  , 0.0625])
    """
    family = check_family(family)
    sampling = check_sampling(sampling)
    lr = check_lr(lr)
    batch_size = check_batch_size(batch_size, family.population_size, integer=sampling != "bernoulli",
                                  samples=family.n)
    steps = check_positive_int(steps, "steps", minimum=0)
    momentum, nesterov = check_momentum(momentum, nesterov)
    if steps > MAX_TRAJECTORY_STEPS:
        raise ValueError(
            f"steps must be at most {MAX_TRAJECTORY_STEPS:,} (the trajectory holds one float per "
            f"step); got {steps:,}. For the asymptotic growth use spectral_radius")
    X, log_inside, log_rest = _initial_state(family, init)
    reduction = reduced(family)
    if family.gradients is not None:
        a, b = map_coefficients(sampling, family.population_size, batch_size)
        if momentum != 0.0:
            log_mean_sq, excess = _affine_momentum_trajectory(family, reduction, init, lr, a, b,
                                                              steps, momentum, nesterov)
        else:
            log_mean_sq, excess = _affine_trajectory(family, reduction, init, lr, a, b, steps)
        return SecondMomentResult(log_mean_sq, lr, batch_size, sampling, steps, momentum,
                                  nesterov, excess)
    if reduction.k == 0 or X is None:
        log_mean_sq = np.full(steps + 1, log_rest)
    elif momentum != 0.0:
        a, b = map_coefficients(sampling, family.population_size, batch_size)
        x, extra = _momentum_unit_lr(reduction, lr)
        log_growth = _momentum_iterate(reduction, sampling, X, x, b, momentum, nesterov, steps)
        log_growth = log_growth + extra * np.arange(1, steps + 1)
        log_inside = log_inside + np.concatenate(([0.0], log_growth))
        log_mean_sq = np.logaddexp(log_inside, log_rest)
    else:
        a, b = map_coefficients(sampling, family.population_size, batch_size)
        multiplier, noise_weight, log_factor = second_moment_multiplier(
            reduction.unit_eigenvalues, reduction.unit_lr(lr), a, b)
        log_growth = _iterate(reduction, X, multiplier, noise_weight, steps) + log_factor
        log_inside = log_inside + np.concatenate(([0.0], np.cumsum(log_growth)))
        log_mean_sq = np.logaddexp(log_inside, log_rest)
    return SecondMomentResult(log_mean_sq, lr, batch_size, sampling, steps, momentum, nesterov)


def _affine_start(family, reduction, init):
    """The affine trajectories' start, split along range(H) (basis (d, k)) and its complement:
    ``(basis, inside gradients (n, k), outside gradients (n, d), Sigma_0 and E w_0 inside (k
    coordinates), tr Sigma_0 and E w_0 outside)``. The initial mean is ``w_0`` for a vector,
    ``1/2`` per coordinate for "uniform", 0 otherwise (a second-moment matrix: mean 0)."""
    d, k = family.d, reduction.k
    basis = range_basis(family)
    gradients = np.asarray(family.gradients)
    inside_gradients = gradients @ basis
    outside_gradients = gradients - inside_gradients @ basis.T
    if init is None or (isinstance(init, str) and init == "normal"):
        sigma, mean, rest, mean_rest = np.eye(k), np.zeros(k), float(d - k), np.zeros(d)
    elif isinstance(init, str):  # "uniform" (validated by _initial_state)
        ones = basis.T @ np.ones(d)
        sigma = 0.25 * np.outer(ones, ones) + np.eye(k) / 12.0
        mean = 0.5 * ones
        rest = d / 3.0 - float(np.trace(sigma))
        mean_rest = 0.5 * np.ones(d) - basis @ mean
    else:
        array = np.asarray(init, dtype=np.float64)
        if array.ndim == 1:
            mean = basis.T @ array
            sigma = np.outer(mean, mean)
            mean_rest = array - basis @ mean
            rest = float(mean_rest @ mean_rest)
        else:  # a second moment: its mean is taken to be 0
            sigma0 = 0.5 * (array + array.T)
            sigma = basis.T @ sigma0 @ basis
            rest = float(np.trace(sigma0)) - float(np.trace(sigma))
            mean, mean_rest = np.zeros(k), np.zeros(d)
    rest = max(rest, 0.0)
    return basis, inside_gradients, outside_gradients, sigma, mean, rest, mean_rest


def _affine_trajectory(family, reduction, init, lr, a, b, steps):
    """``(log E||w_t||^2, (1/2) tr(H Sigma_t))`` for t = 0..steps of the affine iteration
    ``w_{t+1} = (I - lr H_B) w_t - lr g_B`` (specification page, section "Non-interpolating
    minima: stationary covariance and the loss floor"), exactly, with the cross term of a start with non-zero mean:

        Sigma' = Q(Sigma) + E[A m c^T] + E[c m^T A^T] + lr^2 (a gbar gbar^T + b S_g),
        E[A m c^T] = -lr m gbar^T + lr^2 (a H m gbar^T + b (1/n) sum_i H_i m g_i^T),
        m' = (I - lr H) m - lr gbar,

    in H's eigenbasis on its range (one operator product per step); the gradients' part outside
    the range moves ``w`` by ``-lr g_B`` there (a random walk), tracked by its trace. Not
    renormalised (the additive term breaks linearity): plain floats at the family's scale. The
    initial mean is ``w_0`` for a vector, ``1/2`` per coordinate for "uniform", 0 otherwise."""
    d, k, n = family.d, reduction.k, family.n
    basis, inside_gradients, outside_gradients, sigma, mean, rest, mean_rest = _affine_start(
        family, reduction, init)
    x = reduction.unit_lr(lr)
    m = reduction.unit_eigenvalues
    sharpness = reduction.sharpness
    multiplier, noise_weight, log_factor = second_moment_multiplier(m, x, a, b)
    operator = SandwichOperator(reduction, np.ones((k, k)), multiplier, noise_weight)
    factor = math.exp(log_factor)
    rows = reduction.unit_rows.reshape(n, reduction.rank, k)
    gbar = inside_gradients.mean(axis=0)
    constant = lr * lr * (a * np.outer(gbar, gbar) + b * inside_gradients.T @ inside_gradients / n)
    gbar_rest = outside_gradients.mean(axis=0)
    rest_step = lr * lr * (a * float(gbar_rest @ gbar_rest)
                           + b * float(np.sum(outside_gradients * outside_gradients)) / n)
    log_mean_sq = np.empty(steps + 1)
    excess = np.empty(steps + 1)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for t in range(steps + 1):
            total = float(np.trace(sigma)) + rest
            log_mean_sq[t] = math.log(total) if total > 0 else -math.inf
            excess[t] = 0.5 * sharpness * float(m @ np.diag(sigma)) if k else 0.0
            if t == steps:
                break
            new = factor * operator(sigma) + constant if k else sigma
            if k and np.any(mean):
                # H_i m / lambda_1 = rows_i^T rows_i m, H m / lambda_1 = m_u o m (units)
                per_sample = np.einsum("irk,ir->ik", rows, rows @ mean)
                cross = (-lr * np.outer(mean, gbar)
                         + lr * x * (a * np.outer(m * mean, gbar)
                                     + b * per_sample.T @ inside_gradients / n))
                new = new + cross + cross.T
            sigma = 0.5 * (new + new.T)
            mean = mean - x * m * mean - lr * gbar
            rest = rest - 2.0 * lr * float(mean_rest @ gbar_rest) + rest_step
            mean_rest = mean_rest - lr * gbar_rest
    return log_mean_sq, excess


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
    lam = reduction.sharpness * np.asarray(reduction.unit_eigenvalues, dtype=np.float64)
    M = np.empty((k, 2, 2))
    M[:] = P
    M[:, :, 0] += np.outer(lam, q)  # M_j = P + lam_j q e_1^T: the 2 x 2 blocks of Abar
    gbar = inside_gradients.mean(axis=0)
    constant = a * np.outer(gbar, gbar) + b * inside_gradients.T @ inside_gradients / n
    sigma = np.ascontiguousarray(np.kron(start, sigma0), dtype=np.float64)
    mean = np.ascontiguousarray(np.kron(mean_start, mean0), dtype=np.float64)
    gbar_rest = np.ascontiguousarray(outside_gradients.mean(axis=0), dtype=np.float64)
    rest_noise = (a * float(gbar_rest @ gbar_rest)
                  + b * float(np.sum(outside_gradients * outside_gradients)) / n)
    traces = rest0 * start
    means_rest = np.ascontiguousarray(np.outer(mean_start, mean_rest0), dtype=np.float64)
    log_mean_sq = np.empty(steps + 1)
    excess = np.empty(steps + 1)
    rows = np.ascontiguousarray(reduction.unit_rows, dtype=np.float64)
    arguments = (rows, reduction.rank, float(reduction.sharpness), lam, float(a), float(b), M, P,
                 q, sigma, mean, np.ascontiguousarray(constant, dtype=np.float64),
                 np.ascontiguousarray(gbar, dtype=np.float64),
                 np.ascontiguousarray(inside_gradients, dtype=np.float64), traces, means_rest,
                 gbar_rest, float(rest_noise))
    per_step = 4.0 * rows.shape[0] * k * k + 40.0 * k * k + 8.0 * family.d + 1.0
    chunk = max(1, int(ITERATION_CHUNK_FLOPS / per_step))
    done = 0
    while done <= steps:  # records t = done..last - 1, Ctrl-C between chunks
        last = min(steps + 1, done + chunk)
        part_log, part_excess = np.empty(last - done), np.empty(last - done)
        affine_momentum_trajectory(*arguments, last == steps + 1, part_log, part_excess)
        log_mean_sq[done:last], excess[done:last] = part_log, part_excess
        done = last
    return log_mean_sq, excess


# Beyond this unit lr the momentum iteration divided by x is P / x + (x m / x) q e_1^T, and P / x
# is below every rounding of the second term: a larger x changes only the carried log factor.
_MOMENTUM_MAX_UNIT_LR = 1e300


_MOMENTUM_SMALL_UNIT_LR = 1e-6


def _momentum_unit_lr(reduction, lr: float):
    """``(x, extra_log)``: the unit lr, capped at ``_MOMENTUM_MAX_UNIT_LR`` when lr lambda_1
    exceeds it (or the float range), and ``2 log`` of the factor the cap removed (per step, on
    the second moment): scale covariance beyond the float range, carried in logs."""
    x = reduction.unit_lr(lr)
    if x <= _MOMENTUM_MAX_UNIT_LR:
        return x, 0.0
    log_x = math.log(lr) + 2.0 * math.log(reduction.root_sharpness)
    return _MOMENTUM_MAX_UNIT_LR, 2.0 * (log_x - math.log(_MOMENTUM_MAX_UNIT_LR))


def _momentum_iterate(reduction, sampling, X, x, b, momentum, nesterov, steps) -> np.ndarray:
    """``log tr(Sigma_11(t)) - log tr(X)`` for t = 1..steps (X has trace 1), iterating the three
    blocks of ``Sigma = E[z z^T]`` from torch's start (heavy ball ``w_{-1} = w_0``: every block
    is X; Nesterov ``v_{-1} = 0``: only ``Sigma_11``). Renormalised by ``tr Sigma`` each step."""
    dynamics = MomentumDynamics(reduction.unit_eigenvalues, x, momentum, nesterov)
    weight = (x / dynamics.scale) ** 2 * b
    interaction = 0.0 if sampling == "bernoulli" else -1.0
    qq = np.outer(dynamics.q, dynamics.q)
    S11 = np.array(X, dtype=np.float64)
    S12 = S11.copy() if not nesterov else np.zeros_like(S11)
    S22 = S11.copy() if not nesterov else np.zeros_like(S11)
    out = np.full(steps, -math.inf)
    state = np.zeros(1)  # the cumulative log scale
    rows, k = reduction.unit_rows, reduction.k
    m = np.ascontiguousarray(reduction.unit_eigenvalues, dtype=np.float64)
    per_step = (4.0 * rows.shape[0] * k * k if weight != 0.0 else 0.0) + 40.0 * k * k
    chunk = max(1, int(ITERATION_CHUNK_FLOPS / per_step))
    M = np.ascontiguousarray(dynamics.matrices, dtype=np.float64)
    done = 0
    while done < steps:  # Ctrl-C (KeyboardInterrupt) between chunks
        last = min(steps, done + chunk)
        part = np.full(last - done, -math.inf)
        vanished = momentum_iteration(rows, reduction.rank, m, interaction, M, qq, float(weight),
                                      float(dynamics.log_factor), S11, S12, S22, state, part)
        out[done:last] = part
        done = last
        if vanished:  # z vanished exactly: E||w||^2 is 0 from here on
            break
    return out


def _scaled_bracket(bracket: Bracket, log_factor: float) -> Bracket:
    """The bracket times ``exp(log_factor)`` (inf where that exceeds the float range)."""
    if log_factor == 0.0:
        return bracket
    def times(value):
        if value == 0.0:
            return 0.0
        log_value = math.log(abs(value)) + log_factor
        return math.copysign(math.exp(log_value) if log_value < 709.78 else math.inf, value)

    return replace(bracket, value=times(bracket.value), lower=times(bracket.lower),
                   upper=times(bracket.upper), error=times(bracket.error))


@blas_policy(size_of=family_work)
def spectral_radius(family, lr, batch_size, *, sampling="bernoulli", bounds=False, momentum=0.0,
                    nesterov=False):
    """Spectral radius of the second-moment map Q on the range of H (certified).

    ``rho(Q) = lambda_max(Q)`` (Q is self-adjoint and cone-preserving) is the asymptotic
    per-step growth factor of ``E||w_t||^2``: SGD is mean-square stable iff ``rho <= 1`` and
    converges iff ``rho < 1``. Computed by Lanczos on k x k symmetric matrices from the
    identity, then certified to be the *top* eigenvalue by a proven two-sided bound (section
    "Certified answers and scale"): a Collatz-Wielandt upper bound and a Rayleigh lower bound.
    A family with no curvature returns 1.0 (nothing moves). Works in units of the sharpness,
    so any scale of the loss gives the same answer; ``inf`` when the radius exceeds the float
    range.

    With ``momentum > 0`` the quantity is the spectral radius of the map
    ``Sigma -> E[A_B Sigma A_B^T]`` of the state ``z = (w_t, w_{t-1})`` (heavy ball) or
    ``(w_t, v_{t-1})`` (Nesterov) on symmetric 2k x 2k matrices (section "Momentum"): the
    asymptotic per-step growth factor of ``E||w_t||^2`` (and of ``E||z_t||^2``); stable iff
    ``< 1``. Nothing of size ``(2k)^2 x (2k)^2`` is formed. The map is ``D + E``, D its
    deterministic part (per pair of eigen-directions, ``rho(D) = max_j rho(M_j)^2``) and E the
    noise, and for every ``r > rho(D)``: ``rho(D + E) < r`` iff the Perron root of
    ``G_r o (lr^2 b V_s)`` is below 1, with ``G_r`` the closed-form solution of the 2 x 2
    Stein equation ``r X - M_j X M_k^T = q q^T``. The radius is the root r of that equation
    (a safeguarded Newton iteration on a shared non-symmetric Krylov basis, see
    ``_linalg.ConeKrylov``), and ``bounds=True`` gives a bracket proven by Collatz-Wielandt
    bounds on the full map itself, with the floating-point error of every product enclosed
    (``_verified``; a proof, not an estimate: docs/momentum.md, "How the answers are certified").

    Parameters
    ----------
    family : HessianFamily
    lr : float
        Learning rate, > 0.
    batch_size : float or int
        In [1, n]: a real number for Bernoulli, an integer for the other two schemes.
    sampling : {"bernoulli", "without_replacement", "with_replacement"}
    bounds : bool, default False
        Return the certified ``Bracket`` (value, lower, upper) instead of the value.
    momentum : float, default 0.0
        torch.optim.SGD's momentum, in [0, 1) (0: plain SGD, today's computation bit for bit).
    nesterov : bool, default False
        Nesterov momentum (requires ``momentum > 0``, as torch does).

    Returns
    -------
    float or Bracket

    Raises
    ------
    TypeError, ValueError
        Invalid arguments; the message names the argument.

    Warns
    -----
    CertificationWarning
        The proven bracket is wider than the certification tolerance
        (``fastsgdstab._config.CERTIFY_RTOL`` = 1e-5 relative to the value; near rho = 1,
        relative to ``|1 - rho|``, never tighter than 1e-9 of the value).

    Examples
    --------
    >>> from fastsgdstab import HessianFamily, spectral_radius
    >>> family = HessianFamily.from_features([[1.0], [1.0]])   # H_1 = H_2 = 1: plain GD
    >>> round(spectral_radius(family, lr=0.5, batch_size=1, sampling="without_replacement"), 12)
    0.25
    >>> bracket = spectral_radius(family, lr=0.5, batch_size=1, bounds=True)
    >>> bool(bracket.lower <= bracket.value <= bracket.upper), bracket.certified
    (True, True)
    >>> # Heavy ball without noise (B = n): the largest |eigenvalue|^2 of [[1 + mu - lr, -mu], [1, 0]]
    >>> round(spectral_radius(family, lr=0.5, batch_size=2, momentum=0.5), 12)   # |root|^2 = mu
    0.5
    """
    family = check_family(family)
    sampling = check_sampling(sampling)
    lr = check_lr(lr)
    batch_size = check_batch_size(batch_size, family.population_size, integer=sampling != "bernoulli",
                                  samples=family.n)
    momentum, nesterov = check_momentum(momentum, nesterov)
    reduction = reduced(family)
    if reduction.k == 0:
        bracket = Bracket(1.0, 1.0, 1.0)
    elif momentum != 0.0:
        a, b = map_coefficients(sampling, family.population_size, batch_size)
        solver = MomentumSolver(reduction, sampling)
        x, extra = _momentum_unit_lr(reduction, lr)
        top, log_factor = solver.radius(x, b, momentum, nesterov)
        _warn_uncertified(top, "spectral_radius")
        bracket = _scaled_bracket(top, log_factor + extra)
    else:
        a, b = map_coefficients(sampling, family.population_size, batch_size)
        multiplier, noise_weight, log_factor = second_moment_multiplier(
            reduction.unit_eigenvalues, reduction.unit_lr(lr), a, b)
        x = reduction.unit_lr(lr)
        operator = SandwichOperator(reduction, np.ones((reduction.k, reduction.k)), multiplier,
                                    noise_weight)
        top = top_eigenvalue(operator, what="spectral_radius", certify_rtol=radius_tolerance,
                             scale_hint=second_moment_scale(x))
        # The reduction's own rounding (a family congruent to the user's): Weyl on Q.
        top = widen_radius(top, reduction, x, a, b, log_factor)
        # A spectral radius is >= 0: round-off below 0 (a radius formed by cancellation) is 0.
        top = replace(top, value=max(top.value, 0.0), lower=max(top.lower, 0.0),
                      upper=max(top.upper, 0.0))
        bracket = _scaled_bracket(top, log_factor)
    return bracket if bounds else bracket.value


@blas_policy(size_of=family_work)
def critical_lr(family, batch_size, *, sampling="bernoulli", bounds=False, momentum=0.0,
                nesterov=False):
    """Exact critical learning rate ``eta*``: SGD is mean-square stable iff ``0 < lr <= eta*``.

    ``eta* = 1 / lambda_max(L^{-1/2} D L^{-1/2})`` with ``L(X) = H X + X H`` and
    ``D(X) = a H X H + b N(X)`` (section "Exact critical learning rate"). In H's eigenbasis
    ``L^{-1/2}`` is the entrywise multiplier ``1 / sqrt(lam_j + lam_k)``, so this is one
    matrix-free Lanczos solve: no bisection, no d^2 x d^2 matrix. The eigenvalue is certified
    to be the top one by a proven bracket, and the value returned errs on the stable side: it
    is the Lanczos estimate lowered by its error estimate and rounding (about 1e-13 relative),
    never above the proven upper end, so ``spectral_radius`` there is at most 1. ``math.inf``
    for a family with no curvature. Scale-covariant: ``critical_lr`` of ``c H`` is
    ``critical_lr(H) / c`` for every representable c.

    The learning rate is for the loss convention of the family: ``H_i`` is the Hessian of the
    per-sample loss ``l_i`` with SGD stepping ``(1/B) sum_batch grad l_i``; for
    ``from_features`` that loss is ``(1/2) (x_i . w)^2`` (a loss twice as large, such as
    ``torch.nn.MSELoss`` on a scalar output, halves the critical learning rate).

    With ``momentum > 0`` (section "Momentum"): the smallest lr at which mean-square stability
    is lost, either by the deterministic part (``lr lambda_1 >= 2 (1 + mu)`` heavy ball,
    ``2 (1 + mu) / (1 + 2 mu)`` Nesterov) or by the noise (the Perron root of ``G_lr o V``
    reaching 1, with ``V = lr^2 b V_s`` and ``G_lr`` the closed-form 2 x 2 Stein solution per
    pair of eigen-directions). G depends on lr non-linearly, so this is a root finder (Brent's
    method on a shared non-symmetric Krylov basis of ``V_s``: most of its steps cost no product
    of the noise operator), and ``bounds=True`` gives a proven bracket (stable at ``lower``,
    unstable at ``upper``); the value is the proven-stable end. The proofs first take the gain
    route on k x k matrices (``rho(D) < 1`` by interval arithmetic and
    ``lr^2 b rho(G o V_s) <= 1`` or ``> 1``, with G enclosed in midpoint-radius arithmetic, one
    enclosed product of ``V_s`` and Cholesky-verified Collatz-Wielandt and weighted Rayleigh
    bounds; the deterministic part uses H's computed eigenvalues and the noise the reduced
    factors, as the plain engine does before its widening), and Collatz-Wielandt bounds on the
    full 2k x 2k map with enclosed rounding where that does not certify. That the stable set is
    the interval
    ``(0, eta*)`` is the specification's observation (every case checked), not a theorem.

    Parameters
    ----------
    family : HessianFamily
    batch_size : float or int
        In [1, n]: a real number for Bernoulli, an integer for the other two schemes.
    sampling : {"bernoulli", "without_replacement", "with_replacement"}
    bounds : bool, default False
        Return a ``Bracket`` whose ``lower`` and ``upper`` enclose ``eta*`` (proven).
    momentum : float, default 0.0
        torch.optim.SGD's momentum, in [0, 1) (0: plain SGD, today's computation bit for bit).
    nesterov : bool, default False
        Nesterov momentum (requires ``momentum > 0``, as torch does).

    Returns
    -------
    float or Bracket

    Raises
    ------
    TypeError, ValueError
        Invalid arguments; the message names the argument.

    Examples
    --------
    >>> from fastsgdstab import HessianFamily, critical_lr
    >>> family = HessianFamily.from_features([[1.0], [1.0], [1.0], [1.0]])   # all H_i = 1
    >>> round(critical_lr(family, 2), 12)   # 2 / (1 + 1/B - 1/n)
    1.6
    >>> round(critical_lr(family, 2, sampling="without_replacement"), 12)
    2.0
    >>> # identical samples, no noise beyond Bernoulli's: momentum raises the cap to 2 (1 + mu)
    >>> round(critical_lr(family, 2, sampling="without_replacement", momentum=0.9), 9)
    3.8
    >>> round(critical_lr(family, 2, sampling="without_replacement", momentum=0.9, nesterov=True), 9)
    1.357142857
    """
    family = check_family(family)
    sampling = check_sampling(sampling)
    batch_size = check_batch_size(batch_size, family.population_size, integer=sampling != "bernoulli",
                                  samples=family.n)
    momentum, nesterov = check_momentum(momentum, nesterov)
    reduction = reduced(family)
    if reduction.k == 0:
        bracket = Bracket(math.inf, math.inf, math.inf)
        return bracket if bounds else math.inf
    a, b = map_coefficients(sampling, family.population_size, batch_size)
    if momentum != 0.0:
        root = reduction.root_sharpness
        top = MomentumSolver(reduction, sampling).critical_unit_lr(b, momentum, nesterov)

        # The unit answers are proven for the reduced unit family; converting to an lr divides
        # by lambda_1, whose computed value carries the reduction's eigensolver error (a few
        # ulps times k: not proven here, see issue 17 item 1) and two roundings. The ends move
        # outward by that much (32 k ulps: far below the brackets' width).
        margin = 32.0 * reduction.k * np.finfo(float).eps

        def unit_to_lr(x, direction):
            with np.errstate(over="ignore", under="ignore"):
                value = np.float64(x) / root / root
                value = value * (1.0 - margin if direction < 0 else 1.0 + margin)
                for _ in range(2):
                    value = np.nextafter(value, direction)
                return max(float(value), 0.0)

        result = replace(top, value=unit_to_lr(top.value, -math.inf),
                         lower=unit_to_lr(top.lower, -math.inf),
                         upper=unit_to_lr(top.upper, math.inf), error=0.0)
        _warn_uncertified(result, "critical_lr")
        return result if bounds else result.value
    m = reduction.unit_eigenvalues
    operator = SandwichOperator(reduction, 1.0 / np.sqrt(pair_sum(m)), a * pair_product(m), b)
    perturbations = ratio_perturbations(reduction, a, b)
    # The engine aims at the tolerance minus what the widening below adds (ratio_tolerance).
    top = top_eigenvalue(operator, what="critical_lr", certify_rtol=ratio_tolerance(*perturbations),
                         warn=False)
    # The value errs on the stable side by the solver's own estimates (as before); the bracket
    # is then widened by the reduction's proven backward error, which bounds how far the user's
    # family can be from the engine's, and judged (one warning, on the user's bracket).
    safe = safe_upper_value(top)
    top = widen_ratio(top, *perturbations)
    safe = min(max(safe, top.lower), top.upper)
    top = replace(top, certified=bool(top.upper - top.lower <= CERTIFY_RTOL * abs(top.value)))
    _warn_uncertified(top, "critical_lr")
    root = reduction.root_sharpness

    def lr_of(value):
        # 1 / (value * lambda_1) without forming lambda_1 (which may overflow).
        with np.errstate(over="ignore", under="ignore", divide="ignore"):
            return float(np.float64(1.0) / value / root / root)

    result = Bracket(lr_of(safe), lr_of(top.upper), lr_of(top.lower),
                     top.products, certified=top.certified)
    return result if bounds else result.value


@blas_policy(size_of=family_work)
def critical_batch_size(family, lr, *, sampling="bernoulli", bounds=False, momentum=0.0,
                        nesterov=False):
    """Smallest batch size in [1, n] at which SGD with this ``lr`` is mean-square stable.

    A real number for Bernoulli sampling (its batch size is a mean); for the two schemes that
    draw exactly B samples, the smallest stable integer B (``bounds=True`` gives the real
    threshold).

    With ``R = L - lr H(x)H`` the batch size enters through one scalar ``q`` (section "Exact
    critical batch size"): stable iff ``q <= q* = 1 / (lr lambda_max(R^{-1/2} V R^{-1/2}))``,
    ``V = N`` (Bernoulli) or ``N - H(x)H``. Every larger batch size is stable too. Returns 1.0
    when every batch size is stable and ``math.inf`` when none is (``lr lambda_1(H) > 2``, or
    with replacement even B = n is unstable). The eigenvalue is certified to be the top one
    (``bounds=True`` gives the proven bracket); the value is accurate to about 1e-12 relative.
    Round up for an integer batch.

    With ``momentum > 0`` (section "Momentum"): the gain G of the deterministic part does not
    depend on the batch size, so ``q* = 1 / (lr^2 rho(G o V_s))`` is still one (certified,
    non-symmetric Krylov) eigensolve; ``math.inf`` when ``lr lambda_1`` reaches the deterministic
    cap ``2 (1 + mu)`` (heavy ball) or ``2 (1 + mu) / (1 + 2 mu)`` (Nesterov).

    Parameters
    ----------
    family : HessianFamily
    lr : float
        Learning rate, > 0.
    sampling : {"bernoulli", "without_replacement", "with_replacement"}
    bounds : bool, default False
        Return a ``Bracket`` whose ``lower`` and ``upper`` enclose the critical batch size.
    momentum : float, default 0.0
        torch.optim.SGD's momentum, in [0, 1) (0: plain SGD, today's computation bit for bit).
    nesterov : bool, default False
        Nesterov momentum (requires ``momentum > 0``, as torch does).

    Returns
    -------
    float, int or Bracket
        A float for Bernoulli, an int (or ``math.inf``) for the other schemes; with
        ``bounds=True`` a ``Bracket`` of the real threshold.

    Raises
    ------
    TypeError, ValueError
        Invalid arguments; the message names the argument.

    Examples
    --------
    >>> from fastsgdstab import HessianFamily, critical_batch_size
    >>> family = HessianFamily.from_features([[1.0], [1.0], [1.0], [1.0]])
    >>> round(critical_batch_size(family, lr=1.6), 9)   # inverse of critical_lr's example
    2.0
    >>> critical_batch_size(family, lr=2.5)
    inf
    >>> family = HessianFamily.from_features([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.5]])
    >>> critical_batch_size(family, lr=0.8, sampling="without_replacement")   # an integer
    2
    >>> bracket = critical_batch_size(family, lr=0.8, sampling="without_replacement", bounds=True)
    >>> 1 < bracket.value <= 2   # the real threshold
    True
    >>> # lr = 2.5 is beyond gradient descent's 2 / lambda_1, not beyond heavy ball's 2 (1 + mu):
    >>> family = HessianFamily.from_features([[1.0], [1.0], [1.0], [1.0]])
    >>> round(critical_batch_size(family, lr=2.5, momentum=0.5), 9)   # 60 / 19
    3.157894737
    """
    family = check_family(family)
    sampling = check_sampling(sampling)
    lr = check_lr(lr)
    momentum, nesterov = check_momentum(momentum, nesterov)
    reduction = reduced(family)
    n = family.population_size  # the batch law's N (a probe's training set; n by default)

    def constant(value):
        return Bracket(value, value, value) if bounds else _as_batch(value, sampling)

    if reduction.k == 0:
        return constant(1.0)
    x = reduction.unit_lr(lr)
    if momentum != 0.0:
        if x >= momentum_cap(momentum, nesterov):
            return constant(math.inf)
        solver = MomentumSolver(reduction, sampling)
        _, b_max = map_coefficients(sampling, n, 1.0)
        if x < _MOMENTUM_SMALL_UNIT_LR:
            # The noise is O(x^2) and the damping O(x): at so small an lr the full map's margin
            # below 1 is under the rounding of its entries, so stability at B = 1 is proven
            # through the critical lr at B = 1 (stable for every lr up to its proven lower end).
            bound = solver.critical_unit_lr(b_max, momentum, nesterov)
            if x <= bound.lower:
                return constant(1.0)
        top = solver.noise_threshold(x, momentum, nesterov, b_max)
        # q* = 1 / (x^2 theta): the same map from eigenvalue to batch size as below, with x^2.
        return _batch_result(top, x * x, sampling, n, bounds)
    if x > 2.0:
        return constant(math.inf)
    m = reduction.unit_eigenvalues
    if x == 2.0:
        # On the gradient-descent boundary (rho = 1 along the top direction): only a batch with
        # no noise at all is stable, which B = n gives for the two schemes without repeats.
        return constant(float(n) if sampling != "with_replacement" else math.inf)
    remainder = pair_sum(m) - x * pair_product(m)
    interaction = 0.0 if sampling == "bernoulli" else -1.0
    # R^{-1/2} o and V both preserve the PSD cone (V(X) = (1/n) sum_i (H_i - H) X (H_i - H) for
    # the schemes with interaction), so the identity start overlaps the top eigenvector.
    operator = SandwichOperator(reduction, 1.0 / np.sqrt(remainder), interaction * pair_product(m), 1.0)
    top = top_eigenvalue(operator, what="critical_batch_size", warn=False)
    top = widen_ratio(top, *ratio_perturbations(reduction, 0.0, 1.0, interaction, x))

    return _batch_result(top, x, sampling, n, bounds)


def _batch_result(top: Bracket, factor: float, sampling: str, n: int, bounds: bool):
    """The critical batch size from the certified top eigenvalue ``theta`` of the noise operator
    (``q* = 1 / (factor theta)``), with its bracket and certification verdict."""

    def batch_of(value):
        if not value > 0.0:
            return 1.0
        with np.errstate(over="ignore", divide="ignore"):
            critical_noise = float(np.float64(1.0) / (factor * value))
        batch = batch_size_from_noise(sampling, n, critical_noise)
        if batch > n:
            return math.inf
        return max(batch, 1.0)

    # The value is the batch size of the Lanczos estimate itself (unbiased, accurate to about
    # 1e-12): critical_lr, not this function, carries the margin toward stability, so that
    # critical_batch_size(critical_lr(B)) <= B holds.
    lower, upper = batch_of(top.lower), batch_of(top.upper)
    # Certified when the eigenvalue's bracket is tight, or when the batch sizes at its two ends
    # agree (an eigenvalue near 0, as for identical samples, has a bracket wide relative to
    # itself, but every value in it gives batch size 1).
    certified = top.certified or lower == upper or abs(upper - lower) <= CERTIFY_RTOL * abs(
        batch_of(top.value))
    result = Bracket(batch_of(top.value), lower, upper, top.products, certified=certified)
    if not certified:
        warn(
            f"critical_batch_size: the critical batch size is proven only to lie in "
            f"[{result.lower:.12g}, {result.upper:.12g}] (value {result.value:.12g}); the bracket "
            f"is wider than the certification tolerance", CertificationWarning)
    if bounds:
        return result
    return _as_batch(result.value, sampling)


def _warn_uncertified(bracket: Bracket, what: str) -> None:
    if not bracket.certified:
        warn(
            f"{what}: the answer is proven only to lie in [{bracket.lower:.12g}, "
            f"{bracket.upper:.12g}] (value {bracket.value:.12g}); the bracket is wider than the "
            f"certification tolerance", CertificationWarning)


def _as_batch(value: float, sampling: str):
    """The answer in the scheme's own terms: a real batch size for Bernoulli (its mean), the
    smallest integer at or above the real threshold otherwise (``math.inf`` stays ``inf``).

    The real threshold is accurate to about 1e-12, so it is lowered by ``INTEGER_BATCH_RTOL``
    before rounding up: a threshold of exactly 2 computed as 2.0000000000001 is still 2.
    """
    if sampling == "bernoulli" or not math.isfinite(value):
        return value
    return max(1, math.ceil(value * (1.0 - INTEGER_BATCH_RTOL)))
