"""Reproduced experiments of the paper, one module each, their public names re-exported here.

* :func:`figure1` (:class:`Figure1`): the synthetic experiment of Dexter et al. (their Figure 1),
  with the exact mean-square verdict beside the simulated one; the command line's
  ``fastsgdstab reproduce figure1``.

Modules carry a private name (``_figure1``) so that no function hides its module.
"""

from ._figure1 import FIGURE1_LRS, FIGURE1_SAMPLINGS, Figure1, figure1

__all__ = ["FIGURE1_LRS", "FIGURE1_SAMPLINGS", "Figure1", "figure1"]
