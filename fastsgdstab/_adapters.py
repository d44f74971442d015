"""What the framework adapters (``fastsgdstab.torch``, ``fastsgdstab.jax``) share once they have
a family: the per-sample gradients attached, and the near-minimum check (specification page,
sections "From a network to a family" and "Non-interpolating minima: stationary covariance and
the loss floor")."""

from __future__ import annotations

from dataclasses import dataclass

from ._config import GAUSS_NEWTON_RTOL, JACOBIAN_RTOL, RELATIVE_GRADIENT_RTOL
from ._warnings import warn
from .family import HessianFamily


def attach_gradients(family: HessianFamily, gradients, relative: float) -> HessianFamily:
    """``family`` with the per-sample ``gradients`` (n, d). At an interpolating minimum to
    round-off (relative gradient <= ``JACOBIAN_RTOL``) the gradients are rounding errors whose
    mean is not ~0 relative to their size; it is removed (a change at the rounding level) so that
    the family does not warn ``NotAMinimumWarning`` at a minimum. A reduction already computed
    for ``family`` is shared (it does not depend on the gradients)."""
    if relative <= JACOBIAN_RTOL:
        gradients = gradients - gradients.mean(axis=0)
    attached = HessianFamily(family.factors, gradients=gradients)
    # The reduction to H's eigenbasis depends on the factors only (the same, copied): a cached
    # one is shared rather than computed again (the adapters ask for the sharpness first).
    if "_reduced" in family.__dict__:
        attached.__dict__["_reduced"] = family.__dict__["_reduced"]
    return attached


def warn_if_not_at_minimum(what: str, category, *, relative: float, gap: float, check_gauss_newton: bool,
                           sample_gradient_norm: float, gradient_norm: float) -> None:
    """Warn ``category`` when the point is not an interpolating minimum (``what``: "model" or
    "function"): the relative gradient above ``RELATIVE_GRADIENT_RTOL``, or the Gauss-Newton gap
    above ``GAUSS_NEWTON_RTOL`` when it was measured."""
    reasons = []
    if not relative <= RELATIVE_GRADIENT_RTOL:
        reasons.append(f"the point is not a minimum: its relative gradient {relative:.3g} exceeds "
                       f"{RELATIVE_GRADIENT_RTOL:g} (mean per-sample gradient norm "
                       f"{sample_gradient_norm:.3g}, full-batch gradient norm {gradient_norm:.3g})")
    if check_gauss_newton and not gap <= GAUSS_NEWTON_RTOL:
        reasons.append(f"the Hessian differs from its Gauss-Newton part by about {gap:.3g} of the "
                       f"sharpness (mean per-sample gradient norm {sample_gradient_norm:.3g}, "
                       f"relative gradient {relative:.3g})")
    if reasons:
        warn(f"the {what} is not at an interpolating minimum: {'; '.join(reasons)}; the family is the "
             f"Gauss-Newton surrogate there, not the Hessian (train to interpolation for exact "
             f"answers)", category)


@dataclass(frozen=True)
class NetworkFamily:
    """The fields the adapters return (``fastsgdstab.torch.ModelFamily``,
    ``fastsgdstab.jax.FunctionFamily``, each documented there): the family and how close the
    point is to a minimum."""

    family: HessianFamily
    route: str
    parameter_count: int
    parameter_names: tuple
    outputs: int
    loss: float
    gradient_norm: float
    sample_gradient_norm: float
    relative_gradient: float
    gauss_newton_gap: float

    def __str__(self) -> str:
        return (f"{type(self).__name__}: n = {self.family.n}, d = {self.parameter_count} parameters, "
                f"C = {self.outputs} outputs, {self.route} route (family d = {self.family.d}, "
                f"rank {self.family.rank})\n"
                f"  sharpness {self.family.sharpness():.6g}, mean loss {self.loss:.3g}\n"
                f"  near-minimum check: relative gradient {self.relative_gradient:.3g}, "
                f"Gauss-Newton gap {self.gauss_newton_gap:.3g} (of the sharpness)")
