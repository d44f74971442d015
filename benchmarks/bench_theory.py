"""asv benchmarks of the theory module: coherence at large n beside a numpy/scipy-only baseline.

Setup builds seeded data and calls every function once, so Numba compilation is never timed.
The timed calls build a fresh HessianFamily, so the reduction to H's eigenbasis is included.
"""


import fastsgdstab as fs
from fastsgdstab.theory import lemma1, theorem1

try:
    from baselines import QUICK, coherence_numpy_baseline, lognormal_features, sizes
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import QUICK, coherence_numpy_baseline, lognormal_features, sizes



def _warm_up():
    family = fs.HessianFamily.from_features(lognormal_features(40, 4, seed=1))
    fs.coherence(family)
    fs.coherence(family, store_limit=10)  # the matrix-free path
    fs.report(family, 0.1, 2)


class Coherence:
    """The issue's target: n = 50,000 rank-1 samples in d = 100 under 30 s and 2 GB."""

    params = [sizes([(5000, 100), (20000, 100), (50000, 100)], [(2000, 50)])]
    param_names = ["n_d"]
    number = 1
    repeat = 2
    timeout = 900

    def setup(self, n_d):
        self.features = lognormal_features(*n_d)
        _warm_up()

    def time_fastsgdstab(self, n_d):
        fs.coherence(fs.HessianFamily.from_features(self.features), store_limit=0)

    if not QUICK:  # the memory cases are full-mode only (each is a process of its own)
        def peakmem_fastsgdstab(self, n_d):
            fs.coherence(fs.HessianFamily.from_features(self.features), store_limit=0)


class CoherenceBaseline:
    """The numpy/scipy baseline (ARPACK on a row-block sweep of |X X^T|) at the sizes where it
    finishes in minutes: measured 74 s at n = 20,000 and 630 s (2.6 GB) at n = 50,000."""

    params = [sizes([(5000, 100), (20000, 100)], [(2000, 50)])]
    param_names = ["n_d"]
    number = 1
    repeat = 2
    timeout = 900

    def setup(self, n_d):
        self.features = lognormal_features(*n_d)

    def time_baseline_eigsh(self, n_d):
        coherence_numpy_baseline(self.features)

    if not QUICK:
        def peakmem_baseline_eigsh(self, n_d):
            coherence_numpy_baseline(self.features)


class CoherenceStored:
    """Small n: S is formed and returned."""

    params = [sizes([(1000, 100), (4000, 100)])]
    param_names = ["n_d"]
    number = 1
    repeat = 3

    def setup(self, n_d):
        self.features = lognormal_features(*n_d)
        _warm_up()

    def time_fastsgdstab(self, n_d):
        fs.coherence(fs.HessianFamily.from_features(self.features))


class Theory:
    """Theorem 1, Lemma 1 and the full report at a moderate size."""

    params = [[(1000, 50)]]
    param_names = ["n_d"]
    number = 1
    repeat = 3

    def setup(self, n_d):
        self.family = fs.HessianFamily.from_features(lognormal_features(*n_d))
        self.lr = fs.critical_lr(self.family, 32)
        _warm_up()

    def time_theorem1(self, n_d):
        theorem1(self.family, self.lr, 32)

    def time_lemma1(self, n_d):
        lemma1(self.family, self.lr, 32)

    def time_report(self, n_d):
        fs.report(self.family, self.lr, 32)
