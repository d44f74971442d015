"""The Numba disk cache never runs stale code, and still saves the compile time when it is fresh.

A cached kernel contains the code of every kernel it calls, compiled in. Numba's own check
only looks at the kernel's own source file, so ``_kernels/_jit.py`` stamps every cache index
with a hash of all kernel sources; these tests check that, on a copy of the package in a
temporary directory with its own ``NUMBA_CACHE_DIR``.
"""

import ast
import importlib
import json
import os
import pathlib
import pkgutil
import shutil
import subprocess
import sys
import textwrap

import fastsgdstab
import fastsgdstab._kernels
from fastsgdstab._kernels import _jit

PACKAGE_DIR = pathlib.Path(fastsgdstab.__file__).resolve().parent
KERNEL_MODULES = [importlib.import_module(f"fastsgdstab._kernels.{info.name}")
                  for info in pkgutil.iter_modules(fastsgdstab._kernels.__path__)]

# Draws a batch with sample_with_replacement (a serial kernel in sgd.py, quick to compile, which
# calls the stream functions of rng.py) and reports it with that kernel's cache statistics.
SCRIPT = textwrap.dedent("""
    import json

    import numpy as np

    import fastsgdstab
    from fastsgdstab._kernels import sgd

    batch = np.empty(16, dtype=np.int64)
    sgd.sample_with_replacement(np.uint64(12345), np.uint64(0), 10**6, 16, batch)
    stats = sgd.sample_with_replacement.stats
    print(json.dumps({"file": fastsgdstab.__file__, "indices": batch.tolist(),
                      "hits": sum(stats.cache_hits.values()),
                      "misses": sum(stats.cache_misses.values())}))
""")


def _run(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba_cache"),
               PYTHONPATH=str(tmp_path / "copy"), PYTHONDONTWRITEBYTECODE="1")
    completed = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert pathlib.Path(report["file"]).is_relative_to(tmp_path / "copy")
    return report


def test_changing_a_called_kernel_file_recompiles_the_caller(tmp_path):
    shutil.copytree(PACKAGE_DIR, tmp_path / "copy" / "fastsgdstab",
                    ignore=shutil.ignore_patterns("__pycache__"))
    cold = _run(tmp_path)
    assert cold["misses"] == 1 and cold["hits"] == 0

    warm = _run(tmp_path)  # nothing changed: loaded from the cache, not compiled
    assert warm["misses"] == 0 and warm["hits"] == 1
    assert warm["indices"] == cold["indices"]

    # Change the streams in rng.py only; sgd.py, where the kernel lives, is untouched. With
    # Numba's own cache check the stale kernel is loaded here (hits 1, the old indices).
    rng_file = tmp_path / "copy" / "fastsgdstab" / "_kernels" / "rng.py"
    source = rng_file.read_text()
    assert "\n_GOLDEN = " in source, "the test changes rng._GOLDEN: update it if rng.py changed"
    rng_file.write_text(source + "\n_GOLDEN = _GOLDEN ^ np.uint64(2)\n")
    changed = _run(tmp_path)
    assert changed["misses"] == 1 and changed["hits"] == 0
    assert changed["indices"] != cold["indices"]


def _dispatchers():
    for module in KERNEL_MODULES:
        for name, value in vars(module).items():
            if hasattr(value, "py_func") and value.py_func.__module__ == module.__name__:
                yield f"{module.__name__}.{name}", value


def _simulation_variants():
    """Every variant of the simulation kernels (closures made on demand, not module attributes)."""
    from fastsgdstab._kernels import sgd

    for scheme in range(4):
        for momentum in (False, True):
            yield f"chunk_linear[{scheme}, {momentum}]", sgd.linear_kernel(scheme, momentum)
            yield f"chunk_affine[{scheme}, {momentum}]", sgd.affine_kernel(scheme, momentum)
    for kind in range(3):
        yield f"initialise_runs[{kind}]", sgd.initial_kernel(kind)


def test_every_kernel_cache_is_stamped_with_all_kernel_sources():
    dispatchers = dict(_dispatchers())
    assert "fastsgdstab._kernels.sgd.sample_with_replacement" in dispatchers, dispatchers
    variants = dict(_simulation_variants())
    assert len(variants) == 19 and len({id(kernel) for kernel in variants.values()}) == 19
    dispatchers.update(variants)
    for name, dispatcher in dispatchers.items():
        assert isinstance(dispatcher._cache, _jit.KernelCache), name
        stamp = dispatcher._cache._cache_file._source_stamp
        assert stamp[1] == _jit.KERNEL_SOURCES_STAMP, name


def test_the_stamp_changes_with_any_kernel_source(tmp_path):
    kernels = tmp_path / "_kernels"
    shutil.copytree(PACKAGE_DIR / "_kernels", kernels, ignore=shutil.ignore_patterns("__pycache__"))
    original = _jit.sources_stamp(kernels)
    assert original is not None and original == _jit.sources_stamp(kernels)
    for path in sorted(kernels.glob("*.py")):
        content = path.read_bytes()
        path.write_bytes(content + b"\n")
        assert _jit.sources_stamp(kernels) != original, path.name
        path.write_bytes(content)
    (kernels / "new.py").write_text("")
    assert _jit.sources_stamp(kernels) != original
    assert _jit.sources_stamp(tmp_path / "missing") is None


def test_kernel_modules_import_nothing_from_the_rest_of_the_package():
    # Numba compiles a kernel's globals into its code as constants: a kernel module that took a
    # constant from outside _kernels/ would make the stamp incomplete.
    for path in (PACKAGE_DIR / "_kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}:{node.lineno} imports from the package"
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(name.split(".")[0] == "fastsgdstab" for name in names), (
                f"{path.name}:{node.lineno} imports from the package")


def test_one_signature_per_operator_kernel():
    """Every path into the exact engine's kernels passes the same types (C-contiguous float64,
    writable, int64 rank): one compiled signature each, so a cold start compiles each once."""
    import numpy as np

    from fastsgdstab._kernels import operators

    family = fastsgdstab.HessianFamily.from_features(np.random.default_rng(0).standard_normal((30, 4)))
    rank2 = fastsgdstab.HessianFamily(np.random.default_rng(1).standard_normal((30, 4, 2)))
    for each in (family, rank2):
        fastsgdstab.critical_lr(each, 4)
        fastsgdstab.critical_lr(each, 4, sampling="with_replacement")
        fastsgdstab.second_moment(each, 0.1, 4, 3)
        fastsgdstab.non_uniformity(each)
        fastsgdstab.stability_map(each, [0.1, 0.5], [2, 5])
    for name in ("noise_operator", "sandwich_operator", "second_moment_iteration"):
        assert len(getattr(operators, name).signatures) <= 1, (name, getattr(operators, name).signatures)
