"""Optimiser preconditioners: the frozen P of an Adam, AdamW or RMSprop state."""

from __future__ import annotations

import numpy as np
import torch

from ._common import check_model

__all__ = ["preconditioner_from_adam"]


def preconditioner_from_adam(optimizer, model) -> np.ndarray:
    """The frozen diagonal preconditioner of an Adam, AdamW or RMSprop state, as a vector.

    Late in training the second-moment estimate v barely moves, and the step is preconditioned
    SGD with ``P = 1 / (sqrt(v) + eps)`` (specification page, section "Preconditioned SGD"); use
    it as ``family.preconditioned(P)`` with the optimiser's learning rate. Bias correction as
    ``torch.optim.Adam``/``AdamW`` apply it at the current step count t:
    ``P = 1 / (bc1 (sqrt(v / bc2) + eps))`` with ``bc1 = 1 - beta1^t`` (torch divides the
    learning rate by it) and ``bc2 = 1 - beta2^t`` (both are 1 after a few thousand steps);
    ``amsgrad=True`` uses ``max_exp_avg_sq``. RMSprop has no bias correction:
    ``P = 1 / (sqrt(v) + eps)`` with ``v = square_avg`` (minus ``grad_avg^2`` when
    ``centered=True``). The first-moment average of Adam (beta1) and RMSprop's momentum are not
    part of P: the family answers for the preconditioned step without them.

    Parameters
    ----------
    optimizer : torch.optim.Adam, torch.optim.AdamW or torch.optim.RMSprop
        After at least one step (its state holds v for every trainable parameter).
    model : torch.nn.Module
        Gives the order: the trainable parameters of ``model.named_parameters()``, flattened and
        concatenated, as in :func:`family_from_model`.

    Returns
    -------
    ndarray, shape (d,)
        P, positive, float64.

    Raises
    ------
    TypeError
        Another optimiser, or ``model`` not a Module.
    ValueError
        A trainable parameter that the optimiser does not hold, or has no state for yet.

    Examples
    --------
    >>> import torch
    >>> from fastsgdstab.torch import preconditioner_from_adam
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.0, eps=0.0)
    >>> model.weight.grad = torch.tensor([[2.0, 0.5]])
    >>> optimizer.step()
    >>> preconditioner_from_adam(optimizer, model)   # alpha = 0: v = g^2, P = 1 / |g|
    array([0.5, 2. ])
    """
    check_model(model)
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)):
        raise TypeError(f"optimizer must be a torch.optim.Adam, AdamW or RMSprop; got "
                        f"{type(optimizer).__name__}")
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    pieces = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in groups:
            raise ValueError(f"parameter {name!r} is trainable but not in the optimizer")
        state, group = optimizer.state.get(p, {}), groups[id(p)]
        eps = float(group["eps"])
        if isinstance(optimizer, torch.optim.RMSprop):
            if "square_avg" not in state:
                raise ValueError(f"the optimizer has no state for parameter {name!r} yet: take a step first")
            v = state["square_avg"].detach().double()
            if group.get("centered", False):
                v = v - state["grad_avg"].detach().double() ** 2
            P = 1.0 / (v.clamp(min=0).sqrt() + eps)
        else:
            key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
            if key not in state:
                raise ValueError(f"the optimizer has no state for parameter {name!r} yet: take a step first")
            v = state[key].detach().double()
            t = float(state["step"])
            beta1, beta2 = group["betas"]
            bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
            P = 1.0 / (bc1 * ((v / bc2).sqrt() + eps))
        pieces.append(P.reshape(-1).cpu().numpy())
    if not pieces:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    P = np.concatenate(pieces)
    if not np.all(np.isfinite(P)):
        raise ValueError("the preconditioner is infinite somewhere (v = 0 with eps = 0): set eps > 0")
    return P

