"""Issue 23's real-network case: the typical critical lr of a tanh MLP with heavy ball 0.9,
beside real ``torch.optim.SGD(momentum=0.9)`` runs at 1.0, 1.05, 1.1 and 1.15 eta*.

    python benchmarks/typical_diabetes.py [--batch-size 32] [--runs 6] [--steps 5000] [--no-typical]
                                          [--out docs/images/typical_diabetes.png] [--quick]

The network: a tanh MLP 10-128-1 (1,537 parameters) on 128 standardised samples of
scikit-learn's ``load_diabetes`` (inputs and targets standardised), ``MSELoss`` (no 1/2: the
learning rates are torch's), trained to interpolation: Adam, then least squares on the last
layer (128 equations, 129 unknowns: an exact minimum, every per-sample gradient ~0). The family
is ``fastsgdstab.torch.family_from_model``; ``eta*`` the exact mean-square critical lr and
``eta_typ`` the typical one (``typical_critical_lr``), both for batches drawn without
replacement (a uniform B-subset at every step), heavy ball 0.9.

The real runs: from ``w* + eps v`` (v a random unit vector in the span of the per-sample
gradients, eps = 1e-6: the displacement stays
inside the linear regime, ||w - w*|| < 1e-4 until a run escapes), ``torch.optim.SGD(lr,
momentum=0.9)`` on the mean ``MSELoss`` of the same kind of batches, ``steps`` steps. Per lr:
the runs' mean growth rate of ``log ||w_t - w*||`` after a quarter of the steps (the real-network
Lyapunov exponent; its standard error over runs) and how many runs escaped
(``||w_t - w*||^2 >= 1000 ||w_0 - w*||^2`` at some step). Prints a table and draws
docs/images/typical_diabetes.png; takes a few minutes (``--quick``: seconds, for the test).
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np


def build(seed: int = 0):
    import torch
    from sklearn.datasets import load_diabetes

    torch.manual_seed(seed)
    X, y = load_diabetes(return_X_y=True)
    X, y = X[:128], y[:128]
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    X = torch.tensor(X, dtype=torch.float64)
    y = torch.tensor(y, dtype=torch.float64)[:, None]
    model = torch.nn.Sequential(torch.nn.Linear(10, 128), torch.nn.Tanh(),
                                torch.nn.Linear(128, 1)).double()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = torch.nn.MSELoss()
    for _ in range(3000):
        optimiser.zero_grad()
        value = loss(model(X), y)
        value.backward()
        optimiser.step()
    with torch.no_grad():  # least squares on the last layer: an exact interpolating minimum
        hidden = torch.cat([model[1](model[0](X)), torch.ones(128, 1, dtype=torch.float64)], 1)
        solution = torch.linalg.lstsq(hidden, y, driver="gelsd").solution
        model[2].weight.copy_(solution[:-1].T)
        model[2].bias.copy_(solution[-1])
        residual = float(loss(model(X), y))
    return model, X, y, residual


def real_runs(model, X, y, lr, batch_size, runs, steps, seed, rows, eps=1e-6):
    """Per run: the slope of log ||w_t - w*|| over the last 3/4 of the steps, and whether
    ||w_t - w*||^2 reached 1000 ||w_0 - w*||^2. The perturbation is ``rows^T c`` (c ~ N(0, I)),
    inside the range of H: a component in the 1,409 directions no sample's gradient reaches
    would never move, and would hide the growth rate (as the simulation's range reduction)."""
    import torch

    params = list(model.parameters())
    star = [p.detach().clone() for p in params]
    loss = torch.nn.MSELoss()
    n = X.shape[0]
    burn_in = steps // 4
    slopes, escaped = [], []
    for run in range(runs):
        generator = torch.Generator().manual_seed(seed * 100003 + run)
        flat = torch.as_tensor(rows.T @ np.asarray(
            torch.randn(rows.shape[0], generator=generator, dtype=torch.float64)))
        direction, start = [], 0
        for p in params:
            direction.append(flat[start:start + p.numel()].reshape(p.shape))
            start += p.numel()
        scale = eps / math.sqrt(sum(float((v * v).sum()) for v in direction))
        with torch.no_grad():
            for p, s, v in zip(params, star, direction):
                p.copy_(s + scale * v)
        optimiser = torch.optim.SGD(params, lr=lr, momentum=0.9)
        log0 = 2 * math.log(eps)
        log_b, log_t, flagged = None, None, False
        for t in range(1, steps + 1):
            batch = torch.randperm(n, generator=generator)[:batch_size]
            optimiser.zero_grad()
            loss(model(X[batch]), y[batch]).backward()
            optimiser.step()
            with torch.no_grad():
                sq = sum(float(((p - s) ** 2).sum()) for p, s in zip(params, star))
            log_t = math.log(sq)
            flagged = flagged or log_t >= log0 + math.log(1000.0)
            if t == burn_in:
                log_b = log_t
            if log_t > log0 + math.log(1e6):  # left the linear regime: the slope so far
                break
        slopes.append((log_t - log_b) / (2.0 * (t - burn_in)) if t > burn_in else math.inf)
        escaped.append(flagged)
    with torch.no_grad():
        for p, s in zip(params, star):
            p.copy_(s)
    return np.array(slopes), np.array(escaped)


def measure(batch_size=32, runs=6, steps=5000, factors=(1.0, 1.05, 1.1, 1.15), typical=True,
            typical_budget=None, simulated_budget=(256, 2000)):
    """Everything the note shows, as a dict: eta*, the typical estimate, and per lr factor the
    simulated exponent of the linearised model and the real torch runs (printed as it goes)."""
    import torch

    import fastsgdstab as fs
    from fastsgdstab.torch import family_from_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        model, X, y, residual = build()
        fitted = family_from_model(model, X, y, torch.nn.MSELoss())
        family = fitted.family
        assert fitted.route == "factors"  # rows in the order of model.parameters()
        B = batch_size
        eta_star = fs.critical_lr(family, B, sampling="without_replacement", momentum=0.9)
        estimate = None if not typical else fs.typical_critical_lr(
            family, B, sampling="without_replacement", momentum=0.9, **(typical_budget or {}))
        print(f"diabetes tanh MLP 10-128-1, n = 128, MSELoss (torch's lr), training loss after "
              f"least squares {residual:.2e}; family {family}; B = {B}, heavy ball 0.9, batches "
              f"without replacement")
        print(f"exact mean-square eta* = {eta_star:.6g}")
        if estimate is not None:
            low, high = estimate.interval
            print(f"typical eta_typ = {estimate.value:.6g} = {estimate.value / eta_star:.4f} "
                  f"eta*, 95% interval [{low / eta_star:.4f}, {high / eta_star:.4f}] eta* "
                  f"({estimate.cost.simulated_steps:,} simulated steps, "
                  f"{estimate.cost.elapsed_seconds:.1f} s)")
        print(f"{'lr / eta*':>9} {'simulated gamma':>18} {'torch gamma (+/- se)':>26} "
              f"{'escaped':>9}")
        rows = []
        sim_runs, sim_steps = simulated_budget
        for factor in factors:
            lr = factor * eta_star
            simulated = fs.simulate(family, lr, B, sim_steps, sim_runs,
                                    sampling="without_replacement", momentum=0.9,
                                    progress=False, record_every=sim_steps // 4)
            rates = (simulated.log_sq_norm[:, -1] - simulated.log_sq_norm[:, 1]) / (
                2.0 * (sim_steps - sim_steps // 4))
            slopes, escaped = real_runs(model, X, y, lr, B, runs, steps, seed=1,
                                        rows=family.factors[:, :, 0])
            finite = slopes[np.isfinite(slopes)]
            row = dict(factor=factor, simulated=rates.mean(),
                       simulated_se=rates.std(ddof=1) / math.sqrt(rates.size),
                       torch=finite.mean() if finite.size else math.nan,
                       torch_se=(finite.std(ddof=1) / math.sqrt(finite.size)
                                 if finite.size > 1 else math.nan),
                       escaped=int(escaped.sum()), runs=int(escaped.size))
            rows.append(row)
            print(f"{factor:9.3f} {row['simulated']:+11.2e} +/- {row['simulated_se']:.1e}"
                  f" {row['torch']:+13.2e} +/- {row['torch_se']:.1e}"
                  f" {row['escaped']:4d}/{row['runs']}", flush=True)
        print(f"total {time.perf_counter() - started:.0f} s")
    finally:
        torch.set_num_threads(threads)
    return dict(eta_star=eta_star, typical=estimate, rows=rows, batch_size=B,
                simulated_runs=sim_runs, torch_runs=runs)


def draw(result, path):
    """docs/images/typical_diabetes.png: the growth rates against lr / eta*, with eta*, the
    typical threshold and its interval, and the torch runs that escaped."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    rows = result["rows"]
    factors = np.array([r["factor"] for r in rows])
    axes.errorbar(factors - 0.002, [r["simulated"] for r in rows],
                  yerr=[1.96 * r["simulated_se"] for r in rows], marker="o", capsize=3,
                  label=f"simulated (linearised), {result['simulated_runs']} runs",
                  gid="simulated")
    axes.errorbar(factors + 0.002, [r["torch"] for r in rows],
                  yerr=[1.96 * r["torch_se"] for r in rows], marker="s", capsize=3,
                  label=f"torch.optim.SGD, {result['torch_runs']} runs per lr", gid="torch")
    for r in rows:
        axes.annotate(f"{r['escaped']}/{r['runs']} escaped", (r["factor"], r["torch"]),
                      textcoords="offset points", xytext=(6, -12), fontsize=7)
    axes.axhline(0.0, color="grey", lw=0.8)
    axes.axvline(1.0, color="black", lw=1.2, ls="--", label="exact mean-square eta*")
    typical = result["typical"]
    if typical is not None:
        star = result["eta_star"]
        low, high = typical.interval
        axes.axvspan(low / star, high / star, color="tab:green", alpha=0.25, lw=0)
        axes.axvline(typical.value / star, color="tab:green", lw=1.5, gid="typical",
                     label=f"typical eta_typ = {typical.value / star:.3f} eta*")
    axes.set_xlabel("lr / eta*  (torch's lr, MSELoss)")
    axes.set_ylabel("growth rate of log ||w_t - w*|| per step")
    axes.set_title(f"diabetes MLP 10-128-1, B = {result['batch_size']}, heavy ball 0.9, "
                   f"without replacement", fontsize=10)
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path)
    return str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--factors", type=str, default="1.0,1.05,1.1,1.15")
    parser.add_argument("--no-typical", action="store_true",
                        help="skip typical_critical_lr (the real runs and eta* only)")
    parser.add_argument("--out", default=None,
                        help="write the figure here (default docs/images/typical_diabetes.png; "
                             "'-' for none)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny budgets (the test suite runs the script so); numbers not "
                             "meaningful")
    args = parser.parse_args(argv)
    factors = [float(f) for f in args.factors.split(",")]
    if args.quick:
        result = measure(args.batch_size, runs=2, steps=60, factors=factors[:2],
                         typical=not args.no_typical, typical_budget=dict(runs=8, steps=60),
                         simulated_budget=(8, 60))
    else:
        result = measure(args.batch_size, args.runs, args.steps, factors,
                         typical=not args.no_typical)
    path = args.out or str(Path(__file__).resolve().parents[1] / "docs" / "images"
                           / "typical_diabetes.png")
    if path != "-":
        print(draw(result, path))
    return result


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore", category=RuntimeWarning)
    main()
