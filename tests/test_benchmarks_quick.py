"""The asv suite's quick mode (issue 19 item 6; docs/performance.md): every benchmark file
imports in both modes (asv's discovery imports them all: one failure breaks ``asv run``), quick
mode defines a subset of the full suite's benchmarks (a benchmark is never only in quick mode,
and full mode loses none), and each parameterised class keeps few cases in quick mode.

Each mode is listed in a subprocess of its own (``baselines.QUICK`` is read at import).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

LISTING = r"""
import importlib, inspect, itertools, json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
out = {}
for path in sorted(__import__("pathlib").Path(sys.argv[1]).glob("bench_*.py")):
    module = importlib.import_module(path.stem)
    for name, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ != module.__name__:
            continue
        methods = [m for m in dir(cls) if m.startswith(("time_", "peakmem_", "track_", "mem_"))]
        params = getattr(cls, "params", None)
        if params and not isinstance(params[0], (list, tuple)):
            params = [params]
        cases = len(list(itertools.product(*params))) if params else 1
        for m in methods:
            out[f"{path.stem}.{name}.{m}"] = cases
print(json.dumps(out))
"""


def _listing(quick: bool) -> dict:
    env = dict(os.environ)
    env["FASTSGDSTAB_ASV_QUICK"] = "1" if quick else ""
    done = subprocess.run([sys.executable, "-c", LISTING, str(BENCHMARKS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def listings():
    pytest.importorskip("torch")
    return _listing(True), _listing(False)


def test_quick_mode_is_a_subset_of_the_full_suite(listings):
    quick, full = listings
    assert quick and full
    assert set(quick) <= set(full), sorted(set(quick) - set(full))
    for name, cases in quick.items():
        assert cases <= full[name], name
        assert cases <= 2, (name, cases)  # few cases: each is a process of its own


def test_quick_mode_keeps_each_targets_small_case(listings):
    """Issue 19's targets each keep a case in quick mode."""
    quick, _ = listings
    for name in ("bench_exact.CriticalLRLargeK.time_plain",
                 "bench_exact.CriticalLRLargeK.time_heavy_ball_0_9",
                 "bench_exact.CriticalLRLargeK.time_nesterov_0_9",
                 "bench_phase.MapProducts.track_readme_map_products",
                 "bench_phase.StabilityMap.time_stability_map_100x100",
                 "bench_coldstart.ColdStartSimulate.track_first_simulate_empty_cache",
                 "bench_coldstart.ColdStart.track_first_critical_lr_empty_cache",
                 "bench_torch.FamilyFromModelGram.time_family_from_model"):
        assert name in quick, name
