"""Hypothesis strategies for small Hessian families.

Entries are multiples of 1/2 in [-1.5, 1.5]: small integer grids produce the edge cases that
matter (identical samples, orthogonal samples, rank-deficient H, zero samples) often, while
keeping every non-zero eigenvalue far from round-off, so that the engine's and the references'
range tolerances can never disagree.
"""

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fastsgdstab import HessianFamily


@st.composite
def factor_arrays(draw, max_n=8, max_d=4, max_rank=3):
    n = draw(st.integers(2, max_n))
    d = draw(st.integers(1, max_d))
    r = draw(st.integers(1, max_rank))
    grid = draw(hnp.arrays(np.int8, (n, d, r), elements=st.integers(-3, 3)))
    factors = grid.astype(float) / 2.0
    assume(np.any(factors))  # a family with curvature
    return factors


@st.composite
def families(draw, **kwargs):
    return HessianFamily(draw(factor_arrays(**kwargs)))


def random_rotation(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def batch_size_for(scheme: str, n: int, fraction: float):
    """A batch size in [1, n] at ``fraction`` of the way: real for Bernoulli (a mean batch
    size), the nearest integer for the schemes that draw exactly B samples."""
    batch = 1 + fraction * (n - 1)
    return batch if scheme == "bernoulli" else int(round(batch))
