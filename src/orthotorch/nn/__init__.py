"""Orthogonality inside models: penalties, orthogonal layers, compatible representations.

- :mod:`.regularizers`: soft orthogonality, SRIP, OrthoReg and :class:`OrthogonalityPenalty`,
  which walks a model and adds one of them to the loss.
- :mod:`.conv`: the OCNN / Achour et al. penalty on a convolution's own Gram and the published
  existence conditions for exactly orthogonal convolutions.
- :mod:`.parametrizations`: Householder and Cayley orthogonal parametrizations (drop-in for
  ``torch.nn.utils.parametrizations.orthogonal``) and the Householder projector layer.
- :mod:`.compatible`: λ-orthogonality and the old-to-new :class:`OrthogonalTransform`.
- :mod:`.losses`: orthogonal projection loss and equiangular-basis-vector heads.
- :mod:`.adapters`: SORSA-style orthonormal adapters, with merge back into plain ``Linear``.
- :mod:`.qk_clip`: QK-Clip (MuonClip, Kimi K2): per-head rescaling of the query/key projections
  that keeps attention logits under a threshold.

Parametrizations' helper kernels (``householder_matmul``, ``cayley_semi_orthogonal``, ...) stay in
their submodule.
"""

from .adapters import (
    DEFAULT_GAMMA,
    OrthonormalAdapter,
    apply_orthonormal_adapters,
    merge_orthonormal_adapters,
    orthonormal_adapter_penalty,
    orthonormality_penalty,
)
from .compatible import (
    OrthogonalTransform,
    fit_orthogonal_transform,
    lambda_orthogonality,
    train_orthogonal_transform,
)
from .conv import (
    CONV_PADDINGS,
    ConvPadding,
    OrthogonalConvExistence,
    conv_orthogonality,
    explicit_conv_matrix,
    orthogonal_conv_exists,
)
from .losses import (
    EquiangularClassifier,
    InterClass,
    OrthogonalProjectionLoss,
    equiangular_basis_vectors,
    orthogonal_projection_loss,
    welch_bound,
)
from .parametrizations import (
    CayleyOrthogonal,
    HouseholderOrthogonal,
    HouseholderProjector,
    orthogonal,
)
from .qk_clip import (
    QKClip,
    attention_max_logits,
    fused_qk_parts,
    qk_clip_,
    qk_clip_factors,
)
from .regularizers import (
    PENALTY_KINDS,
    OrthogonalityPenalty,
    PenaltyKind,
    orthoreg,
    soft_orthogonality,
    spectral_restricted_isometry,
)

__all__ = [
    "CONV_PADDINGS",
    "DEFAULT_GAMMA",
    "PENALTY_KINDS",
    "CayleyOrthogonal",
    "ConvPadding",
    "EquiangularClassifier",
    "HouseholderOrthogonal",
    "HouseholderProjector",
    "InterClass",
    "OrthogonalConvExistence",
    "OrthogonalProjectionLoss",
    "OrthogonalTransform",
    "OrthogonalityPenalty",
    "OrthonormalAdapter",
    "PenaltyKind",
    "QKClip",
    "apply_orthonormal_adapters",
    "attention_max_logits",
    "conv_orthogonality",
    "equiangular_basis_vectors",
    "explicit_conv_matrix",
    "fit_orthogonal_transform",
    "fused_qk_parts",
    "lambda_orthogonality",
    "merge_orthonormal_adapters",
    "orthogonal",
    "orthogonal_conv_exists",
    "orthogonal_projection_loss",
    "orthonormal_adapter_penalty",
    "orthonormality_penalty",
    "orthoreg",
    "qk_clip_",
    "qk_clip_factors",
    "soft_orthogonality",
    "spectral_restricted_isometry",
    "train_orthogonal_transform",
    "welch_bound",
]
