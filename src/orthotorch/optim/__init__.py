"""Optimizer classes: thin wrappers that validate, gather state, and call ``functional``."""

from ._base import NonFiniteGradientError, OrthogonalOptimizer
from .muon import Muon

__all__ = ["Muon", "NonFiniteGradientError", "OrthogonalOptimizer"]
