"""asv benchmarks of ``fs.estimate`` (the bootstrap over a probe's samples) beside a plain
numpy/scipy bootstrap of the same statistic.

The probe: n rank-1 samples in d dimensions, ``population_size`` 50,000, the critical learning
rate at B = 128 without replacement, 200 resamples (50 in quick mode). ``fastsgdstab`` resamples in the probe's
reduced coordinates on a thread pool; ``reuse_reduction=False`` is the same bootstrap on the
d-dimensional factors; the baseline loops over resamples with ``critical_lr_numpy_baseline``
(Bernoulli; the same amount of linear algebra per resample, its own eigendecomposition of H
each time). Setup calls everything once, so Numba compilation is never timed.
"""

import numpy as np

import fastsgdstab as fs

try:
    from baselines import QUICK, critical_lr_numpy_baseline, lognormal_features, sizes
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import QUICK, critical_lr_numpy_baseline, lognormal_features, sizes

RESAMPLES = 50 if QUICK else 200  # quick mode: a quarter of the resamples, on each side


class Estimate:
    params = [sizes([(300, 50), (100, 20000)], [(100, 20)])]
    param_names = ["n_d"]
    number = 1
    repeat = 2
    timeout = 900

    def setup(self, n_d):
        self.features = lognormal_features(*n_d)
        self.probe = fs.HessianFamily.from_features(self.features, population_size=50_000)
        fs.estimate(fs.critical_lr, fs.HessianFamily.from_features(self.features[:20, :4]), 2,
                    resamples=2)
        self.indices = np.random.default_rng(0).integers(0, n_d[0], size=(RESAMPLES, n_d[0]))

    def time_fastsgdstab(self, n_d):
        fs.estimate(fs.critical_lr, self.probe, 128, sampling="without_replacement",
                    resamples=RESAMPLES)

    def time_fastsgdstab_without_reuse(self, n_d):
        fs.estimate(fs.critical_lr, self.probe, 128, sampling="without_replacement",
                    reuse_reduction=False, resamples=RESAMPLES)

    def time_baseline_numpy_loop(self, n_d):
        for rows in self.indices:
            critical_lr_numpy_baseline(self.features[rows], 128)
