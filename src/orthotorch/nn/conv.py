r"""Orthogonal convolutions: the OCNN penalty and when orthogonal convolutions exist.

A 2-D convolution with kernel ``K`` of shape ``(M, C, k, k)`` (``M`` output channels, ``C``
input channels) and stride ``S`` is a linear map :math:`\mathcal{K}` from ``C x n x n`` images
to ``M x n/S x n/S`` ones. It is *row-orthogonal* when :math:`\mathcal{K}\mathcal{K}^\top = I`
(possible only if ``M <= C S^2``, the "RO" case) and *column-orthogonal* (an isometry) when
:math:`\mathcal{K}^\top\mathcal{K} = I` (only if ``M >= C S^2``, the "CO" case).

**Penalty** (Wang, Chen, Chakraborty, Yu, "Orthogonal Convolutional Neural Networks", CVPR
2020, https://arxiv.org/abs/1911.12207): with ``P = floor((k - 1) / S) * S``,

.. math::

    L_{\text{OCNN}}(K) = \|\operatorname{conv}(K, K, \text{padding}=P, \text{stride}=S)
    - I_{r_0}\|_F^2,

where ``conv(K, K)`` is the ``(M, M, r, r)`` tensor of inner products between the kernel and
its copies shifted by multiples of ``S`` (``r = 2P/S + 1``) and ``I_{r0}`` is the identity
``M x M`` at the centre shift, zero elsewhere. Achour, Malgouyres and Mamalet ("Existence,
Stability and Scalability of Orthogonal Convolutional Layers", JMLR 23(347), 2022,
https://jmlr.org/papers/v23/22-0026.html) subtract ``max(0, M - C S^2)`` so that the minimum
is 0 in the CO case too (``variant="achour"``); the gradients are the same. For circular
padding and an input of size ``n`` (``S | n``, ``n/S >= r``) both are exact orthogonality
measures (their Theorem 2; :func:`explicit_conv_matrix` checks it in the tests):

.. math::

    \|\mathcal{K}\mathcal{K}^\top - I\|_F^2 = (n/S)^2\, L_{\text{OCNN}}(K), \qquad
    \|\mathcal{K}^\top\mathcal{K} - I\|_F^2 = (n/S)^2\, \big(L_{\text{OCNN}}(K) - (M - C S^2)\big),

so in the RO case ``L_OCNN = 0`` iff :math:`\mathcal{K}` is row-orthogonal and in the CO case
``L_achour = 0`` iff it is column-orthogonal, for every such ``n`` at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CONV_PADDINGS",
    "ConvPadding",
    "OrthogonalConvExistence",
    "conv_orthogonality",
    "explicit_conv_matrix",
    "orthogonal_conv_exists",
]

ConvPadding = Literal["circular", "valid", "same"]
CONV_PADDINGS: tuple[str, ...] = ("circular", "valid", "same")
_VARIANTS = ("ocnn", "achour")


@dataclass(frozen=True)
class OrthogonalConvExistence:
    """Whether an orthogonal convolution exists for an architecture; truthy iff it does.

    Attributes:
        exists: an orthogonal kernel exists (for inputs large enough, ``S`` dividing ``n``).
        kind: ``"row"`` (:math:`\\mathcal{K}\\mathcal{K}^\\top = I`, ``M <= C S^2``; at
            ``M = C S^2`` with circular or same padding the operator is square, so also
            column-orthogonal) or ``"column"``
            (:math:`\\mathcal{K}^\\top\\mathcal{K} = I`, ``M > C S^2``) when it exists, else
            ``None``.
        reason: the condition that decided, with the numbers.
    """

    exists: bool
    kind: Literal["row", "column"] | None
    reason: str

    def __bool__(self) -> bool:
        return self.exists


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def orthogonal_conv_exists(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: ConvPadding = "circular",
) -> OrthogonalConvExistence:
    r"""Necessary and sufficient conditions for an orthogonal 2-D convolution to exist.

    With ``C = in_channels``, ``M = out_channels``, ``k = kernel_size``, ``S = stride``, input
    size ``n`` divisible by ``S`` and large enough (``n/S >= 2 floor((k-1)/S) + 1``):

    - ``"circular"`` (Achour, Malgouyres, Mamalet, JMLR 2022, Theorem 1): RO case
      (``M <= C S^2``): exists iff ``M <= C k^2``; CO case (``M >= C S^2``): exists iff
      ``S <= k``. So orthogonal convolutions exist for almost every architecture in use.
    - ``"valid"`` (no padding; the paper's Section 2 shows its limitations): the rows are full
      interior kernels, so the RO case is as for circular padding (``M <= C k^2``). In the CO
      case the pixel in a corner is seen by the tap ``(0, 0)`` alone while interior pixels of
      its residue class mod ``S`` are seen by all the taps of that class, which forces every
      tap ``>= S`` to vanish; the opposite corner, seen only by tap ``k - 1``, then needs
      ``k - 1 < S``, and pixels are left uncovered if ``k < S``. Exists iff ``k == S``.
    - ``"same"`` (zero padding ``(k-1)/2`` on each side, odd ``k``): the same boundary argument
      on both sides confines the kernel to the taps ``[P, P + S - 1]``, ``P = (k-1)/2``, i.e.
      ``s = min(S, (k+1)/2)`` taps per axis with no overlap between shifts. RO: exists iff
      ``M <= C s^2``; CO: exists iff ``S <= (k+1)/2``. With ``S = 1`` only kernels whose
      centre tap alone is non-zero (a 1x1 orthogonal convolution) are orthogonal.

    The ``"valid"``/``"same"`` statements are derived here by the boundary argument above (the
    one the paper uses for these paddings) and checked numerically against explicit matrices
    in ``tests/test_nn_conv.py``; the circular statement is the paper's theorem.

    Returns:
        :class:`OrthogonalConvExistence` (truthy iff an orthogonal convolution exists).

    Raises:
        ValueError: a size is not a positive int, ``padding`` is unknown, or ``padding="same"``
            with an even ``kernel_size``.
    """
    C = _check_positive_int("in_channels", in_channels)
    M = _check_positive_int("out_channels", out_channels)
    k = _check_positive_int("kernel_size", kernel_size)
    S = _check_positive_int("stride", stride)
    if padding not in CONV_PADDINGS:
        raise ValueError(
            f"padding must be one of {', '.join(map(repr, CONV_PADDINGS))}, got {padding!r}"
        )
    if padding == "same" and k % 2 == 0:
        raise ValueError(f"padding='same' needs an odd kernel_size, got {k}")
    rows_side = M <= C * S * S
    case = f"M={M} {'<=' if rows_side else '>'} C S^2={C * S * S}"
    kind: Literal["row", "column"] = "row" if rows_side else "column"
    if padding == "circular":
        if rows_side:
            ok, why = M <= C * k * k, f"RO case ({case}): needs M <= C k^2={C * k * k}"
        else:
            ok, why = S <= k, f"CO case ({case}): needs S={S} <= k={k}"
    elif padding == "valid":
        if rows_side:
            ok, why = M <= C * k * k, f"RO case ({case}), valid: needs M <= C k^2={C * k * k}"
        else:
            ok, why = k == S, f"CO case ({case}), valid: needs k={k} == S={S}"
    else:
        s = min(S, (k + 1) // 2)
        if rows_side:
            ok = M <= C * s * s
            why = f"RO case ({case}), same: needs M <= C min(S, (k+1)/2)^2={C * s * s}"
        else:
            half = (k + 1) // 2
            ok, why = S <= half, f"CO case ({case}), same: needs S={S} <= (k+1)/2={half}"
    return OrthogonalConvExistence(
        ok, kind if ok else None, ("satisfied: " if ok else "fails: ") + why
    )


def _check_kernel(weight: object) -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim != 4:
        raise ValueError(
            "weight must be a 4-D conv2d kernel (out_channels, in_channels, k, k), got shape "
            f"{tuple(weight.shape)}"
        )
    if weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"weight must have a square k x k kernel, got {tuple(weight.shape[-2:])}")
    if weight.is_complex() or not weight.is_floating_point():
        raise ValueError(f"weight must be a real floating-point tensor, got dtype {weight.dtype}")
    if not bool(torch.isfinite(weight.detach()).all()):
        raise ValueError(f"weight of shape {tuple(weight.shape)} contains NaN or Inf values")
    return weight


def conv_orthogonality(
    weight: Tensor,
    stride: int = 1,
    variant: Literal["ocnn", "achour"] = "ocnn",
    check_exists: bool = True,
) -> Tensor:
    r"""OCNN orthogonality penalty of a conv2d kernel (see the module docstring).

    ``||conv(K, K, padding=P, stride=S) - I_r0||_F^2`` with ``P = floor((k-1)/S) S``; with
    ``variant="achour"`` minus ``max(0, M - C S^2)`` (the paper's ``L_orth``), which is 0 at
    column-orthogonal kernels. It measures orthogonality of the **circularly padded**
    convolution exactly (up to the factor ``(n/S)^2``); for zero-padded layers it is the usual
    surrogate (interior orthogonality), and exact orthogonality there is rarely possible (see
    :func:`orthogonal_conv_exists` with ``padding="valid"``/``"same"``).

    Args:
        weight: ``(M, C, k, k)`` kernel of an ``nn.Conv2d`` with ``groups=1`` (any ``k``).
        stride: the layer's stride ``S >= 1``.
        variant: ``"ocnn"`` (Wang et al. 2020) or ``"achour"`` (Achour et al. 2022).
        check_exists: raise if no orthogonal convolution exists for this architecture under
            circular padding (minimising the penalty could then never reach orthogonality).

    Returns:
        A scalar tensor in ``weight``'s dtype.

    Raises:
        TypeError: ``weight`` is not a tensor.
        ValueError: ``weight`` is not a finite real 4-D square kernel, ``stride`` is not a
            positive int, ``variant`` is unknown, or (``check_exists``) the configuration
            admits no orthogonal convolution.
    """
    K = _check_kernel(weight)
    S = _check_positive_int("stride", stride)
    if variant not in _VARIANTS:
        raise ValueError(
            f"variant must be one of {', '.join(map(repr, _VARIANTS))}, got {variant!r}"
        )
    M, C, k, _ = K.shape
    if check_exists:
        verdict = orthogonal_conv_exists(C, M, k, S, "circular")
        if not verdict:
            raise ValueError(
                f"no orthogonal convolution exists for in_channels={C}, out_channels={M}, "
                f"kernel_size={k}, stride={S} ({verdict.reason}); pass check_exists=False "
                "to penalise anyway"
            )
    X = K.float() if K.dtype in (torch.float16, torch.bfloat16) else K
    P = ((k - 1) // S) * S
    # conv2d takes the M filters as a batch of C-channel k x k images and correlates each with
    # every filter: Z[i, j, a, b] = <K_i, K_j shifted by S(a, b) - P>.
    Z = F.conv2d(X, X, padding=P, stride=S)
    c = P // S
    target = torch.zeros_like(Z)
    target[:, :, c, c] = torch.eye(M, dtype=X.dtype, device=X.device)
    # Subtract I_r0 before squaring (not ||Z||^2 - 2 tr + M) so float32 stays accurate near 0.
    value = (Z - target).square().sum()
    if variant == "achour":
        value = value - max(0, M - C * S * S)
    return value.to(K.dtype)


def explicit_conv_matrix(
    weight: Tensor, n: int, stride: int = 1, padding: ConvPadding = "circular"
) -> Tensor:
    r"""The ``(M n_out^2, C n^2)`` matrix :math:`\mathcal{K}` of a conv2d on ``C x n x n`` inputs.

    Built by applying the convolution to every basis image (slow: ``C n^2`` images; for tests
    and small layers). Rows are ordered ``(out channel, y, x)``, columns ``(in channel, y, x)``.
    ``"circular"``: wrap-around padding, output ``n/S x n/S`` (``S`` must divide ``n``);
    ``"valid"``: no padding; ``"same"``: zero padding ``(k-1)/2`` (odd ``k``). Differentiable in
    ``weight``.
    """
    K = _check_kernel(weight)
    S = _check_positive_int("stride", stride)
    n = _check_positive_int("n", n)
    _, C, k, _ = K.shape
    basis = torch.eye(C * n * n, dtype=K.dtype, device=K.device).reshape(C * n * n, C, n, n)
    if padding == "circular":
        if n % S or n < k:
            raise ValueError(
                f"circular padding needs stride | n and n >= k, got n={n}, S={S}, k={k}"
            )
        basis = F.pad(basis, (0, k - 1, 0, k - 1), mode="circular")
        out = F.conv2d(basis, K, stride=S)
    elif padding == "valid":
        out = F.conv2d(basis, K, stride=S)
    elif padding == "same":
        if k % 2 == 0:
            raise ValueError(f"padding='same' needs an odd kernel size, got {k}")
        out = F.conv2d(basis, K, stride=S, padding=(k - 1) // 2)
    else:
        raise ValueError(
            f"padding must be one of {', '.join(map(repr, CONV_PADDINGS))}, got {padding!r}"
        )
    return out.reshape(C * n * n, -1).mT
