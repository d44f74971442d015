"""Regenerate docs/images/loss_floor.png (and print the table of docs/loss-floor.md): the loss floor that
fastsgdstab predicts for a real network that cannot interpolate, against torch.optim.SGD's
measured time-averaged training excess loss.

    python benchmarks/make_loss_floor_figure.py [--quick] [output.png]

The network (specification page, section "Non-interpolating minima: stationary covariance and
the loss floor"): a tanh MLP 10 -> 8 -> 1 (97 parameters) on the first 200 samples of
scikit-learn's diabetes data (inputs and target standardised), torch.nn.MSELoss, float64,
trained to its minimum by full-batch L-BFGS (the gradient norm below 1e-10; the loss stays far
above 0: the model cannot interpolate). The family is the Gauss-Newton one,
``H_i = J_i^T (2) J_i`` (MSELoss has no 1/2: Lambda_i = 2), with per-sample gradients
``g_i = 2 (f_i - y_i) J_i^T``, so every learning rate here is MSELoss's own.

Measured: torch.optim.SGD (no momentum) started at the minimum, two batch sizes, two ways of
drawing batches: "reshuffle" (DataLoader(shuffle=True): an epoch is a random permutation cut
into batches) and "without_replacement" (an independent uniform B-subset every step, the
exact engine's scheme). After a burn-in, the full training loss minus its minimum is averaged
over the remaining steps; its standard error comes from batch means (20 batches). Predicted:
fs.stationary(family, lr, B, sampling="without_replacement"), the exact floor of the
linearised dynamics, for independent batches; fs.stationary(family, lr, B,
sampling="reshuffle", drop_last=True), a Monte-Carlo estimate of the linearised model's floor
with its standard error (no exact formula exists), for reshuffled epochs. The reshuffled
measurement uses torch.utils.data.DataLoader(shuffle=True, drop_last=True) itself.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

import fastsgdstab as fs

N_SAMPLES, HIDDEN = 200, 8
BATCH_SIZES = (8, 32)
FRACTIONS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9)
SCHEMES = ("without_replacement", "reshuffle")


def trained_network(seed: int = 0):
    """(model, X, y, minimum loss): the MLP at its minimum (full-batch L-BFGS, float64)."""
    import torch
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    X = data.data[:N_SAMPLES]
    y = data.target[:N_SAMPLES]
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    y = (y - y.mean()) / y.std()
    X = torch.tensor(X, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.float64)[:, None]
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, HIDDEN), torch.nn.Tanh(),
                                torch.nn.Linear(HIDDEN, 1)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator,
                                              dtype=torch.float64))
    loss_fn = torch.nn.MSELoss()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=20000,
                                  tolerance_grad=1e-13, tolerance_change=0.0,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = loss_fn(model(X), y)
        value.backward()
        return value

    for _ in range(5):
        optimizer.step(closure)
    with torch.no_grad():
        minimum = float(loss_fn(model(X), y))
    return model, X, y, minimum


def family_of(model, X, y):
    """The Gauss-Newton family of MSELoss with per-sample gradients, from torch.func."""
    import torch
    from torch.func import functional_call, jacrev, vmap

    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def output(flat_params, x):
        shapes = [p.shape for p in params]
        pieces, start = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            pieces.append(flat_params[start:start + size].reshape(shape))
            start += size
        return functional_call(model, dict(zip(names, pieces)), (x[None],))[0]

    flat = torch.cat([p.reshape(-1) for p in params])
    jacobians = vmap(jacrev(output), in_dims=(None, 0))(flat, X)  # (n, 1, d)
    with torch.no_grad():
        residuals = model(X) - y  # (n, 1)
    J = jacobians.numpy()
    gradients = 2.0 * residuals.numpy() * J[:, 0, :]  # grad of (f - y)^2
    return fs.HessianFamily.from_jacobians(J, output_hessians=[[2.0]], gradients=gradients)


def measure(model, X, y, minimum, lr, batch_size, scheme, steps, burn, seed):
    """Time average of the training excess loss of torch.optim.SGD from the minimum, with the
    standard error of 20 batch means. Returns (mean, standard error)."""
    import copy

    import torch

    model = copy.deepcopy(model)
    loss_fn = torch.nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    values = np.empty(steps)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y),
                                         batch_size=batch_size, shuffle=True, drop_last=True,
                                         generator=generator)
    epochs = iter(())
    for t in range(burn + steps):
        if scheme == "reshuffle":  # DataLoader(shuffle=True): a new permutation each epoch
            batch = next(epochs, None)
            if batch is None:
                epochs = iter(loader)
                batch = next(epochs)
            inputs, targets = batch
        else:
            index = torch.randperm(n, generator=generator)[:batch_size]
            inputs, targets = X[index], y[index]
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
        if t >= burn:
            with torch.no_grad():
                values[t - burn] = float(loss_fn(model(X), y)) - minimum
    means = values.reshape(20, -1).mean(axis=1)
    return float(means.mean()), float(means.std(ddof=1) / math.sqrt(20))


def run(quick: bool = False, seed: int = 0):
    """Every number of the figure: {"eta_star": {B: value}, "rows": [...]}."""
    import torch

    torch.set_num_threads(1)
    model, X, y, minimum = trained_network(seed)
    family = family_of(model, X, y)
    steps, burn = (2000, 500) if quick else (20000, 2000)
    fractions = (0.1, 0.5) if quick else FRACTIONS
    batch_sizes = BATCH_SIZES[:1] if quick else BATCH_SIZES
    rows = []
    eta_stars = {}
    for B in batch_sizes:
        eta_star = fs.critical_lr(family, B, sampling="without_replacement")
        eta_stars[B] = eta_star
        for fraction in fractions:
            lr = fraction * eta_star
            exact = fs.stationary(family, lr, B, sampling="without_replacement").excess_loss
            estimate = fs.stationary(family, lr, B, sampling="reshuffle", drop_last=True,
                                     estimate_rtol=0.02 if quick else 0.005)
            for k, scheme in enumerate(SCHEMES):
                mean, error = measure(model, X, y, minimum, lr, B, scheme, steps, burn,
                                      seed=1000 * B + 10 * k + int(100 * fraction))
                predicted, predicted_error = ((exact, 0.0) if scheme == "without_replacement"
                                              else (estimate.excess_loss, estimate.stderr))
                rows.append(dict(batch_size=B, fraction=fraction, lr=lr, scheme=scheme,
                                 predicted=predicted, predicted_error=predicted_error,
                                 measured=mean, standard_error=error))
    # the inverse question: the largest lr for a floor of 1e-3 (MSELoss units), B = 8
    inverse = fs.max_lr_for_excess_loss(family, batch_sizes[0], 1e-3,
                                        sampling="without_replacement", bounds=True)
    return dict(minimum=minimum, parameters=family.d, gradient_rms=float(
        np.sqrt(np.mean(np.sum(np.asarray(family.gradients) ** 2, axis=1)))),
        eta_star=eta_stars, rows=rows,
        inverse=dict(batch_size=batch_sizes[0], excess_loss=1e-3, lower=inverse.lower,
                     upper=inverse.upper), family=family)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family = result["family"]
    figure, axes = plt.subplots(1, len(result["eta_star"]), figsize=(5.2 * len(result["eta_star"]),
                                                                      4.0), squeeze=False)
    for axis, (B, eta_star) in zip(axes[0], result["eta_star"].items()):
        grid = eta_star * np.concatenate([np.linspace(0.01, 0.9, 40),
                                          1 - np.geomspace(0.1, 1e-3, 20)])
        curve = [fs.stationary(family, lr, B, sampling="without_replacement").excess_loss
                 for lr in grid]
        axis.plot(grid, curve, "k-", label="predicted, i.i.d. batches (exact)")
        reshuffled = [r for r in result["rows"] if r["batch_size"] == B
                      and r["scheme"] == "reshuffle"]
        axis.errorbar([r["lr"] for r in reshuffled], [r["predicted"] for r in reshuffled],
                      yerr=[2 * r["predicted_error"] for r in reshuffled], fmt="x--",
                      color="0.45", ms=6, capsize=2,
                      label="predicted, reshuffled (Monte-Carlo estimate)")
        for scheme, marker in zip(SCHEMES, ("o", "s")):
            rows = [r for r in result["rows"] if r["batch_size"] == B and r["scheme"] == scheme]
            name = "i.i.d. batches" if scheme == "without_replacement" else \
                "DataLoader(shuffle=True)"
            axis.errorbar([r["lr"] for r in rows], [r["measured"] for r in rows],
                          yerr=[2 * r["standard_error"] for r in rows], fmt=marker, ms=4,
                          capsize=2, mfc="none", label=f"torch.optim.SGD, {name}")
        axis.axvline(eta_star, color="r", ls="--", label="eta* (critical lr)")
        axis.set_yscale("log")
        axis.set_xlabel("learning rate (MSELoss's own)")
        axis.set_ylabel("training loss above its minimum")
        axis.set_title(f"batch size {B}")
        axis.set_ylim(top=max(curve[-1], 1e-1))
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def ratio_error(row) -> float:
    """Standard error of measured / predicted (both errors, first order)."""
    ratio = row["measured"] / row["predicted"]
    return ratio * math.hypot(row["standard_error"] / row["measured"],
                              row["predicted_error"] / row["predicted"])


def table(result) -> str:
    lines = ["| B | lr / eta* | lr | predicted i.i.d. (exact) | SGD i.i.d. batches | "
             "i.i.d. / predicted | predicted reshuffled (estimate) | SGD reshuffled | "
             "reshuffled / predicted |", "|---|---|---|---|---|---|---|---|---|"]
    keyed = {(r["batch_size"], r["fraction"], r["scheme"]): r for r in result["rows"]}
    for B in result["eta_star"]:
        for fraction in sorted({r["fraction"] for r in result["rows"] if r["batch_size"] == B}):
            a = keyed[B, fraction, "without_replacement"]
            b = keyed[B, fraction, "reshuffle"]
            lines.append(
                f"| {B} | {fraction:g} | {a['lr']:.4g} | {a['predicted']:.4g} | "
                f"{a['measured']:.4g} ± {a['standard_error']:.2g} | "
                f"{a['measured'] / a['predicted']:.3f} | "
                f"{b['predicted']:.4g} ± {b['predicted_error']:.2g} | "
                f"{b['measured']:.4g} ± {b['standard_error']:.2g} | "
                f"{b['measured'] / b['predicted']:.3f} ± {ratio_error(b):.3f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    path = Path(argv[0]) if argv else Path("docs/images/loss_floor.png")
    result = run(quick=quick)
    plot(result, path)
    text = table(result)
    print(f"minimum loss {result['minimum']:.6g}, d = {result['parameters']}, "
          f"eta* = {result['eta_star']}")
    print(text)
    print("inverse:", result["inverse"])
    return result


if __name__ == "__main__":
    main()
