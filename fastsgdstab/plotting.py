"""Figures: the reproduced figure 1 of Dexter et al. and phase diagrams of any family.

matplotlib is an optional dependency (``pip install "fastsgdstab[plot]"``). Figures are drawn
on a ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so they work
headless (no display, no GUI backend) and leave the user's pyplot state alone.
"""

from __future__ import annotations

import numpy as np

from .theory import theorem1_sigma_boundary, theorem2_sigma_boundary

__all__ = ["plot_figure1_panel", "plot_stability_map", "PLOT_EXTRA_MESSAGE"]

PLOT_EXTRA_MESSAGE = (
    'plotting needs matplotlib, which is an optional extra: pip install "fastsgdstab[plot]"'
)

# Pixel size of every PNG: figsize (6.4, 4.8) inches at 100 dpi.
_FIGSIZE = (6.4, 4.8)
_DPI = 100


def _new_figure():
    """A Figure with an Agg canvas; ImportError naming the ``plot`` extra without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError(PLOT_EXTRA_MESSAGE) from exc
    figure = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def plot_figure1_panel(result, lr, sampling, path) -> str:
    """Draw one panel of the reproduced figure 1 and write it as a 640 x 480 PNG.

    Cells in the (batch size, sigma) plane, red where the simulated verdict is divergent and
    blue where it is convergent; over them Theorem 1's curve
    (:func:`fastsgdstab.theory.theorem1_sigma_boundary`: divergence is proven below it) and the
    exact mean-square boundary: for Bernoulli sampling the closed form of Theorem 2
    (:func:`fastsgdstab.theory.theorem2_sigma_boundary`), otherwise the boundary between the
    cells the engine finds stable and divergent.

    Parameters
    ----------
    result : fastsgdstab.experiments.Figure1
    lr : float
    sampling : str
        One of the result's panels.
    path : str or path-like
        Where to write the PNG.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ImportError
        matplotlib is not installed (the message names the ``plot`` extra).
    ValueError
        The result has no such panel.
    """
    mask = result.panel(lr, sampling)
    if not np.any(mask):
        raise ValueError(f"the result has no panel lr = {lr}, sampling = {sampling!r}; "
                         f"it has {result.panels()}")
    figure = _new_figure()
    axes = figure.add_subplot()
    batch = result.batch_size[mask]
    sigma = result.sigma[mask]
    diverges = result.simulated_diverges[mask]
    axes.scatter(batch[diverges], sigma[diverges], s=9, marker="s", color="tab:red",
                 label="simulated: diverges")
    axes.scatter(batch[~diverges], sigma[~diverges], s=9, marker="s", color="tab:blue",
                 label="simulated: converges")
    n, top = result.n, result.sharpness
    curve_b = np.linspace(max(batch.min(), 1.0), batch.max(), 400)
    axes.plot(curve_b, theorem1_sigma_boundary(lr, top, n, curve_b), color="black", lw=1.8,
              label=r"Theorem 1: $\sigma = \eta\lambda_1\sqrt{n/B-1}$")
    if sampling == "bernoulli" and lr * top < 2:
        axes.plot(curve_b, theorem2_sigma_boundary(lr, top, n, curve_b), color="gold", lw=1.8,
                  ls="--", label=r"exact: $\sigma = \eta\lambda_1(n/B-1)/(2-\eta\lambda_1)$")
    else:
        # The engine's boundary: for each batch size, halfway between the largest divergent
        # sigma and the next sigma of the grid.
        stable = ~result.exact_diverges[mask]
        sigmas = np.unique(sigma)
        xs, ys = [], []
        for b in np.unique(batch):
            column = batch == b
            unstable_sigmas = sigma[column & ~stable]
            if unstable_sigmas.size == 0:
                level = sigmas[0] - 0.5
            else:
                above = sigmas[sigmas > unstable_sigmas.max()]
                level = 0.5 * (unstable_sigmas.max() + above[0]) if above.size else sigmas[-1] + 0.5
            xs += [b - 0.5, b + 0.5]
            ys += [level, level]
        axes.plot(xs, ys, color="gold", lw=1.8, ls="--", label="exact (engine) boundary")
    agree_exact, agree_theorem = result.agreement(lr, sampling)
    axes.set_xlim(batch.min() - 1, batch.max() + 1)
    axes.set_ylim(sigma.min() - 1, sigma.max() + 1)
    axes.set_xlabel("batch size B")
    axes.set_ylabel(r"coherence $\sigma$")
    axes.set_title(f"lr = {lr:g}, {sampling}: agreement with exact {100 * agree_exact:.0f}%, "
                   f"with Theorem 1 {100 * agree_theorem:.0f}%", fontsize=9)
    axes.legend(loc="upper right", fontsize=7, framealpha=0.9)
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)
    return str(path)


def plot_stability_map(result, path, *, title=None) -> str:
    """Draw a phase diagram (a :class:`fastsgdstab.phase.StabilityMap`) as a 640 x 480 PNG.

    Colour: ``log10`` of the spectral radius of the second-moment map (blue: ``E||w_t||^2``
    shrinks, red: it grows), with the exact critical learning rate of each batch size drawn as a
    black curve (stable to its left).

    Parameters
    ----------
    result : fastsgdstab.phase.StabilityMap
    path : str or path-like
    title : str, optional

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ImportError
        matplotlib is not installed (the message names the ``plot`` extra).
    """
    figure = _new_figure()  # first: raises the ImportError naming the extra
    from matplotlib.colors import TwoSlopeNorm

    axes = figure.add_subplot()
    lr_order = np.argsort(result.lrs)
    batch_order = np.argsort(result.batch_sizes)
    lrs = result.lrs[lr_order]
    batches = result.batch_sizes[batch_order]
    with np.errstate(divide="ignore"):
        log_radius = np.log10(np.maximum(result.spectral_radius[np.ix_(batch_order, lr_order)], 1e-300))
    finite = log_radius[np.isfinite(log_radius)]
    low = min(float(finite.min()), -1e-6) if finite.size else -1.0
    high = max(float(finite.max()), 1e-6) if finite.size else 1.0
    mesh = axes.pcolormesh(lrs, batches, log_radius, shading="nearest", cmap="RdBu_r",
                           norm=TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high))
    figure.colorbar(mesh, ax=axes, label=r"$\log_{10}\rho(Q)$")
    critical = result.critical_lr[batch_order]
    shown = np.isfinite(critical) & (critical <= lrs.max()) & (critical >= lrs.min())
    axes.plot(np.where(shown, critical, np.nan), batches, color="black", lw=1.8,
              label="critical learning rate")
    if batches.size > 2 and batches[0] > 0 and batches[-1] / batches[0] > 20:
        axes.set_yscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("batch size")
    axes.set_title(title or f"exact mean-square stability ({result.sampling}, n = {result.n})",
                   fontsize=10)
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)
    return str(path)
