"""Memory-light low-rank Adam: ``orthotorch.DCTAdamW`` (SVD-free) and ``orthotorch.GaLoreAdamW``.

Both are thin classes over :mod:`orthotorch.functional.lowrank`; they differ only in the
:class:`~orthotorch.functional.lowrank.SubspaceFinder` and its options.

Distributed (all communication through :mod:`orthotorch.distributed`):

- **DDP** (replicated parameters): each subspace (DCT scoring + top-k, or the SVD) is found on
  one owner rank and shared (``map_owned``), so the indices/bases are identical everywhere by
  construction and the costly SVDs are split over the ranks; with ``orthogonalize=True`` each
  rank runs Newton–Schulz on its share of the projected momenta (``map_matrices``). The
  projections and Adam moments are small and computed on every rank.
- **FSDP2** (``DTensor`` weights sharded by rows; also HSDP's ``(Replicate(), Shard(0))`` and
  column-parallel weights, whose replicas repeat the shards' computation, so the replicated
  state stays equal without communication): a tall weight (``m > n``) is projected on its
  columns, which every row shard holds whole: its ``m x r`` moments are row-sharded like the
  weight and Adam needs no communication. A wide weight is projected on its sharded rows: the
  projection ``P^T G`` is all-reduced from per-shard terms (``r x n``), its moments are
  replicated ``DTensor`` objects, and each rank back-projects its own rows. A subspace refresh
  (every ``update_every`` steps) gathers each gradient whole on its owner only (``all_to_all``),
  except for tall weights under the DCT: column scores add over rows, so every rank scores its
  rows and one all-reduce of ``n`` numbers gives every rank the same totals to select from.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import distributed
from ..distributed import DistributedMode
from ..functional import MatrixLayout, matrix_shape, nesterov_momentum_, shape_scale
from ..functional.lowrank import (
    DCT_FINDER,
    SVD_FINDER,
    SubspaceFinder,
    back_project,
    back_project_rows,
    lowrank_shape,
    project,
    project_rows,
    projected_adam_,
    resolve_rank,
    rotate_moments_,
    wide,
)
from ..linalg import resolve_compute
from ..linalg.dct import SCORE_NORMS
from ._base import ADAMW, OrthogonalOptimizer, check_range

__all__ = ["DCTAdamW", "GaLoreAdamW"]


class _Projected(list):
    """The low-rank momenta ``_momentum`` hands to ``_direction``, with the step's projectors.

    The skeleton passes ``_momentum``'s return value straight to ``_direction``; carrying the
    projectors along saves a second DCT gather per weight, and keeps them out of the state
    (storing them would undo the memory saving). The momenta are local tensors (for a wide
    sharded weight ``projectors`` holds this rank's rows of ``P``); ``shapes`` are the weights'
    global matrix shapes and ``sharded`` marks the ``DTensor`` weights.
    """

    def __init__(
        self,
        momenta: list[Tensor],
        projectors: list[Tensor],
        shapes: list[tuple[int, int]],
        sharded: list[bool],
        local_shapes: list[torch.Size],
    ) -> None:
        super().__init__(momenta)
        self.projectors = projectors
        self.shapes = shapes
        self.sharded = sharded
        self.local_shapes = local_shapes


class _LowRankAdamW(OrthogonalOptimizer):
    """Shared class of the low-rank optimizers: hooks of the base step skeleton.

    ``_momentum`` refreshes subspaces when due, projects the gradients and runs Adam (or
    momentum) on the projections; ``_direction`` orthogonalizes (optionally) and back-projects;
    the base applies ``lr``, the scale and decoupled weight decay.
    """

    finder: ClassVar[SubspaceFinder]
    # Row-sharded moments and projections of their own: Replicate() with Shard(0) on one mesh
    # dimension (FSDP2, HSDP, column-parallel); Shard(1) is refused at construction.
    mesh_layouts = "row_blocks"
    block_state = True  # a subspace per matrix: each expert / q-k-v block has its own

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        adamw_lr: float | None,
        check_finite: bool,
        skip_nonfinite: bool,
        distributed: DistributedMode,
        **topology: Any,
    ) -> None:
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
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"{label}: betas must be a pair (beta1, beta2), got {betas!r}")
        check_range(label, "betas[0]", betas[0], 0.0, 1.0)
        check_range(label, "betas[1]", betas[1], 0.0, 1.0)
        check_range(label, "eps", group["eps"], 0.0, math.inf, lo_open=True)
        check_range(label, "scale", group["scale"], 0.0, math.inf, lo_open=True)
        every = group["update_every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{label}: update_every must be a positive int, got {every!r}")
        for key in ("rotate_moments", "orthogonalize", "nesterov"):
            if not isinstance(group[key], bool):
                raise ValueError(f"{label}: {key} must be True or False, got {group[key]!r}")
        check_range(label, "momentum", group["momentum"], 0.0, 1.0)
        if group["orthogonalize"]:
            try:
                resolve_compute(group["ns_method"], group["ns_steps"], group["ns_dtype"])
            except ValueError as err:
                raise ValueError(f"{label}: {err}") from None
        self._check_rank_per_matrix(group, label)  # a subspace per expert / q-k-v block

    # ------------------------------------------------------------------ hooks
    def _init_state(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        adam = not group["orthogonalize"]
        for p, state in zip(params, states, strict=True):
            if "step" in state:
                continue
            m, n = matrix_shape(p.shape)
            shape = lowrank_shape(p.shape, resolve_rank(group["rank"], (m, n)))
            state["step"] = torch.tensor(0.0)
            # Tall moments (m x r) are row-sharded like a sharded weight, wide ones replicated.
            names = ("exp_avg", "exp_avg_sq") if adam else ("momentum_buffer",)
            for name in names:
                state[name] = distributed.zeros_state(shape, p, rows_sharded=m > n)

    def _refresh_subspaces(
        self, group: dict[str, Any], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        """New subspaces for the parameters whose step count is a multiple of ``update_every``
        (every parameter at its first step); rotates their moments if asked to.

        Each subspace is found once, on one rank, from the whole gradient, and shared
        (:func:`orthotorch.distributed.map_owned`), so ranks never disagree on it. Tall
        row-sharded weights with a finder whose scores add over rows (the DCT) are the
        exception: every rank scores its own rows, and all select from the same all-reduced
        totals.
        """
        # CPU step counters: no device sync, and equal on every rank.
        due = [j for j, s in enumerate(states) if int(s["step"]) % group["update_every"] == 0]
        if not due:
            return
        finder = self.finder
        shapes = {j: matrix_shape(grads[j].shape) for j in due}
        ranks = {j: resolve_rank(group["rank"], shapes[j]) for j in due}
        by_rows = [
            j
            for j in due
            if finder.row_scores is not None
            and distributed.is_dtensor(grads[j])
            and shapes[j][0] > shapes[j][1]
        ]
        owned = [j for j in due if j not in by_rows]
        like = [
            finder.allocate(min(shapes[j]), ranks[j], distributed.local(grads[j])) for j in owned
        ]

        def find(i: int, G: Tensor) -> Tensor:
            return finder.find(wide(G), ranks[owned[i]], group)

        results = distributed.map_owned([grads[j] for j in owned], find, like, self.distributed)
        found = dict(zip(owned, results, strict=True))
        if by_rows:
            totals = [
                finder.row_scores(distributed.local(grads[j]).reshape(-1, shapes[j][1]), group)
                for j in by_rows
            ]
            distributed.sum_across_shards_(totals, [grads[j] for j in by_rows])
            for j, total in zip(by_rows, totals, strict=True):
                found[j] = finder.select(total, ranks[j], group)
        key = self.finder.state_key
        first, second, rotations, tall = [], [], [], []
        for j in due:
            new = found[j]
            state = states[j]
            old = state.get(key)
            state[key] = new
            if old is not None and group["rotate_moments"]:
                M = state.get("exp_avg", state.get("momentum_buffer"))
                V = state.get("exp_avg_sq")
                first.append(distributed.local(M))
                second.append(None if V is None else distributed.local(V))
                rotations.append(self.finder.rotation(old, new))
                tall.append(shapes[j][0] > shapes[j][1])
        if rotations:
            rotate_moments_(first, second, rotations, tall=tall)

    def _project(
        self, grads: list[Tensor], states: list[dict[str, Any]]
    ) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]], list[bool]]:
        """Projected gradients (local, parameter orientation) and the projectors that made them."""
        key = self.finder.state_key
        projected, projectors, shapes, sharded = [], [], [], []
        partials, partial_of = [], []
        for G, state in zip(grads, states, strict=True):
            m, n = matrix_shape(G.shape)
            G_local = distributed.local(G)
            P = self.finder.projector(state[key], min(m, n), G_local)
            if distributed.is_dtensor(G):
                if m <= n:
                    start, stop = distributed.row_range(G)
                    P = P[start:stop]
                R = project_rows(G_local.reshape(-1, n), P, tall=m > n)
                if m <= n:
                    partials.append(R)
                    partial_of.append(G)
            else:
                R = project(G, P)
            projected.append(R)
            projectors.append(P)
            shapes.append((m, n))
            sharded.append(distributed.is_dtensor(G))
        distributed.sum_across_shards_(partials, partial_of)
        return projected, projectors, shapes, sharded

    def _momentum(
        self, group: dict[str, Any], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> list[Tensor]:
        self._refresh_subspaces(group, grads, states)
        projected, projectors, shapes, sharded = self._project(grads, states)
        local_shapes = [distributed.local(G).shape for G in grads]
        if group["orthogonalize"]:
            for s in states:
                s["step"] += 1
            bufs = [distributed.local(s["momentum_buffer"]) for s in states]
            momenta = nesterov_momentum_(projected, bufs, group["momentum"], group["nesterov"])
            return _Projected(momenta, projectors, shapes, sharded, local_shapes)
        beta1, beta2 = group["betas"]
        directions = projected_adam_(
            projected,
            [distributed.local(s["exp_avg"]) for s in states],
            [distributed.local(s["exp_avg_sq"]) for s in states],
            [s["step"] for s in states],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
        )
        return _Projected(directions, projectors, shapes, sharded, local_shapes)

    def _direction(
        self,
        group: dict[str, Any],
        momenta: list[Tensor],
        states: list[dict[str, Any]],
        layouts: list[MatrixLayout],
    ) -> list[Tensor]:
        assert isinstance(momenta, _Projected), "_direction takes _momentum's return value"
        projected = momenta
        directions: list[Tensor] = list(projected)
        if group["orthogonalize"]:
            spec, steps, compute = resolve_compute(
                group["ns_method"], group["ns_steps"], group["ns_dtype"]
            )

            def kernel(X: Tensor, transposed: bool) -> Tensor:
                del transposed
                return spec.iterate(X, steps)

            # The momenta take the buffers' layout (row-sharded or replicated DTensors under
            # FSDP2), which tells map_matrices how to split the Newton–Schulz work.
            wrapped = [
                distributed.wrap_like(D, s["momentum_buffer"])
                for D, s in zip(projected, states, strict=True)
            ]
            directions = distributed.map_matrices(wrapped, kernel, compute, self.distributed)
        updates = []
        for i, (D, P) in enumerate(zip(directions, projected.projectors, strict=True)):
            shape = projected.shapes[i]
            if projected.sharded[i]:
                U = back_project_rows(D, P, tall=shape[0] > shape[1])
            else:
                # back_project gives the wide orientation; tall weights are its transpose.
                U = back_project(D, P)
                U = U.mT if shape[0] > shape[1] else U
            U = U.mul_(self._scale(group, shape))
            updates.append(U.reshape(projected.local_shapes[i]))
        return updates

    def _scale(self, group: dict[str, Any], shape: tuple[int, int]) -> float:
        if group["orthogonalize"]:
            # A polar factor has unit singular values; give it AdamW's typical RMS (Liu et al.).
            return group["scale"] * shape_scale(shape, "match_rms_adamw")
        return group["scale"]

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict`` plus two low-rank guards.

        - A state saved with a different rank raises ``ValueError`` naming the parameter,
          instead of loading moments of the wrong shape.
        - ``torch.optim`` casts every non-``"step"`` state tensor to the parameter's dtype, which
          would turn the int32 DCT indices into floats (and round them in bf16); they are
          restored exactly.
        """
        self._check_loadable(state_dict)  # another optimizer's checkpoint, other layouts
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        id_to_param = {}
        if len(saved_groups) == len(self.param_groups):  # else torch raises its own error
            for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
                if len(saved["params"]) != len(group["params"]):
                    continue
                id_to_param.update(zip(saved["params"], group["params"]))
                if group["algorithm"] != ADAMW:
                    self._check_saved_ranks(group, index, saved["params"], saved_state)
        super().load_state_dict(state_dict)
        key = self.finder.state_key
        for pid, p in id_to_param.items():
            saved = saved_state.get(pid, {})
            # Blocks of a non-flatten layout (experts, q/k/v) keep their indices in "blocks".
            pairs = [(saved, self.state[p])]
            pairs += zip(saved.get("blocks", ()), self.state[p].get("blocks", ()))
            for source, target in pairs:
                if key in source and not source[key].is_floating_point():
                    target[key] = source[key].to(device=p.device, dtype=torch.int32, copy=True)

    def _check_saved_ranks(
        self, group: dict[str, Any], index: int, saved_ids: list[Any], saved_state: dict
    ) -> None:
        layouts = self._layouts_of(group, list(group["params"]))
        for i, (pid, p) in enumerate(zip(saved_ids, group["params"], strict=True)):
            state = saved_state.get(pid, {})
            if layouts[i].is_flatten:
                entries = [(state, matrix_shape(p.shape))]
            else:
                blocks = layouts[i].block_shapes(tuple(p.shape))
                entries = list(zip(state.get("blocks", ()), blocks))
            for block_state, shape in entries:
                self._check_saved_rank(group, index, i, p, block_state, shape)

    def _check_saved_rank(
        self,
        group: dict[str, Any],
        index: int,
        i: int,
        p: Tensor,
        state: dict[str, Any],
        shape: tuple[int, int],
    ) -> None:
        moment = state.get("exp_avg", state.get("momentum_buffer"))
        if moment is not None:
            expected = lowrank_shape(shape, resolve_rank(group["rank"], shape))
            if tuple(moment.shape) != expected:
                raise ValueError(
                    f"{self._group_label(group, index)}: the saved state of parameter "
                    f"{self._param_label(group, i)} (shape {tuple(p.shape)}) has low-rank "
                    f"moments of shape {tuple(moment.shape)} (rank {min(moment.shape)}), but "
                    f"this optimizer uses rank {min(expected)} (moments {expected}). Construct "
                    "the optimizer with the rank the checkpoint was saved with."
                )


_SHARED_ARGS_DOC = """
    Args:
        params: tensors, ``(name, tensor)`` pairs or group dicts (see
            :func:`orthotorch.param_groups`). Low-rank groups take 2-D weights (convolution
            kernels are flattened to ``(shape[0], -1)``); put embeddings, heads, biases and
            norms in ``"adamw"`` groups.
        lr: learning rate ``eta`` (default ``1e-3``).
        rank: ``r``: an int in ``[1, min(m, n)]`` for every matrix, or a float in ``(0, 1]``,
            the fraction of each matrix's smaller side (default ``0.25``).
        update_every: ``T``, steps between subspace refreshes (default ``200``, GaLore's).
        scale: ``alpha``, the back-projection scale (default ``0.25``, GaLore's).
        rotate_moments: move the moments into the new subspace at each refresh.
        weight_decay: decoupled weight decay ``lambda`` (default ``0``).
        betas, eps: Adam's ``(beta1, beta2)`` and ``epsilon`` for the low-rank moments and the
            ``"adamw"`` groups (default ``(0.9, 0.999)``, ``1e-8``).
        orthogonalize: instead of Adam, Nesterov momentum ``momentum`` in the subspace followed
            by Newton–Schulz (``ns_method``, ``ns_steps``, ``ns_dtype`` as in
            :class:`orthotorch.Muon`), scaled by ``0.2 sqrt(max(m, n))`` times ``scale``
            (keeps AdamW's lr range). State: one ``r``-dim momentum buffer.
        adamw_lr: ``lr`` of ``"adamw"`` groups that set none (``None``: ``1e-3``, AdamW's default).
        check_finite: raise on NaN/Inf gradients before changing anything (one sync per step).
        skip_nonfinite: skip (and count in state) updates of parameters with NaN/Inf gradients.
        distributed: ``"auto"`` (default): under DDP each subspace search and each
            orthogonalization runs on one rank and is shared; ``DTensor`` weights (FSDP2) are
            handled shard-wise (see the module docstring). ``"off"``: every rank does all the
            work for plain tensors.
"""


class DCTAdamW(_LowRankAdamW):
    r"""SVD-free low-rank AdamW: Adam in the span of ``r`` DCT columns picked per layer.

    For each weight ``W`` (``m x n``; ``X`` the wide view of its gradient, ``k = min(m, n)``):

    .. math::
       \begin{aligned}
       &\text{every } T \text{ steps: } s_j = \lVert X^\top q_j \rVert,\
         \mathcal{I} = \operatorname{top}_r(s), \ P = Q_{:, \mathcal{I}} \\
       &R_t = P^\top X_t, \quad M_t, V_t \leftarrow \mathrm{Adam}(R_t), \quad
         N_t = \hat M_t / (\sqrt{\hat V_t} + \epsilon) \\
       &W_t = (1 - \eta\lambda) W_{t-1} - \eta\,\alpha\, P N_t
       \end{aligned}

    ``Q`` is the orthonormal DCT-II basis of size ``k``, computed once and shared by all layers
    and optimizers (:func:`orthotorch.linalg.dct_basis`); the scores come from an FFT-based DCT
    in ``O(k N log k)`` instead of an SVD. The state per weight is the two ``r``-dim moments,
    ``r`` int32 column indices and a CPU step counter: no float projection matrix. When the
    selection changes, the moments of kept columns move with them and new columns start from
    zero (``rotate_moments``, exact here since the basis is shared).

    Reference: Modoranu et al., "SVD-Free Low-Rank Adaptive Gradient Optimization for Large
    Language Models" (2025); GaLore (Zhao et al., 2024) for the projected-Adam scheme.
    {args}
        score_norm: ``"l2"`` (captured energy; default) or ``"l1"`` column scores.

    Example:
        >>> opt = DCTAdamW(orthotorch.param_groups(model), lr=4e-3, rank=0.25, adamw_lr=1e-3)
    """

    algorithm = "dct_adamw"
    finder = DCT_FINDER

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        rank: int | float = 0.25,
        update_every: int = 200,
        scale: float = 0.25,
        rotate_moments: bool = True,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        score_norm: str = "l2",
        orthogonalize: bool = False,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_method: str = "polar_express",
        ns_steps: int | None = None,
        ns_dtype: torch.dtype | None = None,
        *,
        adamw_lr: float | None = None,
        check_finite: bool = True,
        skip_nonfinite: bool = False,
        distributed: DistributedMode = "auto",
        **topology: Any,
    ) -> None:
        defaults = dict(
            lr=lr, rank=rank, update_every=update_every, scale=scale,
            rotate_moments=rotate_moments, weight_decay=weight_decay, betas=betas, eps=eps,
            score_norm=score_norm, orthogonalize=orthogonalize, momentum=momentum,
            nesterov=nesterov, ns_method=ns_method, ns_steps=ns_steps, ns_dtype=ns_dtype,
        )  # fmt: skip
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
        if group["score_norm"] not in SCORE_NORMS:
            raise ValueError(
                f"{label}: score_norm must be one of {', '.join(map(repr, SCORE_NORMS))}, "
                f"got {group['score_norm']!r}"
            )
        super()._validate_orthogonal_group(group, label)


class GaLoreAdamW(_LowRankAdamW):
    r"""GaLore: AdamW in the span of each gradient's top-``r`` singular vectors (SVD baseline).

    .. math::
       \begin{aligned}
       &\text{every } T \text{ steps: } X = U S V^\top, \quad P = U_{:, :r} \\
       &R_t = P^\top X_t, \quad M_t, V_t \leftarrow \mathrm{Adam}(R_t), \quad
         N_t = \hat M_t / (\sqrt{\hat V_t} + \epsilon) \\
       &W_t = (1 - \eta\lambda) W_{t-1} - \eta\,\alpha\, P N_t
       \end{aligned}

    Same conventions and code as :class:`DCTAdamW` (projection on the smaller side, ``"adamw"``
    groups, checkpoints); the subspace comes from a float32 SVD and the ``k x r`` projector is
    stored per weight, as in the reference implementation. ``rotate_moments`` defaults to
    ``False`` as in GaLore (the rotation of the second moment is an approximation here).

    Reference: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection" (ICML 2024).
    {args}
    Example:
        >>> opt = GaLoreAdamW(orthotorch.param_groups(model), lr=4e-3, rank=0.25, adamw_lr=1e-3)
    """

    algorithm = "galore_adamw"
    finder = SVD_FINDER

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        rank: int | float = 0.25,
        update_every: int = 200,
        scale: float = 0.25,
        rotate_moments: bool = False,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        orthogonalize: bool = False,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_method: str = "polar_express",
        ns_steps: int | None = None,
        ns_dtype: torch.dtype | None = None,
        *,
        adamw_lr: float | None = None,
        check_finite: bool = True,
        skip_nonfinite: bool = False,
        distributed: DistributedMode = "auto",
        **topology: Any,
    ) -> None:
        defaults = dict(
            lr=lr, rank=rank, update_every=update_every, scale=scale,
            rotate_moments=rotate_moments, weight_decay=weight_decay, betas=betas, eps=eps,
            orthogonalize=orthogonalize, momentum=momentum, nesterov=nesterov,
            ns_method=ns_method, ns_steps=ns_steps, ns_dtype=ns_dtype,
        )  # fmt: skip
        super().__init__(
            params,
            defaults,
            adamw_lr=adamw_lr,
            check_finite=check_finite,
            skip_nonfinite=skip_nonfinite,
            distributed=distributed,
            **topology,
        )


# One Args list for both classes, so that the two stay documented alike.
for _cls in (DCTAdamW, GaLoreAdamW):
    _cls.__doc__ = _cls.__doc__.replace("{args}", _SHARED_ARGS_DOC.strip())
