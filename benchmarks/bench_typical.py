"""asv benchmark of ``typical_critical_lr`` at its default budget, beside a numpy baseline.

The issue's case: n = 1,000 rank-1 samples in d = 64 (the seeded Gaussian features of
``bench_simulate``), batches of B = 32 without replacement, the default budget (256 runs x
2,000 steps at each lr evaluated; ~15-20 lrs). Target: under 60 s on 2 cores. The baseline is
what a user would write with numpy alone for ONE lr: the same 256 runs, vectorised over runs,
each step a batch gathered per run (``einsum``), renormalised; timed on 200 steps (a tenth of
one lr's work), so one lr of the library compares with ten times the baseline's time.
Quick mode (``FASTSGDSTAB_ASV_QUICK=1``): 32 runs x 200 steps.
"""

import numpy as np

import fastsgdstab as fs

try:
    from baselines import QUICK
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import QUICK

N, D, BATCH = 1000, 64, 32
RUNS, STEPS = (32, 200) if QUICK else (256, 2000)


def _features(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) / np.sqrt(d)


def lyapunov_numpy_baseline(features, lr, batch_size, steps, runs, seed=0):
    """Mean over runs of (1/t) log ||w_t|| / ||w_0||: numpy only, batches without replacement."""
    rng = np.random.default_rng(seed)
    n, d = features.shape
    W = rng.standard_normal((runs, d))
    log_norm = np.log(np.linalg.norm(W, axis=1))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    total = np.zeros(runs)
    for _ in range(steps):
        batch = np.argpartition(rng.random((runs, n)), batch_size, axis=1)[:, :batch_size]
        X = features[batch]                                   # (runs, B, d)
        W = W - (lr / batch_size) * np.einsum("rbd,rb->rd", X, np.einsum("rbd,rd->rb", X, W))
        norms = np.linalg.norm(W, axis=1)
        total += np.log(norms)
        W /= norms[:, None]
    return float(np.mean(total) / steps), log_norm


class TypicalCriticalLR:
    """The default budget end to end (every lr of the scan, Brent's points, the interval's ends)."""

    number = 1
    repeat = 1 if not QUICK else 2
    timeout = 900

    def setup(self):
        self.features = _features(N, D)
        self.family = fs.HessianFamily.from_features(self.features)
        self.eta_star = fs.critical_lr(self.family, BATCH, sampling="without_replacement")
        # compile (or load) the kernels and the eta* solve outside the timing
        fs.typical_critical_lr(self.family, BATCH, sampling="without_replacement", runs=2,
                               steps=4)
        lyapunov_numpy_baseline(self.features, self.eta_star, BATCH, 2, 4)

    def time_typical_critical_lr_default_budget(self):
        fs.typical_critical_lr(self.family, BATCH, sampling="without_replacement", runs=RUNS,
                               steps=STEPS)

    def time_numpy_baseline_one_lr_tenth_of_the_steps(self):
        lyapunov_numpy_baseline(self.features, self.eta_star, BATCH, STEPS // 10, RUNS)


if __name__ == "__main__":  # a direct measurement (asv aside): python benchmarks/bench_typical.py
    import os
    import time

    bench = TypicalCriticalLR()
    bench.setup()
    tick = time.perf_counter()
    result = fs.typical_critical_lr(bench.family, BATCH, sampling="without_replacement",
                                    runs=RUNS, steps=STEPS)
    seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    bench.time_numpy_baseline_one_lr_tenth_of_the_steps()
    baseline = time.perf_counter() - tick
    print(result)
    print(f"typical_critical_lr default budget: {seconds:.1f} s wall for {result.lrs.size} lrs "
          f"({seconds / result.lrs.size:.2f} s per lr); numpy baseline, one lr: "
          f"{10 * baseline:.1f} s (10 x {baseline:.2f} s for {STEPS // 10} steps); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
