r"""TIES-merging: trim, elect sign, disjoint mean (the standard interference-aware baseline).

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(arXiv:2306.01708). Per entry, with task vectors :math:`\Delta_i = W_i - W_0`:

1. **Trim**: keep the ``density`` fraction of each :math:`\Delta_i`'s entries with the largest
   magnitude, zero the rest (:math:`\hat\Delta_i`).
2. **Elect**: the sign of each coordinate is the sign of :math:`\sum_i \hat\Delta_i` (the sign
   with the larger total mass).
3. **Disjoint mean**: average, per coordinate, only the kept values whose sign agrees with the
   elected one; :math:`W = W_0 + \lambda\, \tau_m`.

The disjoint mean is already a mean, so :math:`\lambda = 1` (the paper's default) does not add
the models' drifts up. Batch-norm statistics take the models' mean and integer buffers the base's,
as in every merge of :mod:`orthotorch.merge`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from .merging import (
    KeyFilter,
    MergeMethod,
    StateDictLike,
    _is_statistic,
    _prepare,
    register_merge_method,
)

__all__ = ["ties_delta", "ties_merge"]


def _trim(delta: Tensor, density: float) -> Tensor:
    k = max(1, math.ceil(density * delta.numel()))
    if k >= delta.numel():
        return delta
    flat = delta.abs().flatten()
    threshold = flat.kthvalue(flat.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties_delta(deltas: Sequence[Tensor], density: float = 0.2) -> Tensor:
    r"""The merged task vector :math:`\tau_m` of TIES (trim, elect sign, disjoint mean).

    Args:
        deltas: task vectors :math:`W_i - W_0` of one entry, equal shapes.
        density: fraction of each task vector's entries kept by magnitude, ``0 < density <= 1``
            (ties in magnitude at the threshold are all kept).

    Returns:
        :math:`\tau_m`, zero where no kept value agrees with the elected sign.
    """
    trimmed = torch.stack([_trim(d, density) for d in deltas])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0).clamp_min(1)
    return torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(0) / count


@torch.no_grad()
def ties_merge(
    base: StateDictLike,
    finetuned: Sequence[StateDictLike],
    scale: float = 1.0,
    *,
    density: float = 0.2,
    keys: KeyFilter = None,
) -> dict[str, Tensor]:
    r"""TIES-merging: :math:`W_0 + \lambda\, \operatorname{ties}(W_1 - W_0, \dots, W_N - W_0)`
    for every floating entry (module docstring).

    Args:
        base: the shared pre-trained model (state_dict or module).
        finetuned: models fine-tuned from ``base`` (same keys and shapes).
        scale: :math:`\lambda` (default 1, the paper's; the merged delta is a mean).
        density: fraction of each task vector kept per entry (default 0.2, the paper's ``k``).
        keys: which entries to merge (``None``: all); the others are copied from ``base``.

    Returns:
        A new state_dict with ``base``'s keys, order, dtypes and device.

    Raises:
        ValueError / TypeError: as :func:`~orthotorch.merge.task_arithmetic`, and for a
            ``scale`` that is not a finite number or a ``density`` outside ``(0, 1]``.
    """
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    ok = isinstance(density, numbers.Real) and not isinstance(density, bool)
    if not ok or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    base_sd, models, chosen = _prepare(base, finetuned, keys)
    out: dict[str, Tensor] = {}
    for key, W0 in base_sd.items():
        if key not in chosen or not W0.is_floating_point():
            out[key] = W0.detach().clone()
            continue
        compute = torch.float64 if W0.dtype == torch.float64 else torch.float32
        values = [sd[key].detach().to(W0.device, compute) for sd in models]
        if _is_statistic(key):
            out[key] = torch.stack(values).mean(0).to(W0.dtype)
            continue
        W0c = W0.detach().to(compute)
        delta = ties_delta([v - W0c for v in values], float(density))
        out[key] = (W0c + float(scale) * delta).to(W0.dtype)
    return out


register_merge_method(
    MergeMethod("ties", ties_merge, "TIES: trim to density, elect sign, disjoint mean")
)
