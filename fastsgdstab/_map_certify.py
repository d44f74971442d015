"""Work a stability map shares across its grid points (issue 19 items 2 and 4).

``MapMomentumSolver``: the momentum engine's solver (:class:`fastsgdstab._engine.MomentumSolver`)
as a map uses it, for every grid point of the map through one shared Krylov basis of ``V_s``
(the engine's own sharing), plus two things a map adds:

* a warm start: each point's root finder (Newton on ``s``, ``r = rho(D) + w e^-s``; ``rho(D)``
  and ``w`` depend on the learning rate only) starts from the root of the same learning rate at
  the previous batch size, which is near (the radius moves little from one batch size to the
  next), instead of from ``s = 0``: fewer trial growth factors, so fewer Ritz solves and fewer
  new directions of the basis;
* proofs that stop when certified (below).

Each point's proof of its spectral radius (Collatz-Wielandt on the full second-moment map, with
proven enclosures: ``_verified``) tries candidate matrices one after another, and each costs
one enclosed product of ``V_s``. The engine's single call keeps trying until the bracket is
1e-13 tight (it has nothing else to do); a map stops as soon as the bracket meets the
certification tolerance of the value (``radius_tolerance``, with a factor 2 of margin), which
is what ``stability_map`` promises. The bounds are the same proofs, only fewer of them.
"""

from __future__ import annotations

import math

from ._engine import MomentumSolver

__all__ = ["MapMomentumSolver"]

STOP_FRACTION = 0.5
"""A point's proof stops once its bracket is this fraction of its certification tolerance."""


class MapMomentumSolver(MomentumSolver):
    """``MomentumSolver`` whose proofs stop once a grid point's bracket is certified."""

    def __init__(self, reduction, sampling: str):
        super().__init__(reduction, sampling)
        self._start = None   # the root finder's start for the next radius (None: the engine's)
        self._root = None    # the root it found last

    def _newton(self, phi, u0: float, u_min: float, u_max: float):
        if self._start is not None and u_min < self._start < u_max:
            u0 = self._start
        u, edge = super()._newton(phi, u0, u_min, u_max)
        self._root = u if edge is None else None
        return u, edge

    def radius_from(self, x: float, b: float, momentum: float, nesterov: bool, start=None):
        """``(bracket, log_factor, root)``: :meth:`radius`, its root finder started at ``start``
        (a previous ``root`` of the same x; None: the engine's start). The bracket is proven
        whatever the start (the start only proposes where to look)."""
        self._start, self._root = start, None
        try:
            bracket, log_factor = self.radius(x, b, momentum, nesterov)
        finally:
            self._start = None
        return bracket, log_factor, self._root

    def bounds_at(self, evaluations, b: float, *, sides=("lower", "upper"),
                  goal_upper: float = -math.inf, goal_lower: float = math.inf):
        """As :meth:`MomentumSolver.bounds_at`; without goals (a spectral radius), stops once
        ``upper - lower <= STOP_FRACTION * radius_tolerance(upper) * upper``."""
        return super().bounds_at(evaluations, b, sides=sides, goal_upper=goal_upper,
                                 goal_lower=goal_lower, stop_fraction=STOP_FRACTION)
