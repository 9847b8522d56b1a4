"""orthotorch: orthogonalized optimizers and orthogonality tools for PyTorch."""

from . import functional, linalg
from ._version import __version__
from .optim import Muon, NonFiniteGradientError, OrthogonalOptimizer
from .routing import describe, param_groups, route_parameters

__all__ = [
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
