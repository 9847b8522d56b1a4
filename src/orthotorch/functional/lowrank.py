"""Projected Adam: the low-rank core shared by ``DCTAdamW`` and ``GaLoreAdamW``.

A gradient ``G`` (``m x n``, convolution kernels flattened to ``(shape[0], -1)``) is handled in
its *wide* orientation ``X = G`` (``m <= n``) or ``X = G^T`` (``m > n``), ``k x N`` with
``k = min(m, n)``: the projection always acts on the smaller side, which keeps the projected
moments smallest (GaLore's rule). A subspace is an orthonormal ``P`` (``k x r``). One step:

.. math::

    \\begin{aligned}
    R_t &= P^\\top X_t &&(r \\times N,\\ \\text{projected gradient})\\\\
    M_t &= \\beta_1 M_{t-1} + (1-\\beta_1) R_t, \\quad
    V_t = \\beta_2 V_{t-1} + (1-\\beta_2) R_t^2\\\\
    N_t &= \\frac{M_t / (1-\\beta_1^t)}{\\sqrt{V_t / (1-\\beta_2^t)} + \\epsilon}, \\qquad
    U_t = P N_t &&(k \\times N,\\ \\text{back in the weight's space})\\\\
    W_t &= (1 - \\eta\\lambda) W_{t-1} - \\eta\\, \\alpha\\, U_t &&(\\text{transposed back if tall})
    \\end{aligned}

The moments are stored in the parameter's orientation: ``r x n`` for a wide weight (GaLore's
"left" projection ``P^T G``), ``m x r`` for a tall one ("right" projection ``G P``). Because
``r <= k < N`` for a tall weight, :func:`wide` recovers the orientation from the shape alone.

Subspaces are refreshed every ``T`` steps by a :class:`SubspaceFinder`:

- ``DCT_FINDER`` (Modoranu et al., 2025, "SVD-Free Low-Rank Adaptive Gradient Optimization for
  Large Language Models"): ``P = Q[:, idx]`` with ``Q`` the DCT-II basis of size ``k`` shared by
  all layers and ``idx`` the ``r`` columns most aligned with ``X``
  (:func:`orthotorch.linalg.select_columns`). State: ``r`` int32 indices.
- ``SVD_FINDER`` (GaLore, Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient
  Low-Rank Projection"): ``P = U[:, :r]`` of ``X = U S V^T``. State: ``P`` itself.

When the subspace changes from ``P`` to ``P'`` the moments' coordinates change by
``R = P^T P'`` (``r x r``): ``M' = R^T M`` and, for the elementwise second moment,
``V' = (R \\circ R)^T V``. For the DCT ``R`` is a partial permutation (the basis is shared), so
this is exact: kept columns keep their moments, new columns start from zero. For the SVD it is
the usual independent-coordinates approximation (GaLore itself does not rotate).

Orthogonalized variant: Nesterov momentum on ``R_t``, then the polar factor of the ``r x N``
momentum by Newton–Schulz (cheap: the small side is ``r``), then ``U_t = P O_t``.

Row shards (FSDP2 holds rows ``a:b`` of ``G``): for a tall weight the projection acts on the
complete rows, ``(G P)[a:b] = G[a:b] P``, so moments and updates are row-sharded like the weight
(:func:`project_rows`, :func:`back_project_rows`). For a wide weight it acts on the sharded side:
``P^T G = sum_s P[rows_s]^T G[rows_s]`` is a sum over the shards (an all-reduce of ``r x n``),
the moments are replicated, and each rank back-projects its rows, ``(P N)[a:b] = P[a:b] N``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..linalg.dct import dct_basis, dct_column_scores, select_columns
from ..linalg.registry import OrthogonalizationMethod
from .muon import bucket_by_shape, matrix_shape

__all__ = [
    "DCT_FINDER",
    "SUBSPACE_FINDERS",
    "SVD_FINDER",
    "SubspaceFinder",
    "back_project",
    "back_project_rows",
    "lowrank_shape",
    "orthogonalize_lowrank",
    "project",
    "project_rows",
    "projected_adam_",
    "resolve_rank",
    "rotate_moments_",
    "wide",
]


def resolve_rank(rank: int | float, shape: tuple[int, int]) -> int:
    """The rank used for a ``rows x cols`` matrix.

    An ``int`` is taken as is; a ``float`` in ``(0, 1]`` is a fraction of the smaller side
    (``max(1, round(rank * k))``), so ``1`` means rank one but ``1.0`` means full rank.

    Raises:
        ValueError: the rank is not in ``[1, k]`` (or the fraction not in ``(0, 1]``), with the
            valid range in the message.
    """
    k = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"rank must be an int in [1, {k}] or a float in (0, 1], got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"rank as a fraction must be in (0, 1], got {rank!r}")
        return max(1, round(rank * k))
    if not 1 <= rank <= k:
        raise ValueError(
            f"rank must be an int in [1, {k}] (the smaller side) or a float in (0, 1], got {rank}"
        )
    return rank


def lowrank_shape(shape: torch.Size | tuple[int, ...], rank: int) -> tuple[int, int]:
    """Shape of the projected moments of a parameter: ``(r, n)`` if wide, ``(m, r)`` if tall."""
    m, n = matrix_shape(shape)
    return (m, rank) if m > n else (rank, n)


def wide(t: Tensor) -> Tensor:
    """``t`` or ``t^T`` (a view), whichever has no more rows than columns."""
    return t.mT if t.shape[-2] > t.shape[-1] else t


def project(G: Tensor, P: Tensor) -> Tensor:
    """``P^T X`` (``X`` the wide view of ``G`` as a matrix), returned in ``G``'s orientation."""
    m, n = matrix_shape(G.shape)
    R = P.mT @ wide(G.reshape(m, n))
    return R.mT if m > n else R


def back_project(D: Tensor, P: Tensor) -> Tensor:
    """``P D`` for a low-rank ``D`` in parameter orientation: the ``k x N`` (wide) update."""
    return P @ wide(D).to(P.dtype)


def project_rows(G_rows: Tensor, P: Tensor, tall: bool) -> Tensor:
    """This rank's part of the projection of rows ``a:b`` of a gradient (``G_rows``, as a matrix).

    ``tall`` (``m > n``; ``P`` is ``n x r``): ``G[a:b] P``, rows ``a:b`` of the projected
    gradient, exact. Wide (``P[a:b]`` passed, ``(b - a) x r``): ``P[a:b]^T G[a:b]``, one term of
    ``P^T G``; summing the terms over the ranks gives the projection.
    """
    return G_rows @ P.to(G_rows.dtype) if tall else P.mT.to(G_rows.dtype) @ G_rows


def back_project_rows(D: Tensor, P: Tensor, tall: bool) -> Tensor:
    """Rows ``a:b`` of the update in parameter orientation: ``D[a:b] P^T`` (``tall``, ``D`` the
    local rows of the ``m x r`` moment) or ``P[a:b] D`` (wide, ``D`` the whole ``r x n``)."""
    return D.to(P.dtype) @ P.mT if tall else P @ D.to(P.dtype)


def rotate_moments_(
    first: list[Tensor],
    second: list[Tensor | None],
    rotations: list[Tensor],
    *,
    tall: list[bool] | None = None,
) -> None:
    """Move moments into a new subspace: ``M <- R^T M``, ``V <- (R * R)^T V`` (wide views).

    ``second`` entries may be ``None`` (momentum-only state). The squared rotation keeps ``V``
    nonnegative, which a plain ``R^T V`` would not. ``tall`` gives each moment's orientation
    (``m x r`` moments of tall weights rotate on the right, ``M <- M R``); by default it is
    read from the shape, which a row shard of a tall moment (possibly fewer rows than ``r``)
    does not show.
    """
    if tall is None:
        tall = [M.shape[-2] > M.shape[-1] for M in first]
    for M, V, R, is_tall in zip(first, second, rotations, tall, strict=True):
        R = R.to(M.dtype)
        M.copy_(M @ R if is_tall else R.mT @ M)
        if V is not None:
            V.copy_(V @ (R * R) if is_tall else (R * R).mT @ V)


def projected_adam_(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> list[Tensor]:
    """Adam's moments on projected gradients, in place; returns the directions ``N_t``.

    ``steps`` are CPU scalar tensors, advanced here; reading them is not a device sync. The
    arithmetic follows :func:`orthotorch.functional.adamw_step_` (lerp first moment, bias
    corrections folded into the denominator and the step size).
    """
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    counts = [float(s) for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in counts])
    torch._foreach_add_(denom, eps)
    directions = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(directions, [1 / (1 - beta1**t) for t in counts])
    return directions


def orthogonalize_lowrank(
    momenta: list[Tensor], spec: OrthogonalizationMethod, steps: int | None, dtype: torch.dtype
) -> list[Tensor]:
    """Polar factors of the projected momenta (same-shape ones batched), parameter order kept."""
    out: list[Tensor] = [torch.empty(0)] * len(momenta)
    for bucket in bucket_by_shape(momenta, dtype):
        bucket.X = spec.iterate(bucket.X, steps)
        for i, d in zip(bucket.index, bucket.directions(), strict=True):
            out[i] = d
    return out


# ------------------------------------------------------------------------- subspace finders
@dataclass(frozen=True)
class SubspaceFinder:
    """How a low-rank optimizer finds and stores its subspace.

    Attributes:
        name: registry key.
        state_key: where the subspace lives in the optimizer state.
        find: ``(X, r, options) -> subspace``, ``X`` the wide ``k x N`` gradient; ``options``
            is the param group (for finder settings such as ``score_norm``).
        projector: ``(subspace, k, like) -> P`` (``k x r``, orthonormal columns, ``like``'s
            dtype and device).
        rotation: ``(old, new) -> R = P_old^T P_new`` (``r x r``).
        allocate: ``(k, r, like) -> empty subspace`` with the shape, dtype and device ``find``
            returns; under DDP/FSDP2 one rank finds each subspace and the others receive it into
            such a buffer (:func:`orthotorch.distributed.map_owned`).
        row_scores, select: optional split of ``find`` for a tall weight (``m > n``, subspace
            of the columns) held as row blocks: ``row_scores(G[a:b], options)`` are per-column
            statistics that *add* over row blocks, and ``select(total, r, options)`` turns
            their sum into the subspace. Under FSDP2 every rank scores its own rows and one
            all-reduce of ``n`` numbers replaces gathering the gradient (the DCT's column
            energies; an SVD has no such split).
    """

    name: str
    state_key: str
    find: Callable[[Tensor, int, Mapping[str, Any]], Tensor]
    projector: Callable[[Tensor, int, Tensor], Tensor]
    rotation: Callable[[Tensor, Tensor], Tensor]
    allocate: Callable[[int, int, Tensor], Tensor] | None = None
    row_scores: Callable[[Tensor, Mapping[str, Any]], Tensor] | None = None
    select: Callable[[Tensor, int, Mapping[str, Any]], Tensor] | None = None


def _dct_find(X: Tensor, rank: int, options: Mapping[str, Any]) -> Tensor:
    # Scores for the basis of the k-side: ||X^T q_j|| over the N columns of X.
    return select_columns(X.mT, None, rank, norm=options.get("score_norm", "l2"))[1]


def _dct_row_scores(G_rows: Tensor, options: Mapping[str, Any]) -> Tensor:
    # Column j's score over rows a:b; squared for l2 so that blocks add up to ||G q_j||^2.
    norm = options.get("score_norm", "l2")
    scores = dct_column_scores(G_rows, norm)
    return scores.square() if norm == "l2" else scores


def _dct_select(total: Tensor, rank: int, options: Mapping[str, Any]) -> Tensor:
    del options  # the square root of the l2 energies would not change the order
    top = torch.topk(total, rank, dim=-1, sorted=False).indices
    return top.sort(dim=-1).values.to(torch.int32)


def _dct_projector(indices: Tensor, k: int, like: Tensor) -> Tensor:
    # A k x r gather per step: cheap next to the r k N projection, and it keeps float
    # projectors out of the state.
    return dct_basis(k, like.dtype, like.device).index_select(1, indices)


def _dct_rotation(old: Tensor, new: Tensor) -> Tensor:
    # Q[:, old]^T Q[:, new] for an orthonormal Q is exactly the 0/1 matrix of equal indices.
    return (old.unsqueeze(1) == new.unsqueeze(0)).float()


def _svd_find(X: Tensor, rank: int, options: Mapping[str, Any]) -> Tensor:
    del options
    # torch.linalg.svd has no half-precision kernels; float32 matches GaLore's reference code.
    compute = torch.float64 if X.dtype == torch.float64 else torch.float32
    U = torch.linalg.svd(X.to(compute), full_matrices=False)[0]
    return U[:, :rank].to(X.dtype)


def _svd_projector(P: Tensor, k: int, like: Tensor) -> Tensor:
    del k
    return P.to(like.dtype)


def _svd_rotation(old: Tensor, new: Tensor) -> Tensor:
    return old.mT @ new


def _dct_allocate(k: int, rank: int, like: Tensor) -> Tensor:
    del k
    return torch.empty(rank, dtype=torch.int32, device=like.device)


def _svd_allocate(k: int, rank: int, like: Tensor) -> Tensor:
    return torch.empty((k, rank), dtype=like.dtype, device=like.device)


DCT_FINDER = SubspaceFinder(
    "dct",
    "indices",
    _dct_find,
    _dct_projector,
    _dct_rotation,
    _dct_allocate,
    _dct_row_scores,
    _dct_select,
)
SVD_FINDER = SubspaceFinder(
    "svd", "projector", _svd_find, _svd_projector, _svd_rotation, _svd_allocate
)
SUBSPACE_FINDERS: dict[str, SubspaceFinder] = {f.name: f for f in (DCT_FINDER, SVD_FINDER)}
