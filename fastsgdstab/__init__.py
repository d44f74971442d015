"""fastsgdstab: will SGD with this learning rate and batch size stay near a minimum, or blow up?

Exact mean-square answers (second-moment map, critical learning rate and batch size), the
theory of Dexter et al. (ICLR 2024) on top of them, and a Numba Monte-Carlo engine for typical
runs. Nothing is computed at import.
"""

from ._linalg import Bracket, CertificationError, CertificationWarning, ConvergenceError
from .family import HessianFamily
from .moments import (
    SecondMomentResult,
    critical_batch_size,
    critical_lr,
    second_moment,
    spectral_radius,
)
from .sampling import SAMPLING_SCHEMES
from .simulation import SimulationResult, SimulationWarning, simulate
from .phase import StabilityMap, stability_map
from ._sweep import sweep
from .geometry import Coherence, coherence, non_uniformity, sample_sharpness, sharpness
from .reporting import Report, report
from . import experiments, theory
from ._estimate import BootstrapEstimate, Estimate
from .estimation import estimate
from .family import NotAMinimumWarning
from .loss_floor import (LossFloorBracket, NoStationaryStateError, StationaryEstimate,
                         StationaryResult,
                         max_lr_for_excess_loss,
                         min_batch_size_for_excess_loss, stationary)
from .typical import TypicalCriticalLR, typical_critical_lr

__version__ = "0.1.0"

__all__ = [
    "Bracket",
    "CertificationError",
    "CertificationWarning",
    "Coherence",
    "ConvergenceError",
    "HessianFamily",
    "Report",
    "SAMPLING_SCHEMES",
    "SecondMomentResult",
    "SimulationResult",
    "SimulationWarning",
    "StabilityMap",
    "coherence",
    "critical_batch_size",
    "critical_lr",
    "experiments",
    "non_uniformity",
    "report",
    "sample_sharpness",
    "second_moment",
    "sharpness",
    "simulate",
    "spectral_radius",
    "stability_map",
    "sweep",
    "theory",
    "BootstrapEstimate",
    "Estimate",
    "estimate",
    "NotAMinimumWarning",
    "NoStationaryStateError",
    "StationaryResult",
    "stationary",
    "StationaryEstimate",
    "LossFloorBracket",
    "max_lr_for_excess_loss",
    "min_batch_size_for_excess_loss",
    "TypicalCriticalLR",
    "typical_critical_lr",
]
