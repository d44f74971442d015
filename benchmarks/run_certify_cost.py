"""What certification costs: the Collatz-Wielandt certificate against the whole critical_lr.

    python benchmarks/run_certify_cost.py [--repeats 7] [--n 5000] [--d 300]

Issue 8's target: the certificate costs at most 10% of critical_lr's time at n = 5,000, d = 300.
Times the whole call (reduction, Lanczos, certificate) and, in the same process, the
certificate alone on the same Ritz pair (it needs no operator product: T(V) comes from the
Lanczos relation and T(I) from the first product). Medians over repeats, after a warm-up call.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import fastsgdstab as fs  # noqa: E402
from fastsgdstab._engine import SandwichOperator, pair_product, pair_sum, reduced  # noqa: E402
from fastsgdstab._linalg import certify_top_eigenvalue, largest_eigenpair  # noqa: E402
from fastsgdstab._config import ENGINE_RTOL  # noqa: E402
from fastsgdstab.sampling import map_coefficients  # noqa: E402
from baselines import lognormal_features  # noqa: E402


def median_time(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(n, d, repeats, batch=32):
    x = lognormal_features(n, d)
    fs.critical_lr(fs.HessianFamily.from_features(x[:20, :4]), 2)  # compile
    whole = median_time(lambda: fs.critical_lr(fs.HessianFamily.from_features(x), batch), repeats)
    family = fs.HessianFamily.from_features(x)
    reduction = reduced(family)
    a, b = map_coefficients("bernoulli", n, batch)
    m = reduction.unit_eigenvalues
    operator = SandwichOperator(reduction, 1.0 / np.sqrt(pair_sum(m)), a * pair_product(m), b)
    k = reduction.k
    pair = largest_eigenpair(operator, np.eye(k), dimension=k * (k + 1) // 2, rtol=ENGINE_RTOL)
    product = median_time(lambda: operator(np.eye(k)), repeats)
    certify = median_time(lambda: certify_top_eigenvalue(pair.value, pair.vector, pair.image,
                                                         pair.start_image), repeats)
    bracket = certify_top_eigenvalue(pair.value, pair.vector, pair.image, pair.start_image)
    print(f"n={n} d={d} B={batch} (k={k}), medians of {repeats}:")
    print(f"  critical_lr, whole call           {whole:8.4f} s  ({pair.products} Lanczos products)")
    print(f"  one operator product              {product:8.4f} s")
    print(f"  certificate alone                 {certify:8.4f} s  = {100 * certify / whole:.1f}% of the call")
    print(f"  bracket width (relative)          {bracket.width / bracket.value:.1e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--d", type=int, default=300)
    args = parser.parse_args()
    main(args.n, args.d, args.repeats)
