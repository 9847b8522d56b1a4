"""Merging fine-tuned models and aggregating federated LoRA updates.

- :mod:`.merging`: :func:`average`, :func:`task_arithmetic` and :func:`orthogonal_merge` on
  ``state_dict``\\ s, behind one registry (:func:`merge_state_dicts`); every scale defaults to
  ``1 / len(finetuned)`` (:func:`default_scale`).
- :mod:`.orthomerge`: :func:`orthomerge`, OrthoMerge as published (Cayley-map merge of the
  Procrustes rotations of the base, residuals added).
- :mod:`.ties`: :func:`ties_merge`, the TIES-merging baseline.
- :mod:`.batchnorm`: :func:`recompute_batchnorm_statistics`, the batch-norm reset of a merged
  model from a few batches (REPAIR-style).
- :mod:`.fedsvd`: :func:`fedsvd_aggregate` (SVD re-factorisation of the mean LoRA product, with
  orthonormal ``A``) and the :func:`fedavg_lora` baseline.
"""

from .batchnorm import recompute_batchnorm_statistics
from .fedsvd import fedavg_lora, fedsvd_aggregate, fedsvd_refactor, mean_lora_product
from .merging import (
    MergeMethod,
    available_merge_methods,
    average,
    default_scale,
    get_merge_method,
    merge_state_dicts,
    norm_matched_orthogonal_delta,
    orthogonal_delta,
    orthogonal_merge,
    polar_decompose,
    register_merge_method,
    task_arithmetic,
)
from .orthomerge import orthomerge
from .ties import ties_delta, ties_merge

__all__ = [
    "MergeMethod",
    "available_merge_methods",
    "average",
    "default_scale",
    "fedavg_lora",
    "fedsvd_aggregate",
    "fedsvd_refactor",
    "get_merge_method",
    "mean_lora_product",
    "merge_state_dicts",
    "norm_matched_orthogonal_delta",
    "orthogonal_delta",
    "orthogonal_merge",
    "orthomerge",
    "polar_decompose",
    "recompute_batchnorm_statistics",
    "register_merge_method",
    "task_arithmetic",
    "ties_delta",
    "ties_merge",
]
