"""Pure tensor functions behind the optimizers: lists of tensors in, no ``Optimizer`` state."""

from . import symmetry  # registers the symmetry-compatible update rules
from .adamw import adamw_step_
from .muon import (
    ADJUST_LR_CHOICES,
    Bucket,
    apply_buckets_,
    bucket_by_shape,
    matrix_shape,
    nesterov_momentum_,
    shape_scale,
)
from .rules import UpdateRule, available_update_rules, get_update_rule, register_update_rule

__all__ = [
    "ADJUST_LR_CHOICES",
    "Bucket",
    "UpdateRule",
    "adamw_step_",
    "apply_buckets_",
    "available_update_rules",
    "bucket_by_shape",
    "get_update_rule",
    "matrix_shape",
    "nesterov_momentum_",
    "register_update_rule",
    "shape_scale",
    "symmetry",
]
