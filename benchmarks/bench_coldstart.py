"""asv benchmarks of the cold start (issue 12, item 3): the first call in a fresh process, with an
empty Numba cache (a fresh install, a fresh CI runner) and with a warm one (``fastsgdstab
warmup`` ran, or an earlier process compiled the kernels).

Each ``track_*`` runs a fresh Python process with its own ``NUMBA_CACHE_DIR`` and reports the
seconds of the first call (import excluded; ``track_import`` reports the import). Targets: first
``critical_lr`` under 1.5 s with an empty cache, first ``simulate`` under 3 s (quiet machine),
beside the numpy baseline's first call in a fresh process.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

try:
    from baselines import QUICK
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import QUICK

FIRST_CALL = textwrap.dedent("""
    import json, sys, time, warnings
    started = time.perf_counter()
    import numpy as np
    import fastsgdstab as fs
    imported = time.perf_counter()
    warnings.simplefilter("ignore")
    family = fs.HessianFamily.from_features(np.random.default_rng(0).standard_normal((200, 10)))
    call = sys.argv[1]
    begin = time.perf_counter()
    if call == "critical_lr":
        fs.critical_lr(family, 8)
    elif call == "simulate":
        fs.simulate(family, 0.1, 8, 100, 64, progress=False)
    elif call == "simulate_gradients":
        gradients = np.random.default_rng(1).standard_normal((200, 10))
        noisy = fs.HessianFamily.from_features(family.factors[:, :, 0],
                                               gradients=gradients - gradients.mean(axis=0))
        fs.simulate(noisy, 0.1, 8, 100, 64, progress=False)
    elif call == "numpy_baseline":
        # the numpy-only baseline's first call in a fresh process (no compilation at all)
        sys.path.insert(0, sys.argv[2])
        from baselines import simulate_numpy_baseline
        simulate_numpy_baseline(family.factors[:, :, 0], 0.1, 8, 100, 64)
    elif call == "warmup":
        from fastsgdstab.cli import warmup
        warmup()
    print(json.dumps({"import": imported - started, "first": time.perf_counter() - begin}))
""")


def _first_call(call, cache):
    environment = dict(os.environ, NUMBA_CACHE_DIR=cache)
    here = os.path.dirname(os.path.abspath(__file__))
    completed = subprocess.run([sys.executable, "-c", FIRST_CALL, call, here], env=environment,
                               capture_output=True, text=True, timeout=1200, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


class _FreshCache:
    unit = "seconds"
    timeout = 1800
    repeat = 1
    number = 1

    def setup(self):
        self.cache = tempfile.mkdtemp(prefix="fastsgdstab-numba-")

    def teardown(self):
        if getattr(self, "cache", None):  # (setup may have skipped the benchmark)
            shutil.rmtree(self.cache, ignore_errors=True)


class ColdStart(_FreshCache):

    def track_first_critical_lr_empty_cache(self):
        return _first_call("critical_lr", self.cache)["first"]

    def track_first_critical_lr_warm_cache(self):
        _first_call("critical_lr", self.cache)
        return _first_call("critical_lr", self.cache)["first"]

    def track_import(self):
        return _first_call("none", self.cache)["import"]


class ColdStartSimulate(_FreshCache):
    """The first ``simulate`` (issue 19: under 3 s with an empty cache): one serial kernel for
    every scheme (no ``parallel=True`` compile). In quick mode only the empty-cache case and
    the numpy baseline's first call (same problem, fresh process) beside it."""

    def track_first_simulate_empty_cache(self):
        return _first_call("simulate", self.cache)["first"]

    def track_numpy_baseline_first_call(self):
        return _first_call("numpy_baseline", self.cache)["first"]


class ColdStartSimulateMore(_FreshCache):
    """Warm cache, and a family with gradients (the affine kernel); not in quick mode."""

    def setup(self):
        if QUICK:
            raise NotImplementedError("skipped in quick mode (FASTSGDSTAB_ASV_QUICK)")
        super().setup()

    def track_first_simulate_warm_cache(self):
        _first_call("simulate", self.cache)
        return _first_call("simulate", self.cache)["first"]

    def track_first_simulate_with_gradients_empty_cache(self):
        return _first_call("simulate_gradients", self.cache)["first"]


if QUICK:  # skipped in quick mode: not defined there (asv would still spend a process on each method)
    del ColdStartSimulateMore
