"""Thread safety: Python threads calling the library at once, under every Numba threading layer.

Numba's workqueue layer aborts the whole process (SIGABRT) when two threads launch parallel
kernels at once, so that case runs in a subprocess: a regression shows as a non-zero exit code
instead of killing pytest. The simulation's kernels are serial (``_blocks`` runs them on its
own threads), so simulate launches no parallel kernel at all, which the subprocess checks.
"""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

import fastsgdstab
from fastsgdstab import HessianFamily, simulate
from fastsgdstab._kernels import _threading

PACKAGE_DIR = pathlib.Path(fastsgdstab.__file__).resolve().parent

# Near the threshold rare runs dominate the sample mean square (flagged, rightly): not the subject.
pytestmark = pytest.mark.filterwarnings("ignore::fastsgdstab.SimulationWarning")

# Shared by the subprocess and this process: the jobs, run in a thread pool and one by one.
JOBS = textwrap.dedent("""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from fastsgdstab import HessianFamily, critical_lr, simulate, spectral_radius

    rng = np.random.default_rng(0)
    family = HessianFamily(rng.standard_normal((24, 5, 2)) / np.sqrt(5))
    lr = 1.1 / family.sharpness()
    SAMPLINGS = ["bernoulli", "without_replacement", "with_replacement"]

    def job(k):
        sampling = SAMPLINGS[k % 3]
        if k % 4 == 3:
            return np.array([critical_lr(family, 4, sampling=sampling),
                             spectral_radius(family, lr, 4, sampling=sampling)])
        result = simulate(family, lr, 4, steps=300, runs=64, seed=k, sampling=sampling,
                          progress=False)
        return np.concatenate([result.log_sq_norm.ravel(), result.first_diverged_step])

    def run_all(threads):
        # threads=None: one by one in this thread
        if threads is None:
            return [job(k) for k in range(12)]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(job, range(12)))
""")

# warnings.catch_warnings is not thread-safe: the filter is set once, before the threads start.
SUBPROCESS = textwrap.dedent("""
    import warnings
    warnings.simplefilter("ignore")
""") + JOBS + textwrap.dedent("""
    import sys

    import numba

    # Threads first, before any parallel launch: Numba has not chosen its layer yet.
    threaded = run_all(4)
    serial = run_all(None)
    try:  # no parallel kernel was launched: Numba never chose a threading layer
        layer = numba.threading_layer()
    except ValueError:
        layer = None
    assert layer is None, layer
    for k, (a, b) in enumerate(zip(threaded, serial)):
        assert a.tobytes() == b.tobytes(), f"job {k} differs between threaded and serial runs"
    np.savez(sys.argv[1], *serial)
""")


def test_threads_under_workqueue_do_not_abort_and_match_serial(tmp_path):
    # Without the launch lock this subprocess aborts ("Concurrent access has been detected").
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue",
               NUMBA_CACHE_DIR=str(tmp_path / "numba_cache"),
               PYTHONPATH=os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")]))
    script = tmp_path / "jobs.py"
    script.write_text(SUBPROCESS)
    out = tmp_path / "serial.npz"
    completed = subprocess.run([sys.executable, str(script), str(out)], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, (completed.returncode, completed.stderr[-3000:])

    # The workqueue results are the ones of this process's (default) layer, bit for bit.
    namespace = {}
    exec(JOBS, namespace)
    here = namespace["run_all"](None)
    with np.load(out) as there:
        assert len(there.files) == len(here)
        for k, expected in enumerate(here):
            assert there[f"arr_{k}"].tobytes() == expected.tobytes(), f"job {k}"


def test_threads_under_default_layer_match_serial():
    namespace = {}
    exec(JOBS, namespace)
    serial = namespace["run_all"](None)
    threaded = namespace["run_all"](4)
    for k, (a, b) in enumerate(zip(threaded, serial)):
        assert a.tobytes() == b.tobytes(), f"job {k}"


def test_launches_are_serialised_exactly_under_workqueue():
    simulate(HessianFamily.from_features(np.eye(3)), 0.5, 1, 2, 2, progress=False)
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run in this process: the lock is taken
        layer = None
    assert _threading.launches_are_serialised() == (layer in (None, "workqueue"))


def _parallel_kernel_names():
    import importlib
    import pkgutil

    import fastsgdstab._kernels

    names = set()
    for info in pkgutil.iter_modules(fastsgdstab._kernels.__path__):
        module = importlib.import_module(f"fastsgdstab._kernels.{info.name}")
        for name, value in vars(module).items():
            if getattr(value, "targetoptions", {}).get("parallel"):
                names.add(name)
    return names


def test_every_parallel_kernel_call_is_inside_parallel_launch():
    kernels = _parallel_kernel_names()
    # the simulation's kernels are serial: a parallel=True compile was most of a cold start
    assert not any(name.startswith("chunk_") for name in kernels), kernels
    unguarded = []

    def visit(node, guarded, path):
        if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call)
                and getattr(item.context_expr.func, "id", getattr(item.context_expr.func, "attr", None))
                == "parallel_launch" for item in node.items):
            guarded = True
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            if name in kernels and not guarded:
                unguarded.append(f"{path}:{node.lineno} {name}")
        for child in ast.iter_child_nodes(node):
            visit(child, guarded, path)

    for path in PACKAGE_DIR.rglob("*.py"):
        if path.parent.name == "_kernels":
            continue  # kernels are not launched from inside kernels
        visit(ast.parse(path.read_text()), False, path.relative_to(PACKAGE_DIR))
    assert not unguarded, unguarded
