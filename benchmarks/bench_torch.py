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

    def peakmem_family_from_model(self, route):
        self._run(route)
