"""asv benchmarks of the momentum engine (issue 11's target): critical_lr with momentum at
n = 5,000, d = 300 under 5x the time of plain critical_lr, side by side on the same family.

Setup builds the seeded family and calls each path once (compilation never timed). The timed
calls reuse the family (its one-off reduction to H's eigenbasis is not the engine's cost here;
bench_exact.py times it with a fresh family).
"""

import fastsgdstab as fs
from fastsgdstab.moments import critical_lr

try:
    from baselines import lognormal_features, sizes
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import lognormal_features, sizes


class MomentumCriticalLR:
    # quick mode: d = 50 (the momentum solves grow like d^3; CriticalLRLargeK's quick case
    # keeps the momentum target in quick mode)
    params = [sizes([(1000, 100), (5000, 300)], quick=[(1000, 50)])]
    param_names = ["n_d"]
    number = 1
    repeat = 5
    timeout = 900

    def setup(self, n_d):
        self.family = fs.HessianFamily.from_features(lognormal_features(*n_d))
        small = fs.HessianFamily.from_features(lognormal_features(20, 4))
        critical_lr(small, 2)
        critical_lr(small, 2, momentum=0.9)
        self.family.sharpness()
        critical_lr(self.family, 32)  # the reduction, once

    def time_plain(self, n_d):
        critical_lr(self.family, 32)

    def time_heavy_ball_0_9(self, n_d):
        critical_lr(self.family, 32, momentum=0.9)

    def time_nesterov_0_9(self, n_d):
        critical_lr(self.family, 32, momentum=0.9, nesterov=True)


class MomentumSpectralRadius:
    params = [sizes([(1000, 100)], quick=[(1000, 50)])]  # setup solves momentum's critical lr
    param_names = ["n_d"]
    number = 1
    repeat = 5

    def setup(self, n_d):
        self.family = fs.HessianFamily.from_features(lognormal_features(*n_d))
        self.lr = 0.5 * critical_lr(self.family, 32, momentum=0.9)

    def time_spectral_radius_plain(self, n_d):
        fs.spectral_radius(self.family, self.lr, 32)

    def time_spectral_radius_heavy_ball(self, n_d):
        fs.spectral_radius(self.family, self.lr, 32, momentum=0.9)


if __name__ == "__main__":
    # Side-by-side medians (python benchmarks/bench_momentum.py): the ratio.
    import statistics
    import sys
    import time

    n, d = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (5000, 300)
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    bench = MomentumCriticalLR()
    bench.setup((n, d))
    times = {"plain": [], "heavy ball 0.9": [], "nesterov 0.9": []}
    for _ in range(repeats):  # interleaved, so that load changes hit all three alike
        for name, call in (("plain", bench.time_plain), ("heavy ball 0.9", bench.time_heavy_ball_0_9),
                           ("nesterov 0.9", bench.time_nesterov_0_9)):
            started = time.perf_counter()
            call((n, d))
            times[name].append(time.perf_counter() - started)
    plain = statistics.median(times["plain"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"n={n} d={d} {name:15s} median {median:.3f} s  ratio {median / plain:.2f}  "
              f"({', '.join(f'{v:.2f}' for v in values)})")
