"""Issue 23's real-network case: the typical critical lr of a tanh MLP with heavy ball 0.9,
beside real ``torch.optim.SGD(momentum=0.9)`` runs at 1.0, 1.05, 1.1 and 1.15 eta*.

    python benchmarks/typical_diabetes.py [--batch-size 32] [--runs 6] [--steps 5000] [--no-typical]

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
(``||w_t - w*||^2 >= 1000 ||w_0 - w*||^2`` at some step). Prints a table; takes a few minutes.
"""

import argparse
import math
import time

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--factors", type=str, default="1.0,1.05,1.1,1.15")
    parser.add_argument("--no-typical", action="store_true",
                        help="skip typical_critical_lr (the real runs and eta* only)")
    args = parser.parse_args()

    import torch

    import fastsgdstab as fs
    from fastsgdstab.torch import family_from_model

    torch.set_num_threads(1)
    started = time.perf_counter()
    model, X, y, residual = build()
    fitted = family_from_model(model, X, y, torch.nn.MSELoss())
    family = fitted.family
    assert fitted.route == "factors"  # rows in the order of model.parameters()
    B = args.batch_size
    eta_star = fs.critical_lr(family, B, sampling="without_replacement", momentum=0.9)
    typical = None if args.no_typical else fs.typical_critical_lr(
        family, B, sampling="without_replacement", momentum=0.9)
    print(f"diabetes tanh MLP 10-128-1, n = 128, MSELoss (torch's lr), training loss after "
          f"least squares {residual:.2e}; family {family}; B = {B}, heavy ball 0.9, batches "
          f"without replacement")
    print(f"exact mean-square eta* = {eta_star:.6g}")
    if typical is not None:
        low, high = typical.interval
        print(f"typical eta_typ = {typical.value:.6g} = {typical.value / eta_star:.4f} eta*, 95% "
              f"interval [{low / eta_star:.4f}, {high / eta_star:.4f}] eta* "
              f"({typical.cost.simulated_steps:,} simulated steps, "
              f"{typical.cost.elapsed_seconds:.1f} s)")
    print(f"{'lr / eta*':>9} {'simulated gamma':>18} {'torch gamma (+/- se)':>26} {'escaped':>9}")
    for factor in [float(f) for f in args.factors.split(",")]:
        lr = factor * eta_star
        steps, runs = 2000, 256  # typical_critical_lr's default budget
        simulated = fs.simulate(family, lr, B, steps, runs, sampling="without_replacement",
                                momentum=0.9, progress=False, record_every=steps // 4)
        rates = (simulated.log_sq_norm[:, -1] - simulated.log_sq_norm[:, 1]) / (
            2.0 * (steps - steps // 4))
        slopes, escaped = real_runs(model, X, y, lr, B, args.runs, args.steps, seed=1,
                                    rows=family.factors[:, :, 0])
        finite = slopes[np.isfinite(slopes)]
        print(f"{factor:9.3f} {rates.mean():+11.2e} +/- {rates.std(ddof=1) / math.sqrt(rates.size):.1e}"
              f" {finite.mean():+13.2e} +/- {finite.std(ddof=1) / math.sqrt(finite.size):.1e}"
              f" {int(escaped.sum()):4d}/{escaped.size}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore", category=RuntimeWarning)
    main()
