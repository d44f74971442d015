"""One object with every number the library knows about a (family, lr, batch size) setting.

The exact answers (spectral radius of the second-moment map, critical learning rate and batch
size) stand beside the paper's sufficient conditions (Theorem 1, Lemma 1, Bernoulli sampling
only), the necessary-condition Rayleigh bounds and the geometry (sharpness, non-uniformity,
coherence). Exact numbers are labelled exact, bounds are labelled bounds.
"""

from __future__ import annotations

import math

import numpy as np
from dataclasses import dataclass, replace

from ._validation import check_batch_size, check_lr
from .geometry import Coherence, coherence, coherence_work, non_uniformity
from ._config import DECISION_MARGIN
from ._engine import check_family, check_momentum
from ._threads import blas_policy
from .moments import critical_batch_size, critical_lr, spectral_radius
from .sampling import check_sampling
from .typical import TypicalCriticalLR, typical_critical_lr
from .theory import Lemma1, RayleighBounds, Theorem1, lemma1, rayleigh_bounds, theorem1

__all__ = ["Report", "report"]


@dataclass(frozen=True)
class Report:
    """Everything about one setting; ``str(report)`` is a readable summary.

    In the summary every sufficient condition (Theorem 1 (i) and (ii), Lemma 1 (a) and (b),
    and "lr above a Rayleigh bound") has one line that says exactly one of
    ``"proves divergence"``, ``"proves convergence"`` or ``"inconclusive (the sufficient
    condition does not hold)"`` (``VERDICTS``). Theorem 2 is a construction, not a condition on
    a given family, so it has no line (see :func:`fastsgdstab.theory.theorem2_family`).

    Attributes
    ----------
    n, d, rank : int
        Family sizes.
    lr, batch_size : float
    sampling : str
    sharpness : float
        ``lambda_1(H)`` (exact).
    non_uniformity : float
        Wu, Ma & E's ``lambda_1((1/n) sum_i H_i^2 - H^2)^(1/2)`` (exact).
    coherence : Coherence
        sigma, Perron root of S, max sample sharpness (``matrix`` is None: call
        :func:`fastsgdstab.coherence` for S itself).
    spectral_radius : float
        Exact ``rho(Q)``: the asymptotic per-step growth factor of ``E||w_t||^2``.
    verdict : str
        ``"converges"`` (rho < 1), ``"diverges"`` (rho > 1) or ``"marginal"`` (rho = 1 within
        1e-9): the exact mean-square answer.
    critical_lr : float
        Exact critical learning rate for this batch size and scheme.
    critical_batch_size : float
        Exact smallest stable (real) batch size for this lr and scheme (inf: none is).
    theorem1, lemma1 : Theorem1, Lemma1 or None
        The paper's sufficient conditions; None unless ``sampling == "bernoulli"`` and there is
        no momentum (they are proven for plain SGD with Bernoulli sampling only).
    rayleigh : RayleighBounds or None
        Upper bounds on the critical learning rate for this scheme (plain SGD; None with
        momentum, for which they are not derived).
    momentum, nesterov
        The optimiser (``momentum = 0``: plain SGD); the exact numbers are for it.
    loss_floor : StationaryResult or None
        For a family with per-sample gradients: :func:`fastsgdstab.stationary` at this setting
        (the time-averaged training loss above its minimum once SGD settles); None otherwise,
        or when there is no stationary state (``loss_floor_note`` then says why).
    loss_floor_note : str
        Why there is no floor to show ("" when there is one or the family has no gradients).
    typical : TypicalCriticalLR or None
        With ``report(..., typical=True)``: the typical (Lyapunov) critical lr, an estimate
        with its interval (:func:`fastsgdstab.typical_critical_lr`); None otherwise.
    """

    n: int
    d: int
    rank: int
    lr: float
    batch_size: float
    sampling: str
    sharpness: float
    non_uniformity: float
    coherence: Coherence
    spectral_radius: float
    verdict: str
    critical_lr: float
    critical_batch_size: float
    theorem1: Theorem1 | None
    lemma1: Lemma1 | None
    rayleigh: RayleighBounds | None
    momentum: float = 0.0
    nesterov: bool = False
    loss_floor: object = None  # StationaryResult, for a family with gradients (see below)
    loss_floor_note: str = ""
    typical: TypicalCriticalLR | None = None

    def __str__(self) -> str:
        return "\n".join(self._header() + self._exact_lines() + self._typical_lines()
                         + self._geometry_lines() + self._necessary_lines()
                         + self._sufficient_lines() + self._loss_floor_lines())
    # ---- loss floor (issue 20): a separate block, shown only for a family with gradients
    def _loss_floor_lines(self) -> list:
        if self.loss_floor is None and not self.loss_floor_note:
            return []
        if self.loss_floor is None:
            return ["", "Loss floor (per-sample gradients do not vanish)", f"  {self.loss_floor_note}"]
        floor = self.loss_floor
        return ["", "Loss floor (per-sample gradients do not vanish; exact, stationary covariance)",
                f"  stationary excess loss   {floor.excess_loss:.10g}   (proven in "
                f"[{floor.lower:.6g}, {floor.upper:.6g}]; the loss's own convention)"]

    def _typical_lines(self) -> list:
        if self.typical is None:
            return []
        t = self.typical
        low, high = t.interval
        return [
            f"Typical runs (Lyapunov exponent; an estimate, {100 * t.level:g}% interval over runs)",
            f"  typical critical lr      {t.value:.6g}   [{low:.6g}, {high:.6g}]   "
            f"= {t.value / self.critical_lr:.4g} eta*",
            "  (a single run shrinks below it and grows above it; between eta* and it, typical runs",
            f"   shrink while rare runs carry the mean square; {t.runs} runs x {t.steps} steps at "
            f"{t.lrs.size} lrs, {t.cost.elapsed_seconds:.1f} s)",
            "",
        ]

    # Exact numbers are shown to 10 significant digits, bounds and conditions to 6.
    def _header(self) -> list:
        optimiser = ""
        if self.momentum:
            optimiser = f", momentum={_exact(self.momentum)}" + (", nesterov" if self.nesterov else "")
        return [f"SGD stability: n={self.n} samples, d={self.d}, rank {self.rank}; "
                f"lr={_exact(self.lr)}, batch_size={_exact(self.batch_size)}, sampling={self.sampling}"
                + optimiser, ""]

    def _exact_lines(self) -> list:
        batch = self.critical_batch_size
        return [
            "Exact (second-moment map; top eigenvalues certified)",
            f"  spectral radius rho(Q)   {_exact(self.spectral_radius)}   -> {self.verdict} in mean square",
            f"  critical lr eta*         {_exact(self.critical_lr)}   (stable iff lr <= eta*)",
            f"  critical batch size      {_exact(batch)}"
            + ("   (no batch size is stable at this lr)" if math.isinf(batch) else
               "   (stable iff batch_size >= this)"),
            "  (learning rates for the family's loss: H_i is the Hessian of sample i's loss and SGD",
            "   steps on the batch mean; from_features means (1/2)(x_i . w - y_i)^2, half of MSELoss)",
            "",
        ]

    def _geometry_lines(self) -> list:
        gradient_descent = 2.0 / self.sharpness if self.sharpness > 0 else math.inf
        return [
            "Geometry (exact)",
            f"  sharpness lambda_1(H)    {_exact(self.sharpness)}   (gradient descent stable iff "
            f"lr <= {_exact(gradient_descent)})",
            f"  non-uniformity s         {_exact(self.non_uniformity)}",
            f"  coherence sigma          {_exact(self.coherence.sigma)}   (Perron root of S "
            f"{_exact(self.coherence.lambda_S)} / max_i lambda_1(H_i) "
            f"{_exact(self.coherence.max_sample_sharpness)})",
            "",
        ]

    def _necessary_lines(self) -> list:
        if self.rayleigh is None:
            return ["Necessary conditions (Rayleigh bounds): derived for plain SGD only, not shown "
                    "with momentum", ""]
        bounds = (("(15), X = v v^T", self.rayleigh.top_direction),
                  ("(16), X = I    ", self.rayleigh.identity))
        return [
            f"Rayleigh bounds (eta* <= bound, {self.sampling} sampling; an lr above one diverges)",
            *[f"  bound {name}  lr > {_bound(value)}: "
              f"{_verdict(diverges=_above(self.lr, value))}" for name, value in bounds],
            "",
        ]

    def _sufficient_lines(self) -> list:
        if self.momentum:
            return ["Paper's sufficient conditions (Theorem 1, Lemma 1): proven for plain SGD only,",
                    "  so not evaluated with momentum (the exact numbers above include it)."]
        if self.theorem1 is None:
            return [
                "Paper's sufficient conditions (Theorem 1, Lemma 1): proven for Bernoulli sampling only,",
                f"  so not evaluated for {self.sampling} sampling (to see them: sampling='bernoulli'",
                "  in Python, --sampling bernoulli on the command line).",
            ]
        t1, l1 = self.theorem1, self.lemma1
        lines = [
            "Paper's sufficient conditions (Bernoulli sampling; bounds, not exact)",
            "  Theorem 1, eta_T1 = sigma / (lambda_1(H) sqrt(n/B - 1))",
            f"    (i)  lr > 2/lambda_1(H) = {_bound(t1.gd_threshold)}: "
            f"{_verdict(diverges=t1.condition_i)}",
            f"    (ii) lr > eta_T1 = {_bound(t1.lr_threshold)}: {_verdict(diverges=t1.condition_ii)}",
        ]
        if t1.diverges:
            lines.append(f"         proven growth from w_0 ~ N(0, I): E||w_k||^2 >= "
                         f"{_bound(t1.growth_lower_bound)}^k")
        lines += [
            f"  Lemma 1, c = {_bound(l1.c)}, kappa = {_bound(l1.kappa)}, "
            f"c kappa = {_bound(l1.growth_lower_bound)}",
            f"    (a) c kappa > 1: {_verdict(diverges=bool(l1.diverges))}",
        ]
        if l1.diverges:
            lines.append(f"        proven growth from w_0 ~ N(0, I): E||w_k||^2 >= "
                         f"{_bound(l1.growth_lower_bound)}^k")
        lines.append(f"    (b) ||I - lr H|| = {_bound(l1.contraction_norm)} <= 1 - eps and "
                     f"c kappa <= eps for an eps in (0, 1): {_verdict(converges=bool(l1.converges))}")
        if l1.converges:
            lines.append(f"        eps = {_bound(l1.eps)}: E||w_k||^2 <= d {_bound(l1.rho)}^k from "
                         f"w_0 ~ N(0, I) on the range of H")
        rayleigh = self.rayleigh is not None and _above(self.lr, self.rayleigh.best)
        if not (t1.diverges or l1.diverges or l1.converges or rayleigh):
            lines.append("  (no bound above proves anything here, either way: the exact spectral "
                         "radius decides)")
        return lines


PROVES_DIVERGENCE = "proves divergence"
PROVES_CONVERGENCE = "proves convergence"
INCONCLUSIVE = "inconclusive (the sufficient condition does not hold)"
VERDICTS = (PROVES_DIVERGENCE, PROVES_CONVERGENCE, INCONCLUSIVE)
"""The three things a sufficient condition's line of the report can say (exactly one of them)."""


def _verdict(*, diverges: bool = False, converges: bool = False) -> str:
    """A sufficient condition's verdict: what it proves when it holds, else inconclusive."""
    if diverges:
        return PROVES_DIVERGENCE
    if converges:
        return PROVES_CONVERGENCE
    return INCONCLUSIVE


def _above(lr: float, bound: float) -> bool:
    """``lr > bound`` beyond the decision margin (round-off at an equality proves nothing)."""
    return lr > bound * (1.0 + DECISION_MARGIN)


def _exact(value) -> str:
    """An exact number: 10 significant digits (integers as integers)."""
    if isinstance(value, int):
        return str(value)
    return "inf" if math.isinf(value) else f"{value:.10g}"


def _bound(value: float) -> str:
    """A bound or a condition's quantity: 6 significant digits."""
    return "inf" if math.isinf(value) else f"{value:.6g}"


@blas_policy(size_of=coherence_work)
def report(family, lr, batch_size, *, sampling="bernoulli", momentum=0.0, nesterov=False,
           typical=False) -> Report:
    """Every number about a setting: exact answers, geometry, the paper's bounds.

    Exact: the spectral radius of the second-moment map and its verdict, the critical learning
    rate ``eta*`` and the critical batch size (sections "Exact critical learning rate" and
    "Exact critical batch size"). Geometry: sharpness, non-uniformity, coherence sigma. Bounds:
    the Rayleigh upper bounds on ``eta*`` for this scheme, and, for Bernoulli sampling only,
    Theorem 1 and Lemma 1.

    Parameters
    ----------
    family : HessianFamily
    lr : float
        Learning rate, > 0.
    batch_size : float
        Real number in [1, n].
    sampling : {"bernoulli", "without_replacement", "with_replacement"}
    momentum : float, default 0.0
        torch.optim.SGD's momentum, in [0, 1) (specification page, section "Momentum"): the
        exact numbers are then those of heavy ball (or Nesterov); the paper's bounds, derived
        for plain SGD, are left out.
    nesterov : bool, default False
        Nesterov momentum (requires ``momentum > 0``, as torch does).
    typical : bool, default False
        Also estimate the typical (Lyapunov) critical lr beside ``eta*``
        (:func:`fastsgdstab.typical_critical_lr` with its default budget and seed 0; it
        simulates, seconds rather than milliseconds).

    Returns
    -------
    Report
        ``print(report(...))`` shows a readable summary.

    Raises
    ------
    TypeError, ValueError
        ``family`` is not a HessianFamily; ``lr`` not > 0; ``batch_size`` outside [1, n] (an
        integer for the schemes without Bernoulli's random batch size); unknown ``sampling``.

    Warns
    -----
    CertificationWarning
        An eigenvalue could be enclosed only in a bracket wider than the certification
        tolerance (the bracket is still proven).

    Examples
    --------
    >>> from fastsgdstab import HessianFamily, report
    >>> family = HessianFamily.from_features([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> result = report(family, lr=0.8, batch_size=1)
    >>> result.verdict, round(result.critical_lr, 6)
    ('converges', 0.986572)
    >>> print(result)   # doctest: +ELLIPSIS
    SGD stability: n=3 samples, d=2, rank 1; lr=0.8, batch_size=1, sampling=bernoulli
    ...
    >>> report(family, lr=0.8, batch_size=1, momentum=0.9).verdict   # momentum 0.9 at this lr
    'diverges'
    >>> print(report(family, lr=0.8, batch_size=1, typical=True))   # doctest: +ELLIPSIS
    SGD stability: ...
    Typical runs (Lyapunov exponent; an estimate, 95% interval over runs)
      typical critical lr      ...   [...]   = ... eta*
    ...
    """
    family = check_family(family)
    sampling = check_sampling(sampling)
    lr = check_lr(lr)
    batch_size = check_batch_size(batch_size, family.population_size, integer=sampling != "bernoulli",
                                  samples=family.n)
    momentum, nesterov = check_momentum(momentum, nesterov)
    if not isinstance(typical, (bool, np.bool_)):
        raise TypeError(f"typical must be True or False; got {typical!r}")
    optimiser = {"momentum": momentum, "nesterov": nesterov}
    rho = spectral_radius(family, lr, batch_size, sampling=sampling, **optimiser)
    if rho > 1.0 + DECISION_MARGIN:
        verdict = "diverges"
    elif rho < 1.0 - DECISION_MARGIN:
        verdict = "converges"
    else:
        verdict = "marginal"
    # the paper's bounds assume the samples are the whole training set (no probe)
    bernoulli = sampling == "bernoulli" and momentum == 0.0 and family.population_size == family.n
    # The report keeps sigma and its parts, not S itself (up to 128 MB at n = 4096).
    geometry = replace(coherence(family), matrix=None)
    return Report(
        n=family.n,
        d=family.d,
        rank=family.rank,
        lr=lr,
        batch_size=batch_size,
        sampling=sampling,
        sharpness=family.sharpness(),
        non_uniformity=non_uniformity(family),
        coherence=geometry,
        spectral_radius=rho,
        verdict=verdict,
        critical_lr=critical_lr(family, batch_size, sampling=sampling, **optimiser),
        critical_batch_size=critical_batch_size(family, lr, sampling=sampling, **optimiser),
        theorem1=theorem1(family, lr, batch_size, sigma=geometry.sigma) if bernoulli else None,
        lemma1=lemma1(family, lr, batch_size) if bernoulli else None,
        rayleigh=rayleigh_bounds(family, batch_size, sampling=sampling) if momentum == 0.0 else None,
        momentum=momentum,
        nesterov=nesterov,
        **_loss_floor(family, lr, batch_size, sampling, optimiser),
        typical=(typical_critical_lr(family, batch_size, sampling=sampling, **optimiser)
                 if typical else None),
    )


def _loss_floor(family, lr, batch_size, sampling, optimiser) -> dict:
    """The report's loss-floor fields (issue 20): stationary's result, or why there is none."""
    if family.gradients is None:
        return {}
    from .loss_floor import NoStationaryStateError, stationary
    try:
        return {"loss_floor": stationary(family, lr, batch_size, sampling=sampling, **optimiser)}
    except NoStationaryStateError as exc:
        return {"loss_floor_note": str(exc)}
