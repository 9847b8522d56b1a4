"""Pure tensor functions behind the optimizers: lists of tensors in, no ``Optimizer`` state."""

from . import symmetry  # registers the symmetry-compatible update rules
from .adamw import adamw_step_
from .auon import auon_directions, auon_kernel, hybrid_auon_kernel
from .checks import maybe_nonfinite
from .layout import LAYOUT_NAMES, MatrixLayout, check_layout, parse_layout
from .lowrank import (
    SUBSPACE_FINDERS,
    SubspaceFinder,
    back_project,
    project,
    projected_adam_,
    resolve_rank,
    rotate_moments_,
)
from .muon import (
    ADJUST_LR_CHOICES,
    Bucket,
    apply_updates_,
    bucket_by_shape,
    matrix_shape,
    nesterov_momentum_,
    shape_scale,
)
from .root import outlier_threshold, root_kernel, soft_clip
from .rules import UpdateRule, available_update_rules, get_update_rule, register_update_rule

__all__ = [
    "ADJUST_LR_CHOICES",
    "LAYOUT_NAMES",
    "SUBSPACE_FINDERS",
    "Bucket",
    "MatrixLayout",
    "SubspaceFinder",
    "UpdateRule",
    "adamw_step_",
    "apply_updates_",
    "auon_directions",
    "auon_kernel",
    "available_update_rules",
    "back_project",
    "bucket_by_shape",
    "check_layout",
    "get_update_rule",
    "hybrid_auon_kernel",
    "matrix_shape",
    "maybe_nonfinite",
    "nesterov_momentum_",
    "outlier_threshold",
    "parse_layout",
    "project",
    "projected_adam_",
    "register_update_rule",
    "resolve_rank",
    "root_kernel",
    "rotate_moments_",
    "shape_scale",
    "soft_clip",
    "symmetry",
]
