"""orthotorch.decomposition: orthogonal dictionary learning as a scikit-learn estimator.

Needs the optional extra ``pip install orthotorch[sklearn]``.
"""

from .dictionary import (
    CodingAlgorithm,
    Objective,
    OnlineOrthogonalDictionaryLearning,
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
