"""asv benchmarks of ``HessianFamily.from_gram`` (issue 19, item 5): one decomposition of the
Gram matrix, its reduction set in H's eigenbasis, against release 0.1.0's route beside it in the
same run (``eigh`` of the Gram matrix, then the family's own reduction: a second ``eigh``).

Cases: a full-rank Gram matrix (n r < d: the eigendecomposition route) and a rank-deficient
one (d < n r: above ``GRAM_PIVOTED_MIN`` rows the pivoted Cholesky route). Quick mode keeps a
full-rank 600 x 600 one. The family's sharpness is read (the reduction is lazy in 0.1.0).
"""

import numpy as np
import scipy.linalg

from fastsgdstab import HessianFamily

try:
    from baselines import QUICK, sizes
except ImportError:  # asv imports benchmark modules as a package
    from .baselines import QUICK, sizes


def gram_matrix(m, rank, outputs, seed=0):
    rng = np.random.default_rng(seed)
    columns = rng.standard_normal((m, rank)) * rng.lognormal(0.0, 0.5, (m, 1))
    return columns @ columns.T


def release_0_1_route(gram, outputs):
    """from_gram as release 0.1.0 computed it: eigh of G, then the family reduces its factors
    with a second eigh (of the (d', d') matrix H)."""
    values, vectors = scipy.linalg.eigh(gram, driver="evr")
    values, vectors = values[::-1], vectors[:, ::-1]
    kept = int(np.sum(values > 1e-12 * values[0]))
    rows = vectors[:, :kept] * np.sqrt(values[:kept])
    n = gram.shape[0] // outputs
    family = HessianFamily(np.ascontiguousarray(rows.reshape(n, outputs, kept).transpose(0, 2, 1)))
    return family.sharpness()


class FromGram:
    params = [sizes([(600, 600), (3000, 3000), (3000, 1000)])]
    param_names = ["m_rank"]
    number = 1
    repeat = 3
    timeout = 900

    def setup(self, m_rank):
        m, rank = m_rank
        self.gram = gram_matrix(m, rank, 10)
        HessianFamily.from_gram(gram_matrix(20, 20, 10), 10).sharpness()

    def time_from_gram(self, m_rank):
        HessianFamily.from_gram(self.gram, 10).sharpness()

    def time_release_0_1_route_baseline(self, m_rank):
        release_0_1_route(self.gram, 10)

    if not QUICK:  # one process fewer in quick mode
        def peakmem_from_gram(self, m_rank):
            HessianFamily.from_gram(self.gram, 10).sharpness()
