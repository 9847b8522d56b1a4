"""Muon's pieces as pure functions: Nesterov momentum, shape scale, batched orthogonalization.

Muon (Jordan et al., 2024; Liu et al., 2025 "Muon is Scalable for LLM Training"):

.. math::

    B_t = \\mu B_{t-1} + (1 - \\mu) G_t, \\quad
    \\tilde B_t = (1 - \\mu) G_t + \\mu B_t \\ (\\text{Nesterov}), \\quad
    \\theta_t = (1 - \\eta\\lambda)\\theta_{t-1} - \\eta\\, s(m, n)\\, \\mathrm{polar}(\\tilde B_t)

The lerp form of the momentum is ``(1 - mu)`` times the classic ``B = mu B + G`` and gives the
same direction, since the polar factor ignores scale; it keeps the buffer at gradient scale and
matches ``torch.optim.Muon``'s state.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..linalg import orthogonalize_unchecked
from ..linalg.registry import OrthogonalizationMethod

AdjustLR = Literal["original", "match_rms_adamw"]
ADJUST_LR_CHOICES: tuple[str, ...] = ("original", "match_rms_adamw")


def nesterov_momentum_(
    grads: list[Tensor], bufs: list[Tensor], momentum: float, nesterov: bool
) -> list[Tensor]:
    """Update ``bufs`` in place (``B = lerp(B, G, 1 - mu)``) and return the step's momentum."""
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    if nesterov:
        return torch._foreach_lerp(grads, bufs, momentum)
    return bufs


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The 2-D shape a parameter is orthogonalized as: ``(shape[0], prod(shape[1:]))``."""
    rows = shape[0]
    return rows, math.prod(shape[1:])


def shape_scale(shape: tuple[int, int], adjust_lr: str) -> float:
    """Learning-rate multiplier for an orthogonalized update of a ``rows x cols`` matrix.

    ``"original"``: ``sqrt(max(1, rows / cols))`` (Jordan); ``"match_rms_adamw"``:
    ``0.2 sqrt(max(rows, cols))`` (Liu et al.), which gives the update AdamW's typical RMS so
    that AdamW's learning rate and weight decay carry over.
    """
    rows, cols = shape
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr must be one of {ADJUST_LR_CHOICES}, got {adjust_lr!r}")


@dataclass
class Bucket:
    """Same-shape matrices of one group, stacked as ``X`` (batch, rows, cols) for one batched call.

    ``index`` maps batch entries back to positions in the group's parameter list.
    """

    shape: tuple[int, int]
    index: list[int]
    X: Tensor


def bucket_by_shape(
    updates: list[Tensor], compute_dtype: torch.dtype
) -> list[Bucket]:
    """Stack same-(flattened)-shape updates into one compute-dtype tensor per shape.

    The copy into the stack does the dtype conversion too, so each update is read once.
    """
    positions: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, u in enumerate(updates):
        positions[matrix_shape(u.shape)].append(i)
    buckets = []
    for shape, index in positions.items():
        first = updates[index[0]]
        X = torch.empty((len(index), *shape), dtype=compute_dtype, device=first.device)
        for j, i in enumerate(index):
            X[j].copy_(updates[i].reshape(shape))
        buckets.append(Bucket(shape, index, X))
    return buckets


def orthogonalize_buckets(
    buckets: list[Bucket], spec: OrthogonalizationMethod, steps: int | None
) -> list[Bucket]:
    """Replace each bucket's stack by its polar-factor approximation (one batched call each)."""
    for b in buckets:
        b.X = orthogonalize_unchecked(b.X, spec, steps, b.X.dtype)
    return buckets


def apply_buckets_(
    params: list[Tensor],
    buckets: list[Bucket],
    *,
    lr: float,
    weight_decay: float,
    scales: list[float],
) -> None:
    """``p = (1 - lr wd) p - lr * scale * U`` with one foreach call per bucket."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    for b, scale in zip(buckets, scales, strict=True):
        targets = [params[i] for i in b.index]
        directions = [u.view_as(t) if u.is_contiguous() else u.reshape(t.shape)
                      for u, t in zip(b.X.unbind(0), targets, strict=True)]
        torch._foreach_add_(targets, directions, alpha=-lr * scale)
