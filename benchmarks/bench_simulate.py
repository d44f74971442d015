"""asv benchmarks of the Monte-Carlo engine beside its numpy-only baseline.

The issue's case: n = 1,000 rank-1 samples in d = 64, Bernoulli batches of B = 32, 1,024 runs.
Setup builds seeded data and calls each function once, so Numba compilation (or the cache load)
is never timed. Throughput is run-steps per second: runs x steps / time.
"""

import warnings

import numpy as np

import fastsgdstab as fs
from fastsgdstab import SimulationWarning

try:
    from baselines import QUICK, simulate_numpy_baseline, sizes
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import QUICK, simulate_numpy_baseline, sizes

N, D, BATCH, RUNS = 1000, 64, 32, 1024


def _features(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) / np.sqrt(d)


def _lr(family):
    # below the GD threshold 2 / lambda_1(H), so runs stay finite-looking and typical
    return 1.0 / family.sharpness()


class Simulate:
    """200 steps of every run: fastsgdstab vs the vectorised numpy baseline (2,000 fewer steps)."""

    params = [sizes(["bernoulli", "without_replacement", "with_replacement", "reshuffle"])]
    param_names = ["sampling"]
    number = 1
    repeat = 5
    timeout = 600

    def setup(self, sampling):
        self.features = _features(N, D)
        self.family = fs.HessianFamily.from_features(self.features)
        self.lr = _lr(self.family)
        self.run(sampling, steps=2)
        simulate_numpy_baseline(self.features, self.lr, BATCH, 2, RUNS)

    def run(self, sampling, steps=200):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)
            fs.simulate(self.family, self.lr, BATCH, steps, RUNS, seed=1, sampling=sampling,
                        progress=False)

    def time_fastsgdstab_200_steps(self, sampling):
        self.run(sampling)

    if not QUICK:  # the memory cases are full-mode only (each is a process of its own)
        def peakmem_fastsgdstab_200_steps(self, sampling):
            self.run(sampling)

    def time_numpy_baseline_20_steps(self, sampling):
        # Bernoulli masks only (the baseline's natural scheme); 20 steps = 1/10 of the work above
        simulate_numpy_baseline(self.features, self.lr, BATCH, 20, RUNS)

    if not QUICK:
        def peakmem_numpy_baseline_20_steps(self, sampling):
            simulate_numpy_baseline(self.features, self.lr, BATCH, 20, RUNS)


class SimulateRank:
    """Higher rank: r factor columns per sample (the work grows like r)."""

    params = [sizes([1, 4])]
    param_names = ["rank"]
    number = 1
    repeat = 3
    timeout = 600

    def setup(self, rank):
        rng = np.random.default_rng(0)
        self.family = fs.HessianFamily(rng.standard_normal((N, D, rank)) / np.sqrt(D * rank))
        self.lr = _lr(self.family)
        self.run(2)

    def run(self, steps=100):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)
            fs.simulate(self.family, self.lr, BATCH, steps, RUNS, seed=1, progress=False)

    def time_fastsgdstab_100_steps(self, rank):
        self.run()


class SimulateLong:
    """The issue's memory target at reduced length: 1,024 runs, default records (O(runs x 1000))."""

    number = 1
    repeat = 1
    timeout = 1200

    def setup(self):
        if QUICK:
            raise NotImplementedError("skipped in quick mode (FASTSGDSTAB_ASV_QUICK)")
        self.family = fs.HessianFamily.from_features(_features(N, D))
        self.lr = _lr(self.family)
        fs.simulate(self.family, self.lr, BATCH, 2, RUNS, progress=False)

    def peakmem_10000_steps(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)
            fs.simulate(self.family, self.lr, BATCH, 10_000, RUNS, seed=1, progress=False)


class SimulateLargeN:
    """Issue 12: the cost of a step must not depend on n. d = 64, B = 32, 1,024 runs at
    n = 1e3 and 1e6 (512 MB of rows): a 1-step call (the fixed cost of a call: target under
    100 ms at n = 1e6) and a 50-step call (per step: target within 5x of n = 1e3)."""

    params = [sizes([1_000, 1_000_000]), sizes(["bernoulli", "without_replacement", "with_replacement"])]
    param_names = ["n", "sampling"]
    number = 1
    repeat = 3
    timeout = 900

    def setup(self, n, sampling):
        self.family = fs.HessianFamily.from_features(_features(n, D))
        self.run(sampling, 1)

    def run(self, sampling, steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)
            fs.simulate(self.family, 0.5, BATCH, steps, RUNS, seed=1, sampling=sampling,
                        progress=False)

    def time_1_step(self, n, sampling):
        self.run(sampling, 1)

    def time_50_steps(self, n, sampling):
        self.run(sampling, 50)


class SimulateMomentum:
    """Issue 11: momentum must keep at least 60% of plain SGD's run-steps per second (n = 1,000,
    d = 64, B = 32, 1,024 runs, 200 steps)."""

    params = [sizes(["none", "heavy_ball", "nesterov"], quick=["heavy_ball"])]
    param_names = ["momentum"]
    number = 1
    repeat = 5
    timeout = 600

    def setup(self, momentum):
        self.family = fs.HessianFamily.from_features(_features(N, D))
        self.lr = _lr(self.family)
        self.kwargs = {"none": {}, "heavy_ball": dict(momentum=0.9),
                       "nesterov": dict(momentum=0.9, nesterov=True)}[momentum]
        self.run(2)

    def run(self, steps=200):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)
            fs.simulate(self.family, self.lr, BATCH, steps, RUNS, seed=1, progress=False,
                        **self.kwargs)

    def time_200_steps(self, momentum):
        self.run()


class SimulateSizes:
    """Issue 19: run-steps per second at a few sizes (serial kernels on the block runner's
    threads), each beside the numpy baseline on the same problem (Bernoulli, 1/10 of the
    steps). Quick mode: the smallest size."""

    params = [sizes(["n200_d16_B4_runs256", "n1000_d64_B32_runs1024", "n1000_d64_r4_B8_runs64"])]
    param_names = ["size"]
    number = 1
    repeat = 3
    timeout = 600
    _SIZES = {"n200_d16_B4_runs256": (200, 16, 1, 4, 256),
              "n1000_d64_B32_runs1024": (1000, 64, 1, 32, 1024),
              "n1000_d64_r4_B8_runs64": (1000, 64, 4, 8, 64)}

    def setup(self, size):
        n, d, rank, self.batch, self.runs = self._SIZES[size]
        rng = np.random.default_rng(1)
        self.factors = rng.standard_normal((n, d, rank)) / np.sqrt(d * rank)
        self.family = fs.HessianFamily(self.factors)
        self.lr = _lr(self.family)
        self.run(2)
        simulate_numpy_baseline(self.factors, self.lr, self.batch, 2, self.runs)

    def run(self, steps=200):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)
            fs.simulate(self.family, self.lr, self.batch, steps, self.runs, seed=1,
                        progress=False)

    def time_fastsgdstab_200_steps(self, size):
        self.run()

    def time_numpy_baseline_20_steps(self, size):
        simulate_numpy_baseline(self.factors, self.lr, self.batch, 20, self.runs)
if QUICK:  # skipped in quick mode: not defined there (asv would still spend a process on each method)
    del SimulateLong
