"""orthotorch: orthogonalized optimizers and orthogonality tools for PyTorch."""

from . import functional, linalg
from ._version import __version__
from .optim import (
    ARO,
    ROOT,
    SPECTRA,
    AuON,
    DCTAdamW,
    GaLoreAdamW,
    Muon,
    NonFiniteGradientError,
    OrthogonalOptimizer,
)
from .routing import describe, param_groups, route_parameters

__all__ = [
    "ARO",
    "ROOT",
    "SPECTRA",
    "AuON",
    "DCTAdamW",
    "GaLoreAdamW",
    "Muon",
    "NonFiniteGradientError",
    "OrthogonalOptimizer",
    "__version__",
    "describe",
    "functional",
    "linalg",
    "param_groups",
    "route_parameters",
]
