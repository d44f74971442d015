"""``fastsgdstab warmup``: every Numba kernel compiled into the disk cache once, so that a fresh
process's first calls compile nothing (issue 12, item 3)."""

import importlib
import io
import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest
from numba.core.dispatcher import Dispatcher

import fastsgdstab._kernels
from fastsgdstab import sampling
from fastsgdstab.cli import main

KERNEL_MODULES = [f"fastsgdstab._kernels.{info.name}"
                  for info in pkgutil.iter_modules(fastsgdstab._kernels.__path__)]


def kernels():
    """``{module.name: dispatcher}`` for every kernel defined in ``_kernels``."""
    found = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, Dispatcher) and value.py_func.__module__ == module_name:
                found[f"{module_name.rsplit('.', 1)[1]}.{name}"] = value
    return found


# A fresh process's first calls after the warm-up: every simulation scheme and the exact
# engine. Reports the compilations (cache misses) and cache loads (hits) of every kernel.
FIRST_CALLS = textwrap.dedent("""
    import importlib, json, pkgutil, warnings
    import numpy as np
    import fastsgdstab as fs
    import fastsgdstab._kernels
    from fastsgdstab import sampling
    from numba.core.dispatcher import Dispatcher

    warnings.simplefilter("ignore")
    family = fs.HessianFamily.from_features(np.random.default_rng(5).standard_normal((40, 4)))
    gradients = np.random.default_rng(6).standard_normal((40, 4))
    noisy = fs.HessianFamily(family.factors, gradients=gradients - gradients.mean(axis=0))
    for scheme in getattr(sampling, "SIMULATION_SAMPLING_SCHEMES", sampling.SAMPLING_SCHEMES):
        fs.simulate(family, 0.2, 8, 20, 16, sampling=scheme, progress=False)
        fs.simulate(family, 0.2, 8, 20, 16, sampling=scheme, momentum=0.9, nesterov=True,
                    progress=False)
        fs.simulate(noisy, 0.2, 8, 20, 16, sampling=scheme, progress=False)
        fs.simulate(noisy, 0.2, 8, 20, 16, sampling=scheme, momentum=0.9, progress=False)
    fs.simulate(family, 0.2, 8, 20, 16, init="uniform", progress=False)
    fs.simulate(family, 0.2, 8, 20, 16, init=np.ones(4), progress=False)
    fs.critical_lr(family, 8)
    fs.second_moment(family, 0.2, 8, 5)
    misses, hits = {}, {}
    # the simulation kernels' variants (closures made on demand, not module attributes)
    from fastsgdstab._kernels import sgd
    for (factory, key), value in sgd._VARIANTS.items():
        misses[factory.__name__ + str(list(key))] = sum(value.stats.cache_misses.values())
        hits[factory.__name__ + str(list(key))] = sum(value.stats.cache_hits.values())
    for info in pkgutil.iter_modules(fastsgdstab._kernels.__path__):
        module = importlib.import_module("fastsgdstab._kernels." + info.name)
        for name, value in vars(module).items():
            if isinstance(value, Dispatcher) and value.py_func.__module__ == module.__name__:
                misses[info.name + "." + name] = sum(value.stats.cache_misses.values())
                hits[info.name + "." + name] = sum(value.stats.cache_hits.values())
    print(json.dumps({"misses": misses, "hits": hits}))
""")


def _environment(cache):
    return dict(os.environ, NUMBA_CACHE_DIR=str(cache), PYTHONDONTWRITEBYTECODE="1")


@pytest.mark.slow
def test_after_warmup_a_fresh_process_compiles_nothing(tmp_path):
    cache = tmp_path / "numba_cache"
    warm = subprocess.run([sys.executable, "-m", "fastsgdstab", "warmup"], env=_environment(cache),
                          capture_output=True, text=True, timeout=3000)
    assert warm.returncode == 0, warm.stderr[-3000:]
    # an index file for every kernel of the package
    indexed = {path.name.split("-")[0] for path in cache.rglob("*.nbi")}
    # (kernels inlined at Numba IR level are compiled into their callers, never on their own)
    standalone = {name for name, kernel in kernels().items()
                  if kernel.targetoptions.get("inline", "never") != "always"}
    missing = sorted(standalone - indexed)
    assert missing == [], f"warmup left kernels uncompiled: {missing}"

    first = subprocess.run([sys.executable, "-c", FIRST_CALLS], env=_environment(cache),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads(first.stdout.strip().splitlines()[-1])
    compiled = {name: count for name, count in report["misses"].items() if count}
    assert compiled == {}, f"compiled after warmup: {compiled}"
    assert sum(report["hits"].values()) >= 3  # loaded from the cache: simulate, critical_lr
    # every simulation variant the calls ran was loaded: 4 schemes x (plain, momentum) x
    # (linear, affine), and the three kinds of w_0
    variants = [name for name in report["hits"] if name.startswith("_make_")]
    assert len(variants) == 19 and all(report["hits"][name] == 1 for name in variants), report


def test_warmup_command_names_every_step(capsys):
    out = io.StringIO()
    assert main(["warmup"], out=out) == 0
    lines = out.getvalue().splitlines()
    schemes = getattr(sampling, "SIMULATION_SAMPLING_SCHEMES", sampling.SAMPLING_SCHEMES)
    for scheme in schemes:
        for rank in (1, 2):
            assert any(line.startswith(f"simulate ({scheme}, rank {rank}") for line in lines), scheme
    for name in ("critical_lr", "second_moment", "stability_map", "geometry", "theory", "figure1"):
        assert any(line.startswith(name) for line in lines), name
    assert all(line.rsplit(": ", 1)[1].endswith(" s") for line in lines)
    assert capsys.readouterr().err == ""
