"""The paper's theory on top of the exact engine: Theorem 1, Lemma 1, Theorem 2, Rayleigh bounds.

Dexter et al. (ICLR 2024) state sufficient conditions under Bernoulli sampling (specification page,
section "The paper's results (Bernoulli sampling)"): Theorem 1 and Lemma 1 (a) for divergence, Lemma 1 (b) for
convergence. A sufficient condition that does not hold proves nothing, so every ``diverges`` /
``converges`` here is ``True`` or ``None`` (inconclusive), never ``False``: only the exact
engine (:func:`fastsgdstab.spectral_radius`, :func:`fastsgdstab.critical_lr`) decides
stability. Theorem 2's construction and the necessary-condition Rayleigh bounds of Mulayoff &
Michaeli (section "Other criteria to report beside the exact answer") complete the module.

Scale: every quantity is computed from the family in units of its sharpness (``lr lambda_1(H)``,
the unit eigenvalues and factor rows of ``HessianFamily``'s reduction) and products of powers
go through :func:`_product`, so nothing raises ``OverflowError`` or turns into NaN at any
learning rate floats represent: a quantity whose true value exceeds the float range is ``inf``
(specification page, section "Certified answers and scale"). ``n/B - 1`` is computed as ``(n - B) / B``,
which keeps its relative accuracy at B just below n.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ._config import DECISION_MARGIN, THEORY_RTOL
from ._engine import SandwichOperator, check_family, reduced as reduced_family, top_eigenvalue
from ._validation import check_batch_size, check_lr, check_positive_int, check_real_scalar
from ._validation import check_batch_sizes
from .geometry import coherence, coherence_work
from ._threads import blas_policy, operator_work
from .family import HessianFamily
from .sampling import check_sampling, map_coefficients

__all__ = [
    "Theorem1",
    "Lemma1",
    "RayleighBounds",
    "theorem1",
    "lemma1",
    "noise_norm",
    "theorem2_family",
    "theorem2_critical_lr",
    "theorem1_sigma_boundary",
    "theorem2_sigma_boundary",
    "theorem1_closed_form_diverges",
    "theorem2_bernoulli_diverges",
    "rayleigh_bounds",
]


def _family_work(family, *args, **kwargs) -> int:
    """Work of the reduction and of an operator product (threading policy, ``_threads``)."""
    return operator_work(family)


def _theorem1_work(family, *args, sigma=None, **kwargs) -> int:
    """Work of the reduction and, unless sigma is given, of the coherence's Gram blocks."""
    return operator_work(family) if sigma is not None else coherence_work(family)


def _product(*terms) -> float:
    """``prod base ** power`` over ``(base, power)`` pairs (bases >= 0, integer powers), with no
    intermediate overflow or underflow: ``inf`` only if the result itself exceeds the float range
    (0.0 if it underflows). A zero base (positive power) gives 0.0 even beside an infinite one:
    in every use here a zero factor means the quantity vanishes (no noise, no curvature)."""
    if any(base == 0.0 and power > 0 for base, power in terms):
        return 0.0
    if any(base == math.inf for base, power in terms):
        return math.inf if any(base == math.inf and power > 0 for base, power in terms) else 0.0
    mantissa, exponent = 1.0, 0
    for base, power in terms:
        m, e = math.frexp(base)
        mantissa, e2 = math.frexp(mantissa * m**power)  # m in [0.5, 1), |power| <= 4: no overflow
        exponent += e * power + e2
    if exponent > 1024:
        return math.inf
    return math.ldexp(mantissa, exponent)


def _check_whole_training_set(family, name: str) -> None:
    """The paper's theorems are for Bernoulli batches of the family's own n samples; a probe of
    a larger training set (``population_size`` > n) is refused, naming what to use instead."""
    if family.population_size != family.n:
        raise ValueError(
            f"{name} is the paper's bound for a family whose n samples are the whole training set; "
            f"this family is a probe of n = {family.n} samples from population_size = "
            f"{family.population_size} (section 'A probe subset of a large training set'). Use "
            f"the exact engine (critical_lr, spectral_radius), which takes the population's "
            f"batch law, or family.with_population_size({family.n}) for the probe alone")


def _noise_ratio(n: int, batch_size: float) -> float:
    """``n/B - 1`` as ``(n - B) / B``: no cancellation at B just below n, and exactly 0 at B = n."""
    return max((n - batch_size) / batch_size, 0.0)


def _noise_coefficient(lr: float, n: int, batch_size: float) -> float:
    """``c = lr^2 (n - B) / (n^2 B)``: the Bernoulli map is (I - lr H) X (I - lr H) + c sum_i H_i X H_i."""
    return _product((lr, 2), (_noise_ratio(n, batch_size), 1), (float(n), -2))


def _consistent_product(a: float, b: float, *unit_terms) -> float:
    """``a b`` as the reported fields multiply (so that, e.g., ``c kappa <= eps`` holds to the last
    bit), unless that product over- or underflows where the true one need not: then the same
    quantity from its units-of-the-sharpness ``unit_terms`` (see :func:`_product`)."""
    tiny = np.finfo(float).tiny
    if tiny <= a < math.inf and tiny <= b < math.inf and tiny <= a * b < math.inf:
        return a * b
    return _product(*unit_terms)


def _sharpness_power(reduced, power: int) -> float:
    """``lambda_1(H)^power`` (inf or 0.0 outside the float range), from the reduction's exact
    power-of-two scale."""
    return _product((reduced.scaled_sharpness, power), (reduced.scale, 2 * power))


@dataclass(frozen=True)
class Theorem1:
    """Theorem 1 of Dexter et al. (divergence under Bernoulli sampling); see :func:`theorem1`.

    Attributes
    ----------
    diverges : True or None
        True if condition (i) or (ii) holds (proven mean-square divergence); None otherwise
        (the theorem says nothing: it never proves stability).
    condition_i, condition_ii : bool
        ``lr lambda_1(H) > 2``; ``lambda_1(H) > (sigma / lr) (n/B - 1)^(-1/2)`` (strict, B < n).
    gd_threshold : float
        ``2 / lambda_1(H)``: (i) holds for every lr above it.
    lr_threshold : float
        ``eta_T1 = sigma / (lambda_1(H) sqrt(n/B - 1))``: (ii) holds for every lr above it
        (``inf`` at B = n).
    growth_factor_i, growth_factor_ii : float
        ``(1 - lr lambda_1(H))^2`` and ``g = (lr / sigma)^2 (n/B - 1) lambda_1(H)^2``: from
        ``w_0 ~ N(0, I)``, ``E||w_k||^2 >= factor^k`` for each (whether or not it exceeds 1).
    growth_lower_bound : float
        The larger of the two: the proven per-step growth lower bound.
    sharpness, sigma, lr, batch_size, n
        The quantities used.
    """

    diverges: bool | None
    condition_i: bool
    condition_ii: bool
    gd_threshold: float
    lr_threshold: float
    growth_factor_i: float
    growth_factor_ii: float
    growth_lower_bound: float
    sharpness: float
    sigma: float
    lr: float
    batch_size: float
    n: int


@blas_policy(size_of=_theorem1_work)
def theorem1(family, lr, batch_size, *, sigma=None) -> Theorem1:
    """Theorem 1 of Dexter et al.: sufficient conditions for mean-square divergence (Bernoulli).

    Linearised SGD with Bernoulli sampling diverges in mean square if

    (i) ``lambda_1(H) > 2 / lr``, or
    (ii) ``lambda_1(H) > (sigma / lr) (n/B - 1)^(-1/2)`` for ``B < n`` (strict: equality gives
         growth factor 1, which is not divergence),

    i.e. for every ``lr > min(2 / lambda_1(H), eta_T1)``, ``eta_T1 = sigma / (lambda_1(H)
    sqrt(n/B - 1))``. The proof gives, from ``w_0 ~ N(0, I)``, ``E||w_k||^2 >= g^k`` with
    ``g = (lr / sigma)^2 (n/B - 1) lambda_1(H)^2``; under (i) also ``E||w_k||^2 >=
    ((1 - lr lambda_1(H))^2)^k``. (Not ``g^k E||w_0||^2 = d g^k``, which is false in general.)
    ``eta_T1`` is never below the exact Bernoulli threshold ``eta*``. Both conditions are
    decided with a relative margin of 1e-9 (a factor within it of the threshold is reported
    inconclusive), so round-off at an exact equality never proves divergence.

    Parameters
    ----------
    family : HessianFamily
    lr : float
        Learning rate, > 0.
    batch_size : float
        Nominal Bernoulli batch size B, a real number in [1, n].
    sigma : float, optional
        The family's coherence, if already computed (``coherence(family).sigma``); computed
        here otherwise.

    Returns
    -------
    Theorem1
        ``diverges`` is True or None (never False), with the conditions, thresholds and growth
        factors.

    Raises
    ------
    TypeError, ValueError
        ``family`` not a HessianFamily; ``lr`` not > 0; ``batch_size`` outside [1, n].

    Examples
    --------
    >>> from fastsgdstab import HessianFamily
    >>> from fastsgdstab.theory import theorem1
    >>> family = HessianFamily.from_features([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    >>> result = theorem1(family, lr=1.5, batch_size=1)
    >>> result.diverges, result.condition_ii, round(result.lr_threshold, 6)
    (True, True, 1.154701)
    >>> theorem1(family, lr=0.5, batch_size=1).diverges is None   # inconclusive, not "stable"
    True
    """
    family = check_family(family)
    _check_whole_training_set(family, "theorem1")
    lr = check_lr(lr)
    batch_size = check_batch_size(batch_size, family.n)
    if sigma is not None:
        sigma = _check_coherence(sigma)
    return _theorem1(family, lr, batch_size, sigma)


def _theorem1(family: HessianFamily, lr: float, batch_size: float, sigma: float | None) -> Theorem1:
    """Theorem 1 on validated arguments; ``sigma`` may be passed in when already computed."""
    n = family.n
    reduced = reduced_family(family)
    top = family.sharpness()
    noise_ratio = _noise_ratio(n, batch_size)  # n/B - 1
    if reduced.k == 0 or top <= 0.0:
        # No curvature: nothing moves, neither condition can hold.
        return Theorem1(None, False, False, math.inf, math.inf, 1.0, 0.0, 1.0, 0.0, math.nan,
                        lr, batch_size, n)
    if sigma is None:
        sigma = _coherence_sigma(family)
    unit_lr = reduced.unit_lr(lr)  # lr lambda_1(H), inf beyond the float range
    inverse_top = _sharpness_power(reduced, -1)
    gd_threshold = 2.0 * inverse_top
    lr_threshold = (_product((sigma, 1), (inverse_top, 1), (math.sqrt(noise_ratio), -1))
                    if noise_ratio > 0 else math.inf)
    growth_i = (1.0 - unit_lr) * (1.0 - unit_lr)
    growth_ii = _theorem1_growth(unit_lr, sigma, noise_ratio)
    condition_i = unit_lr > 2.0 * (1.0 + DECISION_MARGIN)
    condition_ii = noise_ratio > 0 and growth_ii > 1.0 + DECISION_MARGIN
    return Theorem1(
        diverges=True if (condition_i or condition_ii) else None,
        condition_i=condition_i,
        condition_ii=condition_ii,
        gd_threshold=gd_threshold,
        lr_threshold=lr_threshold,
        growth_factor_i=growth_i,
        growth_factor_ii=growth_ii,
        growth_lower_bound=max(growth_i, growth_ii),
        sharpness=top,
        sigma=sigma,
        lr=lr,
        batch_size=batch_size,
        n=n,
    )


def _coherence_sigma(family: HessianFamily) -> float:
    """The coherence sigma; scale-free, so at an extreme scale (lambda_1(H) outside [1e-100,
    1e100], where ``coherence``'s products of factor rows leave the float range) it is computed
    on the family in units of its sharpness."""
    reduced = reduced_family(family)
    if 1e-100 <= reduced.sharpness <= 1e100:
        return coherence(family).sigma
    # row i r + c of unit_rows is column c of the i-th reduced factor
    unit = HessianFamily(reduced.unit_rows.reshape(family.n, reduced.rank, reduced.k).transpose(0, 2, 1))
    return coherence(unit).sigma


@blas_policy(size_of=_family_work)
def noise_norm(family) -> float:
    """``kappa = lambda_max(X -> sum_i H_i X H_i)`` on symmetric matrices.

    Equals ``lambda_1(sum_i H_i (x) H_i)`` and ``n lambda_max(N)`` with ``N(X) = (1/n) sum_i
    H_i X H_i``; the operator is PSD and cone-preserving, so Lanczos from the identity finds it
    (matrix-free, in H's eigenbasis, no d^2 x d^2 matrix).

    Parameters
    ----------
    family : HessianFamily

    Returns
    -------
    float
        kappa (certified top eigenvalue; ``inf`` if it exceeds the float range).

    Raises
    ------
    TypeError
        ``family`` is not a HessianFamily.

    Examples
    --------
    >>> from fastsgdstab import HessianFamily
    >>> from fastsgdstab.theory import noise_norm
    >>> round(noise_norm(HessianFamily.from_features([[1.0, 0.0], [0.0, 2.0]])), 12)   # 1 and 16
    16.0
    """
    family = check_family(family)
    return _product((_unit_noise_norm(family), 1), (_sharpness_power(reduced_family(family), 2), 1))


def _unit_noise_norm(family: HessianFamily) -> float:
    """``kappa / lambda_1(H)^2``: kappa of the family in units of its sharpness (of order 1)."""
    reduced = reduced_family(family)
    if reduced.k == 0:
        return 0.0
    # N is cone-preserving and self-adjoint: the engine's certified top eigenvalue (a proven
    # bracket, with a CertificationWarning if it is wider than the certification tolerance).
    operator = SandwichOperator(reduced, np.ones((reduced.k, reduced.k)),
                                np.zeros((reduced.k, reduced.k)), float(family.n))
    return float(top_eigenvalue(operator, what="noise_norm", rtol=THEORY_RTOL).value)


def _unit_sample_sharpness(family: HessianFamily) -> float:
    """``max_i lambda_1(H_i) / lambda_1(H)`` (in [1, n] for rank 1), from the unit factor rows."""
    reduced = reduced_family(family)
    if reduced.k == 0:
        return 0.0
    rows, n, rank = reduced.unit_rows, family.n, reduced.rank
    if rank == 1:
        return float(np.max(np.einsum("ij,ij->i", rows, rows)))
    blocks = rows.reshape(n, rank, reduced.k)
    grams = np.matmul(blocks, blocks.transpose(0, 2, 1))
    return float(np.max(np.linalg.eigvalsh(grams)[:, -1]))


@dataclass(frozen=True)
class Lemma1:
    """Lemma 1 (as reconstructed on the specification page), Bernoulli sampling; see :func:`lemma1`.

    Attributes
    ----------
    diverges : True or None
        Part (a): ``c kappa > 1``.
    converges : True or None
        Part (b): some eps in (0, 1) has ``||I - lr H||_2 <= 1 - eps`` on the range of H and
        ``c kappa <= eps``.
    c : float
        ``lr^2 (n - B) / (n^2 B)``.
    kappa : float
        ``lambda_max(X -> sum_i H_i X H_i)``.
    max_sample_sharpness : float
        ``max_i lambda_1(H_i)``; ``c max_i lambda_1(H_i)^2 > 1`` is the cheaper sufficient form
        of (a) (``cheap_diverges``), since ``kappa >= max_i lambda_1(H_i)^2``.
    cheap_diverges : True or None
    growth_lower_bound : float
        ``c kappa``: from ``w_0 ~ N(0, I)``, ``E||w_k||^2 >= (c kappa)^k``.
    contraction_norm : float
        ``||I - lr H||_2`` on the range of H (the largest ``|1 - lr lam_j|``, lam_j > 0).
    eps : float
        The eps of (b) when it holds (chosen in ``[c kappa, 1 - contraction_norm]`` to minimise
        ``rho``), else the largest admissible value ``1 - contraction_norm`` (possibly <= 0).
        Both parts are decided with a relative margin of 1e-9 against round-off.
    rho : float
        ``(1 - eps)^2 + eps`` when (b) holds (the map's norm bound), else nan. Then from
        ``w_0 ~ N(0, I)`` on the range of H ``E||w_k||^2 <= d rho^k``, and from a fixed
        ``w_0`` in the range ``E||w_k||^2 <= sqrt(d) rho^k ||w_0||^2``.
    map_norm_bound : float
        ``||I - lr H||_2^2 + c kappa``, an upper bound on the spectral radius that is never
        larger than ``rho`` (reported for information; (b) is decided as the lemma states it).
    lr, batch_size, n
    """

    diverges: bool | None
    converges: bool | None
    c: float
    kappa: float
    max_sample_sharpness: float
    cheap_diverges: bool | None
    growth_lower_bound: float
    contraction_norm: float
    eps: float
    rho: float
    map_norm_bound: float
    lr: float
    batch_size: float
    n: int


@blas_policy(size_of=_family_work)
def lemma1(family, lr, batch_size) -> Lemma1:
    """Lemma 1 (reconstruction): a divergence and a convergence condition, Bernoulli sampling.

    With ``c = lr^2 (n - B) / (n^2 B)`` and ``kappa = lambda_max(X -> sum_i H_i X H_i)``:

    (a) if ``c kappa > 1``, SGD diverges in mean square, at least like ``(c kappa)^k`` from
        ``w_0 ~ N(0, I)``. Cheaper sufficient form: ``c max_i lambda_1(H_i)^2 > 1``.
    (b) if some ``eps`` in (0, 1) has ``||I - lr H||_2 <= 1 - eps`` on the range of H and
        ``c kappa <= eps``, SGD converges: the second-moment map has norm at most
        ``rho = (1 - eps)^2 + eps < 1``, so ``E||w_k||^2 <= d rho^k`` from ``w_0 ~ N(0, I)`` on the
        range of H.

    Parameters
    ----------
    family : HessianFamily
    lr : float
        Learning rate, > 0.
    batch_size : float
        Nominal Bernoulli batch size, a real number in [1, n].

    Returns
    -------
    Lemma1
        ``diverges`` and ``converges`` each True or None, with c, kappa, eps, rho.

    Raises
    ------
    TypeError, ValueError
        ``family`` not a HessianFamily; ``lr`` not > 0; ``batch_size`` outside [1, n].

    Examples
    --------
    >>> from fastsgdstab import HessianFamily
    >>> from fastsgdstab.theory import lemma1
    >>> family = HessianFamily.from_features([[1.0, 0.0], [0.0, 1.0]])
    >>> result = lemma1(family, lr=0.5, batch_size=1)   # c = 1/16, kappa = 1, ||I - H/4|| = 3/4
    >>> result.converges, result.c, result.eps, result.rho
    (True, 0.0625, 0.25, 0.8125)
    >>> lemma1(family, lr=3.0, batch_size=1).diverges   # c kappa = 2.25
    True
    """
    family = check_family(family)
    _check_whole_training_set(family, "lemma1")
    lr = check_lr(lr)
    batch_size = check_batch_size(batch_size, family.n)
    c, kappa, top_sample, product, cheap_product, unit_lr = _lemma1_products(family, lr, batch_size)
    contraction, converges, eps, rho = _lemma1_convergence(reduced_family(family), unit_lr, product)
    return Lemma1(
        diverges=True if product > 1.0 + DECISION_MARGIN else None,
        converges=True if converges else None,
        c=c,
        kappa=kappa,
        max_sample_sharpness=top_sample,
        cheap_diverges=True if cheap_product > 1.0 + DECISION_MARGIN else None,
        growth_lower_bound=product,
        contraction_norm=contraction,
        eps=eps,
        rho=rho,
        map_norm_bound=contraction * contraction + product,
        lr=lr,
        batch_size=batch_size,
        n=family.n,
    )


def _lemma1_products(family: HessianFamily, lr: float, batch_size: float):
    """``(c, kappa, max_i lambda_1(H_i), c kappa, c max_i lambda_1(H_i)^2, lr lambda_1)``.

    Every comparison is in units of the sharpness: c kappa = (lr lambda_1)^2 (n/B - 1) kappa_u / n^2
    with kappa_u = kappa / lambda_1^2 (likewise the sample sharpness), so that it holds whether
    or not c, kappa and lambda_1 themselves are floats.
    """
    n = family.n
    reduced = reduced_family(family)
    noise_ratio = _noise_ratio(n, batch_size)
    c = _noise_coefficient(lr, n, batch_size)
    unit_lr = reduced.unit_lr(lr)
    unit_kappa = _unit_noise_norm(family)
    unit_top_sample = _unit_sample_sharpness(family)
    kappa = _product((unit_kappa, 1), (_sharpness_power(reduced, 2), 1))
    top_sample = _product((unit_top_sample, 1), (_sharpness_power(reduced, 1), 1))
    product = _consistent_product(c, kappa, (unit_lr, 2), (noise_ratio, 1), (float(n), -2), (unit_kappa, 1))
    cheap_product = _consistent_product(c, top_sample * top_sample, (unit_lr, 2), (noise_ratio, 1),
                                        (float(n), -2), (unit_top_sample, 2))
    return c, kappa, top_sample, product, cheap_product, unit_lr


def _lemma1_convergence(reduced, unit_lr: float, product: float):
    """Lemma 1 (b): ``(||I - lr H||, holds, eps, rho)`` on the range of H."""
    if reduced.k == 0:
        contraction = 0.0  # nothing moves on the (empty) range
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            contraction = float(np.max(np.abs(1.0 - unit_lr * reduced.unit_eigenvalues)))
    largest_eps = 1.0 - contraction
    # A family with no curvature has an empty range: (b) is vacuous there, so say nothing.
    converges = (reduced.k > 0 and largest_eps > DECISION_MARGIN
                 and product <= largest_eps * (1.0 - DECISION_MARGIN) and product < 1.0)
    if converges:
        # rho(eps) = 1 - eps + eps^2 is smallest at eps = 1/2; clip to the admissible range
        # [c kappa, largest_eps] (which lies inside [0, 1) when (b) holds, since c kappa < 1).
        eps = min(max(0.5, product), largest_eps)
        return contraction, True, eps, (1.0 - eps) ** 2 + eps
    return contraction, False, largest_eps, math.nan


def _check_theorem2_arguments(n, sigma, sharpness) -> tuple[int, int, float]:
    n = check_positive_int(n, "n", minimum=2)
    if isinstance(sigma, (bool, np.bool_)) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be an integer in [1, n]; got {sigma!r}")
    if isinstance(sigma, numbers.Integral):
        sigma = int(sigma)
    elif not math.isfinite(sigma):  # int() of it would raise OverflowError (inf) or a bare ValueError (nan)
        raise ValueError(f"sigma must be an integer in [1, n] = [1, {n}]; got {sigma}")
    if sigma != int(sigma):
        raise ValueError(f"sigma must be an integer in [1, n] for the Theorem 2 construction; got {sigma}")
    sigma = int(sigma)
    if not 1 <= sigma <= n:
        raise ValueError(f"sigma must be an integer in [1, n] = [1, {n}]; got {sigma}")
    return n, sigma, _check_sharpness(sharpness)


def theorem2_family(n, sigma, sharpness) -> HessianFamily:
    """Theorem 2's construction: n rank-1 Hessians with coherence sigma and a given sharpness.

    In dimension ``d = n - sigma + 1``, with ``m = n lambda_1 / sigma``:
    ``H_i = m e_1 e_1^T`` for the first sigma samples and ``H_i = m e_{i-sigma+1} e_{i-sigma+1}^T``
    for the others. Its coherence is exactly sigma, ``lambda_1(H) = sharpness``, and its exact
    Bernoulli threshold is :func:`theorem2_critical_lr`.

    Parameters
    ----------
    n : int
        Number of samples, >= 2.
    sigma : int
        Coherence, an integer in [1, n].
    sharpness : float
        ``lambda_1(H)``, > 0.

    Returns
    -------
    HessianFamily
        Rank 1, shape (n, n - sigma + 1, 1).

    Raises
    ------
    TypeError, ValueError
        ``n`` or ``sigma`` not an integer, ``sigma`` outside [1, n], ``sharpness`` not a
        finite number > 0.

    Examples
    --------
    >>> from fastsgdstab import coherence
    >>> from fastsgdstab.theory import theorem2_family
    >>> family = theorem2_family(4, 2, sharpness=2.0)
    >>> family.d, family.sharpness(), round(coherence(family).sigma, 12)
    (3, 2.0, 2.0)
    """
    n, sigma, sharpness = _check_theorem2_arguments(n, sigma, sharpness)
    d = n - sigma + 1
    factors = np.zeros((n, d, 1))
    m = n * sharpness / sigma
    # sqrt(m), also where m itself is not a float (sharpness near the float range's ends)
    root = math.sqrt(m) if 1e-300 < m < math.inf else math.sqrt(n / sigma) * math.sqrt(sharpness)
    factors[:sigma, 0, 0] = root
    factors[np.arange(sigma, n), np.arange(1, d), 0] = root
    return HessianFamily(factors)


def theorem2_critical_lr(n, sigma, sharpness, batch_size) -> float:
    """Exact Bernoulli critical learning rate of :func:`theorem2_family` (closed form).

    The family is mean-square stable iff ``lr lambda_1 (1 + (n/B - 1) / sigma) <= 2``, so

        eta* = 2 sigma / (lambda_1 (sigma + n/B - 1)),

    within a factor ``(sigma + n/B - 1) / (2 sqrt(n/B - 1))`` of Theorem 1's ``eta_T1``.

    Parameters
    ----------
    n, sigma : int
        Samples and coherence of the construction, ``1 <= sigma <= n``.
    sharpness : float
        ``lambda_1(H)``, > 0.
    batch_size : float
        Nominal Bernoulli batch size in [1, n].

    Returns
    -------
    float
        ``eta* = 2 sigma / (lambda_1 (sigma + n/B - 1))`` (``2 / lambda_1`` at B = n).

    Raises
    ------
    TypeError, ValueError
        As :func:`theorem2_family`, and ``batch_size`` outside [1, n].

    Examples
    --------
    >>> from fastsgdstab.theory import theorem2_critical_lr
    >>> theorem2_critical_lr(100, 10, 2.0, batch_size=10)
    0.5263157894736842
    """
    n, sigma, sharpness = _check_theorem2_arguments(n, sigma, sharpness)
    batch_size = check_batch_size(batch_size, n)
    # the unit answer (in (0, 2]) first, then the scale: no overflow for any sharpness
    return _theorem2_unit_critical_lr(sigma, _noise_ratio(n, batch_size)) / sharpness


# ----------------------------------------------------------- closed forms in the (B, sigma) plane
# The paper's synthetic experiment compares two closed forms, each written here once:
# Theorem 1's condition (ii) through its growth factor g (theorem1 decides with the same
# function) and the exact Bernoulli threshold of Theorem 2's family (theorem2_critical_lr is it
# in units of 1 / lambda_1). Both helpers work on floats and, unchanged, on Fractions.


def _theorem1_growth(unit_lr, sigma, noise_ratio):
    """Theorem 1's ``g = (lr lambda_1)^2 (n/B - 1) / sigma^2``; condition (ii) is ``g > 1``.

    Exact on ``Fraction`` arguments; on floats through :func:`_product` (no overflow)."""
    if isinstance(unit_lr, Fraction):
        return unit_lr * unit_lr * noise_ratio / (sigma * sigma)
    return _product((unit_lr, 2), (sigma, -2), (noise_ratio, 1))


def _theorem2_unit_critical_lr(sigma, noise_ratio):
    """``lambda_1 eta* = 2 sigma / (sigma + n/B - 1)``: Theorem 2's family is mean-square stable
    under Bernoulli sampling iff ``lr lambda_1 <=`` this, i.e. iff
    ``lr lambda_1 (sigma B + n - B) <= 2 sigma B`` (specification page, section "The paper's
    results (Bernoulli sampling)")."""
    return 2 * sigma / (sigma + noise_ratio)


def _decimal(value) -> Fraction:
    """The number as its decimal reads, exactly: integers as they are, a float as the shortest
    decimal that rounds to it (its ``repr``), so 0.8 is 4/5 and not the binary float nearest."""
    if isinstance(value, numbers.Integral):
        return Fraction(int(value))
    return Fraction(repr(float(value)))


def _check_sharpness(sharpness) -> float:
    sharpness = check_real_scalar(sharpness, "sharpness")
    if sharpness <= 0:
        raise ValueError(f"sharpness must be > 0; got {sharpness}")
    return sharpness


def _check_coherence(sigma) -> float:
    sigma = check_real_scalar(sigma, "sigma")
    if not sigma >= 1.0:
        raise ValueError(f"sigma (the coherence) is at least 1; got {sigma!r}")
    return sigma


def _boundary_arguments(lr, sharpness, n, batch_size):
    """Checked ``(lr lambda_1, n, batch sizes as a 1-d array, whether batch_size was a scalar)``."""
    lr = check_lr(lr)
    sharpness = _check_sharpness(sharpness)
    n = check_positive_int(n, "n")
    scalar = np.ndim(batch_size) == 0
    batch_sizes = check_batch_sizes(batch_size, n, "batch_size")
    # lr lambda_1: a float product is inf only where the true one exceeds the float range
    return lr * sharpness, n, batch_sizes, scalar


def theorem1_sigma_boundary(lr, sharpness, n, batch_size):
    """Theorem 1's curve in the (batch size, coherence) plane: ``sigma = lr lambda_1 sqrt(n/B - 1)``.

    Condition (ii) of :func:`theorem1` holds iff ``sigma < lr lambda_1 sqrt(n/B - 1)`` (strict):
    below the curve divergence is proven, on and above it Theorem 1 says nothing, unless
    condition (i), ``lr lambda_1 > 2``, holds (then for every sigma). The curve of the paper's
    synthetic experiment (specification page, section "The paper's synthetic experiment (the
    reproduction target)"). ``n/B - 1`` is computed as ``(n - B) / B``, which keeps its accuracy
    at B just below n.

    Parameters
    ----------
    lr : float
        Learning rate, > 0.
    sharpness : float
        ``lambda_1(H)``, > 0.
    n : int
        Number of samples, >= 1.
    batch_size : float or array_like of float
        Nominal Bernoulli batch sizes, each in [1, n].

    Returns
    -------
    float or ndarray
        The coherence on the curve at each batch size (0 at B = n); a float for a scalar
        ``batch_size``, else a 1-d array.

    Raises
    ------
    TypeError, ValueError
        ``lr`` or ``sharpness`` not > 0; ``n`` not a positive integer; a batch size outside
        [1, n] or not finite.

    Examples
    --------
    >>> from fastsgdstab.theory import theorem1_sigma_boundary
    >>> theorem1_sigma_boundary(0.5, 2.0, 100, 20)   # 1 * sqrt(80 / 20)
    2.0
    >>> theorem1_sigma_boundary(0.5, 2.0, 100, [1, 25, 100]).round(6).tolist()
    [9.949874, 1.732051, 0.0]
    """
    unit_lr, n, batch_sizes, scalar = _boundary_arguments(lr, sharpness, n, batch_size)
    noise_ratio = (n - batch_sizes) / batch_sizes
    with np.errstate(over="ignore", invalid="ignore"):
        sigma = np.where(noise_ratio > 0, unit_lr * np.sqrt(noise_ratio), 0.0)
    return float(sigma[0]) if scalar else sigma


def theorem2_sigma_boundary(lr, sharpness, n, batch_size):
    """The exact Bernoulli boundary of Theorem 2's family: ``sigma = lr lambda_1 (n/B - 1) / (2 - lr lambda_1)``.

    :func:`theorem2_family` with coherence sigma diverges in mean square under Bernoulli
    sampling iff ``lr lambda_1 (sigma B + n - B) > 2 sigma B``; for ``lr lambda_1 < 2`` that is
    ``sigma < lr lambda_1 (n/B - 1) / (2 - lr lambda_1)`` (on the curve ``rho = 1``: not
    divergent). For ``lr lambda_1 > 2`` every sigma diverges (``inf``), and at ``lr lambda_1 = 2``
    every sigma at ``B < n`` (``inf``) and none at ``B = n`` (0). The same condition solved for
    the learning rate is :func:`theorem2_critical_lr` (specification page, sections "The paper's
    results (Bernoulli sampling)" and "The paper's synthetic experiment (the reproduction
    target)"). ``n/B - 1`` is computed as ``(n - B) / B``.

    Parameters
    ----------
    lr : float
        Learning rate, > 0.
    sharpness : float
        ``lambda_1(H)``, > 0.
    n : int
        Number of samples, >= 1.
    batch_size : float or array_like of float
        Nominal Bernoulli batch sizes, each in [1, n].

    Returns
    -------
    float or ndarray
        The coherence on the boundary at each batch size: a float for a scalar ``batch_size``,
        else a 1-d array.

    Raises
    ------
    TypeError, ValueError
        ``lr`` or ``sharpness`` not > 0; ``n`` not a positive integer; a batch size outside
        [1, n] or not finite.

    Examples
    --------
    >>> from fastsgdstab.theory import theorem2_sigma_boundary
    >>> theorem2_sigma_boundary(0.5, 2.0, 100, 2)   # 1 * 49 / (2 - 1)
    49.0
    >>> theorem2_sigma_boundary(0.5, 2.0, 100, [1, 50, 100]).tolist()
    [99.0, 1.0, 0.0]
    >>> theorem2_sigma_boundary(1.5, 2.0, 100, 10)   # lr lambda_1 > 2: every sigma diverges
    inf
    """
    unit_lr, n, batch_sizes, scalar = _boundary_arguments(lr, sharpness, n, batch_size)
    noise_ratio = (n - batch_sizes) / batch_sizes
    if unit_lr < 2.0:
        with np.errstate(over="ignore"):
            sigma = unit_lr * noise_ratio / (2.0 - unit_lr)
    else:
        sigma = np.where((unit_lr > 2.0) | (noise_ratio > 0), math.inf, 0.0)
    return float(sigma[0]) if scalar else sigma


def theorem1_closed_form_diverges(lr, sharpness, n, sigma, batch_size, *, exact=True) -> bool:
    """Theorem 1 for a family of known coherence sigma and sharpness: does it prove divergence?

    True iff ``lr lambda_1 > 2`` (condition (i)) or ``B < n`` and ``sigma < lr lambda_1
    sqrt(n/B - 1)`` (condition (ii), strict), i.e. ``g = (lr lambda_1)^2 (n/B - 1) / sigma^2 > 1``:
    the decision of :func:`theorem1` without its eigensolves and their margin. False means
    inconclusive, not "converges". The curve of (ii) is :func:`theorem1_sigma_boundary`.

    Parameters
    ----------
    lr : float
        Learning rate, > 0.
    sharpness : float
        ``lambda_1(H)``, > 0.
    n : int
        Number of samples, >= 1.
    sigma : float
        The coherence, >= 1.
    batch_size : float
        Nominal Bernoulli batch size, in [1, n].
    exact : bool, default True
        Decide in exact rational arithmetic on the numbers as their decimals read (``repr`` of
        each float: 0.8 is 4/5), so a point exactly on the curve is not called divergent.
        False: in floating point (rounding may then decide such a point either way).

    Returns
    -------
    bool

    Raises
    ------
    TypeError, ValueError
        ``lr`` or ``sharpness`` not > 0; ``n`` not a positive integer; ``sigma`` below 1;
        ``batch_size`` outside [1, n]; any of them not finite.

    Examples
    --------
    >>> from fastsgdstab.theory import theorem1_closed_form_diverges
    >>> theorem1_closed_form_diverges(0.5, 2.0, 100, 2, 20)   # sigma = lr lambda_1 sqrt(4): equality
    False
    >>> theorem1_closed_form_diverges(0.5, 2.0, 100, 1, 20)
    True
    """
    lr = check_lr(lr)
    sharpness = _check_sharpness(sharpness)
    n = check_positive_int(n, "n")
    sigma = _check_coherence(sigma)
    batch_size = check_batch_size(batch_size, n)
    if exact:
        unit_lr, sigma = _decimal(lr) * _decimal(sharpness), _decimal(sigma)
        noise_ratio = (n - _decimal(batch_size)) / _decimal(batch_size)
    else:
        unit_lr, noise_ratio = lr * sharpness, _noise_ratio(n, batch_size)
    return bool(unit_lr > 2 or _theorem1_growth(unit_lr, sigma, noise_ratio) > 1)


def theorem2_bernoulli_diverges(lr, sharpness, n, sigma, batch_size, *, exact=True) -> bool:
    """The exact mean-square verdict for :func:`theorem2_family` under Bernoulli sampling.

    Diverges iff ``lr lambda_1 (1 + (n/B - 1) / sigma) > 2``, i.e. ``lr > eta*`` of
    :func:`theorem2_critical_lr`; in the (B, sigma) plane iff sigma lies below
    :func:`theorem2_sigma_boundary`. On the boundary ``rho = 1``: not divergent.

    Parameters
    ----------
    lr : float
        Learning rate, > 0.
    sharpness : float
        ``lambda_1(H)``, > 0.
    n : int
        Number of samples, >= 2.
    sigma : int
        Coherence of the construction, an integer in [1, n].
    batch_size : float
        Nominal Bernoulli batch size, in [1, n].
    exact : bool, default True
        Decide in exact rational arithmetic on the numbers as their decimals read (``repr`` of
        each float: 0.8 is 4/5), so a cell exactly on the boundary is not called divergent.
        False: in floating point (rounding may then decide such a cell either way).

    Returns
    -------
    bool

    Raises
    ------
    TypeError, ValueError
        ``lr`` or ``sharpness`` not > 0; ``n`` not an integer >= 2; ``sigma`` not an integer in
        [1, n]; ``batch_size`` outside [1, n].

    Examples
    --------
    >>> from fastsgdstab.theory import theorem2_bernoulli_diverges
    >>> theorem2_bernoulli_diverges(0.5, 2.0, 100, 49, 2)   # exactly on the boundary
    False
    >>> theorem2_bernoulli_diverges(0.5, 2.0, 100, 48, 2)
    True
    """
    n, sigma, sharpness = _check_theorem2_arguments(n, sigma, sharpness)
    lr = check_lr(lr)
    batch_size = check_batch_size(batch_size, n)
    if exact:
        unit_lr, sigma = _decimal(lr) * _decimal(sharpness), Fraction(sigma)
        noise_ratio = (n - _decimal(batch_size)) / _decimal(batch_size)
    else:
        unit_lr, noise_ratio = lr * sharpness, _noise_ratio(n, batch_size)
    return bool(unit_lr > _theorem2_unit_critical_lr(sigma, noise_ratio))


@dataclass(frozen=True)
class RayleighBounds:
    """Necessary conditions on the critical learning rate; see :func:`rayleigh_bounds`.

    Attributes
    ----------
    top_direction : float
        Bound (15), ``X = v v^T``: ``2 lam / (a lam^2 + b (1/n) sum_i (v^T H_i v)^2)``.
    identity : float
        Bound (16), ``X = I``: ``2 tr(H) / (a ||H||_F^2 + b (1/n) sum_i ||H_i||_F^2)``.
    best : float
        The smaller: SGD is mean-square unstable for every lr above it.
    sampling, batch_size
    """

    top_direction: float
    identity: float
    best: float
    sampling: str
    batch_size: float


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.inf


@blas_policy(size_of=_family_work)
def rayleigh_bounds(family, batch_size, *, sampling="bernoulli") -> RayleighBounds:
    """Upper bounds on the exact critical learning rate (Mulayoff & Michaeli's (15) and (16)).

    Any symmetric X gives ``eta* <= <X, L X> / <X, D X>`` with ``L(X) = H X + X H`` and
    ``D(X) = a H X H + b N(X)`` (section "Other criteria to report beside the exact answer").
    ``X = v v^T`` (v a top eigenvector of H) gives (15), ``X = I`` gives (16). Each is a
    necessary condition for stability (lr above it diverges), never a sufficient one.

    Parameters
    ----------
    family : HessianFamily
    batch_size : float
        Real number in [1, n].
    sampling : {"bernoulli", "without_replacement", "with_replacement"}

    Returns
    -------
    RayleighBounds

    Raises
    ------
    TypeError, ValueError
        ``family`` not a HessianFamily; ``batch_size`` outside [1, n] (an integer for the
        schemes that draw exactly B samples); unknown ``sampling``.

    Examples
    --------
    >>> from fastsgdstab import HessianFamily
    >>> from fastsgdstab.theory import rayleigh_bounds
    >>> family = HessianFamily.from_features([[1.0], [1.0], [1.0], [1.0]])   # all H_i = 1
    >>> bounds = rayleigh_bounds(family, 2)
    >>> round(bounds.top_direction, 12), round(bounds.identity, 12)   # exact here: 2 / (1 + 1/B - 1/n)
    (1.6, 1.6)
    """
    family = check_family(family)
    sampling = check_sampling(sampling)
    batch_size = check_batch_size(batch_size, family.population_size, integer=sampling != "bernoulli",
                                  samples=family.n)
    reduced = reduced_family(family)
    n, rank = family.n, reduced.rank
    if reduced.k == 0:
        return RayleighBounds(math.inf, math.inf, math.inf, sampling, batch_size)
    a, b = map_coefficients(sampling, family.population_size, batch_size)
    # In units of the sharpness (unit eigenvalues m, the first 1; unit rows), then divided by
    # lambda_1(H): each bound scales like 1 / lambda_1.
    eigenvalues = reduced.unit_eigenvalues
    top = float(eigenvalues[0])
    # v^T H_i v = ||U_i^T v||^2, v = e_1 in H's eigenbasis.
    along_top = np.sum(reduced.unit_rows[:, 0].reshape(n, rank) ** 2, axis=1)
    top_direction = _ratio(2.0 * top, a * top * top + b * float(np.mean(along_top**2)))
    # ||H_i||_F^2 = ||U_i^T U_i||_F^2.
    blocks = reduced.unit_rows.reshape(n, rank, reduced.k)
    grams = np.matmul(blocks, blocks.transpose(0, 2, 1))
    sample_frobenius_sq = np.sum(grams**2, axis=(1, 2))
    identity = _ratio(2.0 * float(np.sum(eigenvalues)),
                      a * float(np.sum(eigenvalues**2)) + b * float(np.mean(sample_frobenius_sq)))
    inverse_top = _sharpness_power(reduced, -1)
    top_direction = _product((top_direction, 1), (inverse_top, 1))
    identity = _product((identity, 1), (inverse_top, 1))
    return RayleighBounds(top_direction, identity, min(top_direction, identity), sampling, batch_size)
