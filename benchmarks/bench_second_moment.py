"""asv benchmarks of momentum ``second_moment`` (issue 19, item 4): the compiled whole-trajectory
kernels beside release 0.1.0's Python loop per step (``momentum_loops.py``, the numpy baseline)
in the same run, without and with per-sample gradients (the affine trajectory).

Quick mode keeps one small case (k = 40, 200 steps, with gradients: the affine kernel). Setup compiles and warms both paths.
"""

import warnings

import numpy as np

import fastsgdstab as fs

try:
    from baselines import lognormal_features, sizes
    from momentum_loops import python_loops
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import lognormal_features, sizes
    from .momentum_loops import python_loops


def momentum_family(n, d, gradients):
    features = lognormal_features(n, d)
    if not gradients:
        return fs.HessianFamily.from_features(features)
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.NotAMinimumWarning)
        return fs.HessianFamily(features[:, :, None], gradients=0.1 * rng.standard_normal((n, d)))


class MomentumTrajectory:
    params = [sizes([(200, 40, 200), (1000, 150, 200)]), sizes([False, True], quick=[True])]
    param_names = ["n_d_steps", "gradients"]
    number = 1
    repeat = 3
    timeout = 600

    def setup(self, n_d_steps, gradients):
        n, d, self.steps = n_d_steps
        self.family = momentum_family(n, d, gradients)
        self.lr = 0.5 / self.family.sharpness()
        fs.second_moment(self.family, self.lr, 8, 2, momentum=0.9)
        with python_loops():
            fs.second_moment(self.family, self.lr, 8, 2, momentum=0.9)

    def time_kernel(self, n_d_steps, gradients):
        fs.second_moment(self.family, self.lr, 8, self.steps, momentum=0.9)

    def time_python_loop_baseline(self, n_d_steps, gradients):
        with python_loops():
            fs.second_moment(self.family, self.lr, 8, self.steps, momentum=0.9)
