"""Figures: the reproduced figure 1 of Dexter et al. and phase diagrams of any family.

matplotlib is an optional dependency (``pip install "fastsgdstab[plot]"``). Figures are drawn
on a ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so they work
headless (no display, no GUI backend) and leave the user's pyplot state alone.
"""

from __future__ import annotations

import numpy as np

from .theory import theorem1_sigma_boundary, theorem2_sigma_boundary

__all__ = ["plot_figure1_panel", "plot_stability_map", "typical_figure1_boundary",
           "PLOT_EXTRA_MESSAGE"]

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


def plot_figure1_panel(result, lr, sampling, path, *, typical=None) -> str:
    """Draw one panel of the reproduced figure 1 and write it as a 640 x 480 PNG.

    Cells in the (batch size, sigma) plane, red where the simulated verdict is divergent and
    blue where it is convergent; over them Theorem 1's curve
    (:func:`fastsgdstab.theory.theorem1_sigma_boundary`: divergence is proven below it) and the
    exact mean-square boundary: for Bernoulli sampling the closed form of Theorem 2
    (:func:`fastsgdstab.theory.theorem2_sigma_boundary`), otherwise the boundary between the
    cells the engine finds stable and divergent. With typical thresholds in the result
    (``figure1(..., typical=True)``), also the **typical boundary** (green, dash-dotted): for
    each batch size, the first sigma (from below) at which the cells' typical (Lyapunov)
    critical lr (:func:`fastsgdstab.typical_critical_lr`, section "Typical runs: the Lyapunov
    critical learning rate") crosses the panel's lr, linearly interpolated between the grid's
    sigmas (:func:`typical_figure1_boundary`); the majority vote of the runs is a typical-run
    verdict, so it follows this line rather than the mean-square one.

    Parameters
    ----------
    result : fastsgdstab.experiments.Figure1
    lr : float
    sampling : str
        One of the result's panels.
    path : str or path-like
        Where to write the PNG.
    typical : bool, optional
        Draw the typical boundary: default (None) when the result has typical thresholds;
        True requires them.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ImportError
        matplotlib is not installed (the message names the ``plot`` extra).
    ValueError
        The result has no such panel; ``typical=True`` on a result without typical thresholds.
    """
    mask = result.panel(lr, sampling)
    if not np.any(mask):
        raise ValueError(f"the result has no panel lr = {lr}, sampling = {sampling!r}; "
                         f"it has {result.panels()}")
    if typical is not None and not isinstance(typical, (bool, np.bool_)):
        raise TypeError(f"typical must be None, True or False; got {typical!r}")
    has_typical = getattr(result, "typical_lr", None) is not None
    if typical and not has_typical:
        raise ValueError("typical=True needs typical thresholds in the result: run "
                         "figure1(..., typical=True)")
    draw_typical = has_typical if typical is None else bool(typical)
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
    if draw_typical:
        boundary_b, boundary_sigma = typical_figure1_boundary(result, lr, sampling)
        axes.plot(boundary_b, boundary_sigma, color="tab:green", lw=1.8, ls="-.",
                  marker=".", gid="typical-boundary", label="typical (Lyapunov) boundary")
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


def typical_figure1_boundary(result, lr, sampling):
    """The typical boundary of one figure-1 panel: per batch size, the first sigma (from below)
    where the cells' typical critical lr crosses ``lr``.

    Section "Typical runs: the Lyapunov critical learning rate": a cell's typical run grows when
    ``lr > typical_lr``. For each batch size of the panel, with the cells ordered by sigma, the
    first pair of neighbouring sigmas whose ``typical_lr - lr`` changes sign, and the sigma
    between them where the linear interpolation of ``typical_lr`` equals ``lr``.

    Parameters
    ----------
    result : fastsgdstab.experiments.Figure1
        Computed with ``typical=True``.
    lr : float
    sampling : str

    Returns
    -------
    batch_sizes, sigmas : ndarray
        Ascending batch sizes of the panel and the boundary's sigma for each (NaN where
        ``typical_lr - lr`` keeps its sign over the column: no boundary inside the grid).

    Raises
    ------
    ValueError
        No such panel, or no typical thresholds in the result.

    Examples
    --------
    >>> import numpy as np
    >>> from fastsgdstab.experiments import Figure1
    >>> cells = dict(lr=np.full(3, 0.8), sampling=np.array(["bernoulli"] * 3),
    ...              batch_size=np.array([2, 2, 2]), sigma=np.array([10, 20, 30]))
    >>> none = np.zeros(3)
    >>> result = Figure1(**cells, diverged_runs=none, simulated_diverges=none,
    ...                  exact_diverges=none, theorem1_diverges=none, critical_lr=none, runs=10,
    ...                  steps=1000, seed=0, n=100, sharpness=2.0, elapsed_seconds=0.0,
    ...                  typical_lr=np.array([0.6, 0.7, 0.9]))
    >>> typical_figure1_boundary(result, 0.8, "bernoulli")   # 0.7 -> 0.9 at sigma 20 -> 30
    (array([2]), array([25.]))
    """
    mask = result.panel(lr, sampling)
    if not np.any(mask):
        raise ValueError(f"the result has no panel lr = {lr}, sampling = {sampling!r}; "
                         f"it has {result.panels()}")
    if getattr(result, "typical_lr", None) is None:
        raise ValueError("the result has no typical thresholds: run figure1(..., typical=True)")
    batch = result.batch_size[mask]
    sigma = result.sigma[mask].astype(float)
    typical = result.typical_lr[mask]
    batches = np.unique(batch)
    boundary = np.full(batches.size, np.nan)
    for j, b in enumerate(batches):
        column = batch == b
        order = np.argsort(sigma[column], kind="stable")
        s, t = sigma[column][order], typical[column][order] - lr
        for k in range(1, s.size):
            if (t[k - 1] < 0.0) != (t[k] < 0.0):
                if np.isinf(t[k - 1]) or np.isinf(t[k]):
                    boundary[j] = 0.5 * (s[k - 1] + s[k])  # an infinite threshold: midpoint
                else:
                    boundary[j] = s[k - 1] + (s[k] - s[k - 1]) * (-t[k - 1]) / (t[k] - t[k - 1])
                break
    return batches, boundary


def _check_typical_map(result, typical):
    """``(values, lows, highs)`` in the order of ``result.batch_sizes`` from ``typical``."""
    from .typical import TypicalCriticalLR

    if isinstance(typical, (str, bytes)) or not hasattr(typical, "__len__"):
        raise TypeError(f"typical must be a sequence with one TypicalCriticalLR or float per "
                        f"batch size of the map; got {type(typical).__name__}")
    batch_sizes = np.asarray(result.batch_sizes, dtype=float)
    if len(typical) != batch_sizes.size:
        raise ValueError(f"typical must have one entry per batch size of the map "
                         f"({batch_sizes.size}: {batch_sizes.tolist()}); got {len(typical)}")
    values, lows, highs = [], [], []
    for b, entry in zip(batch_sizes, typical):
        if isinstance(entry, TypicalCriticalLR):
            if float(entry.batch_size) != b:
                raise ValueError(f"typical: the entry for batch size {b:g} was computed for "
                                 f"batch size {entry.batch_size:g} (give them in the order of "
                                 f"result.batch_sizes)")
            if (entry.sampling != result.sampling or entry.momentum != result.momentum
                    or entry.nesterov != result.nesterov):
                raise ValueError(
                    f"typical: the entry for batch size {b:g} is for sampling="
                    f"{entry.sampling!r}, momentum={entry.momentum:g}, nesterov="
                    f"{entry.nesterov}; the map is sampling={result.sampling!r}, momentum="
                    f"{result.momentum:g}, nesterov={result.nesterov}")
            value, (low, high) = entry.value, entry.interval
        else:
            if isinstance(entry, (bool, np.bool_)) or not isinstance(entry, (int, float,
                                                                             np.number)):
                raise TypeError(f"typical: the entry for batch size {b:g} must be a "
                                f"TypicalCriticalLR or a float; got {entry!r}")
            value = low = high = float(entry)
        if not value > 0.0:  # also NaN
            raise ValueError(f"typical: the entry for batch size {b:g} must be a positive lr "
                             f"(inf allowed); got {value!r}")
        values.append(value)
        lows.append(low)
        highs.append(high)
    return np.array(values, float), np.array(lows, float), np.array(highs, float)


def plot_stability_map(result, path, *, title=None, typical=None) -> str:
    """Draw a phase diagram (a :class:`fastsgdstab.phase.StabilityMap`) as a 640 x 480 PNG.

    Colour: ``log10`` of the spectral radius of the second-moment map (blue: ``E||w_t||^2``
    shrinks, red: it grows), with the exact critical learning rate of each batch size drawn as a
    black curve (stable to its left). With ``typical``, the typical (Lyapunov) critical lr of
    each batch size (section "Typical runs: the Lyapunov critical learning rate") as a green
    dash-dotted curve, its intervals shaded: a typical run shrinks to its left, so between the
    two curves the mean square grows while a single run usually does not.

    Parameters
    ----------
    result : fastsgdstab.phase.StabilityMap
    path : str or path-like
    title : str, optional
    typical : sequence, optional
        One entry per batch size of the map, in the order of ``result.batch_sizes``: a
        :class:`fastsgdstab.TypicalCriticalLR` for the same sampling scheme and optimiser (its
        interval is drawn too), or a float. For example ``[fs.typical_critical_lr(family, b,
        sampling=result.sampling, momentum=result.momentum, nesterov=result.nesterov) for b in
        result.batch_sizes]``.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ImportError
        matplotlib is not installed (the message names the ``plot`` extra).
    ValueError
        ``typical`` has not one entry per batch size, or an entry computed for another batch
        size, sampling scheme or optimiser, or a value that is not a positive number.
    """
    typical_values = None if typical is None else _check_typical_map(result, typical)
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
    if typical_values is not None:
        limits = axes.get_xlim()  # the map's lrs: a typical lr beyond them is drawn off-axes
        values, lows, highs = (part[batch_order] for part in typical_values)
        axes.plot(values, batches, color="tab:green", lw=1.8, ls="-.", marker=".",
                  gid="typical-boundary", label="typical (Lyapunov) critical lr")
        bounded = np.isfinite(lows) & np.isfinite(highs)
        if np.any(bounded & (lows < highs)):
            axes.fill_betweenx(batches, np.where(bounded, lows, np.nan),
                               np.where(bounded, highs, np.nan), color="tab:green", alpha=0.25,
                               lw=0, gid="typical-interval")
        axes.set_xlim(limits)
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
