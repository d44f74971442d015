"""The loss floor of SGD at a minimum that does not interpolate: the stationary covariance.

Specification page, section "Non-interpolating minima: stationary covariance and the loss
floor". Where the per-sample gradients ``g_i`` do not vanish, linearised SGD is affine,
``w_{t+1} = (I - lr H_B) w_t - lr g_B``, and below the critical learning rate its covariance
tends to the unique solution of

    (L - lr D)(Sigma) = lr b S_g,   L(X) = H X + X H,  D(X) = a H X H + b N(X),

with ``S_g = (1/n) sum g_i g_i^T`` and the scheme's ``a, b`` (section "The exact second-moment
map"). The loss floor is the stationary excess loss ``(1/2) tr(H Sigma)``. With momentum the
stationary ``Sigma_11 = X`` solves ``(I - G o V) X = G o (b S_g)`` in H's eigenbasis (section
"Momentum"'s gain G and noise V).

Everything is computed in H's eigenbasis on its range, in units of the sharpness, with the
same operators as the critical learning rate: nothing of size d^2 x d^2 is formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._config import (GRADIENT_RANGE_RTOL, RESHUFFLE_ESTIMATE_RTOL, RESHUFFLE_MAX_STEPS,
                      STATIONARY_MAX_PRODUCTS, STATIONARY_RTOL)
from ._engine import (
    Bracket,
    MomentumDynamics,
    SandwichOperator,
    check_family,
    check_momentum,
    momentum_cap,
    momentum_noise_operator,
    pair_product,
    pair_sum,
    range_basis,
    ratio_perturbations,
    reduced,
    top_eigenvalue,
)
from ._rounding import UNIT_ROUNDOFF, down, gamma, up
from ._threads import blas_policy, family_work
from ._validation import check_batch_size, check_lr, check_real_scalar
from .family import power_of_two_scale
from .sampling import check_sampling, map_coefficients

__all__ = ["StationaryResult", "StationaryEstimate", "stationary", "NoStationaryStateError",
           "max_lr_for_excess_loss", "min_batch_size_for_excess_loss", "LossFloorBracket"]


class NoStationaryStateError(ValueError):
    """SGD has no stationary state at these settings: the learning rate is at or above the
    critical one (``eta_star`` holds it, in the loss's own convention), or the gradients have a
    part along flat directions of H (``outside`` holds its relative size)."""

    def __init__(self, message: str, *, eta_star: float = math.nan, outside: float = math.nan):
        super().__init__(message)
        self.eta_star = eta_star
        self.outside = outside


@dataclass(frozen=True)
class StationaryResult:
    """The stationary state of linearised SGD at a non-interpolating minimum.

    Attributes
    ----------
    excess_loss : float
        ``(1/2) tr(H Sigma_inf)``: the time-averaged training loss above its minimum once SGD
        has settled, in the convention of the loss whose Hessians the family holds (exact up
        to the solver's residual: ``lower <= excess_loss <= upper`` is proven).
    lower, upper : float
        A proven bracket on the exact excess loss, from the final residual and a proven lower
        bound on the smallest eigenvalue of the (preconditioned) operator.
    relative_residual : float
        ``||r - A y|| / ||r||`` of the final iterate, recomputed (not the recursive one).
    products : int
        Operator products spent (the eigen-solve that proves existence, the solve, the checks).
    covariance : ndarray (d, d) or None
        ``Sigma_inf = lim E[w_t w_t^T]`` in parameter space (with momentum: of the parameters,
        the block ``Sigma_11``); only when requested.
    reduced_covariance : ndarray (k, k) or None
        The same in H's eigenbasis on its range (k = rank H), when requested.
    lr, batch_size, sampling, momentum, nesterov
        The settings.
    eta_star : float
        The critical learning rate of the same settings, in the loss's own convention (plain
        SGD: from the eigen-solve that proves existence; with momentum ``nan``: existence is
        proven directly by a Collatz-Wielandt bound, without computing ``eta*``).
    """

    excess_loss: float
    lower: float
    upper: float
    relative_residual: float
    products: int
    lr: float
    batch_size: float
    sampling: str
    momentum: float = 0.0
    nesterov: bool = False
    eta_star: float = math.nan
    covariance: np.ndarray | None = None
    reduced_covariance: np.ndarray | None = None

    def __str__(self) -> str:
        return (f"stationary excess loss {self.excess_loss:.6g} (proven in [{self.lower:.6g}, "
                f"{self.upper:.6g}]; loss's own convention) at lr={self.lr:g}, "
                f"batch_size={self.batch_size:g}, sampling={self.sampling!r}"
                + (f", momentum={self.momentum:g}{' (Nesterov)' if self.nesterov else ''}"
                   if self.momentum else ""))


@dataclass(frozen=True)
class StationaryEstimate:
    """The loss floor under random reshuffling: a Monte-Carlo ESTIMATE, not a proven bracket.

    Reshuffled epochs (``DataLoader(shuffle=True)``) have no one-step second-moment map
    (specification page, section "Random reshuffling"): the epoch is the i.i.d. unit and its
    exact map is an average over all n! permutations. :func:`stationary` with
    ``sampling="reshuffle"`` therefore simulates the linearised affine model itself
    (:func:`fastsgdstab.simulate` on the family restricted to H's range, from the minimum) and
    time-averages ``(1/2) w_t^T H w_t`` after a burn-in.

    Attributes
    ----------
    excess_loss : float
        The estimated time-averaged excess loss once SGD has settled, in the loss's own
        convention (the Hessians the family holds). An estimate: see ``stderr``.
    stderr : float
        Its standard error (from the spread of ``runs`` independent runs' time averages).
    relative_stderr : float
        ``stderr / excess_loss`` (0 when both are 0).
    transient_bound : float
        A heuristic bound, relative to the floor, on the bias left by starting at the minimum:
        each eigendirection j of H relaxes at the rate ``rho_j`` of the mean iteration
        (``|1 - lr lambda_j|``, or the 2 x 2 momentum matrix's), and ``burn_in`` is chosen so
        that ``sum_j c_j rho_j^(2 burn_in) <= transient_bound * sum_j c_j`` with ``c_j =
        lambda_j (S_g)_jj / (1 - rho_j^2)`` the direction's i.i.d.-like share of the floor. Not
        proven (reshuffling is not i.i.d.); 1e-3 unless the step budget capped the burn-in.
    burn_in, steps, runs : int
        The simulation: steps per run (burn-in included) and independent runs.
    seed : int
    lr, batch_size, sampling, momentum, nesterov, drop_last
        The settings (``sampling`` is "reshuffle").
    eta_star_iid : float
        The exact critical learning rate of independent batches of the same size drawn without
        replacement (for reference: reshuffling has no exact one; the loss's own convention).
    small_lr_limit : float
        The exact leading term of the floor's small-lr expansion at this lr: with m = N / B
        steps per epoch, ``v = (1/n) sum_i H_i g_i`` and the centred gradients,
        ``(lr^2 / 2) [((m - 1) / (2 (N - 1)))^2 v^T H^+ v + (1/m) sum_{j<m} j B (N - j B) /
        ((N - 1) B^2) tr(H S_g)]``: the within-epoch excursion (a sum of batches drawn without
        replacement, a bridge back to 0 at the epoch's end) and the drift of the epoch's mean
        (the O(lr^2) term of the epoch's affine map, E[H_B' g_B] over disjoint batches). The
        floor over it tends to 1 as lr -> 0 (checked against enumeration of every permutation);
        ``nan`` with momentum or when the epoch's batches do not use every sample exactly once
        (B not dividing N).
    exact : bool
        Always False: this is an estimate.
    """

    excess_loss: float
    stderr: float
    relative_stderr: float
    transient_bound: float
    burn_in: int
    steps: int
    runs: int
    seed: int
    lr: float
    batch_size: float
    sampling: str = "reshuffle"
    momentum: float = 0.0
    nesterov: bool = False
    drop_last: bool = False
    eta_star_iid: float = math.nan
    small_lr_limit: float = math.nan
    exact: bool = False

    def __str__(self) -> str:
        return (f"estimated stationary excess loss {self.excess_loss:.6g} +/- {self.stderr:.2g} "
                f"(standard error; Monte Carlo of the linearised model over {self.runs} runs of "
                f"{self.steps} steps after a burn-in of {self.burn_in}, not a proven bracket; "
                f"loss's own convention) at lr={self.lr:g}, batch_size={self.batch_size:g}, "
                f"sampling='reshuffle'" + (", drop_last=True" if self.drop_last else "")
                + (f", momentum={self.momentum:g}{' (Nesterov)' if self.nesterov else ''}"
                   if self.momentum else ""))


def centred_unit_gradients(family, reduction):
    """``(G, s)``: the per-sample gradients in H's eigenbasis on its range, moved to the minimum
    of the quadratic model and divided by the power of two ``sqrt(s)``, shape (n, k); raises
    when the family has no gradients or a part of them lies outside the range of H.

    A non-zero mean ``gbar`` (in the range) is a point that is not a minimum: with
    ``w' = w + H^+ gbar`` the iteration is the same with ``g_i' = g_i - H_i H^+ gbar``, whose
    mean is zero, so the floor is measured from the quadratic model's minimum.
    """
    data = family._reduced_gradients
    if data is None:
        raise ValueError("family has no per-sample gradients: build it with gradients=... (an "
                         "(n, d) array of the per-sample loss gradients at the point), e.g. "
                         "HessianFamily(factors, gradients=g)")
    gradients, outside = data
    if outside > GRADIENT_RANGE_RTOL:
        raise NoStationaryStateError(
            f"the per-sample gradients have a part outside the range of H (flat directions of the "
            f"loss) of relative size {outside:.3g} (root-mean-square norm of that part over that of "
            f"the gradients; tolerated up to GRADIENT_RANGE_RTOL = {GRADIENT_RANGE_RTOL:g}): along "
            f"those directions SGD random-walks and its covariance grows without limit, so there "
            f"is no stationary state and no loss floor", outside=outside)
    n, k = gradients.shape[0], reduction.k
    if k == 0:
        return np.zeros((n, 0)), 1.0
    units, unit = power_of_two_scale(gradients)
    mean = units.mean(axis=0)
    if np.any(mean):
        # H_i in units of lambda_1 is rows_i^T rows_i, H = diag(m): g_i - H_i H^+ gbar.
        r = reduction.rank
        rows = reduction.unit_rows.reshape(n, r, k)
        shift = mean / reduction.unit_eigenvalues
        units = units - np.einsum("irk,ir->ik", rows, rows @ shift)
        units, extra = power_of_two_scale(units)
        unit *= extra
    return units, unit * unit


def _conjugate_gradients(apply, rhs, rtol, max_products):
    """Conjugate gradients for a symmetric positive definite ``apply`` on k x k symmetric
    matrices (Frobenius inner product) from 0. Returns ``(Z, products)``."""
    Z = np.zeros_like(rhs)
    residual = rhs.copy()
    direction = residual.copy()
    rho = float(np.vdot(residual, residual))
    goal = (rtol * math.sqrt(rho)) ** 2
    products = 0
    while rho > goal and products < max_products:
        image = apply(direction)
        products += 1
        curvature = float(np.vdot(direction, image))
        if not curvature > 0:
            break
        alpha = rho / curvature
        Z += alpha * direction
        residual -= alpha * image
        new_rho = float(np.vdot(residual, residual))
        direction = residual + (new_rho / rho) * direction
        rho = new_rho
    return Z, products


def _warn_short(relative, rtol, method, detail):
    from ._linalg import CertificationWarning
    from ._warnings import warn
    warn(f"stationary: {method} reached relative residual {relative:.3g}, not the {rtol:g} asked, "
         f"within {STATIONARY_MAX_PRODUCTS} products{detail}; the result's [lower, upper] is "
         f"still proven, and wider", CertificationWarning)


def _eta_star_text(eta_star: float) -> str:
    return f"{eta_star:.10g}" if math.isfinite(eta_star) else "inf"


@blas_policy(size_of=family_work)
def stationary(family, lr, batch_size, *, sampling="bernoulli", momentum=0.0, nesterov=False,
               covariance=False, rtol=STATIONARY_RTOL, drop_last=False, seed=0,
               estimate_rtol=RESHUFFLE_ESTIMATE_RTOL):
    """The loss floor: the stationary excess loss of SGD at a minimum that does not interpolate.

    Solves ``(L - lr D)(Sigma) = lr b S_g`` (specification page, section "Non-interpolating
    minima: stationary covariance and the loss floor") for the stationary covariance of
    linearised SGD ``w_{t+1} = (I - lr H_B) w_t - lr g_B`` and returns the excess loss
    ``(1/2) tr(H Sigma_inf)``, the loss's time average above its minimum once SGD has settled.
    Matrix-free: preconditioned conjugate gradients with the preconditioner ``L^{-1}``
    (entrywise ``1 / (l_j + l_k)`` in H's eigenbasis), one operator product per iteration, on
    ``I - lr L^{-1/2} D L^{-1/2}``, the operator whose top eigenvalue gives ``eta*`` (section
    "Exact critical learning rate"). The same eigen-solve proves that the state exists
    (``lr < eta*``) and bounds the smallest eigenvalue below by ``1 - lr / eta*``; with the
    final residual this proves the bracket ``[lower, upper]``. It is the bracket of the user's
    own family: the reduction to H's eigenbasis has a backward error (``Reduction``'s relative
    errors, about the unit roundoff times H's condition number) and the gradients are rotated
    into that basis with rounding; both are bounded without a first-order approximation and
    widen the bracket (``A = L - lr D >= (1 - lr / eta*) L`` turns the relative perturbations
    of L and D into one of A; see ``_user_family_error``).

    With ``momentum > 0`` (torch.optim.SGD's heavy ball, or Nesterov): the stationary
    parameter covariance ``X`` solves ``(I - G o V) X = G o (b S_g)`` in H's eigenbasis (section
    "Momentum": G the closed-form Stein gain, V the noise operator), a non-symmetric system:
    GMRES, and a second solve ``(I - G o V) W = I`` whose Collatz-Wielandt bound proves that the
    state exists (``rho(G o V) < 1``) and bounds the error. This bracket is proven for the
    engine's reduced family (H's eigenbasis on its range, the gradients' coordinates there); the
    reduction's backward error is not in it, so for an ill-conditioned H (condition near
    1 / u) the user's floor may lie outside it by about u times the condition number.

    The per-sample gradients are the family's (``HessianFamily(..., gradients=g)``). If their
    mean is not zero, the point is not a minimum; the floor is then that of the quadratic
    model around its own minimum (gradients ``g_i - H_i H^+ gbar``).

    Random reshuffling (``sampling="reshuffle"``, what ``DataLoader(shuffle=True)`` does) has no
    one-step map and no exact equation (section "Random reshuffling": the epoch is the i.i.d.
    unit, an average over n! permutations). There the result is a :class:`StationaryEstimate`,
    a Monte-Carlo *estimate* with a standard error, not a proven bracket: the linearised affine
    model (the same H_i and g_i, restricted to H's range) is simulated from its minimum by
    :func:`fastsgdstab.simulate` and ``(1/2) w^T H w`` is time-averaged after a burn-in chosen
    from the relaxation rates of H's eigendirections, with more runs until the relative
    standard error reaches ``estimate_rtol`` (or the step budget ``RESHUFFLE_MAX_STEPS`` is
    spent: a ``SimulationWarning`` then says so). Within an epoch every sample is used once,
    so the gradient noise of consecutive steps cancels: at small lr the reshuffled floor is
    far below the i.i.d. one (it grows like lr^2, not lr), near ``eta*`` the two meet.
    Whether a reshuffled stationary state exists is not decided exactly either: runs that
    leave the float range or keep growing raise ``NoStationaryStateError``, and a
    ``SimulationWarning`` is given at or above the i.i.d. critical lr (without replacement)
    and when the standard error is not reached; a mean-square divergence carried by rare runs
    while typical runs stay bounded (a heavy tail) shows only as a large standard error.

    Parameters
    ----------
    family : HessianFamily
        With per-sample gradients.
    lr : float
        Learning rate, > 0, in the loss's own convention (the H_i are its Hessians).
    batch_size : float or int
        In [1, n]: a real number for Bernoulli, an integer for the other two schemes.
    sampling : {"bernoulli", "without_replacement", "with_replacement", "reshuffle"}
        The three i.i.d. schemes are exact; "reshuffle" is estimated (see above).
    momentum : float, default 0.0
        torch.optim.SGD's momentum, in [0, 1).
    nesterov : bool, default False
    covariance : bool, default False
        Also return the stationary covariance (d x d, and k x k in H's eigenbasis); i.i.d.
        schemes only.
    rtol : float, default ``STATIONARY_RTOL`` (1e-10)
        Relative residual at which the solver stops (i.i.d. schemes).
    drop_last : bool, default False
        "reshuffle" only: skip an epoch's short last batch, as ``DataLoader(drop_last=True)``.
    seed : int, default 0
        "reshuffle" only: the simulation's seed (the same seed gives the same estimate).
    estimate_rtol : float, default ``RESHUFFLE_ESTIMATE_RTOL`` (0.01)
        "reshuffle" only: the relative standard error to reach, in (0, 1).

    Returns
    -------
    StationaryResult or StationaryEstimate
        ``StationaryResult`` (exact, proven bracket) for the i.i.d. schemes,
        ``StationaryEstimate`` (Monte Carlo, standard error) for "reshuffle".

    Raises
    ------
    NoStationaryStateError (a ValueError)
        ``lr`` at or above the critical learning rate (the message gives ``eta*``; no
        stationary state: the covariance grows without limit), or gradients with a part along
        flat directions of H (the message gives its relative size).
    ValueError, TypeError
        Invalid arguments, or a family without gradients.

    Examples
    --------
    One parameter, identical curvature h = 1, gradients +-1 (d = 1 closed form of the
    specification: ``Sigma = lr b S_g / (2 h - lr (a + b) h^2)``):

    >>> import fastsgdstab as fs
    >>> family = fs.HessianFamily.from_features([[1.0], [1.0]], gradients=[[1.0], [-1.0]])
    >>> result = fs.stationary(family, lr=0.5, batch_size=1, sampling="with_replacement")
    >>> round(result.excess_loss, 12)   # (1/2) 0.5 / (2 - 0.5) = 1/6
    0.166666666667
    >>> bool(result.lower <= 1 / 6 <= result.upper)
    True
    >>> fs.stationary(family, lr=2.5, batch_size=1, sampling="with_replacement")
    Traceback (most recent call last):
    ...
    fastsgdstab.loss_floor.NoStationaryStateError: no stationary state: lr = 2.5 is at or above the critical learning rate eta* = 2 (sampling='with_replacement', batch_size=1; the loss's own convention): the covariance grows without limit

    Reshuffled epochs of one sample: each epoch uses both gradients once, so their noise
    cancels and the floor is far below the i.i.d. one (an estimate with a standard error):

    >>> estimate = fs.stationary(family, lr=0.5, batch_size=1, sampling="reshuffle",
    ...                          estimate_rtol=0.02)
    >>> estimate.exact   # exact by hand: 1/12, half the i.i.d. floor 1/6
    False
    >>> bool(abs(estimate.excess_loss - 1 / 12) < 5 * estimate.stderr)
    True
    """
    family = check_family(family)
    if isinstance(sampling, str) and sampling == "reshuffle":
        return _stationary_reshuffle(family, lr, batch_size, momentum, nesterov, covariance,
                                     drop_last, seed, estimate_rtol)
    if drop_last is not False:
        raise ValueError(f"drop_last applies to sampling='reshuffle' only (epochs of a "
                         f"permutation); got drop_last={drop_last!r} with sampling={sampling!r}")
    sampling = check_sampling(sampling)
    lr = check_lr(lr)
    batch_size = check_batch_size(batch_size, family.population_size, integer=sampling != "bernoulli",
                                  samples=family.n)
    momentum, nesterov = check_momentum(momentum, nesterov)
    rtol = check_real_scalar(rtol, "rtol")
    if not (0.0 < rtol < 1.0):
        raise ValueError(f"rtol must lie in (0, 1); got {rtol}")
    return _stationary(family, lr, batch_size, sampling, momentum, nesterov, covariance, rtol)


def _stationary(family, lr, batch_size, sampling, momentum, nesterov, covariance, rtol):
    """``stationary`` on checked arguments (a real batch size for every scheme: the inverse
    questions search over it)."""
    reduction = reduced(family)
    units, scale = centred_unit_gradients(family, reduction)
    a, b = map_coefficients(sampling, family.population_size, batch_size)
    k = reduction.k
    settings = dict(lr=lr, batch_size=batch_size, sampling=sampling, momentum=momentum,
                    nesterov=nesterov)
    where = (f"sampling={sampling!r}, batch_size={batch_size:g}"
             + (f", momentum={momentum:g}" + (", nesterov=True" if nesterov else "")
                if momentum else ""))
    if k == 0:
        # No curvature and (checked above) no gradient: nothing moves.
        return _result(0.0, 0.0, 0.0, 0.0, 0, math.inf, None, family, reduction, covariance,
                       settings)
    noise = units.T @ units / family.n  # S_g / s in H's eigenbasis (unit-free)
    x = reduction.unit_lr(lr)
    if momentum != 0.0:
        return _stationary_momentum(family, reduction, noise, scale, x, a, b, where, covariance,
                                    settings, rtol, units)
    m = reduction.unit_eigenvalues
    root_inverse = 1.0 / np.sqrt(pair_sum(m))  # C = L^{-1/2}, entrywise (units)
    operator = SandwichOperator(reduction, root_inverse, a * pair_product(m), b)
    top = top_eigenvalue(operator, what="stationary")
    products = top.products

    def eta_star(value):
        with np.errstate(over="ignore", divide="ignore"):
            return float(lr / (x * value)) if value > 0 else math.inf

    if x * top.lower >= 1.0:
        raise NoStationaryStateError(
            f"no stationary state: lr = {lr:.10g} is at or above the critical learning rate eta* = "
            f"{_eta_star_text(eta_star(top.value))} ({where}; the loss's own convention): the "
            f"covariance grows without limit", eta_star=eta_star(top.value))
    # proven lower bound of the smallest eigenvalue of I - x K (rounded down)
    gap = float(down(1.0 - float(up(x * top.upper))))
    if not gap > 0.0:
        raise NoStationaryStateError(
            f"no stationary state can be proven: lr = {lr:.10g} lies within the proven bracket "
            f"[{eta_star(top.upper):.10g}, {eta_star(top.lower):.10g}] of the critical learning "
            f"rate ({where}); below it the floor is finite but unbounded as lr -> eta*",
            eta_star=eta_star(top.value))
    if b == 0.0 or not np.any(noise):
        # Gradient descent (B = n) or no gradient noise: the iterates converge, no floor.
        return _result(0.0, 0.0, 0.0, 0.0, products, eta_star(top.value), np.zeros((k, k)),
                       family, reduction, covariance, settings)

    def apply(Z):
        return Z - x * operator(Z)

    rhs = root_inverse * noise
    rhs_error = _rhs_error(units, root_inverse, family.n)
    rhs_norm = float(np.linalg.norm(rhs))
    Z = np.zeros((k, k))
    residual = rhs
    relative = 1.0
    budget = STATIONARY_MAX_PRODUCTS
    for _ in range(4):  # restarts from the true residual; more do not beat rounding
        correction, spent = _conjugate_gradients(apply, residual, rtol / 4.0, budget)
        products += spent
        budget -= spent
        Z = Z + correction
        Z = 0.5 * (Z + Z.T)
        residual = rhs - apply(Z)  # the true residual (the recursive one drifts)
        products += 1
        relative = float(np.linalg.norm(residual)) / rhs_norm
        if relative <= rtol or budget <= 0 or spent == 0:
            break
    if relative > rtol:
        # Near eta* (condition number 1 / (1 - lr / eta*)) rounding can stop CG short of rtol:
        # the bracket below is still proven, only wider; say so.
        _warn_short(relative, rtol, "conjugate gradients", f" (lr / eta* = {x * top.value:.9g})")
    # excess = (1/2) lr b s tr(M Y), Y = C o Z; tr(M (C o Z)) = <F, Z>, F = diag(m_j C_jj).
    # The bracket is proven with every rounding bounded (_rounding): the true residual of the
    # stored Z (the operator product's own rounding by error_of, the right-hand side's and the
    # residual's formation), the computed preconditioner's departure from L^{-1/2} and the
    # rounding of x, of the weights, of the trace and of the final factor.
    image = operator(Z)
    products += 2  # the image and error_of's product of the absolute operator
    residual_bound, gap_bound = _residual_bound(rhs, rhs_error, Z, image, operator.error_of(Z), x,
                                                gap, root_inverse, m)
    if not gap_bound > 0.0:
        raise NoStationaryStateError(
            f"no stationary state can be proven: lr = {lr:.10g} lies within rounding of the "
            f"critical learning rate {_eta_star_text(eta_star(top.value))} ({where})",
            eta_star=eta_star(top.value))
    weights = m * np.diag(root_inverse)
    base = float(weights @ np.diag(Z))
    weight_norm = up(float(np.linalg.norm(weights)) * (1.0 + gamma(k + 2)))
    trace_error = gamma(k + 2) * float(np.abs(weights) @ np.abs(np.diag(Z)))
    error = float(up(weight_norm * residual_bound / gap_bound + trace_error))
    # The bracket so far is that of the engine's reduced family; widen it to the user's own.
    error = float(up(error + _user_family_error(family, reduction, units, noise, x, a, b,
                                                gap_bound)))
    factor = 0.5 * lr * b * scale
    value, lower, upper = _scaled(factor, base, error,
                                  _factor_rtol(family.population_size, batch_size))
    Y = root_inverse * Z
    return _result(value, lower, upper, relative, products,
                   eta_star(top.value), lr * b * scale / reduction.sharpness * Y, family,
                   reduction, covariance, settings)


def _gradient_error(family, reduction, units):
    """Entrywise bound on ``|U_true - U|`` for the centred unit gradients ``U`` of
    :func:`centred_unit_gradients`: ``U_true`` are the user's gradients' coordinates in the basis
    the engine's eigenvectors stand for (``columns^T rows / (n lambda)`` in exact arithmetic),
    centred exactly with the engine's per-sample Hessians, over ``sqrt(s)``. Counted: the
    rounding of the basis, of the rotation ``g B`` and of the centring, and the computed mean's
    error carried through the centring's ``H^+``."""
    n, k, r = family.n, reduction.k, reduction.rank
    gradients, _ = power_of_two_scale(np.asarray(family._gradients, dtype=np.float64))
    columns, column_scale = power_of_two_scale(family._columns())
    denominator = n * reduction.unit_eigenvalues * (reduction.root_sharpness / column_scale)
    basis = columns.T @ reduction.unit_rows / denominator
    basis_error = gamma(n * r + 4) * (np.abs(columns).T @ np.abs(reduction.unit_rows)) / denominator
    # rotation: gamma(d) of |g| |B| for the product, plus |g| times B's own error
    rotated = gamma(family.d + 2) * (np.abs(gradients) @ np.abs(basis)) \
        + np.abs(gradients) @ basis_error * (1.0 + gamma(family.d + 2))
    # in the scale of U before centring: G = g_scaled B * unit, U0 = G / unit0, so the ratio of
    # the computed arrays gives the scale exactly (powers of two) where G is not 0
    inside = gradients @ basis
    largest = float(np.max(np.abs(inside))) if inside.size else 0.0
    if not largest > 0:
        return np.zeros_like(units)
    _, unit0 = power_of_two_scale(inside)  # U0 = inside / unit0 (exact)
    e0 = rotated / unit0
    units0 = inside / unit0
    mean = units0.mean(axis=0)
    if np.any(mean):
        rows = np.abs(reduction.unit_rows.reshape(n, r, k))
        m = reduction.unit_eigenvalues
        spread = e0.mean(axis=0) / m  # the mean's error through H^+
        shift = np.abs(mean) / m
        carried = np.einsum("irk,ir->ik", rows, rows @ spread)
        centring = gamma(2 * k + 2 * r + 8) * (np.abs(units0)
                                               + np.einsum("irk,ir->ik", rows, rows @ shift))
        rows_signed = reduction.unit_rows.reshape(n, r, k)
        _, extra = power_of_two_scale(  # as centred_unit_gradients: U = U1 / extra
            units0 - np.einsum("irk,ir->ik", rows_signed, rows_signed @ (mean / m)))
        e = (e0 + carried + centring) / extra
    else:
        e = e0
    return e * (1.0 + gamma(2 * k + 2 * r + 16))


def _user_family_error(family, reduction, units, noise, x, a, b, gap):
    """A proven bound (units of ``tr(M Y)``, M the unit eigenvalues, ``(L - x D) Y = N``) on
    ``|F_user - F_engine|``, the floor's change from the engine's reduced family to the user's
    (specification page, section "Non-interpolating minima: stationary covariance and the loss floor"). With ``A = L - x D >= gap L``:

    * the reduction's relative bounds (``Reduction``'s relative errors, the congruence as a
      relative error of L as in the critical batch size) give ``|<Z, (A_user - A) Z>| <= e <Z, L Z>
      <= eps <Z, A Z>``, ``eps = e / gap``, and ``|<c, (A_user^{-1} - A^{-1}) r>| <= eps /
      (1 - eps) ||c||_{A^{-1}} ||r||_{A^{-1}}``;
    * ``<c, A^{-1} c> <= <c, L^{-1} c> / gap``, L^{-1} entrywise ``1 / (m_j + m_k)`` (no solve);
    * the weight's change ``c_user - M`` (relative to M, ``||M^{-1/2} dc M^{-1/2}||_2 <= rd``) and
      the noise's change (the rotated gradients' rounding, :func:`_gradient_error`, and the
      congruence's ``(1 - beta)^{-2} - 1`` of N in the PSD order) in the norm of ``A_user^{-1} <=
      L^{-1} / ((1 - eps) gap)``.

    ``inf`` when eps >= 1 (the perturbation may reach the critical lr)."""
    k = reduction.k
    m = reduction.unit_eigenvalues
    rd, rn, _ = ratio_perturbations(reduction, a, b)
    beta = reduction.congruence
    if not beta < 0.5:
        return math.inf
    congruence = float(up(1.0 / (1.0 - beta) ** 2 - 1.0)) * (1.0 + gamma(4))
    rd = rd + congruence
    g = 1.0 + gamma(k * k + 16)
    eps = float(up((rd + x * rn) * g / gap))
    if not eps < 1.0:
        return math.inf
    inverse = 1.0 / pair_sum(m)
    lc = float(up(0.5 * float(np.sum(m)) * g))  # <M, L^{-1} M> = tr(M) / 2
    lr_ = float(up(float(np.sum(noise * noise * inverse)) * g))  # <N, L^{-1} N>
    # the noise's change: entrywise from the gradients' errors, and the congruence's
    e = _gradient_error(family, reduction, units)
    n = family.n
    au = np.abs(units)
    delta = (au.T @ e + e.T @ au + e.T @ e) / n * g
    dr = float(up(math.sqrt(float(np.sum(delta * delta * inverse)) * g)
                  + congruence * math.sqrt(k) * math.sqrt(lr_)))
    dc = float(up(rd * math.sqrt(0.5 * k) * g))  # ||dc||_{L^{-1}}
    user_gap = float(down(gap * (1.0 - eps)))
    operator = eps / (1.0 - eps) * math.sqrt(lc * lr_) / gap
    weight = dc * (math.sqrt(lr_) + dr) / user_gap
    noise_term = math.sqrt(lc) * dr / user_gap
    return float(up((operator + weight + noise_term) * g))


def _gmres(apply, rhs, rtol, max_products):
    """GMRES on k x k matrices (flattened) from 0; returns ``(solution, products)``."""
    from scipy.sparse.linalg import LinearOperator, gmres

    k = rhs.shape[0]
    count = [0]

    def matvec(v):
        count[0] += 1
        return apply(v.reshape(k, k)).ravel()

    size = k * k
    operator = LinearOperator((size, size), matvec=matvec, dtype=np.float64)
    restart = min(size, 200)
    options = dict(atol=0.0, restart=restart, maxiter=max(1, max_products // restart))
    try:
        solution, _ = gmres(operator, rhs.ravel(), rtol=rtol, **options)
    except TypeError:  # scipy < 1.12 calls the relative tolerance tol
        solution, _ = gmres(operator, rhs.ravel(), tol=rtol, **options)
    return solution.reshape(k, k), count[0]


def _stationary_momentum(family, reduction, noise, scale, x, a, b, where, covariance, settings,
                         rtol, units):
    from .moments import critical_lr

    momentum, nesterov, lr = settings["momentum"], settings["nesterov"], settings["lr"]
    k = reduction.k

    def no_state(reason):
        eta_star = critical_lr(family, settings["batch_size"], sampling=settings["sampling"],
                               momentum=momentum, nesterov=nesterov)
        return NoStationaryStateError(
            f"no stationary state: lr = {lr:.10g} is at or above the critical learning rate eta* = "
            f"{_eta_star_text(eta_star)} ({where}; the loss's own convention): {reason}",
            eta_star=eta_star)

    if x >= momentum_cap(momentum, nesterov):
        raise no_state("the mean itself diverges (lr lambda_1 >= the momentum cap)")
    dynamics = MomentumDynamics(reduction.unit_eigenvalues, x, momentum, nesterov)
    gain = dynamics.gain()
    weight = x * x * b
    if weight == 0.0 or not np.any(noise):
        return _result(0.0, 0.0, 0.0, 0.0, 0, math.nan, np.zeros((k, k)), family, reduction,
                       covariance, settings)
    noise_operator = momentum_noise_operator(reduction, settings["sampling"])

    def transfer(Y):  # T(Y) = x^2 b G o V(Y)
        return weight * gain * noise_operator(0.5 * (Y + Y.T))

    def apply(Y):
        return Y - transfer(Y)

    products = 0
    rhs = gain * noise
    Y, spent = _gmres(apply, rhs, rtol / 4.0, STATIONARY_MAX_PRODUCTS)
    products += spent
    Y = 0.5 * (Y + Y.T)
    image_y = transfer(Y)
    residual = rhs - (Y - image_y)
    products += 1
    relative = float(np.linalg.norm(residual) / np.linalg.norm(rhs))
    # Existence and the error bound: (I - T) W = I - e with W positive definite and ||e||_2 < 1
    # gives T(W) = W - I + e < W, so T(W) <= c W with c = 1 - (1 - ||e||_2) / lambda_max(W) < 1
    # and rho(T) <= c < 1 (Collatz-Wielandt: T preserves the PSD cone); (I - T)^{-1} is then a
    # positive map, W_exact = (I - T)^{-1}(I) <= W / (1 - ||e||_2), and
    # |tr(M (I - T)^{-1} r)| <= ||r||_2 tr(M W_exact) <= ||r||_2 tr(M W) / (1 - ||e||_2).
    # Every quantity is the exact one for the computed gain G, weight and noise operator: the
    # products' rounding (error_of), the residuals' formation and the traces are bounded, and
    # W > 0 is proven by a shifted Cholesky factorisation (Rump's criterion).
    eye = np.eye(k)
    W, spent = _gmres(apply, eye, 1e-6, STATIONARY_MAX_PRODUCTS)
    products += spent
    W = 0.5 * (W + W.T)
    image = transfer(W)
    products += 1
    e = eye - (W - image)
    gain_max = float(np.max(np.abs(gain)))
    g4 = gamma(4)

    def transfer_error(X):  # ||fl(T(X)) - T(X)||_F for the computed G and weight
        return float(up(weight * gain_max * noise_operator.error_of(0.5 * (X + X.T))
                        * (1.0 + g4)))

    def formed_error(first, second, third, exact_error):  # fl(first - (second - third))
        return float(up(exact_error * (1.0 + g4) + g4 * (float(np.linalg.norm(first))
                        + float(np.linalg.norm(second)) + float(np.linalg.norm(third)))))

    products += 2  # error_of's products of the absolute operator
    e_norm = float(up(float(np.linalg.norm(e)) * (1.0 + gamma(k * k + 2))
                      + formed_error(eye, W, image, transfer_error(W))))
    residual_norm = float(up(float(np.linalg.norm(residual)) * (1.0 + gamma(k * k + 2))
                             + formed_error(rhs, Y, image_y, transfer_error(Y))
                             + _rhs_error(units, gain, family.n)))
    if not (e_norm < 1.0 and _proven_positive_definite(W)):
        raise no_state("the operator G o V has spectral radius >= 1 (or its stability could "
                       "not be proven); the covariance grows without limit")
    if relative > rtol:
        _warn_short(relative, rtol, "GMRES", "")
    m = reduction.unit_eigenvalues
    factor = 0.5 * lr * x * b * scale
    diagonal = np.diag(Y)
    base = float(m @ diagonal)
    trace_w = float(up(float(m @ np.diag(W)) + gamma(k + 1) * float(m @ np.abs(np.diag(W)))))
    error = float(up(residual_norm * trace_w / float(down(1.0 - e_norm))
                     + gamma(k + 1) * float(m @ np.abs(diagonal))))
    value, lower, upper = _scaled(factor, base, error, gamma(10))
    Sigma = (lr * lr * b * scale) * Y
    return _result(value, lower, upper, relative, products, math.nan,
                   Sigma, family, reduction, covariance, settings)


def _proven_positive_definite(W) -> bool:
    """True only if the symmetric W is proven positive definite: the floating-point Cholesky
    factorisation of ``W - c I`` succeeds with ``c = gamma(k+1) / (1 - gamma(k+1)) tr(W) +
    4 k (2 (k + 1) + max W_ii) eta`` (eta the smallest subnormal; S. M. Rump, "Verification of
    positive definiteness", BIT 46, 2006, for any order of the operations)."""
    k = W.shape[0]
    g = gamma(k + 1)
    if not math.isfinite(g):
        return False
    trace = float(up(float(np.sum(np.abs(np.diag(W)))) * (1.0 + gamma(k))))
    eta = 5e-324
    shift = float(up(g / (1.0 - g) * trace * (1.0 + 4 * UNIT_ROUNDOFF)
                     + 4 * k * (2 * (k + 1) + float(np.max(np.diag(W)))) * eta))
    try:
        np.linalg.cholesky(W - shift * np.eye(k))
    except np.linalg.LinAlgError:
        return False
    return True


def _scaled(factor, base, error, factor_rtol=0.0):
    """``factor * (base, base - error, base + error)`` (the lower end floored at 0), with an
    exact 0 where a term is 0 even if the factor overflowed to inf (never a NaN); the ends
    widened by the factor's relative error ``factor_rtol`` and rounded outwards."""
    with np.errstate(over="ignore"):
        def times(term):
            return 0.0 if term == 0.0 else float(np.float64(factor) * term)
        low = max(float(down(base - error)), 0.0)
        high = float(up(base + error))
        return (times(base), float(down(times(low) * (1.0 - factor_rtol))),
                float(up(times(high) * (1.0 + factor_rtol))))


def _rhs_error(units, root_inverse, n):
    """Proven bound on ``||fl(C o fl(U^T U / n)) - C o U^T U / n||_F``: each entry of ``U^T U``
    is a length-n sum of products (``gamma(n)`` of the sum of absolute products), then one
    division and one multiplication by C."""
    size = np.abs(units).T @ np.abs(units) / n  # (its own rounding: the factor 1 + gamma below)
    g = gamma(n + 4)
    return float(up(g * (1.0 + g) * float(np.linalg.norm(np.abs(root_inverse) * size))))


def _residual_bound(rhs, rhs_error, Z, image, image_error, x, gap, root_inverse, m):
    """``(r, gap')``: a proven bound ``r`` on the Frobenius norm of the exact residual
    ``R - A(Z)`` of the stored Z, and a proven lower bound ``gap'`` on the smallest
    eigenvalue of A, for the exact system ``A(Z) = R``, ``A(Z) = C o L(C o Z) - x C o D(C o Z)``
    with C the computed preconditioner (so that ``Y = C o Z`` is what is reported) and R
    ``C o S_g`` exactly.

    * ``image`` is ``fl(K(Z))``, within ``image_error`` of ``K(Z)`` (``SandwichOperator.
      error_of``); forming ``rhs - (Z - x image)`` costs ``gamma(3)`` of
      ``|rhs| + |Z| + x |image|`` entrywise; the right-hand side is within ``rhs_error``.
    * The computed C is not exactly ``(m_j + m_k)^{-1/2}``: ``C o L(C o Z) = (1 + E) o Z``
      with ``|E| <= c`` entrywise, so A is ``I + E o . - x K``: ``c ||Z||`` more residual, and
      the eigenvalue bound ``gap = 1 - x lambda_max(K)`` moves by ``c`` at most.
    * x is ``lr lambda_1`` rounded (relative u): the system at the exact x differs by
      ``|dx| ||K(Z)|| <= u (||Z|| + ||R|| + r)`` in its residual (K Z = (Z - R + r) / x).
    """
    computed = rhs - (Z - x * image)
    k = Z.shape[0]
    norm = float(np.linalg.norm(computed)) * (1.0 + gamma(k * k + 2))
    g3 = gamma(3)
    forming = g3 * (float(np.linalg.norm(rhs)) + float(np.linalg.norm(Z))
                    + x * float(np.linalg.norm(image)))
    # E = C^2 (m_j + m_k) - 1, evaluated here with its own rounding (a few roundings: gamma(8)).
    departure = float(np.max(np.abs(root_inverse * root_inverse * pair_sum(m) - 1.0))) + gamma(8)
    z_norm = float(np.linalg.norm(Z))
    r = norm + rhs_error + x * image_error * (1.0 + g3) + forming * (1.0 + g3) \
        + departure * z_norm
    r = r + 2.0 * UNIT_ROUNDOFF * (z_norm + float(np.linalg.norm(rhs)) + rhs_error + r)
    return float(up(r * (1.0 + gamma(16)))), float(down(gap - departure - 4.0 * UNIT_ROUNDOFF))


def _factor_rtol(population, batch_size):
    """Relative error bound of ``0.5 lr b s`` as computed: b from ``map_coefficients`` (a
    difference of exact integers over a product: a few roundings) and three products."""
    return gamma(8)


def _result(value, lower, upper, relative, products, eta_star, reduced_sigma, family, reduction,
            covariance, settings) -> StationaryResult:
    full = None
    if covariance:
        k = reduction.k
        reduced_sigma = np.zeros((k, k)) if reduced_sigma is None else 0.5 * (reduced_sigma
                                                                               + reduced_sigma.T)
        basis = range_basis(family)
        full = basis @ reduced_sigma @ basis.T
    else:
        reduced_sigma = None
    return StationaryResult(excess_loss=value, lower=lower, upper=upper,
                            relative_residual=relative, products=products, eta_star=eta_star,
                            covariance=full, reduced_covariance=reduced_sigma, **settings)


# ----------------------------------------------------------------------------- inverse questions
_ROOT_RTOL = 1e-10  # relative width of the bracket the inverse questions certify
_NEAR_CRITICAL = 1e-6  # closest relative distance to eta* that the inverse questions search


def _floor_or_inf(family, lr, batch_size, options):
    """``(lower, value, upper, products)`` of the floor; ``inf`` where no stationary state."""
    try:
        result = _stationary(family, lr, batch_size, options["sampling"], options["momentum"],
                             options["nesterov"], False, STATIONARY_RTOL)
    except NoStationaryStateError as exc:
        if not math.isnan(exc.outside):
            raise
        return math.inf, math.inf, math.inf, 0
    return result.lower, result.excess_loss, result.upper, result.products


def _check_target(excess_loss) -> float:
    target = check_real_scalar(excess_loss, "excess_loss")
    if not target > 0:
        raise ValueError(f"excess_loss must be > 0 (a loss floor above the minimum, in the "
                         f"loss's own convention); got {target:g}")
    return target


def max_lr_for_excess_loss(family, batch_size, excess_loss, *, sampling="bernoulli", momentum=0.0,
                           nesterov=False, bounds=False):
    """The largest learning rate whose loss floor stays at or below ``excess_loss``.

    The stationary excess loss ``F(lr) = (1/2) tr(H Sigma_inf)`` (:func:`stationary`,
    specification page, section "Non-interpolating minima: stationary covariance and the loss floor") grows from 0 at lr = 0 (like
    ``lr b tr(S_g) / 4``, a lower bound at every lr) to infinity at ``eta*``; without momentum
    it is increasing (``Sigma_inf`` is a series of positive maps whose terms grow with lr). The
    answer is the root of ``F(lr) = excess_loss``, found by Brent's method on
    ``log F - log excess_loss`` and then *certified*: ``F(lower) <= excess_loss`` and
    ``F(upper) > excess_loss`` are proven by :func:`stationary`'s brackets, with
    ``upper - lower`` about 1e-10 relative.

    With momentum the floor is not proven monotone in lr (the Stein gain G of section
    "Momentum" depends on lr in no monotone way that we can prove), so the search does not rely
    on it: it scans lr upwards on a geometric grid (ratio ``2^(1/4)``) from a point proven below
    the target, stops at the first grid point proven above it, and certifies that crossing.
    Every scanned lr below the answer is proven to meet the target; a bump of the floor
    narrower than the grid could be missed, and a larger lr beyond a bump may meet the target
    too: the result (``bounds=True``, a :class:`LossFloorBracket`) says so in ``caveat``,
    with ``monotone_on_grid`` (whether the scanned floors increased).

    Parameters
    ----------
    family : HessianFamily
        With per-sample gradients.
    batch_size : float or int
    excess_loss : float
        The loss floor to stay below, > 0, in the loss's own convention.
    sampling, momentum, nesterov
        As in :func:`stationary`.
    bounds : bool, default False
        Return the certified ``Bracket`` instead of the value (``value`` is the lower end: a
        learning rate proven to meet the target).

    Returns
    -------
    float or Bracket
        With momentum and ``bounds=True`` a :class:`LossFloorBracket` (a Bracket with the
        scan's ``caveat``, ``scanned`` and ``monotone_on_grid``).

    Raises
    ------
    ValueError, TypeError
        Invalid arguments, a family without gradients or with gradients along flat directions.

    Examples
    --------
    >>> import fastsgdstab as fs
    >>> family = fs.HessianFamily.from_features([[1.0], [1.0]], gradients=[[1.0], [-1.0]])
    >>> # floor (1/2) lr / (2 - lr) with one sample per step: 1/6 at lr = 0.5
    >>> round(fs.max_lr_for_excess_loss(family, 1, 1 / 6, sampling="with_replacement"), 8)
    0.5
    """
    from scipy.optimize import brentq

    from .moments import critical_lr

    family = check_family(family)
    sampling = check_sampling(sampling)
    batch_size = check_batch_size(batch_size, family.population_size, integer=sampling != "bernoulli",
                                  samples=family.n)
    momentum, nesterov = check_momentum(momentum, nesterov)
    target = _check_target(excess_loss)
    options = dict(sampling=sampling, momentum=momentum, nesterov=nesterov)
    reduction = reduced(family)
    units, scale = centred_unit_gradients(family, reduction)
    a, b = map_coefficients(sampling, family.population_size, batch_size)
    noise_trace = scale * float(np.sum(units * units)) / family.n  # tr(S_g)
    eta_star = critical_lr(family, batch_size, bounds=True, **options)
    products = eta_star.products
    if b == 0.0 or noise_trace == 0.0 or reduction.k == 0:
        # no noise: the floor is 0 at every stable lr
        result = Bracket(eta_star.lower, eta_star.lower, eta_star.upper, products)
        return result if bounds else result.value
    if momentum != 0.0:
        return _max_lr_momentum(family, batch_size, target, options, eta_star, products, bounds)
    top = min(eta_star.lower, 4.0 * target / (b * noise_trace))
    evaluations = {}

    def log_gap(log_lr):
        lower, value, upper, spent = _floor_or_inf(family, math.exp(log_lr), batch_size, options)
        evaluations[log_lr] = (lower, upper)
        nonlocal products
        products += spent
        return (math.log(value) if value > 0 else -math.inf) - math.log(target) \
            if math.isfinite(value) else math.inf

    # Within 1e-6 of eta* the system's condition number passes 1e6: the search stops there.
    high = math.log(top) + math.log1p(-_NEAR_CRITICAL)
    if log_gap(high) <= 0:
        # The floor stays below the target up to eta* (1 - 1e-6): the answer is eta* to that
        # precision (proven at the lower end only).
        result = Bracket(math.exp(high), math.exp(high), eta_star.upper, products,
                         certified=eta_star.upper - math.exp(high) <= 2 * _NEAR_CRITICAL * top)
        return result if bounds else result.value
    low = high - math.log(2.0)
    while log_gap(low) > 0:
        high, low = low, low - math.log(2.0)
    root = brentq(log_gap, low, high, xtol=1e-14, rtol=1e-14, maxiter=200)
    lower_lr, upper_lr = math.exp(root) * (1 - 0.5 * _ROOT_RTOL), math.exp(root) * (1 + 0.5 * _ROOT_RTOL)
    floor_low = _floor_or_inf(family, lower_lr, batch_size, options)
    floor_high = _floor_or_inf(family, upper_lr, batch_size, options)
    products += floor_low[3] + floor_high[3]
    certified = floor_low[2] <= target < floor_high[0]
    result = Bracket(lower_lr, lower_lr, upper_lr, products, certified=certified)
    if not certified:
        from ._linalg import CertificationWarning
        from ._warnings import warn
        warn(f"max_lr_for_excess_loss: the crossing of the floor {target:g} could not be proven "
             f"within [{lower_lr:.12g}, {upper_lr:.12g}]", CertificationWarning)
    return result if bounds else result.value


@dataclass(frozen=True)
class LossFloorBracket(Bracket):
    """``max_lr_for_excess_loss``'s answer with momentum: a certified crossing found by a scan.

    ``lower`` is proven to meet the target and ``upper`` proven not to (stationary's brackets),
    and so is every scanned lr below ``lower``; the floor is not proven monotone with momentum,
    hence ``caveat``. ``scanned``: the grid points evaluated; ``monotone_on_grid``: whether the
    floor increased along them.
    """

    scanned: int = 0
    monotone_on_grid: bool = True
    caveat: str = ""


_SCAN_RATIO = 2.0 ** 0.25
_SCAN_CAVEAT = ("momentum: the floor is not proven monotone in lr; this is the first crossing "
                "of the target found by a geometric scan (ratio 2^(1/4)) upwards, every scanned "
                "lr below it proven to meet the target; a bump narrower than the grid could be "
                "missed, and a larger lr beyond a bump may meet the target too")


def _max_lr_momentum(family, batch_size, target, options, eta_star, products, bounds):
    """The momentum path of ``max_lr_for_excess_loss``: a scan, not a monotone search."""
    from scipy.optimize import brentq

    def floor(lr):
        nonlocal products
        out = _floor_or_inf(family, lr, batch_size, options)
        products += out[3]
        return out

    high = eta_star.lower * (1.0 - _NEAR_CRITICAL)
    # The starting point: halve from the top until the floor's upper bound is far below the
    # target (1/64 of it: where the floor is small it grows like lr, so a valley of a bump is
    # unlikely to be mistaken for the start), then scan upwards from there.
    bottom, halvings = high, 0
    while True:
        at_bottom = floor(bottom)
        if at_bottom[2] <= target / 64.0:
            break
        bottom *= 0.5
        halvings += 1
        if halvings > 1100 or bottom == 0.0:  # pragma: no cover - the floor tends to 0 with lr
            raise ValueError("max_lr_for_excess_loss: no learning rate meets the target")
    scanned, values, previous = 1, [at_bottom[1]], (bottom, at_bottom)
    lr = bottom
    crossing = None
    while lr < high:
        lr = min(lr * _SCAN_RATIO, high)
        here = floor(lr)
        scanned += 1
        values.append(here[1])
        if here[1] > target:
            crossing = (previous, (lr, here))
            break
        if not here[2] <= target:  # value below, bound not: refine this point's neighbourhood
            crossing = (previous, (lr, here))
            break
        previous = (lr, here)
    monotone = all(b >= a for a, b in zip(values, values[1:]))

    def result(value, lower, upper, certified):
        answer = LossFloorBracket(value, lower, upper, products, certified=certified,
                                  scanned=scanned, monotone_on_grid=monotone,
                                  caveat=_SCAN_CAVEAT)
        if not certified:
            from ._linalg import CertificationWarning
            from ._warnings import warn
            warn(f"max_lr_for_excess_loss: the crossing of the floor {target:g} could not be "
                 f"proven within [{lower:.12g}, {upper:.12g}]", CertificationWarning)
        return answer if bounds else answer.value

    if crossing is None:
        # every scanned lr up to eta* (1 - 1e-6) meets the target
        return result(high, high, eta_star.upper,
                      eta_star.upper - high <= 2 * _NEAR_CRITICAL * eta_star.lower)

    def log_gap(log_lr):
        value = floor(math.exp(log_lr))[1]
        if not math.isfinite(value):
            return math.inf
        return (math.log(value) if value > 0 else -math.inf) - math.log(target)

    (low_lr, _), (high_lr, _) = crossing
    if not log_gap(math.log(high_lr)) > 0:
        # the grid point's floor is within its bracket of the target: no crossing is proven
        return result(low_lr, low_lr, high_lr, False)
    root = brentq(log_gap, math.log(low_lr), math.log(high_lr), xtol=1e-14, rtol=1e-14,
                  maxiter=200)
    lower_lr = max(math.exp(root) * (1 - 0.5 * _ROOT_RTOL), low_lr)
    upper_lr = min(math.exp(root) * (1 + 0.5 * _ROOT_RTOL), high_lr)
    certified = floor(lower_lr)[2] <= target < floor(upper_lr)[0]
    return result(lower_lr, lower_lr, upper_lr, certified)


def min_batch_size_for_excess_loss(family, lr, excess_loss, *, sampling="bernoulli", momentum=0.0,
                                   nesterov=False, bounds=False):
    """The smallest batch size whose loss floor at this ``lr`` is at or below ``excess_loss``.

    The batch size enters the stationary equation through the scheme's noise scalar ``b``
    (``1/B - 1/n``, ``(n - B) / (B (n - 1))`` or ``1/B``; specification page, sections "Exact
    critical batch size" and "Non-interpolating minima: stationary covariance and the loss floor"), and the floor is increasing in it
    (a series of positive maps growing with b), so decreasing in B for every scheme. The
    real threshold is the root of ``F(B) = excess_loss`` (Brent's method on
    ``log F - log excess_loss``), certified like :func:`max_lr_for_excess_loss`; for the two
    schemes that draw exactly B samples the answer is the smallest integer at or above it.
    ``math.inf`` when even B = n is above the target (with replacement: b = 1/n > 0) or not
    stable; 1 when every batch size meets it.

    Parameters
    ----------
    family : HessianFamily
        With per-sample gradients.
    lr : float
    excess_loss : float
        The loss floor to stay below, > 0, in the loss's own convention.
    sampling, momentum, nesterov
        As in :func:`stationary`.
    bounds : bool, default False
        Return the certified ``Bracket`` of the real threshold.

    Returns
    -------
    float, int or Bracket

    Raises
    ------
    ValueError, TypeError
        Invalid arguments, a family without gradients or with gradients along flat directions.

    Examples
    --------
    >>> import fastsgdstab as fs
    >>> family = fs.HessianFamily.from_features([[1.0]] * 4, gradients=[[1.0], [-1.0], [2.0], [-2.0]])
    >>> fs.min_batch_size_for_excess_loss(family, 0.5, 0.1, sampling="without_replacement")
    3
    """
    from scipy.optimize import brentq

    family = check_family(family)
    sampling = check_sampling(sampling)
    lr = check_lr(lr)
    momentum, nesterov = check_momentum(momentum, nesterov)
    target = _check_target(excess_loss)
    options = dict(sampling=sampling, momentum=momentum, nesterov=nesterov)
    n = family.population_size  # batch sizes range over [1, N]
    products = 0

    def floor(B):
        nonlocal products
        out = _floor_or_inf(family, lr, B, options)
        products += out[3]
        return out

    def answer(value, lower, upper, certified=True):
        result = Bracket(value, lower, upper, products, certified=certified)
        if bounds:
            return result
        if sampling == "bernoulli" or not math.isfinite(value):
            return value
        return max(1, math.ceil(value * (1 - 1e-9)))

    at_n = floor(float(n))
    if not at_n[2] <= target:
        if at_n[0] > target:
            return answer(math.inf, math.inf, math.inf)
    # Below the critical batch size there is no stationary state; within 1e-6 of it the system
    # is too ill-conditioned to be worth solving (the floor is then ~1e6 times its usual size).
    from .moments import critical_batch_size
    smallest = critical_batch_size(family, lr, bounds=True, **options).upper
    if not math.isfinite(smallest):
        return answer(math.inf, math.inf, math.inf)
    start = 1.0 if smallest <= 1.0 else min(smallest * (1 + _NEAR_CRITICAL), float(n))
    at_start = floor(start)
    if at_start[2] <= target:
        return answer(start, 1.0 if start == 1.0 else smallest, start, start == 1.0)

    def log_gap(log_b):
        value = floor(math.exp(log_b))[1]
        if not math.isfinite(value):
            return math.inf
        return (math.log(value) if value > 0 else -math.inf) - math.log(target)

    root = math.exp(brentq(log_gap, math.log(start), math.log(n), xtol=1e-14, rtol=1e-14,
                           maxiter=200))
    low_b = max(1.0, root * (1 - 0.5 * _ROOT_RTOL))
    high_b = min(float(n), root * (1 + 0.5 * _ROOT_RTOL))
    # proven: F(high_b) <= target (the batch meets it), F(low_b) > target (it does not)
    certified = floor(high_b)[2] <= target < floor(low_b)[0]
    if not certified:
        from ._linalg import CertificationWarning
        from ._warnings import warn
        warn(f"min_batch_size_for_excess_loss: the crossing of the floor {target:g} could not be "
             f"proven within [{low_b:.12g}, {high_b:.12g}]", CertificationWarning)
    return answer(high_b, low_b, high_b, certified)


# ----------------------------------------------------------------------- reshuffled epochs (estimate)
_TRANSIENT_RTOL = 1e-3  # share of the floor the burn-in leaves to the start (heuristic, see below)
_FIRST_RUNS = 16


def _relaxation_rates(m, x, momentum, nesterov):
    """Per eigendirection j of H, the contraction rate of the mean iteration: ``|1 - x m_j|``,
    or the spectral radius of the 2 x 2 momentum matrix (section "Momentum")."""
    if momentum == 0.0:
        return np.abs(1.0 - x * m)
    dynamics = MomentumDynamics(m, x, momentum, nesterov)
    if dynamics.scale != 1.0:
        return np.full(m.size, math.inf)
    return np.max(np.abs(np.linalg.eigvals(dynamics.matrices)), axis=1)


def _burn_in(rates, weights, epoch, budget):
    """``(burn_in, transient)``: the smallest multiple of the epoch (at least two epochs) with
    ``sum_j w_j rates_j^(2 t) <= _TRANSIENT_RTOL sum_j w_j``, capped at ``budget`` steps, and
    the share actually reached."""
    total = float(weights.sum())
    if not total > 0:
        return 2 * epoch, 0.0
    with np.errstate(divide="ignore"):
        logs = np.log(rates)

    def share(t):
        with np.errstate(under="ignore"):
            return float(weights @ np.exp(2.0 * t * logs)) / total

    low, high = 0, 2 * epoch
    while share(high) > _TRANSIENT_RTOL and high < budget:
        low, high = high, min(2 * high, budget)
    while high - low > epoch:
        middle = (low + high) // 2
        if share(middle) > _TRANSIENT_RTOL:
            low = middle
        else:
            high = middle
    burn = max(2 * epoch, -(-high // epoch) * epoch)
    return burn, share(burn)


def _stationary_reshuffle(family, lr, batch_size, momentum, nesterov, covariance, drop_last, seed,
                          estimate_rtol):
    """``stationary(..., sampling="reshuffle")``: the Monte-Carlo estimate (StationaryEstimate)."""
    import warnings

    from ._validation import check_positive_int
    from ._warnings import warn
    from .moments import critical_lr
    from .family import HessianFamily
    from .simulation import SimulationWarning, simulate

    lr = check_lr(lr)
    population = family.population_size
    batch_size = int(check_batch_size(batch_size, population, integer=True, samples=family.n))
    momentum, nesterov = check_momentum(momentum, nesterov)
    if covariance:
        raise ValueError("covariance=True is not available with sampling='reshuffle': the "
                         "reshuffled floor is estimated by simulation, which gives the excess "
                         "loss only; use an i.i.d. scheme for the exact covariance")
    if not isinstance(drop_last, (bool, np.bool_)):
        raise TypeError(f"drop_last must be True or False; got {drop_last!r}")
    drop_last = bool(drop_last)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= int(seed) < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63); got {seed!r}")
    seed = int(seed)
    estimate_rtol = check_real_scalar(estimate_rtol, "estimate_rtol")
    if not 0.0 < estimate_rtol < 1.0:
        raise ValueError(f"estimate_rtol (the relative standard error to reach) must lie in "
                         f"(0, 1); got {estimate_rtol}")
    reduction = reduced(family)
    units, scale = centred_unit_gradients(family, reduction)
    k = reduction.k
    epoch = population // batch_size if drop_last else -(-population // batch_size)
    settings = dict(lr=lr, batch_size=float(batch_size), momentum=momentum, nesterov=nesterov,
                    drop_last=drop_last, seed=seed)
    if k == 0 or not np.any(units) or (batch_size == population):
        # nothing moves: no curvature and no gradient, or no noise (every batch is the whole
        # centred set, whose mean is 0): the iterates stay at the minimum, floor exactly 0
        return StationaryEstimate(0.0, 0.0, 0.0, 0.0, 0, 0, 0, **settings)
    x = reduction.unit_lr(lr)
    m = reduction.unit_eigenvalues
    rates = _relaxation_rates(m, x, momentum, nesterov)
    if not np.all(rates < 1.0):
        raise NoStationaryStateError(
            f"not estimated: at lr = {lr:.10g} the mean iteration "
            f"{'(full-batch gradient descent) ' if momentum == 0.0 else ''}does not contract "
            f"along H's sharpest direction (lr lambda_1 = {x:.6g}"
            + (", at or above 2" if momentum == 0.0 else ", at or above the momentum cap")
            + "; the loss's own convention): reshuffled SGD has no known stationary state there")
    try:
        eta_star_iid = float(critical_lr(family, batch_size, sampling="without_replacement",
                                         momentum=momentum, nesterov=nesterov))
    except ValueError:  # pragma: no cover - a family critical_lr cannot analyse
        eta_star_iid = math.nan
    if lr >= eta_star_iid:
        warn(f"stationary: lr = {lr:.6g} is at or above the critical learning rate of independent "
             f"batches ({eta_star_iid:.6g}, without replacement, B = {batch_size}); reshuffled "
             f"epochs may have no stationary state there either: the estimate assumes one",
             SimulationWarning)
    noise = np.einsum("ij,ij->j", units, units) / family.n  # diag of S_g / s
    # Critical slowing down: the second moment relaxes like 1 - (1 - rho_j^2)(1 - lr / eta*)
    # (the floor blows up like 1 / (1 - lr / eta*)); i.i.d. eta* stands in for reshuffling's.
    # At or above it (reshuffling can be stable there) the rate is unknown: at most 50x slower.
    slowing = min(1.0, max(1.0 - lr / eta_star_iid, 0.02)) if math.isfinite(eta_star_iid) else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        gaps = (1.0 - rates * rates) * slowing
        weights = np.where(noise > 0, m * noise / gaps, 0.0)
    burn, transient = _burn_in(np.sqrt(1.0 - gaps), weights, epoch,
                               RESHUFFLE_MAX_STEPS // (4 * _FIRST_RUNS))
    window = max(20 * burn, 50 * epoch, 1000)
    window = -(-window // epoch) * epoch  # every position in the epoch weighted alike
    runs = _FIRST_RUNS
    budget = RESHUFFLE_MAX_STEPS
    if runs * (burn + window) > budget:
        window = max(epoch, (budget // runs - burn) // epoch * epoch)
    r = reduction.rank
    factors = reduction.unit_rows.reshape(family.n, r, k).transpose(0, 2, 1)
    unit_family = HessianFamily._trusted(np.ascontiguousarray(factors), population, units)
    # Start at the minimum. simulate refuses the zero vector (a family without gradients would
    # never move), so the start is 1e-150 per coordinate: a loss of ~1e-300, nothing.
    start = np.full(k, 1e-150)

    def run(count, offset):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = simulate(unit_family, x, batch_size, burn + window, count,
                              seed=(seed + offset) % 2 ** 63, sampling="reshuffle", init=start,
                              record_every=burn, momentum=momentum, nesterov=nesterov,
                              drop_last=drop_last, burn_in=burn, progress=False)
        for item in caught:
            text = str(item.message)
            if not text.startswith("the sample mean of ||w_t||^2") and "left the float" not in text:
                warn(text, item.category)
        if result.interrupted:
            raise KeyboardInterrupt
        if not math.isfinite(result.excess_loss):
            raise NoStationaryStateError(
                f"no stationary state: simulated reshuffled SGD left the float range at lr = "
                f"{lr:.10g} (batch_size={batch_size}, sampling='reshuffle'; the loss's own "
                f"convention; the critical lr of independent batches is {eta_star_iid:.10g})",
                eta_star=eta_star_iid)
        # A state that grows slowly need not overflow: the runs' log ||w||^2 from the end of
        # the burn-in to the last step must not grow (stationary: the change has mean 0).
        change = result.log_sq_norm[:, -1] - result.log_sq_norm[:, 1]
        growth = float(np.mean(change))
        spread = float(np.std(change, ddof=1) / math.sqrt(count)) if count > 1 else math.inf
        if not growth <= max(math.log(4.0), 6.0 * spread):
            raise NoStationaryStateError(
                f"no stationary state: simulated reshuffled SGD keeps growing at lr = {lr:.10g} "
                f"(||w||^2 grew by a factor {math.exp(min(growth, 700.0)):.3g} on average over "
                f"{window} steps after the burn-in; batch_size={batch_size}, "
                f"sampling='reshuffle'; the loss's own convention; the critical lr of "
                f"independent batches is {eta_star_iid:.10g})", eta_star=eta_star_iid)
        return result.excess_loss, result.excess_loss_stderr

    value, stderr = run(runs, 0)
    relative = stderr / value if value > 0 else 0.0
    spent = runs * (burn + window)
    if relative > estimate_rtol:
        wanted = math.ceil(runs * (relative / estimate_rtol) ** 2 * 1.3) - runs
        extra = min(wanted, (budget - spent) // (burn + window))
        if extra >= 2:
            value2, stderr2 = run(extra, 1)
            total = runs + extra
            value, stderr = ((runs * value + extra * value2) / total,
                             math.sqrt((runs * stderr) ** 2 + (extra * stderr2) ** 2) / total)
            runs = total
            spent += extra * (burn + window)
        relative = stderr / value if value > 0 else 0.0
        if relative > 1.25 * estimate_rtol:
            warn(f"stationary: the reshuffled floor's relative standard error is {relative:.3g}, "
                 f"not the {estimate_rtol:g} asked, within the budget of {budget} simulated steps "
                 f"(RESHUFFLE_MAX_STEPS)", SimulationWarning)
    with np.errstate(over="ignore"):
        factor = float(np.float64(scale) / reduction.sharpness)
    limit = math.nan
    if momentum == 0.0 and population % batch_size == 0:
        limit = _small_lr_unit(reduction, units, x, population, batch_size) * factor
    return StationaryEstimate(excess_loss=float(value * factor), stderr=float(stderr * factor),
                              relative_stderr=float(relative), transient_bound=float(transient),
                              burn_in=int(burn), steps=int(burn + window), runs=int(runs),
                              eta_star_iid=eta_star_iid, small_lr_limit=float(limit),
                              **settings)


def _small_lr_unit(reduction, units, x, population, batch_size):
    """The leading term of the reshuffled floor as lr -> 0, in units (``StationaryEstimate.
    small_lr_limit``)."""
    n, k, r = units.shape[0], reduction.k, reduction.rank
    m = reduction.unit_eigenvalues
    rows = reduction.unit_rows.reshape(n, r, k)
    # v = (1/n) sum_i H_i g_i (units; H_i = rows_i^T rows_i), S_g diagonal
    v = np.einsum("irk,ir->k", rows, np.einsum("irk,ik->ir", rows, units)) / n
    noise_trace = float(np.einsum("ik,ik,k->", units, units, m)) / n  # tr(H S_g)
    N, B = population, batch_size
    steps = N // B
    drift = (steps - 1) / (2.0 * (N - 1))
    bridge = sum(j * B * (N - j * B) for j in range(steps)) / (steps * (N - 1) * B * B)
    return 0.5 * x * x * (drift * drift * float(v @ (v / m)) + bridge * noise_trace)
