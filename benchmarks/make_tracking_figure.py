"""Regenerate docs/images/tracking.png (and print the table of docs/tracking.md): a real training
run tracked by fastsgdstab.torch.StabilityMonitor.

    python benchmarks/make_tracking_figure.py [--quick] [output.png]

The run: scikit-learn's digits (1,797 images of 8 x 8 pixels, scaled to [0, 1], one-hot
targets), a tanh MLP 64 -> 32 -> 10 (2,410 parameters, float32 as usual), torch.nn.MSELoss
(mean over batch and the 10 outputs: Lambda_i = (2 / 10) I, no 1/2), torch.optim.SGD at a
constant learning rate, batches of B = 32 drawn uniformly without replacement from the whole
training set (the exact engine's scheme). The monitor's probe: 32 fixed training images;
``population_size`` = 1,797, so eta*(B) is for batches of 32 out of 1,797 (specification page,
section "A probe subset of a large training set"). Every learning rate here is
torch.optim.SGD's on MSELoss with mean reduction.

The figure: lr, eta*(B) and 2 / sharpness (full-batch GD's edge) over the steps, and lr / eta*.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path


HIDDEN, PROBE, BATCH, LR = 32, 32, 32, 2.0
STEPS, EVERY = 2000, 100
QUICK = {"steps": 40, "every": 20, "probe": 8}


def digits():
    """(X float32 (1797, 64) in [0, 1], Y one-hot float32 (1797, 10))."""
    import torch
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    X = torch.tensor(images / 16.0, dtype=torch.float32)
    Y = torch.nn.functional.one_hot(torch.tensor(labels), 10).to(torch.float32)
    return X, Y


def network(seed=0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, 10))


def train(steps, lr=LR, *, monitor_options=None, probe=PROBE, seed=0):
    """Train the MLP for ``steps`` SGD steps; returns (losses, monitor or None, seconds).

    ``monitor_options``: None, no monitor; a dict (maybe empty: the default cadence) of
    StabilityMonitor options. Batches come from a generator of their own (seed + 1), so the
    run is the same with and without the monitor."""
    import time

    import torch

    from fastsgdstab.torch import EdgeOfStabilityWarning, StabilityMonitor

    X, Y = digits()
    model = network(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.MSELoss()
    probe_index = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed + 2))[:probe]
    monitor = None
    if monitor_options is not None:
        monitor = StabilityMonitor(model, X[probe_index], Y[probe_index], loss_fn,
                                   batch_size=BATCH, optimizer=optimizer,
                                   population_size=len(X), **monitor_options)
    batches = torch.Generator().manual_seed(seed + 1)
    losses = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EdgeOfStabilityWarning)
        for step in range(steps):
            index = torch.randperm(len(X), generator=batches)[:BATCH]
            optimizer.zero_grad()
            value = loss_fn(model(X[index]), Y[index])
            value.backward()
            optimizer.step()
            losses.append(value.item())
            if monitor is not None:
                monitor.step(step)
    return losses, monitor, time.perf_counter() - start


def draw(monitor, path):
    """The figure: lr, eta*(B), 2 / sharpness (log scale) and lr / eta* over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = monitor.rows
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    monitor.plot(ax=top)
    top.set_ylabel("learning rate\n(torch.optim.SGD on MSELoss, mean)")
    top.set_title(f"digits MLP, SGD at lr = {rows[0]['lr']:g}, B = {monitor.batch_size} of "
                  f"{monitor.population_size or len(monitor.inputs)}")
    bottom.plot(steps, [r["lr_over_critical"] for r in rows], color="C3")
    bottom.axhline(1.0, color="gray", linewidth=0.8)
    bottom.set_ylabel("lr / eta*(B)")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(monitor):
    """The docs' table: a few records."""
    lines = ["| step | loss (probe) | sharpness | 2 / sharpness | eta*(B) | lr / eta* | critical B "
             "| excess loss |", "|---|---|---|---|---|---|---|---|"]
    rows = monitor.rows
    picks = sorted({0, len(rows) // 4, len(rows) // 2, 3 * len(rows) // 4, len(rows) - 1})
    for i in picks:
        r = rows[i]
        excess = "None" if r["excess_loss"] is None else f"{r['excess_loss']:.3g}"
        lines.append(f"| {r['step']} | {r['loss']:.4f} | {r['sharpness']:.4g} | "
                     f"{2 / r['sharpness']:.4g} | {r['critical_lr']:.4g} | "
                     f"{r['lr_over_critical']:.3f} | {r['critical_batch_size']:.4g} | {excess} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    paths = [a for a in argv if not a.startswith("--")]
    path = Path(paths[0]) if paths else Path(__file__).resolve().parents[1] / "docs" / "images" / "tracking.png"
    settings = QUICK if quick else {"steps": STEPS, "every": EVERY, "probe": PROBE}
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the loop's own speed on a shared machine; restored below
    try:
        losses, monitor, seconds = train(settings["steps"], probe=settings["probe"],
                                         monitor_options={"every": settings["every"]})
    finally:
        torch.set_num_threads(threads)
    draw(monitor, path)
    print(table(monitor))
    print(f"{len(monitor.rows)} records in {monitor.seconds:.1f} s of a {seconds:.1f} s run "
          f"(every = {settings['every']} steps, no budget); final training loss {losses[-1]:.4f}")
    print(f"wrote {path}")
    return monitor


if __name__ == "__main__":
    main()
