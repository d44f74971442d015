"""The escape test: real ``torch.optim.SGD`` from a perturbation of a minimum, with the exact
prediction beside it."""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, grad, hessian, jvp, vmap

from .._config import (
    DECISION_MARGIN,
    ESCAPE_FACTOR,
    ESCAPE_LINEARITY_RTOL,
    ESCAPE_MAX_STEPS,
    ESCAPE_MIN_STEPS,
    ESCAPE_NOISE_MARGIN,
    ESCAPE_STABLE_STEPS,
    ESCAPE_STEPS_MARGIN,
)
from .._statistics import wilson_interval
from .._validation import check_lr, check_positive_int, check_real_scalar
from ..family import HessianFamily
from ..moments import critical_lr, spectral_radius
from ._common import check_data, check_model, chunked, PerSampleLoss, over_samples, torch_policy
from .family import GaussNewtonWarning, family_from_model

__all__ = ["EscapeResult", "escape_test", "ESCAPE_SAMPLING"]

ESCAPE_SAMPLING = ("reshuffle", "bernoulli", "without_replacement", "with_replacement")
"""Batch schemes of :func:`escape_test`: DataLoader-style reshuffled epochs, and the library's three."""


@dataclass(frozen=True)
class EscapeResult:
    """What :func:`escape_test` returns: the runs, their verdict, and the exact prediction.

    Attributes
    ----------
    runs, escaped : int
        Runs made and runs that left the minimum (excess loss grew by ``factor``, or became NaN
        or inf).
    fraction : float
        ``escaped / runs``.
    interval : tuple of float
        95% Wilson interval of the escape probability.
    max_ratios : ndarray, shape (runs,)
        Per run: the largest excess-loss ratio ``(L_t - L*) / (L_0 - L*)`` seen (inf when the
        loss became non-finite).
    final_ratios : ndarray, shape (runs,)
        Per run: the ratio at the last step made (the escape step for a run that escaped).
    escape_steps : ndarray of int, shape (runs,)
        The step at which a run escaped, -1 for runs that did not.
    lr, batch_size, sampling, steps, factor
        The settings (``steps`` as used: chosen from rho(lr) when not given).
    verdict : str
        ``"unstable"`` (at least one run escaped), ``"stable"`` (no run escaped, every run stayed
        in the linear regime and ended below its start, and when rho > 1 the runs were long
        enough for the predicted growth), or ``"inconclusive"``.
    reason : str
        Why that verdict, in words.
    spectral_radius : float
        The exact mean-square growth factor per step rho(lr) of the linearised SGD at this
        minimum (``fastsgdstab.spectral_radius`` on the model's family, for ``torch.optim.SGD``
        on the given loss with mean reduction; reshuffled batches use the without-replacement
        operator), computed when lr > eta* (above 1 then); NaN at lr <= eta*, where it is at most
        1 and its value, the slow decay of the flattest directions, is costly and sets nothing.
    critical_lr : float
        The exact eta*(B) of the same family and scheme.
    prediction_sampling : str
        The exact scheme behind ``critical_lr`` and ``spectral_radius``.
    steps_needed : float
        ``log(factor) / log rho``: the steps in which the mean square grows by ``factor`` (rho >
        1); inf at lr <= eta*.
    perturbation : float
        The starting perturbation's norm relative to ``||theta*||`` (absolute when theta* = 0).
    start_excess : float
        The starting excess loss (the same predicted value for every run with the default
        start; measured, run 0).
    noise_excess : float
        Estimated excess loss that the per-sample gradients' noise alone adds during a run
        (zero at an interpolating minimum).
    nonlinearity : ndarray, shape (runs,)
        Per run: the largest relative gap ``|(L_t - L*) - Q(delta_t)| / Q(delta_t)`` between
        the excess loss and its quadratic model, over the start and the steps on which the run
        was above a tenth of its start.
    linear : ndarray of bool, shape (runs,)
        Per run: ``nonlinearity <= ESCAPE_LINEARITY_RTOL``.
    """

    runs: int
    escaped: int
    fraction: float
    interval: tuple
    max_ratios: np.ndarray = field(repr=False)
    final_ratios: np.ndarray = field(repr=False)
    escape_steps: np.ndarray = field(repr=False)
    lr: float = 0.0
    batch_size: int = 1
    sampling: str = "reshuffle"
    steps: int = 0
    factor: float = ESCAPE_FACTOR
    verdict: str = "inconclusive"
    reason: str = ""
    spectral_radius: float = math.nan
    prediction_sampling: str = ""
    steps_needed: float = math.nan
    perturbation: float = math.nan
    start_excess: float = math.nan
    noise_excess: float = math.nan
    nonlinearity: np.ndarray = field(default=None, repr=False)
    linear: np.ndarray = field(default=None, repr=False)
    critical_lr: float = math.nan

    @property
    def predicted(self) -> str:
        """The exact prediction: "unstable" (lr > eta*, rho > 1), "stable" (lr <= eta*),
        "marginal" (lr within ``DECISION_MARGIN`` of eta*), or "" (not computed)."""
        eta = self.critical_lr
        if not eta > 0:
            return ""
        if abs(self.lr - eta) <= DECISION_MARGIN * eta:
            return "marginal"
        return "unstable" if self.lr > eta else "stable"

    def __str__(self) -> str:
        low, high = self.interval
        text = (f"escape_test: {self.escaped} of {self.runs} runs escaped (excess loss x{self.factor:g}) "
                f"in {self.steps} steps at lr = {self.lr:.6g}, batch size {self.batch_size}, "
                f"{self.sampling} batches; 95% interval [{low:.3f}, {high:.3f}]; "
                f"median final excess-loss ratio {np.median(self.final_ratios):.3g}")
        if self.predicted:
            if self.spectral_radius > 1:
                growth = (f"rho(lr) = {self.spectral_radius:.8g} per step, the mean square grows "
                          f"by x{self.factor:g} in {self.steps_needed:.4g} steps")
            else:
                growth = "rho(lr) <= 1, no growth"
            text += (f"\n  verdict: {self.verdict.upper()} ({self.reason})"
                     f"\n  exact prediction: eta*(B = {self.batch_size}) = {self.critical_lr:.8g}, "
                     f"lr / eta* = {self.lr / self.critical_lr:.4g}: mean-square "
                     f"{self.predicted.upper()}; {growth} ({self.prediction_sampling}; lr for "
                     f"torch.optim.SGD on this loss, mean reduction)")
        else:
            text += f"\n  verdict: {self.verdict.upper()} ({self.reason})"
        if math.isfinite(self.start_excess):
            text += (f"\n  start: perturbation {self.perturbation:.3g} of ||theta*||, excess loss "
                     f"{self.start_excess:.3g} (gradient noise over the run ~{self.noise_excess:.3g})")
        return text



# ----------------------------------------------------------------------------- escape test
def escape_test(model, inputs, targets, loss, lr, batch_size, *, steps=None, runs=4,
                sampling="reshuffle", seed=0, perturbation=None, factor=ESCAPE_FACTOR,
                dtype=torch.float64, device="cpu", family=None) -> EscapeResult:
    """Does real ``torch.optim.SGD`` leave this minimum? The user's own check of the theory.

    Each run copies the model (in ``dtype``, evaluation mode, as the curvature was computed),
    perturbs its trainable parameters along a random direction, then makes ``steps`` steps of
    ``torch.optim.SGD(lr)`` on the mean loss of each batch. A run has escaped when its excess
    loss over the minimum, ``L(theta_t) - L(theta*)`` on the whole training set, reaches
    ``factor`` (the paper's 1000) times its starting value, or becomes NaN or inf. The model
    passed in is not modified.

    The exact prediction comes with it: the mean-square growth factor per step rho(lr) of the
    linearised SGD (``fastsgdstab.spectral_radius`` on the model's Gauss-Newton family; learning
    rates for ``torch.optim.SGD`` on ``loss`` with mean reduction, so ``MSELoss()`` has twice the
    curvature and half the learning rate of the (1/2)||f - y||^2 convention; specification page,
    sections "The exact second-moment map", "Exact critical learning rate" and "From a network
    to a family"): the critical learning rate eta*(B), and above it rho(lr) > 1 and
    ``steps_needed = log(factor) / log rho``, the steps in which the mean square grows by
    ``factor``.

    The start (``perturbation=None``): inside the linear regime. The theory is about the
    linearised dynamics; a run says something about it only while the loss is its quadratic
    model ``Q(delta) = (1/2) delta^T H delta`` (H the Gauss-Newton Hessian at the minimum).
    Two things bound that window. From above, the loss's cubic terms: their relative size grows
    like ``||delta||``, and a run that escapes moves ``sqrt(factor)`` times further than its
    start, where descent on the nonlinear loss can mask the growth (the relative start 1e-3 of
    earlier releases did, on a digits MLP). From below, the per-sample gradients of a point that
    is not an exact interpolating minimum: their noise alone adds an excess loss of about
    ``N = (1/2) lr^2 lambda_1 E||g_B||^2 min(steps, 1 / |1 - rho|)`` during a run (per step
    ``lr^2 E||g_B||^2`` enters the second moment, weighted by at most the sharpness lambda_1,
    accumulated over the run or over the linear dynamics' memory ``1 / |1 - rho|``), and a start
    near it would escape or not by noise. So the start is chosen by measuring, along run 0's
    direction u, the relative gap ``|L(theta* + r u) - L* - Q(r u)| / Q(r u)`` on a grid of
    radii r (one forward pass each): admissible radii keep the gap below a quarter of
    ``ESCAPE_LINEARITY_RTOL`` both at ``r / sqrt(10)`` (a run that decays a little) and at
    ``2 sqrt(factor) r`` (a run that escapes, with a margin), and have a starting excess loss at
    least ``ESCAPE_NOISE_MARGIN`` times N; the start is the smallest admissible radius (the
    window is probed along a random direction, while a run that grows turns into the sharpest
    directions, where the cubic terms can be larger), and every run starts at the same predicted
    excess loss. When no radius is
    admissible the best compromise is taken and the verdict is most likely "inconclusive".

    During each run the gap is measured again at the start and at every step on which the run
    is above a tenth of its starting excess loss (one Jacobian-vector product over the data). The
    verdict: ``"unstable"`` when a run escaped; ``"stable"`` when none did, every run stayed
    within ``ESCAPE_LINEARITY_RTOL`` of its quadratic model and ended below its start, and, when
    rho > 1, ``steps >= steps_needed`` (long enough for the predicted growth); ``"inconclusive"``
    otherwise, with the reason. ``steps=None`` takes, when rho > 1, ``ESCAPE_STEPS_MARGIN`` times
    ``steps_needed`` (typical runs grow more slowly than the mean square), between
    ``ESCAPE_MIN_STEPS`` and ``ESCAPE_MAX_STEPS``; when rho <= 1, ``ESCAPE_STABLE_STEPS``.

    Batches: ``"reshuffle"`` as ``DataLoader(shuffle=True, drop_last=False)`` (a new permutation
    each epoch, consecutive batches of ``batch_size``, the last one shorter; the prediction uses
    the without-replacement operator, exact within an epoch's batches of B and for B = n);
    ``"bernoulli"`` (each sample with probability B/n; the batch's loss sum is divided by the
    nominal B, as in the library's model; an empty batch makes no step);
    ``"without_replacement"`` (a uniform B-subset each step); ``"with_replacement"`` (B uniform
    draws).

    Parameters
    ----------
    model : torch.nn.Module
        At (or near) a minimum of the loss on ``(inputs, targets)``.
    inputs, targets : torch.Tensor or array_like
    loss : torch loss module or callable
        As in :func:`family_from_model`.
    lr : float
        The learning rate of ``torch.optim.SGD``.
    batch_size : int
        In [1, n].
    steps : int, optional
        Steps per run (>= 1); default from rho(lr) as above.
    runs : int, default 4
        Runs (>= 1).
    sampling : str, default "reshuffle"
        One of ``ESCAPE_SAMPLING``.
    seed : int, default 0
        Seeds the perturbations and the batches (run r uses ``seed`` and r).
    perturbation : float, optional
        Relative size (in (0, 1)) of the starting perturbation, ``perturbation * ||theta*||``
        (``perturbation`` itself if ``theta* = 0``), instead of the linear-regime start. The
        linearity is checked all the same.
    factor : float, default 1000
        Growth of the excess loss that counts as an escape (> 1).
    dtype : torch.dtype, default torch.float64
        Precision of the runs (float64 so that the excess loss near an interpolating minimum is
        above round-off).
    device : str or torch.device, default "cpu"
    family : ModelFamily or HessianFamily, optional
        The family of this model, data and loss (from :func:`family_from_model`), to skip
        computing it again.

    Returns
    -------
    EscapeResult
        Runs, escaped count, fraction with its 95% Wilson interval, per-run excess-loss ratios,
        escape steps and nonlinearity, the verdict with its reason, and the exact prediction.

    Raises
    ------
    TypeError, ValueError
        Invalid arguments (the message names the argument); a loss without curvature at the
        point; a starting excess loss that is not positive (a perturbation below round-off).

    Examples
    --------
    >>> import torch
    >>> from fastsgdstab.torch import escape_test
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> X = torch.eye(2).repeat(4, 1)      # 8 samples
    >>> y = model(X).detach()              # an exact minimum; MSELoss: H = I, eta* = 2 at B = n
    >>> below = escape_test(model, X, y, torch.nn.MSELoss(), 1.8, 8, runs=2)
    >>> below.escaped, below.verdict, round(below.critical_lr, 6)
    (0, 'stable', 2.0)
    >>> above = escape_test(model, X, y, torch.nn.MSELoss(), 2.2, 8, runs=2)
    >>> above.escaped, above.verdict, round(above.spectral_radius, 6)
    (2, 'unstable', 1.44)
    """
    check_model(model)
    device = torch.device(device)
    per_sample = PerSampleLoss(loss)
    inputs, targets, n = check_data(inputs, targets, dtype, device)
    lr = check_lr(lr)
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, numbers.Integral) \
            or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an integer in [1, n] = [1, {n}]; got {batch_size!r}")
    batch_size = int(batch_size)
    if steps is not None:
        steps = check_positive_int(steps, "steps")
    runs = check_positive_int(runs, "runs")
    if sampling not in ESCAPE_SAMPLING:
        raise ValueError(f"sampling must be one of {', '.join(ESCAPE_SAMPLING)}; got {sampling!r}")
    seed = check_positive_int(seed, "seed", minimum=0)
    if perturbation is not None:
        perturbation = check_real_scalar(perturbation, "perturbation")
        if not 0 < perturbation < 1:
            raise ValueError(f"perturbation must be in (0, 1); got {perturbation}")
    factor = check_real_scalar(factor, "factor")
    if not factor > 1:
        raise ValueError(f"factor must be > 1; got {factor}")
    if family is not None:
        family = getattr(family, "family", family)
        if not isinstance(family, HessianFamily):
            raise TypeError(f"family must be the ModelFamily (or its HessianFamily) of this model; "
                            f"got {type(family).__name__}")
        if family.n != n:
            raise ValueError(f"family has n = {family.n} samples but the data has {n}: it is not "
                             f"this model's family on these inputs")

    work = n * sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch_policy(work):
        return _escape_test(model, inputs, targets, loss, per_sample, lr, batch_size, steps, runs,
                            sampling, seed, perturbation, factor, dtype, device, family, n)


def _escape_test(model, inputs, targets, loss, per_sample, lr, batch_size, steps, runs, sampling,
                 seed, perturbation, factor, dtype, device, family, n) -> EscapeResult:
    base = copy.deepcopy(model).to(device=device, dtype=dtype)
    base.eval()
    names = [name for name, p in base.named_parameters() if p.requires_grad]
    trainable = [p for p in base.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    for name, p in base.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"model parameter {name!r} holds NaN or inf")
    with torch.no_grad():
        per_sample.check(base(inputs[: min(n, 8)]), targets[: min(n, 8)])
    minimum = [p.detach().clone() for p in trainable]
    theta_norm = math.sqrt(sum(float((p * p).sum()) for p in minimum))

    def full_loss():
        with torch.no_grad():
            return float(per_sample.batch(base(inputs), targets))

    floor = full_loss()
    if not math.isfinite(floor):
        raise ValueError("the loss is NaN or inf at the model's parameters")

    # the exact prediction
    if family is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GaussNewtonWarning)  # the linearity check reports it
            family = family_from_model(model, inputs, targets, loss, dtype=dtype, device=device,
                                       check_gauss_newton=False).family
    scheme = "without_replacement" if sampling == "reshuffle" else sampling
    eta = float(critical_lr(family, batch_size, sampling=scheme))
    if lr > eta:
        # above eta* the top eigenvalue stands apart above 1: a fast solve. Below it rho(lr) is
        # the slow decay of the flattest directions, a cluster near 1 that costs a large family
        # thousands of products and sets nothing here (no growth is predicted).
        rho = float(spectral_radius(family, lr, batch_size, sampling=scheme))
        steps_needed = math.log(factor) / math.log(rho) if rho > 1 else math.inf
    else:
        rho, steps_needed = math.nan, math.inf
    if steps is None:
        if rho > 1:
            wanted = ESCAPE_STEPS_MARGIN * steps_needed
            steps = int(min(ESCAPE_MAX_STEPS, max(ESCAPE_MIN_STEPS, math.ceil(wanted)))) \
                if math.isfinite(wanted) else ESCAPE_MAX_STEPS
        else:
            steps = ESCAPE_STABLE_STEPS

    quadratic = _QuadraticModel(base, names, minimum, inputs, targets, per_sample)
    sharpness = family.sharpness()
    noise = _noise_excess(quadratic, lr, batch_size, sampling, n, sharpness, rho, steps)

    def direction(run):
        generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + run)
        u = [torch.randn(p.shape, generator=generator, dtype=dtype).to(device) for p in minimum]
        norm = math.sqrt(sum(float((t * t).sum()) for t in u))
        return [t / norm for t in u], generator

    def place(delta):
        with torch.no_grad():
            for p, p0, t in zip(trainable, minimum, delta):
                p.copy_(p0 + t)

    def gap_at(u, r):
        """(excess loss, quadratic model, relative gap) at theta* + r u."""
        place([r * t for t in u])
        excess = full_loss() - floor
        model_value = quadratic([r * t for t in u])
        if not model_value > 0:
            return excess, model_value, math.inf
        return excess, model_value, abs(excess - model_value) / model_value

    if perturbation is None:
        u0, _ = direction(0)
        curvature = quadratic(u0)            # Q(r u0) = curvature r^2
        if not curvature > 0:
            raise ValueError("the loss has no curvature along a random direction at the model's "
                             "parameters (a zero Gauss-Newton Hessian): nothing to test")
        # The smallest radius the parameters' own precision resolves (a perturbation below it
        # moves them by rounding only, and the loss's rounding then poses as nonlinearity).
        resolution = 64.0 * float(torch.finfo(trainable[0].dtype).eps) if trainable else 0.0
        target_excess, chosen_radius = _linear_start(lambda r: gap_at(u0, r)[2], curvature, noise,
                                                     theta_norm if theta_norm > 0 else 1.0, factor,
                                                     resolution)
        radius_of = None
    else:
        chosen_radius = perturbation * theta_norm if theta_norm > 0 else perturbation
        target_excess = None

    max_ratios, final_ratios = np.zeros(runs), np.zeros(runs)
    nonlinearity = np.zeros(runs)
    escape_steps = np.full(runs, -1, dtype=np.int64)
    start_excess = math.nan
    for run in range(runs):
        u, generator = direction(run)
        if target_excess is not None:
            radius_of = math.sqrt(target_excess / quadratic(u))
        else:
            radius_of = chosen_radius
        start, model_value, worst = gap_at(u, radius_of)
        if not start > 0:
            raise ValueError(f"the perturbed loss is not above the minimum's ({start:.3g}): the "
                             f"perturbation {radius_of:.3g} is below round-off; take a larger one")
        if run == 0:
            start_excess = start
        optimizer = torch.optim.SGD(trainable, lr=lr)
        batches = _batches(n, batch_size, sampling, generator)
        ratio = top = 1.0
        for step in range(1, steps + 1):
            index = next(batches)
            optimizer.zero_grad(set_to_none=True)
            if index.numel():
                value = per_sample.batch(base(inputs[index]), targets[index])
                if sampling == "bernoulli":
                    value = value * (index.numel() / batch_size)
                value.backward()
                optimizer.step()
            excess = full_loss() - floor
            ratio = excess / start
            if not math.isfinite(ratio):
                ratio = math.inf
            top = max(top, ratio)
            if ratio >= factor:
                escape_steps[run] = step
                break
            if ratio >= 0.1:
                with torch.no_grad():
                    delta = [p - p0 for p, p0 in zip(trainable, minimum)]
                model_value = quadratic(delta)
                gap = abs(excess - model_value) / model_value if model_value > 0 else math.inf
                worst = max(worst, gap)
        max_ratios[run], final_ratios[run], nonlinearity[run] = top, ratio, worst
    escaped = int((escape_steps >= 0).sum())
    linear = nonlinearity <= ESCAPE_LINEARITY_RTOL
    verdict, reason = _escape_verdict(escaped, runs, linear, nonlinearity, final_ratios, steps,
                                      steps_needed, rho if lr > eta else 0.0, start_excess, noise)
    relative = (radius_of / theta_norm) if theta_norm > 0 else radius_of
    return EscapeResult(runs=runs, escaped=escaped, fraction=escaped / runs,
                        interval=wilson_interval(escaped, runs), max_ratios=max_ratios,
                        final_ratios=final_ratios, escape_steps=escape_steps, lr=lr,
                        batch_size=batch_size, sampling=sampling, steps=steps, factor=factor,
                        verdict=verdict, reason=reason, spectral_radius=rho, critical_lr=eta,
                        prediction_sampling=scheme + (" operator for reshuffled batches"
                                                      if sampling == "reshuffle" else ""),
                        steps_needed=steps_needed, perturbation=relative,
                        start_excess=start_excess, noise_excess=noise,
                        nonlinearity=nonlinearity, linear=linear)


def _escape_verdict(escaped, runs, linear, nonlinearity, final, steps, steps_needed, rho, start,
                    noise):
    if escaped:
        return "unstable", f"{escaped} of {runs} runs grew by the factor"
    if not linear.all():
        bad = int((~linear).sum())
        return "inconclusive", (f"no run escaped, but {bad} of {runs} runs left the linear regime "
                                f"(excess loss off its quadratic model by up to "
                                f"{float(np.max(nonlinearity)):.2g} > {ESCAPE_LINEARITY_RTOL:g}"
                                + (f"; the gradient noise ~{noise:.2g} is not small against the start "
                                   f"{start:.2g}" if noise * ESCAPE_NOISE_MARGIN > start else "")
                                + "): descent on the nonlinear loss can mask growth")
    if rho > 1 and not steps >= steps_needed:
        return "inconclusive", (f"no run escaped, but {steps} steps are fewer than the "
                                f"{steps_needed:.4g} in which the mean square grows by the factor "
                                f"at rho = {rho:.8g}: too few for the predicted growth")
    grew = final > 1
    if grew.any():
        return "inconclusive", (f"no run escaped, but {int(grew.sum())} of {runs} runs ended above "
                                f"their start (median final excess-loss ratio "
                                f"{float(np.median(final)):.3g}) in {steps} steps: take more steps")
    return "stable", (f"no run escaped in {steps} steps, every run ended below its start and "
                      f"stayed in the linear regime")


def _linear_start(gap, curvature, noise, scale, factor, resolution=0.0):
    """(target starting excess loss, its radius along the probed direction): the smallest of
    the radii r at which the gap (relative, loss against its quadratic model) stays below
    ESCAPE_LINEARITY_RTOL / 4 at r / sqrt(10) and at 2 sqrt(factor) r, and whose excess loss
    curvature r^2 is at least ESCAPE_NOISE_MARGIN times the noise; the best compromise when
    no radius is admissible."""
    tolerance = ESCAPE_LINEARITY_RTOL / 4
    cache = {}

    def measured(r):
        key = round(math.log10(r), 6)
        if key not in cache:
            cache[key] = gap(r)
        return cache[key]

    floor_radius = math.sqrt(ESCAPE_NOISE_MARGIN * noise / curvature) if noise > 0 else 0.0
    # ||theta*|| down to 1e-16 of it, and never below what the parameters' dtype resolves
    grid = [scale * 10.0 ** (-j / 4) for j in range(0, 4 * 16 + 1)
            if 10.0 ** (-j / 4) >= resolution] or [scale * resolution]
    admissible, scores = [], []
    for r in grid:
        worst = max(measured(r / math.sqrt(10)), measured(2 * math.sqrt(factor) * r))
        quiet = r >= floor_radius
        scores.append((0 if quiet else 1, worst, -r))
        if quiet and worst <= tolerance:
            admissible.append(r)
    if admissible:
        # the lowest admissible radius: the window is probed along a random direction, while an
        # escaping run turns into the sharpest directions, where the cubic terms can be larger
        # (a digits MLP at 1.3 eta*, B = 2, started mid-window, left the linear regime)
        radius = min(admissible)
    else:
        radius = -min(scores)[2]
    return curvature * radius ** 2, radius


class _QuadraticModel:
    """``Q(delta) = (1/2) (1/n) sum_i (J_i delta)^T Lambda_i (J_i delta)`` at the minimum (one
    Jacobian-vector product over the data), and the per-sample gradients there."""

    def __init__(self, model, names, minimum, inputs, targets, per_sample):
        self.model, self.names, self.inputs, self.targets = model, names, inputs, targets
        self.params = dict(zip(names, minimum))
        self.rest = {k: b for k, b in model.named_buffers()}
        self.rest.update({k: p.detach() for k, p in model.named_parameters() if k not in self.params})
        self.n = inputs.shape[0]
        self.chunk = max(1, min(self.n, 4096))
        with torch.no_grad():
            outputs = chunked(lambda x: functional_call(model, (self.params, self.rest), (x,)), inputs,
                               self.chunk)
        self.output_shape = tuple(outputs.shape[1:])
        flat = outputs.reshape(self.n, -1)

        def sample_loss(out_flat, y):
            return per_sample(out_flat.reshape(self.output_shape), y).reshape(())

        self.sample_loss = sample_loss
        self.Lam = over_samples(hessian(sample_loss), flat, targets)         # (n, C, C)
        self.q = over_samples(grad(sample_loss), flat, targets)              # (n, C)

    def __call__(self, delta) -> float:
        tangent = dict(zip(self.names, delta))
        total = 0.0
        for s in range(0, self.n, self.chunk):
            x = self.inputs[s:s + self.chunk]
            _, u = jvp(lambda p: functional_call(self.model, (p, self.rest), (x,)), (self.params,),
                       (tangent,))
            u = u.reshape(x.shape[0], -1)
            total += float(torch.einsum("ic,icd,id->", u, self.Lam[s:s + self.chunk], u))
        return 0.5 * total / self.n

    def gradient_moments(self):
        """(||mean g_i||^2, mean ||g_i||^2) of the per-sample gradients g_i = J_i^T q_i."""
        total = None
        squares = 0.0
        for s in range(0, self.n, self.chunk):
            x, q = self.inputs[s:s + self.chunk], self.q[s:s + self.chunk]

            def weighted(p):
                out = functional_call(self.model, (p, self.rest), (x,)).reshape(x.shape[0], -1)
                return out

            out, pullback = torch.func.vjp(weighted, self.params)
            # the per-sample gradients' squared norms: one pull-back per sample (vmap over them)
            eye = torch.eye(x.shape[0], dtype=q.dtype, device=q.device)
            per = vmap(lambda e: pullback(e[:, None] * q)[0])(eye)
            flat = torch.cat([per[k].reshape(x.shape[0], -1) for k in self.names], dim=1)
            squares += float((flat * flat).sum())
            part = flat.sum(0)
            total = part if total is None else total + part
        mean = total / self.n
        return float((mean * mean).sum()), squares / self.n


def _noise_excess(quadratic, lr, batch_size, sampling, n, sharpness, rho, steps) -> float:
    """Excess loss that the per-sample gradients' noise alone adds during a run: (1/2) lr^2
    lambda_1 E||g_B||^2 min(steps, 1 / |1 - rho|) (see ``escape_test``)."""
    if not bool((quadratic.q != 0).any()):
        return 0.0
    mean2, second = quadratic.gradient_moments()
    variance = max(second - mean2, 0.0)
    B = batch_size
    if sampling == "with_replacement":
        batch2 = mean2 + variance / B
    elif sampling == "bernoulli":
        batch2 = mean2 + (1 - B / n) * second / B
    else:   # without replacement, reshuffle
        batch2 = mean2 + variance * (n - B) / (B * (n - 1)) if n > 1 else mean2
    # rho is NaN below eta* (not computed): the whole run then
    memory = min(steps, 1.0 / abs(1.0 - rho)) if math.isfinite(rho) and rho != 1 else steps
    return 0.5 * lr * lr * sharpness * batch2 * memory


def _batches(n, batch_size, sampling, generator):
    """An endless stream of index tensors, one per step."""
    while True:
        if sampling == "reshuffle":
            order = torch.randperm(n, generator=generator)
            for s in range(0, n, batch_size):
                yield order[s:s + batch_size]
        elif sampling == "bernoulli":
            yield torch.nonzero(torch.rand(n, generator=generator) < batch_size / n).reshape(-1)
        elif sampling == "without_replacement":
            yield torch.randperm(n, generator=generator)[:batch_size]
        else:
            yield torch.randint(n, (batch_size,), generator=generator)


