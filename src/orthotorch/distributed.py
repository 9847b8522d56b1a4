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

Ownership is round-robin over one global counter, so ranks differ by at most one matrix in
total, and every collective has the same sizes on every rank: a rank that owns fewer matrices of
a shape sends zero padding rather than skipping the call — skipping would hang the others.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from .functional.muon import Bucket, bucket_by_shape, matrix_shape
from .functional.rules import Kernel

try:  # public since torch 2.4; keep import errors readable on builds without distributed
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
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
    "replicated_world",
]

DistributedMode = Literal["auto", "off"]
DISTRIBUTED_MODES: tuple[str, ...] = ("auto", "off")


@dataclass
class CommStats:
    """Counters that tests and benchmarks read: work done and bytes sent by this process."""

    matrices_processed: int = 0
    bytes_sent: int = 0
    collectives: int = 0

    def reset(self) -> None:
        self.matrices_processed = self.bytes_sent = self.collectives = 0


STATS = CommStats()


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (a view sharing its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


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
    updates: list[Tensor], kernel: Kernel, compute_dtype: torch.dtype, mode: str = "auto"
) -> list[Bucket]:
    """Apply ``kernel`` to every update matrix, splitting the work across ranks.

    Args:
        updates: per-parameter tensors (flattened to ``(shape[0], -1)`` matrices); plain tensors
            or ``DTensor`` row shards.
        kernel: ``(X, transposed) -> Y`` on a wide ``(k, m, n)`` stack in ``compute_dtype``.
        compute_dtype: dtype the matrices are stacked and communicated in.
        mode: ``"auto"`` splits work whenever a process group of size > 1 is initialised;
            ``"off"`` processes every matrix locally (DTensor inputs still need the sharded path).

    Returns:
        One :class:`~orthotorch.functional.Bucket` per shape whose ``directions()`` are in the
        parameters' (local) layout.
    """
    if any(is_dtensor(u) for u in updates):
        return _map_sharded(updates, kernel, compute_dtype)
    world = replicated_world(mode)
    if world is None:
        buckets = bucket_by_shape(updates, compute_dtype)
        for b in buckets:
            b.X = kernel(b.X, b.transposed)
            STATS.matrices_processed += len(b.index)
        return buckets
    return _map_replicated(updates, kernel, compute_dtype, *world)


def _positions(shapes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    positions: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, shape in enumerate(shapes):
        positions[shape].append(i)
    return positions


def _wide(m: Tensor, shape: tuple[int, int]) -> Tensor:
    return m.mT if shape[0] > shape[1] else m


def _map_replicated(
    updates: list[Tensor], kernel: Kernel, compute_dtype: torch.dtype, rank: int, world: int
) -> list[Bucket]:
    buckets = []
    counter = 0
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
        _all_gather_single(received, send)
        STATS.collectives += 1
        STATS.bytes_sent += send.numel() * send.element_size() * (world - 1)
        slot = [0] * world
        X = torch.empty((len(index), *wide), dtype=compute_dtype, device=device)
        for i, owner in enumerate(owners):
            X[i] = received[owner * per_rank + slot[owner]]
            slot[owner] += 1
        buckets.append(Bucket(shape, index, X))
    return buckets


def _all_gather_single(output: Tensor, input: Tensor) -> None:
    # Renamed in recent torch; the old name still works there but warns.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input)


def _row_chunks(rows: int, world: int) -> list[int]:
    """Rows per rank under ``Shard(0)`` (``torch.chunk`` semantics: trailing ranks may get 0)."""
    size = math.ceil(rows / world)
    return [max(0, min(size, rows - r * size)) for r in range(world)]


def _map_sharded(updates: list[Tensor], kernel: Kernel, compute_dtype: torch.dtype) -> list[Bucket]:
    first = updates[0]
    for u in updates:
        if not is_dtensor(u) or u.device_mesh.ndim != 1 or u.placements[0] != Shard(0):
            placement = getattr(u, "placements", "plain tensor")
            raise ValueError(
                f"sharded orthogonalization supports DTensors sharded on dim 0 over a 1-D mesh "
                f"(FSDP2's default); got shape {tuple(u.shape)} with {placement}"
            )
    mesh = first.device_mesh
    group = mesh.get_group()
    world = mesh.size()
    rank = mesh.get_local_rank()
    buckets = []
    counter = 0
    for shape, index in _positions([matrix_shape(u.shape) for u in updates]).items():
        rows, cols = shape
        chunks = _row_chunks(rows, world)
        owners = [(counter + i) % world for i in range(len(index))]
        counter += len(index)
        mine = [i for i, owner in enumerate(owners) if owner == rank]
        shards = [local(updates[i]).reshape(chunks[rank], cols) for i in index]
        device = shards[0].device

        # There: my row shard of matrix i goes to its owner, in matrix order per owner.
        send = torch.cat(
            [
                shards[i].reshape(-1)
                for r in range(world)
                for i in range(len(index))
                if owners[i] == r
            ]
            or [torch.empty(0, device=device)]
        ).to(compute_dtype)
        send_sizes = [chunks[rank] * cols * owners.count(r) for r in range(world)]
        recv_sizes = [chunks[s] * cols * len(mine) for s in range(world)]
        recv = _all_to_all(send, send_sizes, recv_sizes, group, rank)

        # Assemble each owned matrix from every rank's rows (row blocks of a contiguous
        # parameter-orientation buffer: cheap copies), then hand the kernel its wide view.
        pieces = list(recv.split(recv_sizes))
        full = torch.empty((len(mine), rows, cols), dtype=compute_dtype, device=device)
        start = 0
        for s in range(world):
            full[:, start : start + chunks[s]] = pieces[s].view(len(mine), chunks[s], cols)
            start += chunks[s]
        if mine:
            full = _wide(kernel(_wide(full, shape), rows > cols), shape)
        STATS.matrices_processed += len(mine)
        results = list(full.unbind(0))

        # Back: rows of my matrices return to the rank that holds them.
        back = torch.cat(
            [
                results[j][sum(chunks[:s]) : sum(chunks[: s + 1])].reshape(-1)
                for s in range(world)
                for j in range(len(mine))
            ]
            or [torch.empty(0, device=device, dtype=compute_dtype)]
        )
        returned = _all_to_all(back, recv_sizes, send_sizes, group, rank)
        by_owner = list(returned.split(send_sizes))
        directions: list[Tensor] = [None] * len(index)  # type: ignore[list-item]
        for r in range(world):
            owned = [i for i in range(len(index)) if owners[i] == r]
            for j, i in enumerate(owned):
                size = chunks[rank] * cols
                directions[i] = by_owner[r][j * size : (j + 1) * size].reshape(chunks[rank], cols)
        buckets.append(Bucket(shape, index, X=torch.empty(0), local_directions=directions))
    return buckets


def _all_to_all(
    send: Tensor, send_sizes: list[int], recv_sizes: list[int], group: Any, rank: int
) -> Tensor:
    recv = torch.empty(sum(recv_sizes), dtype=send.dtype, device=send.device)
    dist.all_to_all_single(recv, send.contiguous(), recv_sizes, send_sizes, group=group)
    STATS.collectives += 1
    STATS.bytes_sent += (sum(send_sizes) - send_sizes[rank]) * send.element_size()
    return recv
