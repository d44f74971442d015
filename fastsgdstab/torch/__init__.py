"""PyTorch adapter (a package: ``family`` and its routes, ``gram``, ``escape``,
``preconditioners``, ``monitor``): from a ``torch.nn.Module`` to the family of its per-sample Hessians.

Optional (the ``torch`` extra): importing ``fastsgdstab`` never imports torch; importing
``fastsgdstab.torch`` does.

* :func:`family_from_model`: the Gauss-Newton family ``H_i = J_i^T Lambda_i J_i`` of a model at
  its current parameters (specification page, section "From a network to a family"), with
  ``Lambda_i`` the Hessian of the user's own per-sample loss in output space (autograd), so the
  learning rates the library reports are for ``torch.optim.SGD(model.parameters(), lr)`` on that
  loss with mean reduction. Jacobian rows are computed by chunks (``torch.func``); for large
  models only the (n C x n C) Gram matrix of the factors is formed (the Gram route).
* :func:`escape_test`: the user's own check of the theory: real ``torch.optim.SGD`` from a small
  perturbation of the minimum, counting the runs that leave it.
* :class:`StabilityMonitor`: the exact quantities (sharpness, eta*(B), critical batch size,
  gradient) recorded every few steps of any training loop.
* :func:`preconditioner_from_adam`: the frozen preconditioner ``P = 1 / (sqrt(v) + eps)`` of an
  Adam, AdamW or RMSprop state, for ``HessianFamily.preconditioned``.
"""


from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ModuleNotFoundError as _error:  # exercised in a subprocess (tests/test_torch.py)
    if _error.name is not None and _error.name != "torch" and not _error.name.startswith("torch."):
        raise
    raise ModuleNotFoundError(
        "fastsgdstab.torch needs PyTorch, which is an optional extra: pip install "
        "\"fastsgdstab[torch]\" (or install torch itself: https://pytorch.org)", name="torch") from _error

# The Gram route's structured form for nn.Linear layers (False: always the generic rows; tests).
_STRUCTURED = True

from .escape import ESCAPE_SAMPLING, EscapeResult, escape_test  # noqa: E402
from .family import GaussNewtonWarning, ModelFamily, family_from_model  # noqa: E402
from .monitor import MONITOR_FIELDS, EdgeOfStabilityWarning, StabilityMonitor  # noqa: E402
from .preconditioners import preconditioner_from_adam  # noqa: E402

__all__ = [
    "ModelFamily",
    "EscapeResult",
    "GaussNewtonWarning",
    "family_from_model",
    "escape_test",
    "preconditioner_from_adam",
    "ESCAPE_SAMPLING",
    "StabilityMonitor",
    "EdgeOfStabilityWarning",
    "MONITOR_FIELDS",
]
