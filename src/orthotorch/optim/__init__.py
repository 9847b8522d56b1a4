"""Optimizer classes: thin wrappers that validate, gather state, and call ``functional``."""

from ._base import NonFiniteGradientError, OrthogonalOptimizer
from .aro import ARO
from .auon import AuON
from .dion import Dion
from .lowrank import DCTAdamW, GaLoreAdamW
from .muon import Muon
from .normuon import NorMuon
from .root import ROOT
from .spectra import SPECTRA

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
]
