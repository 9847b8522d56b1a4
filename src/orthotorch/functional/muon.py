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
    """Same-shape matrices of one group, stacked for one batched call.

    ``X`` is ``(batch, min(shape), max(shape))``: tall matrices are stored transposed, so every
    kernel sees wide, contiguous matrices. ``index`` maps batch entries back to positions in the
    group's parameter list; ``shape`` is the (flattened) parameter matrix shape.
    """

    shape: tuple[int, int]
    index: list[int]
    X: Tensor
    # Set instead of ``X`` when each rank holds only row shards of the results (FSDP2).
    local_directions: list[Tensor] | None = None

    @property
    def transposed(self) -> bool:
        return self.shape[0] > self.shape[1]

    def directions(self) -> list[Tensor]:
        """The per-matrix results in parameter orientation (views into ``X``, or local shards)."""
        if self.local_directions is not None:
            return self.local_directions
        return [x.mT if self.transposed else x for x in self.X.unbind(0)]


def bucket_by_shape(updates: list[Tensor], compute_dtype: torch.dtype) -> list[Bucket]:
    """Stack same-(flattened)-shape updates into one wide compute-dtype tensor per shape.

    The copy into the stack does the dtype conversion and the transposition of tall matrices
    too, so each update is read once.
    """
    positions: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, u in enumerate(updates):
        positions[matrix_shape(u.shape)].append(i)
    buckets = []
    for shape, index in positions.items():
        first = updates[index[0]]
        wide = (min(shape), max(shape))
        X = torch.empty((len(index), *wide), dtype=compute_dtype, device=first.device)
        for j, i in enumerate(index):
            u = updates[i].reshape(shape)
            X[j].copy_(u.mT if shape[0] > shape[1] else u)
        buckets.append(Bucket(shape, index, X))
    return buckets


def apply_updates_(
    params: list[Tensor], directions: list[Tensor], *, lr: float, weight_decay: float
) -> None:
    """``p = (1 - lr wd) p - lr * D`` with foreach calls (``D`` already carries its scale).

    ``params`` are plain tensors (for FSDP2, the local shards of the parameters) and
    ``directions`` match their shapes (any float dtype; the add promotes).
    """
    if not params:
        return
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, directions, alpha=-lr)
