"""Operator products and seconds of ``stability_map``: the README map and the 100 x 100 map.

    PYTHONPATH=$PWD python benchmarks/run_map_products.py [--which readme,100x100,momentum]

Issue 19's target: every point certified at no more than 1.5x the operator products of the
uncertified map of the earlier release (510 for the README map, so at most 765), and the map
tutorial's 100 x 100 benchmark within 2x of its old 18 s. Product counts are the load-free
figure (the machine may be shared): every application of the noise operator is counted, the
map's shared basis, its engine fallbacks and every row's critical lr alike (a wrapper
around the compiled kernel, the engine's ``NoiseProduct.upper`` and the momentum engine's
enclosure), beside the field ``operator_products`` (since issue 19 the full count too). To compare with another version, run the same script with PYTHONPATH
pointing at that version's tree (it counts through the module names that version has).

The maps:

* README map: the demo family (n = 512, d = 64, rank 1), lrs ``0.02:2.2:80``, batch sizes
  ``1:512:60:log``, Bernoulli (``fastsgdstab map demo.npz --lrs 0.02:2.2:80 --batch-sizes
  1:512:60:log``; the map tutorial's grid before issue 18).
* 100 x 100 map: ``benchmarks/bench_phase.py``'s problem (n = 1,000, d = 100 least squares,
  lrs up to 2.5 / lambda_1, batch sizes 1..n geometrically), Bernoulli.
* momentum: the demo family, 12 x 16 grid (lrs up to the momentum range), momentum 0.9.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import fastsgdstab as fs


class Counter:
    """Counts applications of the noise operator in every module that applies it."""

    def __init__(self):
        self.count = 0
        self._patched = []

    def install(self):
        import importlib

        for name in ("fastsgdstab._engine", "fastsgdstab.phase", "fastsgdstab._map_certify",
                     "fastsgdstab._linalg"):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            kernel = getattr(module, "sandwich_operator", None)
            if kernel is None:
                continue

            def counted(*args, _kernel=kernel):
                self.count += 1
                return _kernel(*args)

            module.sandwich_operator = counted
            self._patched.append((module, "sandwich_operator", kernel))
        try:  # the engine's products since issue 19 (numpy/BLAS, no compiled kernel)
            from fastsgdstab._engine import NoiseProduct
        except ImportError:
            pass
        else:
            upper = NoiseProduct.upper

            def counted_upper(product_self, *args, _upper=upper):
                self.count += 1
                return _upper(product_self, *args)

            NoiseProduct.upper = counted_upper
            self._patched.append((NoiseProduct, "upper", upper))
        try:
            from fastsgdstab._verified import MomentumMap
        except ImportError:
            return self
        noise = MomentumMap.noise

        def counted_noise(map_self, Y, _noise=noise):
            self.count += 1
            return _noise(map_self, Y)

        MomentumMap.noise = counted_noise
        self._patched.append((MomentumMap, "noise", noise))
        return self

    def uninstall(self):
        for owner, name, original in self._patched:
            setattr(owner, name, original)


def demo_family():
    rng = np.random.default_rng(2024)
    n, d = 512, 64
    scales = 1.0 / np.sqrt(np.arange(1, d + 1))
    return fs.HessianFamily.from_features(rng.standard_normal((n, d)) * scales)


def readme_map():
    return demo_family(), np.linspace(0.02, 2.2, 80), np.geomspace(1, 512, 60), {}


def map_100x100():
    n, d, points = 1000, 100, 100
    family = fs.HessianFamily.from_features(np.random.default_rng(0).standard_normal((n, d)))
    top = family.sharpness()
    return family, np.linspace(0.01, 2.5, points) / top, np.geomspace(1, n, points), {}


def momentum_map():
    return demo_family(), np.linspace(0.002, 0.3, 16), np.geomspace(1, 512, 12), {"momentum": 0.9}


MAPS = {"readme": readme_map, "100x100": map_100x100, "momentum": momentum_map}


def measure(name):
    family, lrs, batch_sizes, options = MAPS[name]()
    family.sharpness()  # the reduction is not what is measured
    counter = Counter().install()
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fs.stability_map(family, lrs, batch_sizes, progress=False, **options)
        except TypeError:  # a version without progress=
            result = fs.stability_map(family, lrs, batch_sizes, **options)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    counter.uninstall()
    width = np.max(2.0 * result.radius_error / np.maximum(np.abs(result.spectral_radius), 1e-300))
    print(f"{name:9s} {len(batch_sizes)} x {len(lrs)}: {counter.count:6d} products in all "
          f"(field operator_products {result.operator_products}), {wall:7.2f} s wall, "
          f"{cpu:7.2f} s CPU, load {load:.1f} -> {os.getloadavg()[0]:.1f}; widest bracket "
          f"{width:.1e} relative; {len(caught)} warning(s)", flush=True)
    return counter.count, result


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--which", default="readme,100x100,momentum")
    args = parser.parse_args(argv)
    tiny = fs.HessianFamily.from_features(np.random.default_rng(1).standard_normal((20, 4)))
    fs.stability_map(tiny, [0.1, 0.2], [1, 5])  # compile
    if "momentum" in args.which:
        fs.stability_map(tiny, [0.1, 0.2], [1, 5], momentum=0.9)
    print(f"fastsgdstab from {os.path.dirname(fs.__file__)}", file=sys.stderr)
    for name in args.which.split(","):
        measure(name)


if __name__ == "__main__":
    main()
