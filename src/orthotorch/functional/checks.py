"""Cheap screening of gradients for NaN/Inf before an optimizer touches anything."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["maybe_nonfinite", "nonfinite_flags"]


def maybe_nonfinite(tensors: Sequence[Tensor]) -> Tensor:
    """A CPU bool scalar: ``True`` if some tensor *may* hold a NaN or Inf.

    One ``_foreach_norm`` per device and one host transfer per device. The 2-norm is ~10x
    cheaper than an exact ``isfinite`` pass and is non-finite whenever an entry is, but it can
    also overflow on huge finite tensors: ``True`` therefore only means "check each tensor
    exactly", never "raise".
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    suspect = torch.tensor(False)
    for device_tensors in by_device.values():
        norms = torch._foreach_norm(device_tensors, 2)
        suspect |= ~torch.stack([n.float() for n in norms]).isfinite().all().cpu()
    return suspect


def nonfinite_flags(tensors: Sequence[Tensor]) -> Tensor:
    """A bool vector on the device, ``True`` where a tensor holds a NaN or Inf (exact).

    No host transfer: the screen :class:`~orthotorch.optim.OrthogonalOptimizer` runs inside
    ``torch.compile``, where reading a flag on the host would break the graph. (Tensors on
    several devices are reduced on the first one's device.)
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.bool)
    device = tensors[0].device
    return torch.stack([~torch.isfinite(t).all().to(device) for t in tensors])
