"""Orthogonalization core: polar factors, Newton–Schulz schedules, and error measures.

The polar factor of ``G = U S V^T`` is ``U V^T``: the orthogonal (semi-orthogonal, for
rectangular ``G``) matrix nearest to ``G`` in every unitarily invariant norm. Orthogonalized
optimizers step along it instead of along the raw momentum.

This file only re-exports. :mod:`.polar_factor` holds ``orthogonalize`` and the checks,
:mod:`.registry` THE method registry, :mod:`.newton_schulz` and :mod:`.root` the iterations and
their coefficient tables, :mod:`.dispatch` the measured choice of how a stack of matrices runs,
:mod:`.spectral` soft spectral clipping, :mod:`.dct` the DCT bases of the low-rank optimizers.
"""

from __future__ import annotations

from .dct import (
    clear_dct_cache,
    column_scores,
    dct,
    dct_basis,
    dct_column_scores,
    select_columns,
)
from .dispatch import plan_table
from .newton_schulz import (
    AOL_COEFFICIENTS,
    JIACHENG_COEFFICIENTS,
    MUON_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    gram_restarts,
    iterate_gram_quintic,
    iterate_scalar,
    newton_schulz,
    table_schedule,
)
from .polar_factor import (
    check_matrix_input,
    orthogonality_error,
    orthogonalize,
    orthogonalize_unchecked,
    polar,
    resolve_compute,
)
from .registry import (
    OrthogonalizationMethod,
    available_methods,
    get_method,
    newton_schulz_method,
    register_method,
)
from .root import (
    ROOT_COEFFICIENTS,
    ROOT_GUARDED_COEFFICIENTS,
    guard_coefficients,
    root_schedule,
)
from .spectral import CLIP_ROUTES, ClipRoute, spectral_clip, spectral_clip_reference
from .tuning import tune

__all__ = [
    "AOL_COEFFICIENTS",
    "CLIP_ROUTES",
    "JIACHENG_COEFFICIENTS",
    "MUON_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS",
    "ROOT_COEFFICIENTS",
    "ROOT_GUARDED_COEFFICIENTS",
    "ClipRoute",
    "OrthogonalizationMethod",
    "available_methods",
    "check_matrix_input",
    "clear_dct_cache",
    "column_scores",
    "dct",
    "dct_basis",
    "dct_column_scores",
    "get_method",
    "gram_restarts",
    "guard_coefficients",
    "iterate_gram_quintic",
    "iterate_scalar",
    "newton_schulz",
    "newton_schulz_method",
    "orthogonality_error",
    "orthogonalize",
    "orthogonalize_unchecked",
    "plan_table",
    "polar",
    "register_method",
    "resolve_compute",
    "root_schedule",
    "select_columns",
    "spectral_clip",
    "spectral_clip_reference",
    "table_schedule",
    "tune",
]
