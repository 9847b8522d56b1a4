"""``orthotorch.NorMuon``: Muon with a per-neuron second moment, with built-in AdamW groups."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import distributed as dist
from ..functional import (
    ADJUST_LR_CHOICES,
    MatrixLayout,
    get_update_rule,
    parse_layout,
    shape_scale,
)
from ..functional.muon import matrix_shape
from ..functional.normuon import normalize_rows, rescale_factor, target_norm_for
from ._base import OrthogonalOptimizer, check_range

__all__ = ["NorMuon"]

STATE_KEY = "second_momentum_buffer"  # the name in the authors' code


def second_moment_shape(shape: tuple[int, ...], layout: MatrixLayout) -> tuple[int, ...]:
    """Shape of NorMuon's ``v`` for a parameter: one entry per row of every matrix block.

    ``(R,)`` with ``R`` the rows of all blocks (``shape[0]`` for ``flatten``), or, for ``batch``
    layouts, ``(*shape[:-2], R_per_matrix)``; either way dim 0 runs along the parameter's dim 0,
    so a ``Shard(0)`` parameter's ``v`` is sharded with it.
    """
    rows = [r for r, _ in layout.block_shapes(shape)]
    if layout.batch:
        count = layout.matrix_shape(shape)[0]
        return (*shape[:-2], sum(rows) // count)
    return (sum(rows),)


class NorMuon(OrthogonalOptimizer):
    r"""NorMuon: Muon whose orthogonalized update is normalised per neuron (row), with AdamW groups.

    .. math::
       \begin{aligned}
       &B_t \leftarrow \mu B_{t-1} + (1-\mu) G_t, \quad
        M_t \leftarrow (1-\mu) G_t + \mu B_t \ \text{(Nesterov; else } M_t = B_t) \\
       &O_t \leftarrow \mathrm{NS}_k(M_t) \\
       &v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2)\,\mathrm{mean}_{\text{cols}}(O_t \odot O_t),
        \quad \hat O_t \leftarrow O_t \oslash (\sqrt{v_t} + \epsilon) \\
       &\theta_t \leftarrow (1 - \eta\lambda)\,\theta_{t-1}
        - \eta\, \frac{0.2\sqrt{m n}}{\lVert \hat O_t \rVert_F}\, \hat O_t
       \end{aligned}

    ``v`` (one value per output neuron of each matrix, ``state["second_momentum_buffer"]``, in
    the parameter's dtype, updated in float32 or float64) equalises how far each neuron moves,
    which Muon's polar factor leaves uneven for tall matrices and approximate Newton–Schulz
    outputs; the Frobenius rescaling then gives the update AdamW's RMS 0.2, so AdamW's learning
    rate and weight decay carry over (``adjust_lr="match_rms_adamw"``, default, the paper's
    Algorithm 1). ``adjust_lr="original"`` is the authors' released code instead: ``Ô`` rescaled
    to ``||O||_F`` and multiplied by ``sqrt(max(1, m/n))``, for Muon-like learning rates (0.02).
    The math is in :mod:`orthotorch.functional.normuon`.

    Every orthogonalization method and every matrix layout of the groups works: each matrix of a
    layout (an expert, a q/k/v block) has its own per-row statistics and norm. Distribution:
    the orthogonalization is split across ranks by
    :func:`orthotorch.distributed.map_matrices` exactly as Muon's; the normalisation then runs
    on what each rank holds. Under DDP that is every whole matrix, so ``v`` is computed from
    bitwise equal inputs by every rank and stays identical; for row-sharded ``DTensor``
    parameters (FSDP2's ``Shard(0)``, HSDP's ``(Replicate(), Shard(0))``, a column-parallel
    weight) it is this rank's rows, ``v`` is a ``DTensor`` sharded like them and the two
    Frobenius norms cost one all-reduce of two numbers per matrix over the shards (the replicas
    already hold equal values). Sharded weights must keep rows whole on a shard: ``flatten`` or
    ``batch`` (experts sharded by expert) layouts, and no ``Shard(1)`` (refused at
    construction).

    Reference: Li et al., "NorMuon: Making Muon more efficient and scalable" (ICLR 2026,
    https://arxiv.org/abs/2510.05491); code: github.com/zichongli5/NorMuon, microsoft/dion.

    Args:
        params: tensors, ``(name, tensor)`` pairs or group dicts (see
            :func:`orthotorch.param_groups`; ``"adamw"`` groups get AdamW).
        lr: learning rate (default ``1e-3``, AdamW-like because of the RMS matching; use about
            ``0.02`` with ``adjust_lr="original"``).
        weight_decay: decoupled weight decay ``lambda`` (default ``0.1``).
        momentum: ``mu`` (default ``0.95``).
        nesterov: use the Nesterov form (default ``True``, as the authors' code).
        beta2: decay of the per-neuron second moment, in ``[0, 1)`` (default ``0.95``).
        eps: added to ``sqrt(v)`` (default ``1e-8``; also the ``eps`` of ``"adamw"`` groups).
        ns_method: orthogonalization method from :func:`orthotorch.linalg.available_methods`
            (default ``"polar_express"``).
        ns_steps: Newton–Schulz steps (``None``: the method's default).
        ns_dtype: compute dtype of the orthogonalization (``None``: the method's default, bf16;
            the normalisation always runs in float32 or float64).
        adjust_lr: ``"match_rms_adamw"`` (default; update RMS 0.2) or ``"original"`` (the
            authors' code: ``||O||_F``-preserving, times ``sqrt(max(1, m/n))``).
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
        >>> opt = NorMuon(orthotorch.param_groups(model), lr=3e-3)
    """

    algorithm = "normuon"
    # The per-neuron statistics are computed on whole local rows: Replicate() with Shard(0) on
    # one mesh dimension (FSDP2, HSDP, column-parallel); Shard(1) is refused at construction.
    mesh_layouts = "row_blocks"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        beta2: float = 0.95,
        eps: float = 1e-8,
        ns_method: str = "polar_express",
        ns_steps: int | None = None,
        ns_dtype: torch.dtype | None = None,
        adjust_lr: str = "match_rms_adamw",
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
            "nesterov": nesterov,
            "beta2": beta2,
            "eps": eps,
            "ns_method": ns_method,
            "ns_steps": ns_steps,
            "ns_dtype": ns_dtype,
            "adjust_lr": adjust_lr,
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

    def _validate_orthogonal_group(self, group: dict[str, Any], label: str) -> None:
        self._validate_momentum(group, label)
        check_range(label, "beta2", group["beta2"], 0.0, 1.0)
        check_range(label, "eps", group["eps"], 0.0, math.inf, lo_open=True)
        if group["adjust_lr"] not in ADJUST_LR_CHOICES:
            raise ValueError(
                f"{label}: adjust_lr must be one of {', '.join(map(repr, ADJUST_LR_CHOICES))}, "
                f"got {group['adjust_lr']!r}"
            )
        try:
            get_update_rule("spectral").prepare(group)
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None
        for i, (p, spec) in enumerate(zip(group["params"], group["layouts"], strict=True)):
            layout = parse_layout(spec)
            if dist.is_dtensor(p) and not (layout.is_flatten or layout.batch):
                raise ValueError(
                    f"{label}: parameter {self._param_label(group, i)} is sharded by rows "
                    f"(FSDP2) and has layout {spec!r}; NorMuon's per-neuron statistics need "
                    "whole rows on each shard: use 'flatten' or a 'batch' layout for it"
                )

    def _init_state(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        new = [i for i, state in enumerate(states) if "momentum_buffer" not in state]
        if not new:
            return  # every step after the first: no lookup on the hot path
        # ``params`` may be float32 master copies (master_weights=True): the layouts are the
        # group's parameters', found through their state dicts.
        owner = {id(self.state[q]): q for q in group["params"] if q in self.state}
        layouts = self._layouts_of(group, [owner[id(states[i])] for i in new])
        for i, layout in zip(new, layouts, strict=True):
            p, state = params[i], states[i]
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            shape = second_moment_shape(tuple(p.shape), layout)
            state[STATE_KEY] = dist.zeros_state(shape, p, rows_sharded=True)

    def _direction(
        self,
        group: dict[str, Any],
        momenta: list[Tensor],
        states: list[dict[str, Any]],
        layouts: list[MatrixLayout],
    ) -> list[Tensor]:
        kernel, compute = get_update_rule("spectral").prepare(group)
        # The polar factors, unscaled: each rank gets its (local) part of every one.
        polar = dist.map_matrices(momenta, kernel, compute, self.distributed, layouts=layouts)
        beta2, eps = group["beta2"], group["eps"]
        target = target_norm_for(group["adjust_lr"])
        directions, blocks = [], []  # blocks: (output view, Ô, (m, n), M if sharded, hat², O²)
        for M, O, state, layout in zip(momenta, polar, states, layouts, strict=True):
            stored = dist.local(state[STATE_KEY])
            # Statistics in float32 at least; the state keeps the parameter's dtype.
            v = stored.to(torch.promote_types(stored.dtype, torch.float32))
            O = O.to(v.dtype)
            out = torch.empty_like(O)
            # A row shard of a flattened matrix: its rows are whole, its norms partial.
            sharded = dist.is_dtensor(M) and not layout.batch
            if sharded:
                shapes = [matrix_shape(M.shape)]
                # Explicit columns: an empty shard (more ranks than rows) has no -1 to infer.
                local_shape = (O.shape[0], shapes[0][1])
                pieces = [(O.reshape(local_shape), out.reshape(local_shape), v)]
            else:
                shapes = layout.block_shapes(O.shape)
                segments = v.reshape(-1).split([r for r, _ in shapes])
                pieces = list(zip(layout.matrices(O), layout.matrices(out), segments, strict=True))
            for shape, (block, view, v_rows) in zip(shapes, pieces, strict=True):
                O_hat, hat_sq, o_sq = normalize_rows(block, v_rows, beta2, eps)
                blocks.append((view, O_hat, shape, M if sharded else None, hat_sq, o_sq))
            if v is not stored:
                stored.copy_(v)
            directions.append(out)
        # Every rank holds the same (sharded) parameters, so every rank makes this call: one
        # all-reduce per shard group (the mesh dimensions that shard each weight).
        sums = [torch.stack(b[4:]) for b in blocks if b[3] is not None]
        dist.sum_across_shards_(sums, [b[3] for b in blocks if b[3] is not None])
        whole = iter(sums)
        for view, O_hat, shape, sharded, hat_sq, o_sq in blocks:
            if sharded is not None:
                hat_sq, o_sq = next(whole).unbind(0)
            factor = rescale_factor(hat_sq, o_sq, shape, target) * self._scale(group, shape)
            view.copy_(O_hat.mul_(factor))
        return directions

    def _scale(self, group: dict[str, Any], shape: tuple[int, int]) -> float:
        return shape_scale(shape, group["adjust_lr"])
