"""asv benchmarks of the phase diagram (stability_map) and the figure-1 reproduction.

The issue's target: a 100 x 100 map (learning rates up to 2.5 / lambda_1, batch sizes 1..n
geometrically) of an n = 1,000, d = 100 least-squares problem in under a minute. The baseline is
the library's own per-point engine, one ``spectral_radius`` Lanczos solve per grid point
(``time_per_point_engine_one_row`` times one row of 100 points: multiply by the number of rows),
so the ratio is measured in the same run. ``python benchmarks/bench_phase.py`` prints both in
one process. Setup calls every function once on a tiny problem: compilation is never timed.
"""

import time

import numpy as np

import fastsgdstab as fs
from fastsgdstab.experiments import figure1

try:
    from baselines import QUICK, sizes
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import QUICK, sizes


def _problem(n, d, points=100, seed=0):
    family = fs.HessianFamily.from_features(np.random.default_rng(seed).standard_normal((n, d)))
    family._reduced  # the one-off reduction to H's eigenbasis is not what is measured here
    top = family.sharpness()
    lrs = np.linspace(0.01, 2.5, points) / top
    batch_sizes = np.geomspace(1, n, points)
    return family, lrs, batch_sizes


def _warm_up():
    tiny = fs.HessianFamily.from_features(np.random.default_rng(1).standard_normal((20, 4)))
    fs.stability_map(tiny, [0.1, 0.2], [1, 5])
    fs.spectral_radius(tiny, 0.1, 2)


# quick mode: a 20 x 20 map of n = 300, d = 30 (a full-size map takes 10-60 s)
MAP_SIZE = (300, 30, 20) if QUICK else (1000, 100, 100)


class StabilityMap:
    params = [sizes(["bernoulli", "without_replacement"])]
    param_names = ["sampling"]
    number = 1
    repeat = 2
    timeout = 900

    def setup(self, sampling):
        _warm_up()
        self.family, self.lrs, self.batch_sizes = _problem(*MAP_SIZE)

    def time_stability_map_100x100(self, sampling):
        fs.stability_map(self.family, self.lrs, self.batch_sizes, sampling=sampling)

    def time_per_point_engine_one_row(self, sampling):
        batch_size = self.batch_sizes[3 * len(self.batch_sizes) // 10]
        for lr in self.lrs:
            fs.spectral_radius(self.family, lr, batch_size, sampling=sampling)

    if not QUICK:  # the memory case is full-mode only (a process of its own)
        def peakmem_stability_map_100x100(self, sampling):
            fs.stability_map(self.family, self.lrs, self.batch_sizes, sampling=sampling)


def _demo_family():
    rng = np.random.default_rng(2024)  # fastsgdstab.cli.demo_family: n = 512, d = 64, rank 1
    return fs.HessianFamily.from_features(rng.standard_normal((512, 64)) / np.sqrt(np.arange(1, 65)))


# The README map (the map tutorial's 60 x 80 grid of the demo problem before issue 18) and a
# momentum map of the same problem; quick mode: a 10 x 12 README grid, no momentum map.
README_GRID = (10, 12) if QUICK else (60, 80)
MOMENTUM_GRID = (12, 16)


class MapProducts:
    """Issue 19 item 2: operator products of a map certified at every point (the load-free
    figure; the target for the README map is 765 = 1.5 x the 510 of the uncertified release),
    and its time. ``operator_products`` is the full count (the shared basis', the critical
    learning rates', any engine fallback's); ``benchmarks/run_map_products.py`` counts them
    independently, by wrapping the kernels."""

    number = 1
    repeat = 1
    timeout = 1800

    def setup(self):
        _warm_up()
        self.family = _demo_family()
        self.family._reduced
        rows, columns = README_GRID
        self.lrs, self.batch_sizes = np.linspace(0.02, 2.2, columns), np.geomspace(1, 512, rows)

    def track_readme_map_products(self):
        return fs.stability_map(self.family, self.lrs, self.batch_sizes,
                                progress=False).operator_products

    def time_readme_map(self):
        fs.stability_map(self.family, self.lrs, self.batch_sizes, progress=False)

    track_readme_map_products.unit = "products"


class MomentumMapProducts:
    """The products of a momentum map (heavy ball 0.9) of the demo problem; not in quick mode
    (its proofs on the full 2k x 2k map take tens of seconds even on a 3 x 4 grid)."""

    number = 1
    repeat = 1
    timeout = 3600

    def setup(self):
        if QUICK:
            raise NotImplementedError("skipped in quick mode (FASTSGDSTAB_ASV_QUICK)")
        _warm_up()
        self.family = _demo_family()
        rows, columns = MOMENTUM_GRID
        self.momentum_lrs = np.linspace(0.002, 0.3, columns)
        self.momentum_batch_sizes = np.geomspace(1, 512, rows)

    def track_momentum_map_products(self):
        return fs.stability_map(self.family, self.momentum_lrs, self.momentum_batch_sizes,
                                momentum=0.9, progress=False).operator_products

    track_momentum_map_products.unit = "products"


class Figure1:
    number = 1
    repeat = 2
    timeout = 900

    def setup(self):
        figure1(lrs=[0.5], samplings=["bernoulli"], sigmas=[5], batch_sizes=[5], runs=2, steps=10)

    def time_figure1_quick(self):
        if QUICK:  # one panel of a 2 x 3 grid
            figure1(lrs=[0.5], samplings=["bernoulli"], sigmas=range(1, 51, 25),
                    batch_sizes=range(1, 50, 24), progress=False)
        else:
            figure1(sigmas=range(1, 51, 7), batch_sizes=range(1, 50, 6), progress=False)



class Figure1Panel:
    """One full panel (50 x 49 cells, 10 runs x 1000 steps each); not in quick mode."""

    number = 1
    repeat = 2
    timeout = 900

    def setup(self):
        if QUICK:
            raise NotImplementedError("skipped in quick mode (FASTSGDSTAB_ASV_QUICK)")
        figure1(lrs=[0.5], samplings=["bernoulli"], sigmas=[5], batch_sizes=[5], runs=2, steps=10)

    def time_figure1_one_panel(self):
        figure1(lrs=[0.5], samplings=["bernoulli"], progress=False)


if QUICK:  # a class skipped in quick mode would still cost asv a process each method
    del Figure1Panel


if __name__ == "__main__":
    _warm_up()
    for sampling in ["bernoulli", "without_replacement"]:
        family, lrs, batch_sizes = _problem(1000, 100)
        start = time.perf_counter()
        result = fs.stability_map(family, lrs, batch_sizes, sampling=sampling)
        elapsed = time.perf_counter() - start
        start = time.perf_counter()
        rows = [30, 70]
        for row in rows:
            for lr in lrs:
                fs.spectral_radius(family, lr, batch_sizes[row], sampling=sampling)
        per_point = (time.perf_counter() - start) / (len(rows) * lrs.size)
        check = [abs(result.spectral_radius[row, j] - fs.spectral_radius(family, lrs[j], batch_sizes[row], sampling=sampling))
                 for row in rows for j in range(0, 100, 9)]
        print(f"{sampling}: stability_map 100 x 100 at n = 1000, d = 100: {elapsed:.1f} s "
              f"({result.operator_products} operator products, largest error bound "
              f"{np.max(result.radius_error / result.spectral_radius):.1e} relative, largest "
              f"observed error {max(check):.1e}); per-point engine {per_point * 1e3:.1f} ms/point, "
              f"{per_point * 1e4:.0f} s for the grid: {per_point * 1e4 / elapsed:.0f}x")
