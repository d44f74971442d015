"""The Gram route's Gram matrix: generic Jacobian rows by blocks, and the structured form of
``nn.Linear`` layers (no Jacobian rows)."""

from __future__ import annotations

import math

import torch
from torch.func import functional_call, jacrev, vmap

from .._validation import check_positive_int

def generic_gram(rows_of, n, outputs, d, chunk, memory_bytes, dtype, device) -> torch.Tensor:
    """The (n C, n C) Gram matrix of the rows, by blocks: an outer block of samples held in about
    half of ``memory_bytes`` against inner chunks streamed after it (recomputed once per outer
    block); every sample's rows are computed with ``record=True`` exactly once."""
    m = n * outputs
    gram = torch.empty((m, m), dtype=dtype, device=device)
    per_sample = 8.0 * outputs * d
    outer = n if n * per_sample <= memory_bytes / 2 else max(chunk, int(memory_bytes / 2 // per_sample))
    for a in range(0, n, outer):
        b = min(a + outer, n)
        block = torch.empty(((b - a) * outputs, d), dtype=dtype, device=device)
        for c in range(a, b, chunk):
            e = min(c + chunk, b)
            block[(c - a) * outputs:(e - a) * outputs] = rows_of(c, e, True)
        if b - a == n:  # one block: the product straight into the Gram matrix, no temporary
            torch.mm(block, block.T, out=gram)
        else:
            gram[a * outputs:b * outputs, a * outputs:b * outputs] = block @ block.T
        for c in range(b, n, chunk):
            e = min(c + chunk, n)
            product = block @ rows_of(c, e, False).T
            gram[a * outputs:b * outputs, c * outputs:e * outputs] = product
            gram[c * outputs:e * outputs, a * outputs:b * outputs] = product.T
        del block
    return gram.cpu()


# The Gram route's structured form for nn.Linear layers (False: always the generic rows; tests).

def _linear_layers(model, names):
    """The ``nn.Linear`` modules holding a trainable parameter, with the names of their trainable
    weight and bias (None for a frozen or absent one); None when a trainable parameter is tied
    (reachable under two names: shared, so the per-layer formula does not apply)."""
    trainable = set(names)
    seen = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen and (name in trainable or seen[id(p)] in trainable):
            return None
        seen.setdefault(id(p), name)
    layers = {}
    for prefix, module in model.named_modules():
        if type(module) is not torch.nn.Linear:  # subclasses may not call F.linear in forward
            continue
        base = prefix + "." if prefix else ""
        weight = base + "weight" if base + "weight" in trainable else None
        bias = base + "bias" if module.bias is not None and base + "bias" in trainable else None
        if weight or bias:
            layers[module] = (weight, bias)
    return layers


def structured_gram(model, params, rest, names, inputs, roots, q, n, outputs, chunk_size,
                     memory_bytes, bar=None, phases=None):
    """The (n C, n C) Gram matrix of the factor rows from the layer-wise Kronecker structure of
    the Jacobians of ``nn.Linear`` layers, or None when it does not apply (the generic route).

    For a layer ``y = W a + b`` the rows of ``L_i^T J_i`` with respect to (W, b) are
    ``(delta_ik a_i^T, delta_ik)``, ``delta_ik`` the cotangent ``roots[i, :, k]`` pulled back to
    the layer's output: the layer's Gram block is ``(Delta Delta^T) * (A A^T + 1)`` elementwise,
    with A (n, in) the layer's inputs and Delta (n C, out). One forward pass per chunk of samples
    (hooks record each layer's input and output) and C + 2 backward passes (the C cotangent
    columns, the loss gradient q for the near-minimum report, and a random cotangent whose
    parameter gradient by autograd must equal the structured one: any use of a layer's weight
    outside a single 2-d call of the layer, such as weight sharing, a (batch, seq, features)
    input or a weight read directly, sends the computation back to the generic route).
    Other trainable parameters (normalisation affines, embeddings, convolutions) add their
    generic Jacobian rows, when those fit in half of ``memory_bytes``.

    ``phases`` (``_common.ThreadPhases``): the assembly of the Gram matrix, whose products are
    (n C) x width x (n C), runs under the threading policy for that work.

    Returns (gram, per-sample gradient norms (n,), norm of the summed gradient, route, chunk)."""
    layers = _linear_layers(model, names)
    if not layers:
        return None
    in_layers = {name for pair in layers.values() for name in pair if name}
    others = [k for k in names if k not in in_layers]
    d_other = sum(params[k].numel() for k in others)
    m = n * outputs
    dtype, device = roots.dtype, roots.device
    if 8.0 * m * d_other > memory_bytes / 2:
        return None
    widths = sum(module.in_features + outputs * module.out_features for module in layers)
    if 8.0 * n * widths > memory_bytes / 2:   # the recorded inputs and pulled-back cotangents
        return None
    chunk = min(n, check_positive_int(chunk_size, "chunk_size") if chunk_size is not None else 1024)
    order = list(layers)
    record, calls = {}, {}

    def hook(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        record[module] = (args[0] if args else None, output)

    live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    A = {module: None for module in order}
    Delta = {module: None for module in order}
    Dq = {module: None for module in order}
    generator = torch.Generator(device="cpu").manual_seed(0)
    handles = [module.register_forward_hook(hook) for module in order]
    try:
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            x = inputs[s:e]
            record.clear()
            calls.clear()
            with torch.enable_grad():
                out = functional_call(model, (live, rest), (x,)).reshape(e - s, outputs)
            if any(count != 1 for count in calls.values()):
                return None                            # a layer called twice: weight sharing
            used = [module for module in order if module in record]
            for module in used:
                a, y = record[module]
                if not (isinstance(a, torch.Tensor) and a.ndim == 2 and a.shape[0] == e - s
                        and y.ndim == 2 and y.shape[0] == e - s and y.requires_grad):
                    return None                        # extra dimensions: the generic route
            ys = [record[module][1] for module in used]
            probe = torch.randn((e - s, outputs), generator=generator, dtype=dtype).to(device)
            cotangents = [roots[s:e, :, k] for k in range(outputs)] + [q[s:e], probe]
            pulled = []
            for v in cotangents:
                grads = torch.autograd.grad(out, ys, grad_outputs=v, retain_graph=True, allow_unused=True)
                pulled.append([torch.zeros_like(y) if g is None else g.detach() for g, y in zip(grads, ys)])
            # the check: autograd's gradient for the probe against the structured one
            wanted = [name for module in order for name in layers[module] if name]
            truth = torch.autograd.grad(out, [live[k] for k in wanted], grad_outputs=probe,
                                        allow_unused=True)
            truth = dict(zip(wanted, truth))
            position = {module: j for j, module in enumerate(used)}
            for module in order:
                weight, bias = layers[module]
                if module in position:
                    a, delta = record[module][0].detach(), pulled[-1][position[module]]
                    mine = {weight: delta.T @ a, bias: delta.sum(0)}
                else:
                    mine = {weight: torch.zeros_like(live[weight]) if weight else None,
                            bias: torch.zeros_like(live[bias]) if bias else None}
                for name in (weight, bias):
                    if name is None:
                        continue
                    ref = truth[name]
                    ref = torch.zeros_like(live[name]) if ref is None else ref
                    scale = float(ref.abs().max()) + float(mine[name].abs().max())
                    if float((ref - mine[name]).abs().max()) > 1e-9 * scale:
                        return None                    # the weight is used outside the layer's call
            del out, ys, truth
            for module in order:
                if A[module] is None:
                    A[module] = torch.zeros((n, module.in_features), dtype=dtype, device=device)
                    Delta[module] = torch.zeros((n, outputs, module.out_features), dtype=dtype, device=device)
                    Dq[module] = torch.zeros((n, module.out_features), dtype=dtype, device=device)
                if module in position:
                    j = position[module]
                    A[module][s:e] = record[module][0].detach()
                    for k in range(outputs):
                        Delta[module][s:e, k] = pulled[k][j]
                    Dq[module][s:e] = pulled[outputs][j]
            record.clear()
            if bar is not None:
                bar.update(e - s)
    finally:
        for handle in handles:
            handle.remove()
        record.clear()

    if phases is not None:
        width = max(max(module.in_features, module.out_features) for module in order)
        phases.switch(float(m) * m * width)
    gram, norms2, total2 = _assemble(order, layers, A, Delta, Dq, n, m, outputs, memory_bytes,
                                     dtype, device)
    route = "gram (linear layers)"
    if others:
        route = "gram (linear layers + generic)"
        fixed = dict(params)
        sub = {k: params[k] for k in others}

        def output(p, x):
            return functional_call(model, ({**fixed, **p}, rest), (x[None],))[0]

        step = max(1, min(n, int(memory_bytes / 4 // (3 * 8.0 * outputs * max(d_other, 1)))))
        rows = torch.empty((m, d_other), dtype=dtype, device=device)
        g_sum = torch.zeros(d_other, dtype=dtype, device=device)
        for s in range(0, n, step):
            e = min(s + step, n)
            jac = vmap(jacrev(output), in_dims=(None, 0))(sub, inputs[s:e])
            J = torch.cat([jac[k].reshape(e - s, outputs, -1) for k in others], dim=2)
            g = torch.einsum("icd,ic->id", J, q[s:e])
            norms2[s:e] += (g * g).sum(1)
            g_sum += g.sum(0)
            rows[s * outputs:e * outputs] = torch.einsum("icd,ick->ikd", J, roots[s:e]).reshape(-1, d_other)
        gram.addmm_(rows, rows.T)
        total2 += float((g_sum * g_sum).sum())
        del rows
    return gram, norms2.clamp(min=0).sqrt(), math.sqrt(total2), route, chunk


def _assemble(order, layers, A, Delta, Dq, n, m, outputs, memory_bytes, dtype, device):
    """The Linear layers' Gram matrix ``sum (Delta Delta^T) * (A A^T + 1)``, the per-sample
    gradients' squared norms and the squared norm of their sum, from the recorded inputs A and
    pulled-back cotangents Delta, Dq (freed layer by layer)."""
    gram = torch.zeros((m, m), dtype=dtype, device=device)
    norms2 = torch.zeros(n, dtype=dtype, device=device)
    total2 = 0.0
    # samples per row block: its product with all the rows is a temporary of at most 64 MB (or a
    # quarter of memory_bytes), small beside the (n C)^2 Gram matrix itself
    block = max(1, min(n, int(min(memory_bytes / 4, 2.0 ** 26) // (8.0 * outputs * m))))
    for module in order:
        weight, bias = layers[module]
        a, D, dq = A[module], Delta[module].reshape(m, -1), Dq[module]
        S = a @ a.T if weight else torch.zeros((n, n), dtype=dtype, device=device)
        if bias:
            S += 1.0
        for i0 in range(0, n, block):
            i1 = min(i0 + block, n)
            product = D[i0 * outputs:i1 * outputs] @ D.T
            product.view(i1 - i0, outputs, n, outputs).mul_(S[i0:i1, None, :, None])
            gram[i0 * outputs:i1 * outputs] += product
            del product
        dq2 = (dq * dq).sum(1)
        norms2 += dq2 * ((a * a).sum(1) if weight else 0.0) + (dq2 if bias else 0.0)
        if weight:
            total2 += float(((dq.T @ a) ** 2).sum())
        if bias:
            total2 += float((dq.sum(0) ** 2).sum())
        A[module] = Delta[module] = Dq[module] = None
    return gram, norms2, total2
