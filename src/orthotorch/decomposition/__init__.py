"""orthotorch.decomposition: orthogonal dictionary learning.

- :mod:`.frank_wolfe`: the pure-torch functional core (objectives and their gradients, the
  polar-factor oracle, Frank–Wolfe steps, exact sparse codes); no scikit-learn needed.
- :mod:`.dictionary`: :class:`OnlineOrthogonalDictionaryLearning`, the scikit-learn estimator
  around it; needs the optional extra ``pip install orthotorch[sklearn]`` and is imported on first
  use, so the functions above work without scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import Any

from .frank_wolfe import (
    CodingAlgorithm,
    Objective,
    averaging_weight,
    frank_wolfe_step,
    k_sparse_objective_gradient,
    l4_objective_gradient,
    objective_gradient,
    principal_basis,
    sparse_codes,
    spectral_lmo,
)

__all__ = [
    "CodingAlgorithm",
    "Objective",
    "OnlineOrthogonalDictionaryLearning",
    "averaging_weight",
    "frank_wolfe_step",
    "k_sparse_objective_gradient",
    "l4_objective_gradient",
    "objective_gradient",
    "principal_basis",
    "sparse_codes",
    "spectral_lmo",
]


def __getattr__(name: str) -> Any:
    # The estimator needs scikit-learn: importing it here, on first use, keeps the functional
    # core usable without it (the ImportError then names the extra to install).
    if name == "OnlineOrthogonalDictionaryLearning":
        return importlib.import_module(f"{__name__}.dictionary").OnlineOrthogonalDictionaryLearning
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
