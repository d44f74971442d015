"""How conclusive is Theorem 1, and how far is its threshold from the exact one?

Runs the property tests' kind of random families at scale (default 3,000) and prints:

* the distribution of eta_T1 / eta* (Theorem 1's learning-rate threshold over the exact
  Bernoulli critical learning rate; the theory says it is never below 1) and of
  min(2 / lambda_1(H), eta_T1) / eta* (the learning rate above which Theorem 1 fires at all);
* how often Theorem 1 is conclusive at lr = m eta* for fixed multiples m, and over a random
  learning rate log-uniform in [eta* / 2, 4 eta*];
* the same for Lemma 1 (a) (divergence) and (b) (convergence) for comparison.

Families: n in [2, 12], d in [1, 6], rank in [1, 3]; entries either Gaussian or on the grid
{-1.5, -1, ..., 1.5} (which produces identical, orthogonal, rank-deficient and zero samples
often), plus a dominant-sample variant; Bernoulli batch size B < n, integer or real.

    python benchmarks/theorem1_survey.py [--families 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

import fastsgdstab as fs
from fastsgdstab.theory import lemma1, theorem1

MULTIPLES = (1.01, 1.1, 1.5, 2.0, 3.0)


def random_family(rng: np.random.Generator) -> fs.HessianFamily | None:
    n = int(rng.integers(2, 13))
    d = int(rng.integers(1, 7))
    r = int(rng.integers(1, 4))
    kind = rng.choice(["gaussian", "grid", "dominant"])
    if kind == "grid":
        factors = rng.integers(-3, 4, size=(n, d, r)) / 2.0
    else:
        factors = rng.standard_normal((n, d, r))
        if kind == "dominant":
            factors[rng.integers(n)] *= 10.0 ** rng.uniform(0.5, 2)
    if not np.any(factors):
        return None
    return fs.HessianFamily(factors)


def quantiles(values) -> str:
    values = np.asarray(values)
    q = np.quantile(values, [0, 0.25, 0.5, 0.75, 1])
    return "min {:.15g}  q1 {:.4g}  median {:.4g}  q3 {:.4g}  max {:.4g}  (count {})".format(*q, values.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    ratio_t1, ratio_fire = [], []
    conclusive_at = {m: 0 for m in MULTIPLES}
    random_total = random_unstable = random_t1 = random_t1_unstable = 0
    random_l1a = random_l1b = random_stable = 0
    violations = []
    start = time.perf_counter()
    done = 0
    while done < args.families:
        family = random_family(rng)
        if family is None:
            continue
        n = family.n
        integer = rng.random() < 0.5
        batch = float(rng.integers(1, n)) if integer else float(rng.uniform(1.0, n - 1e-9))
        eta = fs.critical_lr(family, batch)
        base = theorem1(family, 1.0, batch)
        ratio = base.lr_threshold / eta
        ratio_t1.append(ratio)
        ratio_fire.append(min(base.gd_threshold, base.lr_threshold) / eta)
        if ratio < 1 - 1e-9:
            violations.append((family, batch, ratio))
        for m in MULTIPLES:
            conclusive_at[m] += bool(theorem1(family, m * eta, batch).diverges)
        lr = eta * math.exp(rng.uniform(math.log(0.5), math.log(4.0)))
        unstable = lr > eta
        fires = bool(theorem1(family, lr, batch).diverges)
        part = lemma1(family, lr, batch)
        random_total += 1
        random_unstable += unstable
        random_stable += not unstable
        random_t1 += fires
        random_t1_unstable += fires and unstable
        random_l1a += bool(part.diverges)
        random_l1b += bool(part.converges)
        done += 1
    elapsed = time.perf_counter() - start

    print(f"Theorem 1 survey: {done} random families (seed {args.seed}), {elapsed:.1f} s")
    print()
    print("eta_T1 / eta*  (Theorem 1's noise threshold over the exact Bernoulli threshold):")
    print("  " + quantiles(ratio_t1))
    print(f"  below 1: {len(violations)};  equal to 1 within 1e-9 (Theorem 1 exact): "
          f"{int(np.sum(np.abs(np.asarray(ratio_t1) - 1) <= 1e-9))}")
    print("min(2/lambda_1(H), eta_T1) / eta*  (Theorem 1 fires for lr above this multiple of eta*):")
    print("  " + quantiles(ratio_fire))
    print()
    print("Theorem 1 conclusive (proves divergence) at lr = m eta*:")
    for m in MULTIPLES:
        print(f"  m = {m:<5g} {conclusive_at[m] / done:7.1%}")
    print()
    print(f"Random lr, log-uniform in [eta*/2, 4 eta*] ({random_total} settings, "
          f"{random_unstable / random_total:.1%} of them unstable):")
    print(f"  Theorem 1 conclusive:               {random_t1 / random_total:7.1%} of all, "
          f"{random_t1_unstable / max(random_unstable, 1):7.1%} of the unstable ones")
    print(f"  Lemma 1 (a) conclusive (diverges):  {random_l1a / random_total:7.1%} of all")
    print(f"  Lemma 1 (b) conclusive (converges): {random_l1b / random_total:7.1%} of all, "
          f"{random_l1b / max(random_stable, 1):7.1%} of the stable ones")
    if violations:
        print()
        print("VIOLATIONS (eta_T1 < eta*):")
        for family, batch, ratio in violations[:10]:
            print(f"  {family!r} B={batch:g} ratio={ratio:.12g}")


if __name__ == "__main__":
    main()
