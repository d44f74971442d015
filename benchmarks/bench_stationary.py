"""asv benchmarks of the loss floor (``fs.stationary``) beside ``critical_lr`` on the same family
and a numpy/scipy-only baseline (scipy's conjugate gradients on the same preconditioned
operator written with numpy products).

``track_products_ratio`` is the issue's cost target: operator products of ``stationary`` (its
existence-proving eigen-solve, the conjugate gradients to a relative residual of 1e-10 and the
checks) over those of ``critical_lr``: at most 3.
"""

import numpy as np

import fastsgdstab as fs

try:
    from baselines import lognormal_features, sizes
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import lognormal_features, sizes


def gradient_family(n, d, seed=1):
    features = lognormal_features(n, d)
    rng = np.random.default_rng(seed)
    gradients = rng.standard_normal((n, 1)) * features  # residual times feature, as for MSE
    gradients -= gradients.mean(axis=0)
    return features, gradients


def stationary_numpy_baseline(features, gradients, lr, batch_size, rtol=1e-10):
    """The Bernoulli loss floor with numpy/scipy only: scipy.sparse.linalg.cg on
    ``I - lr L^{-1/2} D L^{-1/2}`` in H's eigenbasis (what a user would write without the
    library), the same preconditioning and tolerance."""
    from scipy.sparse.linalg import LinearOperator, cg

    n = features.shape[0]
    H = features.T @ features / n
    lam, V = np.linalg.eigh(H)
    rows = features @ V
    G = gradients @ V
    S = G.T @ G / n
    b = 1.0 / batch_size - 1.0 / n
    C = 1.0 / np.sqrt(np.add.outer(lam, lam))
    k = lam.size

    def apply(z):
        Z = z.reshape(k, k)
        Y = C * Z
        N = (rows.T * (np.einsum("ij,jk,ik->i", rows, Y, rows) / n)) @ rows
        D = np.outer(lam, lam) * Y + b * N
        return (Z - lr * C * D).ravel()

    operator = LinearOperator((k * k, k * k), matvec=apply, dtype=float)
    Z, _ = cg(operator, (C * S).ravel(), rtol=rtol, atol=0.0)
    return 0.5 * lr * b * float(np.sqrt(0.5 * lam) @ np.diag(Z.reshape(k, k)))


class Stationary:
    params = [sizes([(1000, 100), (5000, 300)]), sizes([0.5, 0.9])]
    param_names = ["n_d", "lr_over_eta_star"]
    number = 1
    repeat = 3
    timeout = 600

    def setup(self, n_d, fraction):
        self.features, self.gradients = gradient_family(*n_d)
        self.family = fs.HessianFamily.from_features(self.features, gradients=self.gradients)
        self.eta_star = fs.critical_lr(self.family, 32, bounds=True)
        self.lr = fraction * self.eta_star.value
        small = fs.HessianFamily.from_features(self.features[:20, :4],
                                               gradients=self.gradients[:20, :4]
                                               - self.gradients[:20, :4].mean(axis=0))
        fs.stationary(small, 0.01, 2)

    def time_stationary(self, n_d, fraction):
        fs.stationary(fs.HessianFamily.from_features(self.features, gradients=self.gradients),
                      self.lr, 32)

    def time_critical_lr(self, n_d, fraction):
        fs.critical_lr(fs.HessianFamily.from_features(self.features), 32)

    def time_baseline_scipy_cg(self, n_d, fraction):
        stationary_numpy_baseline(self.features, self.gradients, self.lr, 32)

    def track_products_ratio(self, n_d, fraction):
        return fs.stationary(self.family, self.lr, 32).products / self.eta_star.products

    track_products_ratio.unit = "stationary / critical_lr products"
