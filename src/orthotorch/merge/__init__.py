"""Merging fine-tuned models and aggregating federated LoRA updates.

- :mod:`.merging`: :func:`average`, :func:`task_arithmetic` and :func:`orthogonal_merge` on
  ``state_dict``\\ s, behind one registry (:func:`merge_state_dicts`).
- :mod:`.fedsvd`: :func:`fedsvd_aggregate` (SVD re-factorisation of the mean LoRA product, with
  orthonormal ``A``) and the :func:`fedavg_lora` baseline.
"""

from .fedsvd import fedavg_lora, fedsvd_aggregate, fedsvd_refactor, mean_lora_product
from .merging import (
    MergeMethod,
    available_merge_methods,
    average,
    get_merge_method,
    merge_state_dicts,
    orthogonal_delta,
    orthogonal_merge,
    polar_decompose,
    register_merge_method,
    task_arithmetic,
)

__all__ = [
    "MergeMethod",
    "available_merge_methods",
    "average",
    "fedavg_lora",
    "fedsvd_aggregate",
    "fedsvd_refactor",
    "get_merge_method",
    "mean_lora_product",
    "merge_state_dicts",
    "orthogonal_delta",
    "orthogonal_merge",
    "polar_decompose",
    "register_merge_method",
    "task_arithmetic",
]
