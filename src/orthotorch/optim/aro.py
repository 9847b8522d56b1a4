"""``orthotorch.ARO``: adaptively rotated optimization, with built-in AdamW groups."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .. import distributed as dist
from ..functional import MatrixLayout, matrix_shape
from ..functional.aro import MATMUL_DTYPES, RMS_SCALE, aro_kernel, rotation_layout
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
    refreshed from the momentum every ``rotation_every`` steps (default: every step), computed
    in float32 (float64 for float64 parameters) and stored in the parameter's dtype under
    ``state["rotation"]`` in *row layout*: ``R``'s entries row-major and zero-padded as a
    ``(rows, ceil(k^2 / rows))`` matrix, which is ``R`` itself for wide and square weights
    (:func:`~orthotorch.functional.aro.rotation_from_rows` recovers it; zeros stand for
    ``R_0 = I``); ``state["step"]`` counts the updates. Weights with more than two dimensions
    are handled as ``(shape[0], prod(shape[1:]))`` matrices. The math is in
    :mod:`orthotorch.functional.aro`.

    Distribution: the rotation travels with the momentum through
    :func:`orthotorch.distributed.map_matrices`, packed beside it as ``[M | R_rows]``, so each
    matrix's kernel runs on one owner rank. Under DDP every rank receives every new rotation
    (the replicated state stays identical); for ``DTensor`` parameters whose placements split
    rows only (FSDP2's ``Shard(0)``, HSDP's ``(Replicate(), Shard(0))``, FSDP2 over a
    column-parallel weight's strided ``Shard(0)``, replicated meshes) the rotation is a
    ``DTensor`` with the parameter's placements, the owner assembles the whole ``[M | R]`` and
    each rank gets back its rows of the direction and of the new rotation; replicated mesh
    dimensions split the owners' work. Column-sharded (row-parallel ``Shard(1)``) weights are
    refused at construction. The row layout is the same with and without sharding, so
    ``torch.distributed.checkpoint`` state reshards across layouts and world sizes.

    Reference: Gong et al., "ARO: A New Lens On Matrix Optimization For Large Models" (2026,
    arXiv:2602.09006); Scetbon et al., "Gradient
    Multi-Normalization for Stateless and Scalable LLM Training" (2025) for ``f``.

    Args:
        params: tensors, ``(name, tensor)`` pairs or group dicts (see
            :func:`orthotorch.param_groups`; ``"adamw"`` groups get AdamW).
        lr: learning rate (default ``1e-3``: AdamW-like, thanks to the RMS matching).
        weight_decay: decoupled weight decay ``lambda`` (default ``0.1``).
        momentum: ``beta`` (default ``0.95``).
        sinkhorn_iters: rounds of row/column normalisation in ``f`` (default 5).
        rms_scale: ``s`` (default 0.2).
        rotation_every: refresh the rotation every this many steps (default 1: every step,
            the published algorithm). In between, ``R_t = R_{t-1}``, which skips the QR and
            half of the matrix products; an approximation in the spirit of Shampoo/SOAP's
            preconditioner frequency (the cost and quality trade-off is in
            ``benchmarks/spectra_aro.py`` and the report of issue 7).
        matmul_dtype: operand dtype of the four matrix products per step (``None``: the
            compute dtype, float32, or float64 for float64 parameters; ``torch.bfloat16``: as
            Muon's ``ns_dtype``, several times faster on bf16-capable hardware). QR, the
            Sinkhorn scalings and the state stay float32 (see :mod:`orthotorch.functional.aro`
            for the precision caveat with rank-deficient momenta).
        betas, eps: AdamW hyperparameters of ``"adamw"`` groups.
        adamw_lr: ``lr`` of ``"adamw"`` groups that set none (``None``: ``1e-3``, AdamW's default).
        check_finite: raise on NaN/Inf gradients before changing anything.
        skip_nonfinite: skip (and count) updates of parameters with NaN/Inf gradients instead.
        distributed: ``"auto"`` or ``"off"``; see :class:`~orthotorch.optim.OrthogonalOptimizer`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
        ...                             torch.nn.Linear(32, 2))
        >>> opt = ARO(orthotorch.param_groups(model), lr=3e-3)
    """

    algorithm = "aro"
    # The rotation is per-row state packed beside the momentum: any placement that splits rows
    # only (FSDP2, HSDP, FSDP + column-parallel TP's strided Shard(0), replicated meshes).
    mesh_layouts = "rows"
    block_state = True  # a rotation per matrix: each expert / q-k-v block has its own

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        sinkhorn_iters: int = 5,
        rms_scale: float = RMS_SCALE,
        rotation_every: int = 1,
        matmul_dtype: torch.dtype | None = None,
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
            "sinkhorn_iters": sinkhorn_iters,
            "rms_scale": rms_scale,
            "rotation_every": rotation_every,
            "matmul_dtype": matmul_dtype,
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
        check_range(label, "momentum", group["momentum"], 0.0, 1.0)
        iters = group["sinkhorn_iters"]
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"{label}: sinkhorn_iters must be a positive int, got {iters!r}")
        check_range(label, "rms_scale", group["rms_scale"], 0.0, float("inf"), lo_open=True)
        every = group["rotation_every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{label}: rotation_every must be a positive int, got {every!r}")
        dtype = group["matmul_dtype"]
        if dtype is not None and dtype not in MATMUL_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in MATMUL_DTYPES)
            raise ValueError(f"{label}: matmul_dtype must be None or one of {names}, got {dtype!r}")

    def _init_state(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        for p, state in zip(params, states, strict=True):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # Zeros mean R_0 = I. For a DTensor parameter the rotation is a DTensor with its
                # placements (its rows where the parameter's rows are), made without
                # communication.
                shape = rotation_layout(matrix_shape(p.shape))
                state["rotation"] = dist.zeros_state(shape, p, rows_sharded=True)
                state["step"] = 0  # ARO updates taken; a host int, so reading it never syncs

    def _momentum(
        self, group: dict[str, Any], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> list[Tensor]:
        bufs = [s["momentum_buffer"] for s in states]
        torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
        return bufs

    def _direction(
        self,
        group: dict[str, Any],
        momenta: list[Tensor],
        states: list[dict[str, Any]],
        layouts: list[MatrixLayout],
    ) -> list[Tensor]:
        # QR has no bf16 kernel, and the rotation is accumulated: compute in float32 at least.
        compute = torch.float64 if momenta[0].dtype == torch.float64 else torch.float32
        rotations = [s["rotation"] for s in states]
        # Packed locally: [M | R] shards by rows exactly as M does (any placement that splits
        # rows only), so the local pieces are wrapped with M's placements, no communication.
        # (functional.aro.pack on the local rows, with explicit sizes: an empty shard has
        # no -1 to infer.)
        packed = []
        for M, R in zip(momenta, rotations, strict=True):
            R_local = dist.local(R)
            M_local = dist.local(M).reshape(R_local.shape[0], matrix_shape(M.shape)[1])
            piece = torch.cat([M_local.to(compute), R_local.to(compute)], dim=-1)
            shape = (M.shape[0], M_local.shape[1] + R.shape[1])
            packed.append(dist.wrap_like(piece, M, shape))
        # Matrices whose rotation is refreshed this step, and the others (rotation_every > 1):
        # one map_matrices call each. Step counts are identical on every rank (skips are
        # agreed across ranks), so every rank makes the same calls.
        every = group["rotation_every"]
        refresh = [s["step"] % every == 0 for s in states]
        directions: list[Tensor] = [None] * len(momenta)  # type: ignore[list-item]
        for flag in (True, False):
            chosen = [i for i, f in enumerate(refresh) if f == flag]
            if not chosen:
                continue
            kernel = partial(
                aro_kernel,
                iters=group["sinkhorn_iters"],
                refresh=flag,
                dtype=group["matmul_dtype"],
            )
            # Every rank gets back its (local) rows of every [D | R_t]: store the rotation rows
            # and keep the direction as a view.
            results = dist.map_matrices(
                [packed[i] for i in chosen], kernel, compute, self.distributed
            )
            for i, y in zip(chosen, results, strict=True):
                cols = matrix_shape(momenta[i].shape)[1]
                if flag:
                    dist.local(rotations[i]).copy_(y[:, cols:])
                local_shape = dist.local(momenta[i]).shape
                directions[i] = y[:, :cols].mul(group["rms_scale"]).reshape(local_shape)
        for state in states:
            state["step"] += 1
        return directions

    def _scale(self, group: dict[str, Any], shape: tuple[int, int]) -> float:
        return group["rms_scale"]
