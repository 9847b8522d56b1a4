r"""Orthogonality on features: the orthogonal projection loss and equiangular classifier heads.

- :func:`orthogonal_projection_loss` (Ranasinghe, Naseer, Hayat, Khan, Khan, "Orthogonal
  Projection Loss", ICCV 2021, https://arxiv.org/abs/2103.14021): an auxiliary loss that pulls
  same-class features together (cosine -> 1) and makes different classes orthogonal
  (cosine -> 0) within each mini-batch.
- :func:`equiangular_basis_vectors` / :class:`EquiangularClassifier` (Shen, Sun, Wei, Xu,
  "Equiangular Basis Vectors", CVPR 2023, https://arxiv.org/abs/2303.11637): a fixed,
  non-trainable classifier whose class vectors are unit vectors with pairwise ``|cos|`` below a
  threshold; orthonormal when there are no more classes than dimensions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EquiangularClassifier",
    "InterClass",
    "OrthogonalProjectionLoss",
    "equiangular_basis_vectors",
    "orthogonal_projection_loss",
    "welch_bound",
]


def _check_real_number(name: str, value: object, *, positive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > 0 if positive else value >= 0
    if not ok:
        raise ValueError(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
        )
    return float(value)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


InterClass = Literal["abs_mean", "mean_abs"]
_INTER = ("abs_mean", "mean_abs")


def orthogonal_projection_loss(
    features: Tensor, labels: Tensor, gamma: float = 0.5, inter: InterClass = "abs_mean"
) -> Tensor:
    r"""Orthogonal projection loss :math:`(1 - s) + \gamma\,|d|` of a mini-batch.

    With :math:`\hat f_i = f_i / \|f_i\|`,

    .. math::

        s = \operatorname{mean}_{i \ne j,\ y_i = y_j} \langle \hat f_i, \hat f_j \rangle, \qquad
        d = \operatorname{mean}_{y_i \ne y_j} \langle \hat f_i, \hat f_j \rangle

    (Ranasinghe et al. 2021, eq. 4; ``gamma = 0.5`` is the paper's choice). ``s`` pushes each
    class onto one direction, ``d`` makes the class directions orthogonal. ``0 <= loss <= 2 +
    gamma``.

    ``inter="abs_mean"`` is the paper's ``|d|``: zero when the cross-class cosines cancel *on
    average*. The paper's features are non-negative (after a ReLU), so there every cosine is
    ``>= 0`` and a zero mean means pairwise orthogonal classes; with signed features, positive
    and negative cosines can cancel instead (the tests show such a minimum).
    ``inter="mean_abs"`` uses ``mean |cos|`` over the different-class pairs, which is zero only
    when every pair of classes is orthogonal, for any features. ALGORITHMS.md's
    "mean |cosine|" is this variant.

    A batch without same-class pairs has no ``s`` term (it counts as ``s = 0``, a constant
    ``1``); one without different-class pairs has ``d = 0``, as in the reference code. Zero
    feature vectors count as orthogonal to everything.

    Args:
        features: ``(B, D)`` real features (before or after the classifier's normalisation).
        labels: ``(B,)`` integer class labels.
        gamma: weight ``>= 0`` of the inter-class term.
        inter: ``"abs_mean"`` (``|mean cos|``, the paper) or ``"mean_abs"`` (``mean |cos|``).

    Returns:
        A scalar tensor in ``features``' dtype, differentiable in ``features``.

    Raises:
        TypeError: ``features`` or ``labels`` is not a tensor.
        ValueError: wrong shapes or dtypes, mismatched batch sizes, NaN/Inf features,
            ``gamma < 0``, unknown ``inter``.
    """
    if not isinstance(features, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("features and labels must be torch.Tensors")
    if features.ndim != 2 or not features.is_floating_point():
        raise ValueError(
            f"features must be a real floating-point (B, D) tensor, got shape "
            f"{tuple(features.shape)} and dtype {features.dtype}"
        )
    if labels.shape != features.shape[:1] or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"labels must be an integer tensor of shape ({features.shape[0]},), got shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}"
        )
    gamma = _check_real_number("gamma", gamma, positive=False)
    if inter not in _INTER:
        raise ValueError(f"inter must be one of {', '.join(map(repr, _INTER))}, got {inter!r}")
    if not bool(torch.isfinite(features.detach()).all()):
        raise ValueError("features contain NaN or Inf values")
    f = F.normalize(features, dim=1)
    cos = f @ f.mT
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative = ~same
    # An empty mask gives 0/1 = 0: the term is dropped (no gradient) rather than NaN.
    s = (cos * positive).sum() / positive.sum().clamp_min(1)
    if inter == "abs_mean":
        d = ((cos * negative).sum() / negative.sum().clamp_min(1)).abs()
    else:
        d = (cos.abs() * negative).sum() / negative.sum().clamp_min(1)
    return (1 - s) + gamma * d


class OrthogonalProjectionLoss(nn.Module):
    """Module form of :func:`orthogonal_projection_loss`: ``loss(features, labels)``."""

    def __init__(self, gamma: float = 0.5, inter: InterClass = "abs_mean") -> None:
        super().__init__()
        self.gamma = _check_real_number("gamma", gamma, positive=False)
        if inter not in _INTER:
            raise ValueError(f"inter must be one of {', '.join(map(repr, _INTER))}, got {inter!r}")
        self.inter = inter

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return orthogonal_projection_loss(features, labels, self.gamma, self.inter)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, inter={self.inter!r}"


def welch_bound(num_classes: int, dim: int) -> float:
    r"""Lower bound on ``max_{i != j} |cos(v_i, v_j)|`` for ``num_classes`` unit vectors in
    ``R^dim``: :math:`\sqrt{(N - d) / (d (N - 1))}` (Welch 1974), 0 when ``N <= d``.

    Equality needs an equiangular tight frame, which exists only for special ``(N, d)``.
    """
    N = _check_positive_int("num_classes", num_classes)
    d = _check_positive_int("dim", dim)
    if N <= d:
        return 0.0
    return math.sqrt((N - d) / (d * (N - 1)))


def equiangular_basis_vectors(
    num_classes: int,
    dim: int,
    *,
    max_cos: float | None = None,
    steps: int = 2000,
    lr: float = 0.01,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""``(num_classes, dim)`` unit vectors with small pairwise ``|cos|`` (EBV, Shen et al. 2023).

    ``num_classes <= dim``: an exactly orthonormal set (Q of the QR factorisation of a Gaussian
    matrix), ``max |cos| = 0``. Otherwise, as in EBV, random unit vectors are optimised to push
    every pairwise ``|cos|`` down: Adam on a smooth maximum (log-sum-exp with sharpness 50) of
    the off-diagonal ``|cos|``, the vectors renormalised after each step (the sphere is the
    constraint), stopping as soon as ``max |cos| <= max_cos``. The value cannot go below the
    Welch bound (:func:`welch_bound`).

    Args:
        num_classes, dim: ``N`` vectors in ``R^dim``.
        max_cos: target threshold on ``max_{i != j} |cos|`` (EBV's ``alpha``); ``None`` runs all
            ``steps`` and returns the best set found.
        steps: optimisation steps (when ``num_classes > dim``).
        lr: Adam step size.
        seed: seed of the private generator (the global RNG is not touched).
        dtype: floating dtype of the result (the optimisation itself runs in float64).

    Returns:
        A ``(num_classes, dim)`` tensor of unit rows.

    Raises:
        ValueError: bad sizes or options; ``max_cos`` below the Welch bound (impossible); or
            ``max_cos`` not reached within ``steps`` (the message gives the value reached).
    """
    N = _check_positive_int("num_classes", num_classes)
    d = _check_positive_int("dim", dim)
    steps = _check_positive_int("steps", steps)
    lr = _check_real_number("lr", lr, positive=True)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    bound = welch_bound(N, d)
    if max_cos is not None:
        max_cos = _check_real_number("max_cos", max_cos, positive=False)
        if max_cos < bound:
            raise ValueError(
                f"max_cos={max_cos} is below the Welch bound {bound:.4f} for {N} unit vectors "
                f"in R^{d}: no such set exists"
            )
    gen = torch.Generator().manual_seed(seed)
    if N <= d:
        Q, _ = torch.linalg.qr(torch.randn(d, N, generator=gen, dtype=torch.float64))
        return Q.mT.contiguous().to(dtype)

    V = F.normalize(torch.randn(N, d, generator=gen, dtype=torch.float64), dim=1)
    V.requires_grad_(True)
    opt = torch.optim.Adam([V], lr=lr)
    diagonal = torch.eye(N, dtype=torch.bool)
    best, best_value = V.detach().clone(), math.inf
    for step in range(steps + 1):
        # -inf on the diagonal drops the self-similarities from both the max and the LSE.
        cos = (V @ V.mT).abs().masked_fill(diagonal, -math.inf)
        worst = float(cos.detach().max())
        if worst < best_value:
            best, best_value = V.detach().clone(), worst
        if step == steps or (max_cos is not None and worst <= max_cos):
            break
        # The log-sum-exp spreads the gradient over all near-maximal pairs; plain max would
        # move one pair per step and zig-zag.
        loss = torch.logsumexp(50.0 * cos.flatten(), dim=0) / 50.0
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            V /= torch.linalg.vector_norm(V, dim=1, keepdim=True)
    if max_cos is not None and best_value > max_cos:
        raise ValueError(
            f"max_cos={max_cos} not reached in {steps} steps (best max |cos| {best_value:.4f}, "
            f"Welch bound {bound:.4f}); raise steps or max_cos"
        )
    return best.to(dtype)


class EquiangularClassifier(nn.Module):
    r"""Fixed classifier head of equiangular basis vectors: ``logits = f_hat @ B^T / T``.

    ``B`` (``(num_classes, dim)``, unit rows from :func:`equiangular_basis_vectors`) is a
    registered buffer, so it moves with the model and is saved, but is never trained: the
    backbone learns to map each class onto its vector. ``f_hat`` are the L2-normalised
    features, so logits are cosines scaled by ``1 / temperature``; train with cross-entropy.

    Args:
        dim: feature dimension.
        num_classes: number of classes.
        temperature: ``T > 0``; cosines lie in ``[-1, 1]``, so a small ``T`` is needed for
            confident softmax outputs.
        **ebv: forwarded to :func:`equiangular_basis_vectors` (``max_cos``, ``steps``, ...).
    """

    basis: Tensor

    def __init__(self, dim: int, num_classes: int, temperature: float = 0.1, **ebv: object) -> None:
        super().__init__()
        self.dim = _check_positive_int("dim", dim)
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.temperature = _check_real_number("temperature", temperature, positive=True)
        self.register_buffer("basis", equiangular_basis_vectors(num_classes, dim, **ebv))  # type: ignore[arg-type]

    def forward(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor) or features.shape[-1:] != (self.dim,):
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features)
            raise ValueError(f"features must have last dimension {self.dim}, got {shape}")
        f = F.normalize(features, dim=-1)
        return f @ self.basis.to(f.dtype).mT / self.temperature

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_classes={self.num_classes}, temperature={self.temperature}"
