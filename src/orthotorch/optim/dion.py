"""``orthotorch.Dion``: low-rank orthonormal updates by amortized power iteration."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import distributed as dist
from ..functional import MatrixLayout, matrix_shape, resolve_rank
from ..functional.dion import (
    DION_ADJUST_LR,
    QR_METHODS,
    dion_scale,
    dion_step_,
    initial_right_factor,
    p_on_rows,
)
from ._base import OrthogonalOptimizer, check_range

__all__ = ["Dion"]


class Dion(OrthogonalOptimizer):
    r"""Dion: rank-``r`` orthonormal updates with error feedback, with AdamW groups.

    .. math::
       \begin{aligned}
       &M_t \leftarrow M_{t-1} + G_t, \quad P_t \leftarrow \mathrm{orth}(M_t Q_{t-1}),
        \quad R_t \leftarrow M_t^\top P_t \\
       &M_t \leftarrow M_t - (1-\mu) P_t R_t^\top \ \text{(error feedback)}, \quad
        Q_t \leftarrow R_t\, \mathrm{diag}(\lVert R_{t,:,j} \rVert + \epsilon)^{-1} \\
       &\theta_t \leftarrow (1 - \eta\lambda)\,\theta_{t-1} - \eta\, s(m, n)\, P_t Q_t^\top
       \end{aligned}

    One step of power iteration per optimizer step, warm-started from the last ``Q``: the
    update has rank ``<= r`` and, on a slowly changing momentum, tracks its top-``r`` polar
    factor ``U_r V_r^T``. What the update leaves out stays in ``M`` (error feedback). As in
    microsoft/dion, ``P`` is on the larger side of the matrix (a wide weight is handled as its
    transpose), ``Q`` (``state["Q"]``, ``min(m, n) x r``, in the parameter's dtype) starts as
    a Gaussian matrix drawn from ``seed`` and the shape (identical on every rank), and the
    momentum (``state["momentum_buffer"]``) is the sum form ``M + G`` of the paper. The math is
    in :mod:`orthotorch.functional.dion`; compute is float32 (float64 for float64 weights).

    Distribution: under DDP every rank runs every matrix (gradients are already averaged, the
    low-rank step is cheap, and no collective is needed; the state stays identical because the
    inputs are). Under FSDP2 (``Shard(0)``, also HSDP's ``(Replicate(), Shard(0))`` and a
    column-parallel weight, whose replicas repeat the same work) nothing of size ``m x n`` is
    gathered: each rank works on its rows and only ``r``-column factors are all-reduced
    (``S P``, ``P^T P`` and ``R`` for a tall weight; ``M^T Q`` and ``r`` column norms for a
    wide one), through :func:`orthotorch.distributed.sum_across_shards_`. ``Q`` is then a
    ``DTensor``: replicated for a tall weight, sharded like the rows for a wide one.

    Weights with more than two dimensions are handled as ``(shape[0], prod(shape[1:]))``
    matrices; under other matrix layouts each expert / split block keeps its own ``Q`` (plain
    and DDP parameters; sharded ones take ``flatten`` only).

    Reference: Ahn, Xu, Abreu, Langford, "Dion: Distributed Orthonormalized Updates" (2025,
    https://arxiv.org/abs/2504.05295); github.com/microsoft/dion.

    Args:
        params: tensors, ``(name, tensor)`` pairs or group dicts (see
            :func:`orthotorch.param_groups`; ``"adamw"`` groups get AdamW).
        lr: learning rate (default ``0.01``, microsoft/dion's).
        weight_decay: decoupled weight decay ``lambda`` (default ``0.01``, microsoft/dion's).
        momentum: ``mu`` in ``[0, 1)`` (default ``0.95``).
        rank: ``r``: an int in ``[1, min(m, n)]``, or a float in ``(0, 1]``, a fraction of each
            matrix's smaller side (``round(rank * min(m, n))``, at least 1; default ``1.0``:
            full rank, microsoft/dion's default ``rank_fraction``).
        qr_method: ``"auto"`` (default: ``"householder"``, ``torch.linalg.qr``, where ``P``
            is whole, faster and exact on CPU; ``"cholesky"``, randomized Cholesky-QR, for a
            row-sharded ``P``, which it orthonormalizes with ``r x r`` messages), or either
            of the two everywhere (same basis up to rounding).
        error_feedback: keep ``M - (1 - mu) P R^T`` (default ``True``, the algorithm);
            ``False`` is an ablation.
        adjust_lr: ``"spectral_norm"`` (``sqrt(m/n)``, default, the paper's), ``"original"``
            (Muon's ``sqrt(max(1, m/n))``) or ``"match_rms_adamw"`` (``0.2 sqrt(max(m, n))``).
        eps: added to the column norms of ``R`` (default ``1e-8``; also the ``eps`` of
            ``"adamw"`` groups).
        seed: seed of the initial ``Q`` (default 0).
        betas: AdamW betas of ``"adamw"`` groups (default ``(0.9, 0.95)``).
        adamw_lr: default ``lr`` of ``"adamw"`` groups that set none (``None``: ``lr``).
        check_finite: raise on NaN/Inf gradients before changing anything.
        skip_nonfinite: skip (and count) updates of parameters with NaN/Inf gradients instead.
        distributed: ``"auto"`` or ``"off"``; see :class:`~orthotorch.optim.OrthogonalOptimizer`.
        process_group, device_mesh, overlap: explicit topology (keyword-only), as in
            :class:`~orthotorch.optim.OrthogonalOptimizer`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
        ...                             torch.nn.Linear(32, 2))
        >>> opt = Dion(orthotorch.param_groups(model), lr=0.01, rank=0.5)
    """

    algorithm = "dion"
    # The factor all-reduces assume row blocks: Replicate() with Shard(0) on one mesh dimension
    # (FSDP2, HSDP, column-parallel); Shard(1) is refused at construction.
    mesh_layouts = "row_blocks"
    block_state = True  # a factor Q per matrix: each expert / q-k-v block has its own

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.01,
        weight_decay: float = 0.01,
        momentum: float = 0.95,
        rank: int | float = 1.0,
        qr_method: str = "auto",
        error_feedback: bool = True,
        adjust_lr: str = "spectral_norm",
        eps: float = 1e-8,
        seed: int = 0,
        betas: tuple[float, float] = (0.9, 0.95),
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
            "rank": rank,
            "qr_method": qr_method,
            "error_feedback": error_feedback,
            "adjust_lr": adjust_lr,
            "eps": eps,
            "seed": seed,
            "betas": betas,
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

    # ------------------------------------------------------------------ validation
    def _validate_orthogonal_group(self, group: dict[str, Any], label: str) -> None:
        check_range(label, "momentum", group["momentum"], 0.0, 1.0)
        check_range(label, "eps", group["eps"], 0.0, math.inf, lo_open=True)
        if group["qr_method"] not in QR_METHODS:
            raise ValueError(
                f"{label}: qr_method must be one of {', '.join(map(repr, QR_METHODS))}, "
                f"got {group['qr_method']!r}"
            )
        if not isinstance(group["error_feedback"], bool):
            raise ValueError(
                f"{label}: error_feedback must be True or False, got {group['error_feedback']!r}"
            )
        if group["adjust_lr"] not in DION_ADJUST_LR:
            raise ValueError(
                f"{label}: adjust_lr must be one of {', '.join(map(repr, DION_ADJUST_LR))}, "
                f"got {group['adjust_lr']!r}"
            )
        seed = group["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{label}: seed must be a non-negative int, got {seed!r}")
        self._check_rank_per_matrix(group, label)  # a Q per expert / q-k-v block
        for i, p in enumerate(group["params"]):
            shape = matrix_shape(p.shape)
            if group["qr_method"] == "householder" and dist.is_dtensor(p) and p_on_rows(shape):
                raise ValueError(
                    f"{label}: parameter {self._param_label(group, i)} is row-sharded (FSDP2) "
                    "and tall, so P is split over the ranks: qr_method='householder' needs "
                    "the whole P; use qr_method='cholesky'"
                )

    # ------------------------------------------------------------------ hooks
    def _init_state(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        for p, state in zip(params, states, strict=True):
            if "momentum_buffer" in state:
                continue
            shape = matrix_shape(p.shape)
            r = resolve_rank(group["rank"], shape)
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            on_rows = p_on_rows(shape)
            # Q is on the small side: the columns of a tall weight (replicated over the
            # shards), the rows of a wide one (sharded like them).
            k = shape[1] if on_rows else shape[0]
            Q = dist.zeros_state((k, r), p, rows_sharded=not on_rows)
            full = initial_right_factor(k, r, group["seed"], p.dtype)
            start, stop = (0, k) if on_rows else dist.row_range(p)
            dist.local(Q).copy_(full[start:stop])
            state["Q"] = Q

    def _momentum(
        self, group: dict[str, Any], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> list[Tensor]:
        bufs = [s["momentum_buffer"] for s in states]
        torch._foreach_add_(bufs, grads)
        return bufs

    def _direction(
        self,
        group: dict[str, Any],
        momenta: list[Tensor],
        states: list[dict[str, Any]],
        layouts: list[MatrixLayout],
    ) -> list[Tensor]:
        del layouts  # flatten only: other layouts run block by block (block_state)
        # Same-shape matrices are stacked: one batched product per stage and, when sharded,
        # one all-reduce per stage for the whole stack.
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, M in enumerate(momenta):
            r = states[i]["Q"].shape[1]
            # The placement too: a stack is reduced over one group of shards.
            key = (matrix_shape(M.shape), r, dist.placement_of(M), M.dtype)
            buckets[key].append(i)
        directions: list[Tensor] = [None] * len(momenta)  # type: ignore[list-item]
        for (shape, _, placement, dtype), index in buckets.items():
            sharded = placement != "plain"
            compute = torch.float64 if dtype == torch.float64 else torch.float32
            like = [momenta[i] for i in index]
            locals_ = [dist.local(M) for M in like]
            start, stop = dist.row_range(like[0])
            M = torch.stack([m.reshape(stop - start, shape[1]) for m in locals_]).to(compute)
            Qs = [dist.local(states[i]["Q"]) for i in index]
            Q = torch.stack(Qs).to(compute)
            D = dion_step_(
                M,
                Q,
                rows_side=p_on_rows(shape),
                mu=group["momentum"],
                eps=group["eps"],
                method=group["qr_method"],
                error_feedback=group["error_feedback"],
                reduce=lambda ts, like=like: dist.sum_across_shards_(ts, like),
                rows=(start, stop, shape[0]) if sharded else None,
            )
            D.mul_(self._scale(group, shape))
            for j, i in enumerate(index):
                if group["error_feedback"]:
                    locals_[j].copy_(M[j].view_as(locals_[j]))
                Qs[j].copy_(Q[j])
                directions[i] = D[j].view(locals_[j].shape)
        return directions

    def _scale(self, group: dict[str, Any], shape: tuple[int, int]) -> float:
        return dion_scale(shape, group["adjust_lr"])
