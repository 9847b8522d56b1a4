"""All communication of orthotorch: the only module that calls ``torch.distributed``.

Orthogonalization needs whole matrices, while data-parallel training either replicates them
(DDP) or shards them by rows (FSDP2 / ``DTensor`` with ``Shard(0)``). :func:`map_matrices` runs
a matrix kernel (Newton–Schulz, a normalisation rule, ...) on every update matrix so that each
rank does ``1/world_size`` of the work:

- **single process** (or ``mode="off"``): same-shape matrices are stacked and the kernel runs
  once per shape.
- **replicated** (plain tensors, process group of size > 1): matrix ``i`` of the step's global
  order is owned by rank ``i mod W``; each rank runs the kernel on the matrices it owns, then
  ``all_gather_into_tensor`` gives every rank every result. Each rank sends about
  ``(W - 1) / W`` of the orthogonalized parameters' size (in the compute dtype).
- **sharded** (``DTensor`` sharded on dim 0 over a 1-D mesh): each rank sends its row shards of
  matrix ``i`` to the owner with one ``all_to_all_single`` per shape, the owner assembles and
  processes the full matrix, and a second ``all_to_all_single`` returns the row shards. No rank
  holds more full matrices than it owns; each element crosses the network at most twice.

- **replicated DTensors** (``Replicate()`` over a 1-D mesh, e.g. the ``r x n`` low-rank
  moments of a row-sharded wide weight): as for plain replicated tensors, over the mesh's group.

Ownership is round-robin over one global counter, so ranks differ by at most one matrix in
total, and every collective has the same sizes on every rank: a rank that owns fewer matrices of
a shape sends zero padding rather than skipping the call — skipping would hang the others.

Two more primitives serve the low-rank optimizers: :func:`map_owned` computes a per-matrix
result that must be identical on every rank (a subspace: DCT column indices, an SVD basis) once,
on the matrix's owner, and shares it; :func:`sum_across_shards_` all-reduces the per-shard
terms of a projection ``P^T G = sum_s P_s^T G_s`` over row shards.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from .functional.layout import FLATTEN, MatrixLayout, layout_matrices
from .functional.muon import Bucket, bucket_by_shape, matrix_shape
from .functional.rules import Kernel

try:  # public since torch 2.4; keep import errors readable on builds without distributed
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "STATS",
    "CommStats",
    "DistributedMode",
    "Kernel",
    "all_ranks_agree",
    "any_rank",
    "is_dtensor",
    "local",
    "map_matrices",
    "map_owned",
    "replicated_world",
    "row_range",
    "sum_across_shards_",
    "unsupported_layout",
    "wrap_like",
    "zeros_state",
]

DistributedMode = Literal["auto", "off"]
DISTRIBUTED_MODES: tuple[str, ...] = ("auto", "off")


@dataclass
class CommStats:
    """Counters that tests and benchmarks read: work done and bytes sent by this process."""

    matrices_processed: int = 0
    bytes_sent: int = 0
    collectives: int = 0
    # Results of map_owned computed here (subspace searches: DCT scoring, SVDs).
    owned_results: int = 0

    def reset(self) -> None:
        self.matrices_processed = self.bytes_sent = self.collectives = self.owned_results = 0


STATS = CommStats()


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (a view sharing its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def _is_row_sharded(t: Tensor) -> bool:
    return is_dtensor(t) and t.device_mesh.ndim == 1 and t.placements[0] == Shard(0)


def _is_replicated_dtensor(t: Tensor) -> bool:
    return is_dtensor(t) and t.device_mesh.ndim == 1 and t.placements[0] == Replicate()


def unsupported_layout(t: Tensor) -> str | None:
    """Why the sharded paths cannot handle parameter ``t`` (``None``: plain, or ``Shard(0)``
    over a 1-D mesh, FSDP2's default); for a clear error at optimizer construction."""
    if not is_dtensor(t) or _is_row_sharded(t):
        return None
    return (
        f"it is a DTensor with placements {tuple(t.placements)} over a {t.device_mesh.ndim}-D "
        "mesh; only Shard(0) over a 1-D mesh (FSDP2's default fully_shard) is supported"
    )


def row_range(t: Tensor) -> tuple[int, int]:
    """Global ``[start, stop)`` of the rows this rank holds: a ``Shard(0)`` block, else all."""
    if not _is_row_sharded(t):
        return 0, t.shape[0]
    mesh = t.device_mesh
    chunks = _row_chunks(t.shape[0], mesh.size())
    start = sum(chunks[: mesh.get_local_rank()])
    return start, start + chunks[mesh.get_local_rank()]


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def zeros_state(
    shape: Sequence[int], like: Tensor, *, rows_sharded: bool, dtype: torch.dtype | None = None
) -> Tensor:
    """Zero optimizer state of global ``shape`` laid out to match parameter ``like``.

    A plain ``like`` gives a plain tensor. A ``DTensor`` ``like`` (FSDP2) gives a ``DTensor`` on
    its mesh: sharded on dim 0 like the parameter when ``rows_sharded`` (``shape[0]`` must be the
    parameter's row count, so the row blocks coincide), else replicated. Either way
    ``torch.distributed.checkpoint`` then saves and reshards the state like the parameter's.
    """
    dtype = like.dtype if dtype is None else dtype
    if not is_dtensor(like):
        return torch.zeros(tuple(shape), dtype=dtype, device=like.device)
    shape = tuple(shape)
    if rows_sharded:
        start, stop = row_range(like)
        local_t = torch.zeros((stop - start, *shape[1:]), dtype=dtype, device=local(like).device)
        placements = [Shard(0)]
    else:
        local_t = torch.zeros(shape, dtype=dtype, device=local(like).device)
        placements = [Replicate()]
    return DTensor.from_local(
        local_t,
        like.device_mesh,
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


def wrap_like(t: Tensor, like: Tensor) -> Tensor:
    """The local tensor ``t`` as a ``DTensor`` with ``like``'s mesh, placement and global shape
    (``t`` itself when ``like`` is a plain tensor); no communication."""
    if not is_dtensor(like):
        return t
    return DTensor.from_local(
        t,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def replicated_world(mode: str) -> tuple[int, int] | None:
    """``(rank, world_size)`` of the default group when work should be split, else ``None``."""
    if mode == "off" or not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world > 1 else None


def _group_of(tensors: Sequence[Tensor]) -> Any:
    for t in tensors:
        if is_dtensor(t):
            return t.device_mesh.get_group()
    return None


def any_rank(flags: Tensor, tensors: Sequence[Tensor], mode: str) -> Tensor:
    """Element-wise OR of a bool/int tensor over the ranks that share ``tensors``' parameters.

    Used so that a decision taken from local data (a non-finite gradient shard, a missing
    gradient) is taken identically on every rank: a rank that raised or skipped alone would
    leave the others waiting in the next collective forever.
    """
    group = _group_of(tensors)
    if group is None and replicated_world(mode) is None:
        return flags
    reduced = flags.to(torch.int32)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
    STATS.collectives += 1
    return reduced.to(flags.dtype)


def all_ranks_agree(signature: list, tensors: Sequence[Tensor], mode: str, what: str) -> None:
    """Raise ``ValueError`` on every rank unless all ranks pass the same ``signature``."""
    group = _group_of(tensors)
    if group is None and replicated_world(mode) is None:
        return
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, signature, group=group)
    for rank, other in enumerate(gathered):
        if other != signature:
            diff = next(
                (i for i, (a, b) in enumerate(zip(signature, other, strict=False)) if a != b),
                min(len(signature), len(other)),
            )
            mine = signature[diff] if diff < len(signature) else "<none>"
            theirs = other[diff] if diff < len(other) else "<none>"
            raise ValueError(
                f"ranks disagree on {what}: entry {diff} is {mine!r} here but {theirs!r} on "
                f"rank {rank} ({len(signature)} vs {len(other)} entries). Every rank must build "
                "the optimizer over the same parameters in the same order."
            )


def map_matrices(
    updates: list[Tensor],
    kernel: Kernel,
    compute_dtype: torch.dtype,
    mode: str = "auto",
    *,
    layouts: Sequence[MatrixLayout] | None = None,
    scale: Callable[[tuple[int, int]], float] | None = None,
) -> list[Tensor]:
    """Apply ``kernel`` to every matrix of every update, splitting the work across ranks.

    Args:
        updates: per-parameter tensors; plain tensors, or ``DTensor`` objects over one 1-D mesh,
            each either row-sharded (``Shard(0)``) or replicated (``Replicate()``).
        kernel: ``(X, transposed) -> Y`` on a wide ``(k, m, n)`` stack in ``compute_dtype``.
        compute_dtype: dtype the matrices are stacked and communicated in.
        mode: ``"auto"`` splits work whenever a process group of size > 1 is initialised;
            ``"off"`` processes every matrix locally (DTensor inputs still need the sharded path).
        layouts: how each update is seen as matrices (:mod:`orthotorch.functional.layout`;
            ``None``: ``flatten`` for all). Each matrix of a layout (an expert, a q/k/v block)
            is processed as its own matrix. A row-sharded ``batch`` tensor (an expert stack
            sharded by experts) holds whole matrices on every rank and needs no communication.
        scale: ``(rows, cols) -> factor`` applied to each result matrix (the optimizer's shape
            scale), with ``(rows, cols)`` the matrix in the layer's ``(out, in)`` orientation.

    Returns:
        One direction per update, shaped like its local tensor (``local(update)``), in
        ``compute_dtype``.
    """
    layouts = [FLATTEN] * len(updates) if layouts is None else list(layouts)
    if len(layouts) != len(updates):
        raise ValueError(f"map_matrices: {len(layouts)} layouts for {len(updates)} updates")
    if any(is_dtensor(u) for u in updates):
        return _map_dtensors(updates, layouts, kernel, compute_dtype, scale)
    return _map_plain(updates, layouts, kernel, compute_dtype, scale, replicated_world(mode))[0]


def _map_plain(
    updates: list[Tensor],
    layouts: list[MatrixLayout],
    kernel: Kernel,
    compute_dtype: torch.dtype,
    scale: Callable[[tuple[int, int]], float] | None,
    world: tuple[int, int] | None,
    group: Any = None,
    counter: int = 0,
) -> tuple[list[Tensor], int]:
    """Plain (or local) tensors: every matrix locally, or round-robin owners + all_gather."""
    matrices = layout_matrices(updates, layouts)
    if world is None:
        buckets = bucket_by_shape(matrices, compute_dtype)
        for b in buckets:
            b.X = kernel(b.X, b.transposed)
            STATS.matrices_processed += len(b.index)
    else:
        buckets, counter = _map_replicated(matrices, kernel, compute_dtype, *world, group, counter)
    results: list[Tensor] = [None] * len(matrices)  # type: ignore[list-item]
    for b in buckets:
        factor = 1.0 if scale is None else scale(b.shape)
        if factor != 1.0:
            b.X.mul_(factor)
        for j, d in zip(b.index, b.directions(), strict=True):
            results[j] = d
    return _assemble(updates, layouts, results, compute_dtype), counter


def _assemble(
    tensors: list[Tensor], layouts: list[MatrixLayout], matrices: list[Tensor], dtype: torch.dtype
) -> list[Tensor]:
    """Per-tensor results from per-matrix results (the inverse of ``layout_matrices``)."""
    out, position = [], 0
    for t, layout in zip(tensors, layouts, strict=True):
        count = len(layout.block_shapes(t.shape))
        blocks = matrices[position : position + count]
        position += count
        if layout.is_flatten:
            out.append(blocks[0].reshape(t.shape))
            continue
        result = torch.empty(t.shape, dtype=dtype, device=t.device)
        for view, block in zip(layout.matrices(result), blocks, strict=True):
            view.copy_(block)
        out.append(result)
    return out


def _mesh_of(tensors: Sequence[Tensor], what: str, allow_replicated: bool) -> Any:
    """The one 1-D mesh of ``tensors``; ``ValueError`` naming the first unsupported layout."""
    mesh = None
    for t in tensors:
        ok = _is_row_sharded(t) or (allow_replicated and _is_replicated_dtensor(t))
        if ok and mesh is not None and t.device_mesh != mesh:
            ok = False
        if not ok:
            placement = getattr(t, "placements", "plain tensor")
            layouts = "sharded on dim 0 or replicated" if allow_replicated else "sharded on dim 0"
            raise ValueError(
                f"{what} supports DTensors {layouts} over one 1-D mesh (FSDP2's default); got "
                f"shape {tuple(t.shape)} with {placement}. Do not mix DTensor and plain "
                "parameters in one orthogonalized group."
            )
        mesh = t.device_mesh
    return mesh


def _map_dtensors(
    updates: list[Tensor],
    layouts: list[MatrixLayout],
    kernel: Kernel,
    compute_dtype: torch.dtype,
    scale: Callable[[tuple[int, int]], float] | None,
) -> list[Tensor]:
    mesh = _mesh_of(updates, "sharded orthogonalization", allow_replicated=True)
    results: list[Tensor] = [None] * len(updates)  # type: ignore[list-item]

    def run(index: list[int], how: Callable[..., tuple[list[Tensor], int]], *args: Any) -> int:
        directions, counter = how(
            [updates[i] for i in index], [layouts[i] for i in index], *args
        )
        for i, d in zip(index, directions, strict=True):
            results[i] = d
        return counter

    # A row-sharded stack of independent matrices (experts sharded by experts) holds whole
    # matrices on every rank: process them where they are.
    whole = [i for i, u in enumerate(updates) if _is_row_sharded(u) and layouts[i].batch]
    sharded = [i for i, u in enumerate(updates) if _is_row_sharded(u) and i not in whole]
    replicated = [i for i, u in enumerate(updates) if not _is_row_sharded(u)]
    if whole:
        locals_ = [local(updates[i]) for i in whole]
        directions, _ = _map_plain(
            locals_, [layouts[i] for i in whole], kernel, compute_dtype, scale, None
        )
        for i, d in zip(whole, directions, strict=True):
            results[i] = d
    counter = run(sharded, _map_sharded, kernel, compute_dtype, scale, mesh) if sharded else 0
    if replicated:
        directions, _ = _map_plain(
            [local(updates[i]) for i in replicated],
            [layouts[i] for i in replicated],
            kernel,
            compute_dtype,
            scale,
            (mesh.get_local_rank(), mesh.size()),
            mesh.get_group(),
            counter,
        )
        for i, d in zip(replicated, directions, strict=True):
            results[i] = d
    return results


def _positions(shapes: Sequence[Any]) -> dict[Any, list[int]]:
    positions: dict[Any, list[int]] = defaultdict(list)
    for i, shape in enumerate(shapes):
        positions[shape].append(i)
    return positions


def _wide(m: Tensor, shape: tuple[int, int]) -> Tensor:
    return m.mT if shape[0] > shape[1] else m


def _map_replicated(
    updates: list[Tensor],
    kernel: Kernel,
    compute_dtype: torch.dtype,
    rank: int,
    world: int,
    group: Any = None,
    counter: int = 0,
) -> tuple[list[Bucket], int]:
    buckets = []
    for shape, index in _positions([matrix_shape(u.shape) for u in updates]).items():
        wide = (min(shape), max(shape))
        owners = [(counter + i) % world for i in range(len(index))]
        counter += len(index)
        per_rank = math.ceil(len(index) / world)
        mine = [i for i, owner in enumerate(owners) if owner == rank]
        device = updates[index[0]].device
        send = torch.zeros((per_rank, *wide), dtype=compute_dtype, device=device)
        for j, i in enumerate(mine):
            send[j].copy_(_wide(updates[index[i]].reshape(shape), shape))
        if mine:
            send[: len(mine)] = kernel(send[: len(mine)], shape[0] > shape[1])
        STATS.matrices_processed += len(mine)
        received = torch.empty((world * per_rank, *wide), dtype=compute_dtype, device=device)
        _all_gather_single(received, send, group)
        X = torch.empty((len(index), *wide), dtype=compute_dtype, device=device)
        slot = [0] * world
        for i, owner in enumerate(owners):
            X[i] = received[owner * per_rank + slot[owner]]
            slot[owner] += 1
        buckets.append(Bucket(shape, index, X))
    return buckets, counter


def _all_gather_single(output: Tensor, input: Tensor, group: Any = None) -> None:
    # Renamed in recent torch; the old name still works there but warns.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)
    STATS.collectives += 1
    STATS.bytes_sent += input.numel() * input.element_size() * (dist.get_world_size(group) - 1)


def _row_chunks(rows: int, world: int) -> list[int]:
    """Rows per rank under ``Shard(0)`` (``torch.chunk`` semantics: trailing ranks may get 0)."""
    size = math.ceil(rows / world)
    return [max(0, min(size, rows - r * size)) for r in range(world)]


@dataclass
class _Exchange:
    """The sizes of one shape's row-shard exchange (same on every rank, or a collective hangs)."""

    rows: int
    cols: int
    chunks: list[int]
    owners: list[int]
    mine: list[int]
    send_sizes: list[int]
    recv_sizes: list[int]


def _to_owners(
    shards: list[Tensor], rows: int, cols: int, owners: list[int], mesh: Any, dtype: torch.dtype
) -> tuple[Tensor, _Exchange]:
    """All-to-all of row shards: returns ``(len(mine), rows, cols)``, the matrices I own, whole."""
    world, rank = mesh.size(), mesh.get_local_rank()
    chunks = _row_chunks(rows, world)
    mine = [i for i, owner in enumerate(owners) if owner == rank]
    device = shards[0].device
    # My row shard of matrix i goes to its owner, in matrix order per owner.
    send = torch.cat(
        [
            shards[i].reshape(-1).to(dtype)
            for r in range(world)
            for i in range(len(shards))
            if owners[i] == r
        ]
        or [torch.empty(0, device=device, dtype=dtype)]
    )
    ex = _Exchange(
        rows,
        cols,
        chunks,
        owners,
        mine,
        send_sizes=[chunks[rank] * cols * owners.count(r) for r in range(world)],
        recv_sizes=[chunks[s] * cols * len(mine) for s in range(world)],
    )
    recv = _all_to_all(send, ex.send_sizes, ex.recv_sizes, mesh.get_group(), rank)
    # Row blocks of a contiguous parameter-orientation buffer: cheap copies.
    pieces = list(recv.split(ex.recv_sizes))
    full = torch.empty((len(mine), rows, cols), dtype=dtype, device=device)
    start = 0
    for s in range(world):
        full[:, start : start + chunks[s]] = pieces[s].view(len(mine), chunks[s], cols)
        start += chunks[s]
    return full, ex


def _from_owners(full: Tensor, ex: _Exchange, mesh: Any) -> list[Tensor]:
    """Inverse of :func:`_to_owners`: my row shard of every matrix, from its owner."""
    world, rank = mesh.size(), mesh.get_local_rank()
    results = list(full.unbind(0))
    offsets = [sum(ex.chunks[:s]) for s in range(world + 1)]
    back = torch.cat(
        [
            results[j][offsets[s] : offsets[s + 1]].reshape(-1)
            for s in range(world)
            for j in range(len(ex.mine))
        ]
        or [torch.empty(0, device=full.device, dtype=full.dtype)]
    )
    returned = _all_to_all(back, ex.recv_sizes, ex.send_sizes, mesh.get_group(), rank)
    by_owner = list(returned.split(ex.send_sizes))
    size = ex.chunks[rank] * ex.cols
    shards: list[Tensor] = [None] * len(ex.owners)  # type: ignore[list-item]
    for r in range(world):
        owned = [i for i in range(len(ex.owners)) if ex.owners[i] == r]
        for j, i in enumerate(owned):
            shards[i] = by_owner[r][j * size : (j + 1) * size].reshape(ex.chunks[rank], ex.cols)
    return shards


def _map_sharded(
    updates: list[Tensor],
    layouts: list[MatrixLayout],
    kernel: Kernel,
    compute_dtype: torch.dtype,
    scale: Callable[[tuple[int, int]], float] | None,
    mesh: Any,
) -> tuple[list[Tensor], int]:
    """Row shards to each matrix's owner, the layout's matrices processed there, shards back."""
    rank, world = mesh.get_local_rank(), mesh.size()
    results: list[Tensor] = [None] * len(updates)  # type: ignore[list-item]
    counter = 0
    keys = [(tuple(u.shape), layouts[i]) for i, u in enumerate(updates)]
    for (shape, layout), index in _positions(keys).items():
        rows, cols = matrix_shape(shape)
        owners = [(counter + i) % world for i in range(len(index))]
        counter += len(index)
        chunks = _row_chunks(rows, world)
        shards = [local(updates[i]).reshape(chunks[rank], cols) for i in index]
        full, ex = _to_owners(shards, rows, cols, owners, mesh, compute_dtype)
        if ex.mine:
            whole = list(full.view(len(ex.mine), *shape).unbind(0))
            directions, _ = _map_plain(
                whole, [layout] * len(whole), kernel, compute_dtype, scale, None
            )
            full = torch.stack(directions).view(len(ex.mine), rows, cols)
        shards_back = _from_owners(full, ex, mesh)
        for i, d in zip(index, shards_back, strict=True):
            results[i] = d.reshape(local(updates[i]).shape)
    return results, counter


def _all_to_all(
    send: Tensor, send_sizes: list[int], recv_sizes: list[int], group: Any, rank: int
) -> Tensor:
    recv = torch.empty(sum(recv_sizes), dtype=send.dtype, device=send.device)
    dist.all_to_all_single(recv, send.contiguous(), recv_sizes, send_sizes, group=group)
    STATS.collectives += 1
    STATS.bytes_sent += (sum(send_sizes) - send_sizes[rank]) * send.element_size()
    return recv


# ----------------------------------------------------------------- shared per-matrix results
def map_owned(
    inputs: list[Tensor],
    fn: Callable[[int, Tensor], Tensor],
    outputs_like: list[Tensor],
    mode: str = "auto",
) -> list[Tensor]:
    """``[fn(i, X_i)]`` computed once per matrix, on its owner rank, and shared with every rank.

    For per-matrix results that every rank must hold *identically* — a subspace (the DCT column
    indices, an SVD basis) decides the layout of optimizer state, and ranks that chose
    differently would silently train different models. Computing on one rank and sharing makes
    them equal by construction (an SVD recomputed on each rank need not be bitwise equal across
    thread counts or devices) and splits the work: matrix ``i`` is owned by rank ``i mod W``.

    Args:
        inputs: plain tensors, the same on every rank (DDP); or ``DTensor`` objects sharded on dim 0
            over one 1-D mesh (FSDP2), whose row shards are sent whole to the owner
            (``all_to_all``, one per shape and dtype).
        fn: ``(i, X) -> result``, ``X`` the whole matrix ``inputs[i]`` as ``(shape[0], -1)``.
        outputs_like: for each input, a tensor with the shape, dtype and device of its result
            (the receive buffers must be sized before the results exist).
        mode: as in :func:`map_matrices`; ``"off"`` computes everything locally (plain inputs).

    Returns:
        Plain tensors, one per input, equal on every rank. The results travel with one
        ``all_gather`` per result shape and dtype.
    """
    if not inputs:
        return []
    if any(is_dtensor(t) for t in inputs):
        mesh = _mesh_of(inputs, "map_owned", allow_replicated=False)
        rank, world, group = mesh.get_local_rank(), mesh.size(), mesh.get_group()
    else:
        replicated = replicated_world(mode)
        if replicated is None:
            STATS.owned_results += len(inputs)
            return [fn(i, t.reshape(matrix_shape(t.shape))) for i, t in enumerate(inputs)]
        (rank, world), mesh, group = replicated, None, None
    owners = [i % world for i in range(len(inputs))]
    results: list[Tensor | None] = [None] * len(inputs)
    if mesh is None:
        for i, t in enumerate(inputs):
            if owners[i] == rank:
                results[i] = fn(i, t.reshape(matrix_shape(t.shape)))
    else:
        keys = [(matrix_shape(t.shape), local(t).dtype) for t in inputs]
        for ((rows, cols), dtype), index in _positions(keys).items():
            chunks = _row_chunks(rows, world)
            shards = [local(inputs[i]).reshape(chunks[rank], cols) for i in index]
            bucket_owners = [owners[i] for i in index]
            full, ex = _to_owners(shards, rows, cols, bucket_owners, mesh, dtype)
            for j, X in zip(ex.mine, full.unbind(0), strict=True):
                results[index[j]] = fn(index[j], X)
    STATS.owned_results += sum(owner == rank for owner in owners)
    return _share(results, outputs_like, owners, rank, world, group)


def _share(
    results: list[Tensor | None],
    outputs_like: list[Tensor],
    owners: list[int],
    rank: int,
    world: int,
    group: Any,
) -> list[Tensor]:
    keys = [(tuple(t.shape), t.dtype) for t in outputs_like]
    shared: list[Tensor] = [None] * len(results)  # type: ignore[list-item]
    for (shape, dtype), index in _positions(keys).items():
        counts = [sum(owners[i] == r for i in index) for r in range(world)]
        per_rank = max(counts)
        device = outputs_like[index[0]].device
        send = torch.zeros((per_rank, *shape), dtype=dtype, device=device)
        mine = [i for i in index if owners[i] == rank]
        for j, i in enumerate(mine):
            result = results[i]
            got = None if result is None else tuple(result.shape)
            if got != shape:
                raise ValueError(
                    f"map_owned: fn returned shape {got} for input {i}, but outputs_like[{i}] "
                    f"has shape {shape}"
                )
            send[j].copy_(result)
        received = torch.empty((world * per_rank, *shape), dtype=dtype, device=device)
        _all_gather_single(received, send, group)
        slot = [0] * world
        for i in index:
            shared[i] = received[owners[i] * per_rank + slot[owners[i]]].clone()
            slot[owners[i]] += 1
    return shared


def sum_across_shards_(partials: list[Tensor], like: Sequence[Tensor]) -> None:
    """In place, each tensor becomes the sum of its values over the ranks of ``like``'s mesh.

    For a projection on the sharded side of a row-sharded ``G``:
    ``P^T G = sum_s P[rows_s]^T G[rows_s]``, each rank holding one term. One ``all_reduce``
    per dtype; ``bytes_sent`` counts the ring algorithm's ``2 (W - 1) / W`` of the buffer (the
    least any all-reduce sends; the backend may send more).
    """
    group = _group_of(like)
    if group is None or not partials:
        return
    world = dist.get_world_size(group)
    for index in _positions([t.dtype for t in partials]).values():
        flat = torch.cat([partials[i].reshape(-1) for i in index])
        dist.all_reduce(flat, group=group)
        STATS.collectives += 1
        STATS.bytes_sent += 2 * (world - 1) * flat.numel() * flat.element_size() // world
        for i, piece in zip(index, flat.split([partials[i].numel() for i in index]), strict=True):
            partials[i].copy_(piece.view_as(partials[i]))
