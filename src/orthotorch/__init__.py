"""orthotorch: orthogonalized optimizers and orthogonality tools for PyTorch."""

import importlib
from types import ModuleType

from . import functional, linalg, merge, metrics, nn
from ._version import __version__
from .linalg.tuning import tune
from .optim import (
    ARO,
    ROOT,
    SPECTRA,
    AuON,
    DCTAdamW,
    Dion,
    GaLoreAdamW,
    Muon,
    NonFiniteGradientError,
    NorMuon,
    OrthogonalOptimizer,
)
from .routing import ParameterPlan, describe, param_groups, plan_parameters, route_parameters

__all__ = [
    "ARO",
    "ROOT",
    "SPECTRA",
    "AuON",
    "DCTAdamW",
    "Dion",
    "GaLoreAdamW",
    "Muon",
    "NonFiniteGradientError",
    "NorMuon",
    "OrthogonalOptimizer",
    "ParameterPlan",
    "__version__",
    "decomposition",
    "describe",
    "functional",
    "linalg",
    "merge",
    "metrics",
    "nn",
    "param_groups",
    "plan_parameters",
    "route_parameters",
    "tune",
]


def __getattr__(name: str) -> ModuleType:
    # ``decomposition`` needs scikit-learn (the ``orthotorch[sklearn]`` extra); importing it
    # lazily keeps ``import orthotorch`` working on a torch-only install.
    if name == "decomposition":
        return importlib.import_module(f"{__name__}.decomposition")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
