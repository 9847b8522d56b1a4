"""``orthotorch.Muon``: momentum orthogonalized by Newton–Schulz, with built-in AdamW groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..functional import ADJUST_LR_CHOICES, get_update_rule, shape_scale
from ._base import OrthogonalOptimizer

__all__ = ["Muon"]


class Muon(OrthogonalOptimizer):
    r"""Muon: MomentUm Orthogonalized by Newton–Schulz, with AdamW groups in the same object.

    .. math::
       \begin{aligned}
       &B_t \leftarrow \mu B_{t-1} + (1-\mu) G_t \\
       &M_t \leftarrow (1-\mu) G_t + \mu B_t \ \text{(Nesterov; else } M_t = B_t) \\
       &O_t \leftarrow \mathrm{NS}_k(M_t) \approx U V^\top \quad (M_t = U S V^\top) \\
       &\theta_t \leftarrow (1 - \eta\lambda)\,\theta_{t-1} - \eta\, s(m, n)\, O_t
       \end{aligned}

    Weights with more than two dimensions (convolutions, stacked heads) are orthogonalized as
    ``(shape[0], prod(shape[1:]))`` matrices and scaled by that shape. Same-shape matrices of a
    group are orthogonalized together in one batched call.

    Groups with ``"algorithm": "adamw"`` (see :func:`orthotorch.param_groups`) are updated with
    AdamW instead, using the group's ``lr``, ``betas``, ``eps`` and ``weight_decay``.

    References: Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024);
    Liu et al., "Muon is Scalable for LLM Training" (2025); Amsel et al., "The Polar Express"
    (2025).

    Args:
        params: tensors, ``(name, tensor)`` pairs or group dicts.
        lr: learning rate of the orthogonalized groups (default ``0.02``, the usual value with
            ``adjust_lr="original"``; ``torch.optim.Muon`` defaults to ``1e-3``). With
            ``adjust_lr="match_rms_adamw"`` use an AdamW-like lr (e.g. ``3e-4``).
        weight_decay: decoupled weight decay ``lambda`` (default ``0.1``).
        momentum: ``mu`` (default ``0.95``).
        nesterov: use the Nesterov form (default ``True``).
        ns_method: orthogonalization method from :func:`orthotorch.linalg.available_methods`
            (default ``"polar_express"``; ``"muon"`` reproduces ``torch.optim.Muon``).
        ns_steps: Newton–Schulz steps (``None``: the method's default, 5).
        ns_dtype: compute dtype of the orthogonalization (``None``: the method's default, bf16).
        adjust_lr: ``"original"`` (``sqrt(max(1, rows/cols))``) or ``"match_rms_adamw"``
            (``0.2 sqrt(max(rows, cols))``, reuses AdamW's lr and weight decay).
        update: update rule from :func:`orthotorch.functional.available_update_rules`.
        betas, eps: AdamW hyperparameters of ``"adamw"`` groups (default ``(0.9, 0.95)``,
            ``1e-8``).
        adamw_lr: ``lr`` of ``"adamw"`` groups that set none (``None``: ``1e-3``, AdamW's
            default; never ``lr``).
        check_finite: raise on NaN/Inf gradients before changing anything (one sync per step).
        skip_nonfinite: skip (and count in state) updates of parameters with NaN/Inf gradients
            instead of raising.
        distributed: ``"auto"`` (split orthogonalization work across ranks under DDP/FSDP2)
            or ``"off"``; see :class:`~orthotorch.optim.OrthogonalOptimizer`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
        ...                             torch.nn.Linear(32, 2))
        >>> opt = Muon(orthotorch.param_groups(model), lr=0.02, adamw_lr=3e-3)
    """

    algorithm = "muon"
    accepts_update_rules = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_method: str = "polar_express",
        ns_steps: int | None = None,
        ns_dtype: torch.dtype | None = None,
        adjust_lr: str = "original",
        update: str = "spectral",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        *,
        adamw_lr: float | None = None,
        check_finite: bool = True,
        skip_nonfinite: bool = False,
        distributed: str = "auto",
        **topology: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_method": ns_method,
            "ns_steps": ns_steps,
            "ns_dtype": ns_dtype,
            "adjust_lr": adjust_lr,
            "update": update,
            "betas": betas,
            "eps": eps,
        }
        super().__init__(
            params,
            defaults,
            adamw_lr=adamw_lr,
            check_finite=check_finite,
            skip_nonfinite=skip_nonfinite,
            distributed=distributed,
            **topology,
        )

    def _validate_orthogonal_group(self, group: dict[str, Any], label: str) -> None:
        self._validate_momentum(group, label)
        if group["adjust_lr"] not in ADJUST_LR_CHOICES:
            raise ValueError(
                f"{label}: adjust_lr must be one of {', '.join(map(repr, ADJUST_LR_CHOICES))}, "
                f"got {group['adjust_lr']!r}"
            )
        try:
            get_update_rule(group["update"]).prepare(group)
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None

    def _scale(self, group: dict[str, Any], shape: tuple[int, int]) -> float:
        return shape_scale(shape, group["adjust_lr"])
