"""asv benchmarks of the PyTorch adapter (issue 10): family_from_model's two routes beside the
obvious alternative (torch.func.vmap(jacrev) over all samples at once, then numpy).

Sizes are small enough for asv's repeats; the issue's targets (1e5 parameters with n = 1,000,
C = 10; 1e6 parameters with n C = 2,000) are measured by ``run_torch_targets.py``, one child
process per measurement for the peak memory. Setup calls everything once, so the one-off cost of
torch.func (it imports torch._dynamo, several seconds) is never timed.
"""

try:
    import torch
except ImportError:  # the torch extra is not installed: asv skips a class whose setup raises
    torch = None

import numpy as np

from fastsgdstab.family import HessianFamily

try:
    from baselines import QUICK, sizes
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import QUICK, sizes

# Quick mode: an MLP 16-32-32-10 (1,930 parameters), n = 50 (n C = 500), the factors route only.
PROBLEM = (16, 32, 10, 50) if QUICK else (32, 96, 10, 200)


def _problem(p, h, C, n):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(p, h), torch.nn.Tanh(), torch.nn.Linear(h, h),
                                torch.nn.Tanh(), torch.nn.Linear(h, C))
    X = torch.randn(n, p)
    with torch.no_grad():
        Y = model(X)
    return model, X, Y


def _baseline(model, X, C):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(params, x):
        return torch.func.functional_call(model, params, (x[None],))[0]

    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, X)
    J = torch.cat([jac[k].reshape(X.shape[0], C, -1) for k in params], dim=2).numpy()
    return HessianFamily.from_jacobians(J * np.sqrt(2.0 / C))


class FamilyFromModel:
    """An MLP 32-96-96-10 (13,546 parameters), n = 200 samples, C = 10 (n C = 2,000), MSELoss
    (quick mode: ``PROBLEM``)."""

    params = [sizes(["factors", "gram", "baseline"])]
    param_names = ["route"]
    number = 1
    repeat = 3
    timeout = 900

    def setup(self, route):
        if torch is None:
            raise NotImplementedError("torch is not installed")
        from fastsgdstab.torch import family_from_model

        self.family_from_model = family_from_model
        self.model, self.X, self.Y = _problem(*PROBLEM)
        small = _problem(4, 4, 2, 4)
        if route == "baseline":
            _baseline(small[0], small[1], 2)
        else:
            family_from_model(small[0], small[1], small[2], torch.nn.MSELoss())

    def _run(self, route):
        if route == "baseline":
            return _baseline(self.model, self.X, 10).sharpness()
        result = self.family_from_model(self.model, self.X, self.Y, torch.nn.MSELoss(),
                                        reduce=(route == "gram"))
        return result.family.sharpness()

    def time_family_from_model(self, route):
        self._run(route)

    if not QUICK:  # the memory case is full-mode only (a process of its own, torch imported)
        def peakmem_family_from_model(self, route):
            self._run(route)


class FamilyFromModelGram:
    """Issue 19's target (60 s, 2 GB): ``family_from_model`` (``reduce=True``) on a tanh MLP with
    d >> n C, the Gram route (the Linear layers' structured Gram matrix, factored by Cholesky in
    place, the sharpness by Lanczos): 64-280-280-10 (99,690 parameters) with n = 400 and n =
    1,000 (the target itself; ``run_torch_targets.py --case mlp1e5`` measures it in a fresh
    process). Quick mode: 16-64-64-10 (5,898 parameters), n = 210 (n C = 2,100: the Cholesky
    route starts at 2,048 rows). Beside it, at n = 400 in full mode, the release's route: the same
    family, then scipy's ``eigh`` of its Gram matrix (the eigendecomposition that the release
    took instead of the Cholesky factorisation; 886 s in all at n = 1,000)."""

    params = [sizes([(64, 280, 10, 400), (64, 280, 10, 1000)], quick=[(16, 64, 10, 210)])]
    param_names = ["p_h_C_n"]
    number = 1
    repeat = 1 if QUICK else 2
    timeout = 1200

    def setup(self, p_h_C_n):
        if torch is None:
            raise NotImplementedError("torch is not installed")
        from fastsgdstab.torch import family_from_model

        self.family_from_model = family_from_model
        self.model, self.X, self.Y = _problem(*p_h_C_n)
        small = _problem(4, 4, 2, 4)
        family_from_model(small[0], small[1], small[2], torch.nn.MSELoss(), reduce=True)

    def _run(self):
        # reduce=True: the target's route (its factors, 8 GB, do not fit; the quick case's would)
        result = self.family_from_model(self.model, self.X, self.Y, torch.nn.MSELoss(), reduce=True)
        return result.family.sharpness()

    def time_family_from_model(self, p_h_C_n):
        self._run()

    if not QUICK:
        def peakmem_family_from_model(self, p_h_C_n):
            self._run()

        def time_release_route_baseline_eigh(self, p_h_C_n):
            if p_h_C_n[-1] > 400:
                raise NotImplementedError("the baseline at n = 1,000 takes about 15 minutes")
            import scipy.linalg

            family = self.family_from_model(self.model, self.X, self.Y, torch.nn.MSELoss(),
                                            reduce=True, check_gauss_newton=False).family
            rows = family._columns()
            scipy.linalg.eigh(rows @ rows.T, driver="evr")
