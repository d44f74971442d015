"""asv benchmarks of the exact engine, each beside its numpy/scipy-only baseline.

Setup builds seeded data and calls every function once, so Numba compilation is never timed.
The timed calls build a fresh HessianFamily, so the one-off reduction to H's eigenbasis (an
eigensolve of H or of the Gram matrix) is included, as it is for a user.
"""


import fastsgdstab as fs

try:
    from baselines import QUICK, critical_lr_numpy_baseline, lognormal_features, sizes
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import QUICK, critical_lr_numpy_baseline, lognormal_features, sizes



class CriticalLR:
    """The issue's speed target: n = 5,000 rank-1 samples in d = 300, against ARPACK + BLAS-3."""

    params = [sizes([(1000, 100), (5000, 300)])]
    param_names = ["n_d"]
    number = 1
    repeat = 5
    timeout = 600

    def setup(self, n_d):
        self.features = lognormal_features(*n_d)
        fs.critical_lr(fs.HessianFamily.from_features(self.features[:20, :4]), 2)

    def time_fastsgdstab(self, n_d):
        fs.critical_lr(fs.HessianFamily.from_features(self.features), 32)

    def time_baseline_eigsh_default_tol(self, n_d):
        critical_lr_numpy_baseline(self.features, 32)

    if not QUICK:  # quick mode: one baseline beside the engine, no memory case (a process each)
        def time_baseline_eigsh_tol_1e10(self, n_d):
            critical_lr_numpy_baseline(self.features, 32, tol=1e-10)

        def peakmem_fastsgdstab(self, n_d):
            fs.critical_lr(fs.HessianFamily.from_features(self.features), 32)


class CriticalLRScale:
    """The issue's scale targets (no baseline: it would take minutes)."""

    params = [[(10000, 1000), (1000, 100000)]]
    param_names = ["n_d"]
    number = 1
    repeat = 2
    timeout = 900

    def setup(self, n_d):
        if QUICK:
            raise NotImplementedError("skipped in quick mode (FASTSGDSTAB_ASV_QUICK)")
        self.features = lognormal_features(*n_d)
        fs.critical_lr(fs.HessianFamily.from_features(self.features[:20, :4]), 2)

    def time_critical_lr(self, n_d):
        fs.critical_lr(fs.HessianFamily.from_features(self.features), 32)

    def peakmem_critical_lr(self, n_d):
        fs.critical_lr(fs.HessianFamily.from_features(self.features), 32)


class SpectralRadiusAndBatch:
    params = [sizes([(1000, 100), (5000, 300)])]
    param_names = ["n_d"]
    number = 1
    repeat = 3

    def setup(self, n_d):
        self.features = lognormal_features(*n_d)
        family = fs.HessianFamily.from_features(self.features)
        self.lr = 0.9 * fs.critical_lr(family, 32)
        fs.spectral_radius(fs.HessianFamily.from_features(self.features[:20, :4]), 0.1, 2)
        fs.critical_batch_size(fs.HessianFamily.from_features(self.features[:20, :4]), 0.1)

    def time_spectral_radius(self, n_d):
        fs.spectral_radius(fs.HessianFamily.from_features(self.features), self.lr, 32)

    def time_critical_batch_size(self, n_d):
        fs.critical_batch_size(fs.HessianFamily.from_features(self.features), self.lr)


class SecondMoment:
    """Per-step cost of the exact second-moment iteration (one N(X) product per step)."""

    params = [sizes([(200, 10), (1000, 100)])]
    param_names = ["n_d"]

    def setup(self, n_d):
        self.family = fs.HessianFamily.from_features(lognormal_features(*n_d))
        self.lr = 0.5 / self.family.sharpness()
        fs.second_moment(self.family, self.lr, 8, 2)

    def time_second_moment_100_steps(self, n_d):
        fs.second_moment(self.family, self.lr, 8, 100)


class CriticalLRLargeK:
    """Issue 19's target: critical_lr on a random family of rank-r samples with k = min(n r, d)
    reduced directions (k = 2,000 in full mode; k = 16 in quick mode), plain, heavy ball 0.9 and
    Nesterov 0.9, beside one k x k x k dgemm of the same process's BLAS (the baseline: the
    target is critical_lr <= 60 dgemms, momentum <= 3x plain). The family's reduction is done in
    setup (its cost is the family's, timed by CriticalLR above). run_exact_ratio.py
    --dgemm-ratio prints the ratios, the operator-product counts and the load."""

    params = [sizes([(200, 10, 3000)], quick=[(4, 4, 24)])]
    param_names = ["n_r_d"]
    number = 1
    repeat = 1 if QUICK else 2
    timeout = 1800

    def setup(self, n_r_d):
        import numpy as np

        n, r, d = n_r_d
        rng = np.random.default_rng(0)
        self.family = fs.HessianFamily(rng.standard_normal((n, d, r)) / np.sqrt(d))
        self.family.sharpness()
        small = fs.HessianFamily(rng.standard_normal((5, 20, 2)))
        fs.critical_lr(small, 2)
        fs.critical_lr(small, 2, momentum=0.9)
        k = min(n * r, d)
        self.batch = max(2, n // 10)  # 20 at n = 200 (the target's setting)
        self.a = np.asfortranarray(rng.standard_normal((k, k)))
        self.b = np.asfortranarray(rng.standard_normal((k, k)))

    def time_baseline_one_dgemm(self, n_r_d):
        from scipy.linalg.blas import dgemm
        dgemm(1.0, self.a, self.b)

    def time_plain(self, n_r_d):
        fs.critical_lr(self.family, self.batch)

    def time_heavy_ball_0_9(self, n_r_d):
        fs.critical_lr(self.family, self.batch, momentum=0.9)

    def time_nesterov_0_9(self, n_r_d):
        fs.critical_lr(self.family, self.batch, momentum=0.9, nesterov=True)
if QUICK:  # skipped in quick mode: not defined there (asv would still spend a process on each method)
    del CriticalLRScale
