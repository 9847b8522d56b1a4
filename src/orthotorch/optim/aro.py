"""``orthotorch.ARO``: adaptively rotated optimization, with built-in AdamW groups."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .. import distributed as dist
from ..functional import Bucket, matrix_shape
from ..functional.aro import RMS_SCALE, aro_kernel, pack, unpack
from ._base import OrthogonalOptimizer, check_range

__all__ = ["ARO"]


class ARO(OrthogonalOptimizer):
    r"""ARO: adaptively rotated optimization (normed steepest descent in a learned rotation).

    .. math::
       \begin{aligned}
       &M_t \leftarrow \beta M_{t-1} + (1-\beta) G_t \\
       &R_t \leftarrow \mathrm{Q}\big(\mathrm{QR}(M_t\, f(R_{t-1}^\top M_t)^\top)\big),
        \quad R_0 = I \\
       &\theta_t \leftarrow (1 - \eta\lambda)\,\theta_{t-1} - \eta\, s\, R_t\, f(R_t^\top M_t)
       \end{aligned}

    ``f`` alternately normalises rows and columns to unit RMS (SinkGD, ``sinkhorn_iters``
    rounds), so the update has RMS 1 and ``s = rms_scale = 0.2`` matches AdamW's update RMS:
    AdamW's learning rate and weight decay carry over. The rotation ``R`` (``k x k``, ``k`` the
    smaller side of the matrix; tall weights are rotated on the right) is per-matrix state,
    stored in the parameter's dtype and refreshed from the momentum every step. Weights with
    more than two dimensions are handled as ``(shape[0], prod(shape[1:]))`` matrices. The math
    is in :mod:`orthotorch.functional.aro`.

    Distribution: the rotation travels with the momentum through
    :func:`orthotorch.distributed.map_matrices` (packed as ``[M | R]``), so under DDP each rank
    computes a share of the matrices and every rank receives every new rotation: the
    replicated state stays identical. FSDP2 (``DTensor``) parameters are not supported (the
    rotation would need a sharded layout of its own) and are rejected at construction.

    Reference: "ARO: adaptively rotated optimization"; Scetbon et al., "Gradient
    Multi-Normalization for Stateless and Scalable LLM Training" (2025) for ``f``.

    Args:
        params: tensors, ``(name, tensor)`` pairs or group dicts (see
            :func:`orthotorch.param_groups`; ``"adamw"`` groups get AdamW).
        lr: learning rate (default ``1e-3``: AdamW-like, thanks to the RMS matching).
        weight_decay: decoupled weight decay ``lambda`` (default ``0.1``).
        momentum: ``beta`` (default ``0.95``).
        sinkhorn_iters: rounds of row/column normalisation in ``f`` (default 5).
        rms_scale: ``s`` (default 0.2).
        betas, eps: AdamW hyperparameters of ``"adamw"`` groups.
        adamw_lr: default ``lr`` of ``"adamw"`` groups that set none (``None``: ``lr``).
        check_finite: raise on NaN/Inf gradients before changing anything.
        skip_nonfinite: skip (and count) updates of parameters with NaN/Inf gradients instead.
        distributed: ``"auto"`` or ``"off"``; see :class:`~orthotorch.optim.OrthogonalOptimizer`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
        ...                             torch.nn.Linear(32, 2))
        >>> opt = ARO(orthotorch.param_groups(model), lr=3e-3)
    """

    algorithm = "aro"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        sinkhorn_iters: int = 5,
        rms_scale: float = RMS_SCALE,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        *,
        adamw_lr: float | None = None,
        check_finite: bool = True,
        skip_nonfinite: bool = False,
        distributed: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "sinkhorn_iters": sinkhorn_iters,
            "rms_scale": rms_scale,
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
        )

    def _validate_orthogonal_group(self, group: dict[str, Any], label: str) -> None:
        check_range(label, "momentum", group["momentum"], 0.0, 1.0)
        iters = group["sinkhorn_iters"]
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"{label}: sinkhorn_iters must be a positive int, got {iters!r}")
        check_range(label, "rms_scale", group["rms_scale"], 0.0, float("inf"), lo_open=True)
        for i, p in enumerate(group["params"]):
            if dist.is_dtensor(p):
                raise ValueError(
                    f"{label}: parameter {self._param_label(group, i)} is a DTensor (FSDP2); "
                    "ARO keeps a rotation per whole matrix and supports plain or DDP-replicated "
                    "parameters only. Use Muon for FSDP2, or put it in an 'adamw' group."
                )

    def _init_state(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        for p, state in zip(params, states, strict=True):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                k = min(matrix_shape(p.shape))
                state["rotation"] = torch.eye(k, dtype=p.dtype, device=p.device)

    def _momentum(
        self, group: dict[str, Any], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> list[Tensor]:
        bufs = [s["momentum_buffer"] for s in states]
        torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
        return bufs

    def _direction(
        self, group: dict[str, Any], momenta: list[Tensor], states: list[dict[str, Any]]
    ) -> list[Bucket]:
        # QR has no bf16 kernel, and the rotation is accumulated: compute in float32 at least.
        compute = torch.float64 if momenta[0].dtype == torch.float64 else torch.float32
        rotations = [s["rotation"] for s in states]
        packed = [pack(M, R.to(compute)) for M, R in zip(momenta, rotations, strict=True)]
        kernel = partial(aro_kernel, iters=group["sinkhorn_iters"])
        results: list[Tensor] = [None] * len(momenta)  # type: ignore[list-item]
        for b in dist.map_matrices(packed, kernel, compute, self.distributed):
            for i, y in zip(b.index, b.X.unbind(0), strict=True):
                results[i] = y
        # Every rank now holds every new rotation (map_matrices gathered them): store them, and
        # regroup the directions by parameter shape for the shared apply step.
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (M, R, y) in enumerate(zip(momenta, rotations, results, strict=True)):
            _, R_new = unpack(y)
            R.copy_(R_new)
            by_shape[matrix_shape(M.shape)].append(i)
        return [
            Bucket(shape, index, torch.stack([unpack(results[i])[0] for i in index]))
            for shape, index in by_shape.items()
        ]

    def _scale(self, group: dict[str, Any], shape: tuple[int, int]) -> float:
        return group["rms_scale"]
