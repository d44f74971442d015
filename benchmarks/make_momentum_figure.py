"""Regenerate docs/images/momentum_critical_lr.png: eta* against batch size for momentum in
{0, 0.5, 0.9, 0.99}, heavy ball and Nesterov, on one seeded family (without replacement, the
scheme of training loops).

    python benchmarks/make_momentum_figure.py [output.png]

The family: n = 200 rank-1 samples in d = 20, Gaussian features with lognormal per-sample
scales (the benchmarks' test problem), from_features (loss (1/2)(x_i . w)^2), so lambda_1(H)
sets the scale: the plot shows lr* lambda_1(H). The dashed lines are the deterministic caps
2 (1 + mu) (heavy ball) and 2 (1 + mu) / (1 + 2 mu) (Nesterov), the limits at B = n.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import fastsgdstab as fs  # noqa: E402
from fastsgdstab.moments import critical_lr  # noqa: E402

try:
    from baselines import lognormal_features
except ImportError:
    from .baselines import lognormal_features

MOMENTA = (0.0, 0.5, 0.9, 0.99)
N, D = 200, 20


def curves(family, batch_sizes, sampling="without_replacement"):
    """{(momentum, nesterov): array of lr* lambda_1 over batch_sizes}."""
    sharpness = family.sharpness()
    out = {}
    for nesterov in (False, True):
        for momentum in MOMENTA:
            if nesterov and momentum == 0.0:
                continue
            out[momentum, nesterov] = np.array([
                critical_lr(family, int(b), sampling=sampling, momentum=momentum,
                            nesterov=nesterov) * sharpness for b in batch_sizes])
    return out


def main(path="docs/images/momentum_critical_lr.png"):
    family = fs.HessianFamily.from_features(lognormal_features(N, D, seed=1))
    batch_sizes = np.unique(np.round(np.geomspace(1, N, 16)).astype(int))
    data = curves(family, batch_sizes)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = dict(zip(MOMENTA, ("black", "tab:blue", "tab:orange", "tab:red")))
    for ax, nesterov in zip(axes, (False, True)):
        for momentum in MOMENTA:
            key = (momentum, nesterov) if momentum else (0.0, False)
            label = "plain SGD" if momentum == 0 else f"mu = {momentum:g}"
            ax.plot(batch_sizes, data[key], "o-", ms=3, color=colours[momentum], label=label)
            if momentum:
                cap = 2 * (1 + momentum) / ((1 + 2 * momentum) if nesterov else 1)
                ax.axhline(cap, color=colours[momentum], ls="--", lw=0.8)
        ax.axhline(2.0, color="black", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size B (without replacement)")
        ax.set_title("Nesterov" if nesterov else "heavy ball")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("critical lr x lambda_1(H)")
    axes[0].legend(loc="lower right")
    fig.suptitle(f"Exact mean-square critical learning rate, n = {N}, d = {D} "
                 f"(dashed: deterministic caps)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    for key, values in sorted(data.items()):
        print(key, " ".join(f"{v:.4g}" for v in values))
    print("batch sizes", batch_sizes.tolist())
    print("wrote", path)


if __name__ == "__main__":
    main(*sys.argv[1:])
