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
- **DTensors on any mesh** (1-D or 2-D, any mix of ``Replicate()``, ``Shard(d)`` and FSDP2's
  ``_StridedShard`` over tensor parallelism: FSDP2, HSDP, FSDP + TP, TP alone, expert
  parallelism): each update has an owner among the ranks of its mesh. The mesh dimensions that
  shard it bring its pieces to the owner (one ``all_to_all`` per bucket over those dimensions,
  each piece placed by its rank's global index map), the owner processes it whole and a second
  ``all_to_all`` returns the pieces; the replicated mesh dimensions split the owners further
  (each replica slice owns ``1/R`` of the updates) and an ``all_gather`` over them completes
  every rank's pieces. For FSDP2's ``Shard(0)`` on a 1-D mesh this is the row-shard exchange:
  no rank holds more full matrices than it owns, each element crosses the network at most
  twice. An expert stack sharded by experts is processed where it is (no gather), its experts
  split over the replicated dimensions. With ``Topology.overlap`` the next bucket's exchange is
  in flight while the current one is processed.

Ownership is round-robin over one counter, one matrix at a time (each matrix of a layout, an
expert or a q/k/v block, has its own owner), so ranks differ by at most one matrix per call, and
every collective has matching sizes on every rank: a rank that owns fewer matrices of a shape
sends zero padding rather than skipping the call — skipping would hang the others.

Two more primitives serve the low-rank optimizers: :func:`map_owned` computes a per-matrix
result that must be identical on every rank (a subspace: DCT column indices, an SVD basis) once,
on the matrix's owner, and shares it; :func:`sum_across_shards_` all-reduces the per-shard
terms of a projection ``P^T G = sum_s P_s^T G_s`` over row shards.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from .functional.layout import FLATTEN, MatrixLayout, layout_matrices
from .functional.muon import Bucket, bucket_by_shape, matrix_shape
from .functional.rules import Kernel


class _Deferred(type):
    """Stands for a class of ``torch.distributed.tensor``, imported on first real use.

    Importing ``torch.distributed.tensor`` took 2.3 s of the 2.5 s that ``import orthotorch``
    adds to ``import torch`` (measured with ``python -X importtime``). A DTensor or placement can
    only exist once that module is imported, so ``isinstance`` answers ``False`` without
    importing it; constructing one (``Shard(0)``) or reading an attribute
    (``DTensor.from_local``) imports the real class. On builds without distributed support
    ``isinstance`` stays ``False`` and only real use raises the ``ImportError``.
    """

    _module: str
    _name: str

    def _real(cls) -> Any:
        return getattr(importlib.import_module(cls._module), cls._name)

    def __instancecheck__(cls, obj: Any) -> bool:
        module = sys.modules.get(cls._module)
        real = None if module is None else getattr(module, cls._name, None)
        return real is not None and isinstance(obj, real)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real()(*args, **kwargs)

    def __getattr__(cls, name: str) -> Any:
        return getattr(cls._real(), name)


def _deferred(module: str, name: str) -> Any:
    return _Deferred(name, (), {"_module": module, "_name": name})


DTensor = _deferred("torch.distributed.tensor", "DTensor")
Replicate = _deferred("torch.distributed.tensor", "Replicate")
Shard = _deferred("torch.distributed.tensor", "Shard")
# FSDP2's dim-0 sharding on top of tensor parallelism; private, so optional (isinstance is False
# where it does not exist).
_StridedShard = _deferred("torch.distributed.tensor.placement_types", "_StridedShard")

__all__ = [
    "STATS",
    "CommStats",
    "DistributedMode",
    "Kernel",
    "MeshLayouts",
    "Topology",
    "all_ranks_agree",
    "any_rank",
    "is_dtensor",
    "local",
    "make_topology",
    "map_matrices",
    "map_owned",
    "placement_of",
    "replicated_world",
    "row_block_dim",
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


@dataclass(frozen=True)
class Topology:
    """Where an optimizer's parameters live and how their work is split (its ``distributed``).

    Attributes:
        mode: ``"auto"`` splits work whenever a process group of size > 1 is initialised;
            ``"off"`` processes every plain matrix on every rank.
        group: process group over which plain (replicated, DDP) parameters are shared and the
            ranks' agreement / NaN checks run (``None``: the default group, or ``mesh``'s).
        mesh: ``DeviceMesh`` that plain parameters are replicated over (all of its ranks) and
            that every ``DTensor`` parameter must live on (checked at construction).
        overlap: start the communication of the next bucket before processing the current one
            (asynchronous collectives, waited for explicitly); ``False`` runs them one by one.
    """

    mode: str = "auto"
    group: Any = None
    mesh: Any = None
    overlap: bool = True

    def __str__(self) -> str:
        return self.mode


def make_topology(
    mode: str, process_group: Any = None, device_mesh: Any = None, overlap: bool = True
) -> Topology:
    """Validated :class:`Topology` of an optimizer's constructor arguments."""
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(
            f"distributed must be one of {', '.join(map(repr, DISTRIBUTED_MODES))}, got {mode!r}"
        )
    if process_group is not None and device_mesh is not None:
        raise ValueError(
            "pass process_group= (plain/DDP parameters) or device_mesh= (DTensor parameters, "
            "and plain ones replicated over its ranks), not both"
        )
    if device_mesh is not None and not hasattr(device_mesh, "get_coordinate"):
        raise ValueError(
            f"device_mesh must be a torch.distributed.device_mesh.DeviceMesh, got "
            f"{type(device_mesh).__name__}"
        )
    if not isinstance(overlap, bool):
        raise ValueError(f"overlap must be True or False, got {overlap!r}")
    return Topology(mode, process_group, device_mesh, overlap)


def _topology(mode: str | Topology) -> Topology:
    return mode if isinstance(mode, Topology) else Topology(mode)


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (a view sharing its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def _is_row_sharded(t: Tensor) -> bool:
    return is_dtensor(t) and t.device_mesh.ndim == 1 and t.placements[0] == Shard(0)


def row_block_dim(t: Tensor) -> int | None:
    """The mesh dimension whose ``Shard(0)`` gives this rank a contiguous block of ``t``'s rows,
    when every other mesh dimension replicates ``t`` (FSDP2's 1-D ``Shard(0)``, HSDP's
    ``(Replicate(), Shard(0))``, a column-parallel weight's ``(Replicate(), Shard(0))``, an
    expert-parallel mesh's ``(Shard(0), Replicate())``); else ``None`` (plain tensors too)."""
    if not is_dtensor(t):
        return None
    dims = [d for d, p in enumerate(t.placements) if not isinstance(p, Replicate)]
    if len(dims) == 1 and t.placements[dims[0]] == Shard(0):
        return dims[0]
    return None


def _shards_rows_only(t: Tensor) -> bool:
    """Every placement of DTensor ``t`` is ``Replicate``, ``Shard(0)`` or ``_StridedShard(0)``:
    each rank holds whole rows (in some order), so per-row state shards with them."""
    return all(isinstance(p, Replicate) or (_is_shard(p) and p.dim == 0) for p in t.placements)


def _is_shard(placement: Any) -> bool:
    """``Shard(d)`` or FSDP2's strided ``_StridedShard(d)`` (both split a tensor dimension)."""
    return isinstance(placement, Shard) or (
        _StridedShard is not None and isinstance(placement, _StridedShard)
    )


def placement_of(t: Tensor) -> str:
    """``"plain"``, or a DTensor's placements and mesh shape, e.g.
    ``"(Replicate(), Shard(dim=0)) on mesh (2, 2)"``: compared across ranks at the first step."""
    if not is_dtensor(t):
        return "plain"
    return f"{tuple(t.placements)} on mesh {tuple(t.device_mesh.shape)}"


# What an optimizer's whole-matrix work and state can serve (``mesh_layouts`` of an optimizer):
# True: any mix of Replicate / Shard(d) / _StridedShard(d) on a 1-D or 2-D mesh (map_matrices
# alone); "rows": placements that split dim 0 only (per-row state packed beside the update, ARO);
# "row_blocks": Replicate except one Shard(0) (contiguous row blocks: low-rank, Dion, NorMuon);
# False: FSDP2's Shard(0) over a 1-D mesh only.
MeshLayouts = bool | Literal["rows", "row_blocks"]
_SERVED = {
    "rows": "placements that shard dim 0 only (Replicate(), Shard(0), FSDP2's strided Shard(0))",
    "row_blocks": "Replicate() with Shard(0) on one mesh dimension (FSDP2, HSDP, column-parallel)",
    False: "Shard(0) over a 1-D mesh (FSDP2's default fully_shard)",
}


def unsupported_layout(t: Tensor, mesh_layouts: MeshLayouts = True, mesh: Any = None) -> str | None:
    """Why the sharded paths cannot handle parameter ``t``; for a clear error at construction.

    ``None`` for plain tensors and for what ``mesh_layouts`` serves (see :data:`MeshLayouts`):
    ``True`` (optimizers whose whole-matrix work goes through :func:`map_matrices`): any mix of
    ``Replicate``, ``Shard(d)`` and ``_StridedShard(d)`` over a 1-D or 2-D mesh; ``"rows"``:
    those that split dim 0 only; ``"row_blocks"``: ``Replicate`` and one ``Shard(0)``;
    ``False``: ``Shard(0)`` over a 1-D mesh. ``mesh`` (an optimizer's ``device_mesh=``): ``t``
    must live on it.
    """
    if not is_dtensor(t):
        return None
    where = (
        f"it is a DTensor with placements {tuple(t.placements)} over a {t.device_mesh.ndim}-D mesh"
    )
    if mesh is not None and t.device_mesh != mesh:
        return (
            f"{where} {t.device_mesh}, not on the optimizer's device_mesh {mesh}; build one "
            "optimizer per mesh (or leave device_mesh unset)"
        )
    if _is_row_sharded(t):
        return None
    bad = [p for p in t.placements if not (_is_shard(p) or isinstance(p, Replicate))]
    if bad or t.device_mesh.ndim > 2:
        return (
            f"{where}; supported are Replicate(), Shard(d) and FSDP2's strided Shard over a "
            "1-D or 2-D mesh (not Partial, which a parameter never is after backward)"
        )
    if mesh_layouts is True:
        return None
    if mesh_layouts == "rows" and _shards_rows_only(t):
        return None
    if mesh_layouts == "row_blocks" and row_block_dim(t) is not None:
        return None
    return (
        f"{where}; this optimizer keeps per-row or per-matrix state of its own and supports "
        f"only {_SERVED[mesh_layouts]}; orthotorch.Muon, ROOT, AuON and SPECTRA take every "
        "HSDP, tensor-parallel and 2-D mesh placement"
    )


def row_range(t: Tensor) -> tuple[int, int]:
    """Global ``[start, stop)`` of the rows this rank holds: its ``Shard(0)`` block (on the mesh
    dimension :func:`row_block_dim` names; the others replicate), else all rows."""
    dim = row_block_dim(t)
    if dim is None:
        return 0, t.shape[0]
    mesh = t.device_mesh
    chunks = _row_chunks(t.shape[0], mesh.size(dim))
    index = mesh.get_local_rank(dim)
    start = sum(chunks[:index])
    return start, start + chunks[index]


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

    A plain ``like`` gives a plain tensor. A ``DTensor`` ``like`` gives a ``DTensor`` on its
    mesh: with ``like``'s placements when ``rows_sharded`` (``like`` must shard its dim 0 only,
    see :func:`unsupported_layout`'s ``"rows"``, and ``shape[0]`` must be its row count, so
    every rank's rows coincide), else replicated over every mesh dimension. Either way
    ``torch.distributed.checkpoint`` then saves and reshards the state like the parameter's.
    """
    dtype = like.dtype if dtype is None else dtype
    if not is_dtensor(like):
        return torch.zeros(tuple(shape), dtype=dtype, device=like.device)
    shape = tuple(shape)
    if rows_sharded:
        if not _shards_rows_only(like) or shape[0] != like.shape[0]:
            raise ValueError(
                f"zeros_state: rows_sharded state of shape {shape} needs a parameter sharded "
                f"on dim 0 only with {shape[0]} rows, got shape {tuple(like.shape)} with "
                f"placements {tuple(like.placements)}"
            )
        rows = local(like).shape[0]
        local_t = torch.zeros((rows, *shape[1:]), dtype=dtype, device=local(like).device)
        placements = list(like.placements)
    else:
        local_t = torch.zeros(shape, dtype=dtype, device=local(like).device)
        placements = [Replicate()] * like.device_mesh.ndim
    return DTensor.from_local(
        local_t,
        like.device_mesh,
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


def wrap_like(t: Tensor, like: Tensor, shape: Sequence[int] | None = None) -> Tensor:
    """The local tensor ``t`` as a ``DTensor`` with ``like``'s mesh, placements and global shape
    (``t`` itself when ``like`` is a plain tensor); no communication.

    ``shape``: another global shape (contiguous), for a tensor sharded like ``like`` along the
    dimensions its placements split, e.g. per-row state packed beside a row-sharded momentum
    (``like``'s placements must then split only dimensions ``shape`` shares with it).
    """
    if not is_dtensor(like):
        return t
    if shape is None:
        shape, stride = like.shape, like.stride()
    else:
        shape = torch.Size(shape)
        stride = _contiguous_stride(shape)
    return DTensor.from_local(
        t, like.device_mesh, like.placements, run_check=False, shape=shape, stride=stride
    )


def replicated_world(mode: str | Topology) -> tuple[int, int] | None:
    """``(rank, world_size)`` of the group plain (replicated) parameters are shared over (the
    default group, or the optimizer's ``process_group``/``device_mesh``) when work should be
    split, else ``None``."""
    found = _replicated(mode)
    return None if found is None else found[:2]


def _replicated(mode: str | Topology) -> tuple[int, int, Any] | None:
    topology = _topology(mode)
    if topology.mode == "off" or not dist.is_available() or not dist.is_initialized():
        return None
    group = _plain_group(topology)
    world = dist.get_world_size(group)
    return (dist.get_rank(group), world, group) if world > 1 else None


def _plain_group(topology: Topology) -> Any:
    if topology.mesh is not None:
        return _mesh_group(topology.mesh, tuple(range(topology.mesh.ndim)))
    return topology.group


# Process groups over several mesh dimensions, created once per (mesh, dims).
_FLAT_GROUPS: dict[tuple[Any, tuple[int, ...]], Any] = {}


def _mesh_group(mesh: Any, dims: tuple[int, ...]) -> Any:
    """The process group of the ranks that differ from this one only along mesh ``dims``.

    One dimension: the mesh's own group. Several: the default group when they span a mesh of
    the whole world, else the mesh's flattened sub-mesh (``DeviceMesh._flatten``, which every
    rank of the mesh must reach in the same order: the first step of the same optimizer).
    """
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    key = (mesh, dims)
    if key not in _FLAT_GROUPS:
        if len(dims) == mesh.ndim and mesh.mesh.numel() == dist.get_world_size():
            group = dist.group.WORLD
        elif mesh.mesh_dim_names:
            names = mesh.mesh_dim_names
            sub = mesh if len(dims) == mesh.ndim else mesh[tuple(names[d] for d in dims)]
            group = sub._flatten().get_group()
        else:
            raise ValueError(
                f"a DTensor sharded over mesh dimensions {dims} of {mesh} that does not span "
                "the whole world needs named mesh dimensions (init_device_mesh(..., "
                "mesh_dim_names=(...))) to build their process group"
            )
        _FLAT_GROUPS[key] = group
    return _FLAT_GROUPS[key]


def _check_group(tensors: Sequence[Tensor], mode: str | Topology) -> tuple[bool, Any]:
    """``(needed, group)`` for decisions all ranks must share (agreement, NaN, has-gradient):
    the optimizer's explicit group or mesh, else the first DTensor's whole mesh, else the group
    of plain parameters."""
    topology = _topology(mode)
    if not dist.is_available() or not dist.is_initialized():
        return False, None
    if topology.group is not None or topology.mesh is not None:
        group = _plain_group(topology)
    else:
        mesh = next((t.device_mesh for t in tensors if is_dtensor(t)), None)
        if mesh is None:
            found = _replicated(topology)
            return found is not None, None if found is None else found[2]
        group = _mesh_group(mesh, tuple(range(mesh.ndim)))
    return dist.get_world_size(group) > 1, group


def _shard_group(t: Tensor) -> Any:
    """The group of the ranks holding the other shards of DTensor ``t`` (those that differ
    from this one along the mesh dimensions that shard it): ``None`` when none does."""
    mesh = t.device_mesh
    dims = tuple(d for d, p in enumerate(t.placements) if not isinstance(p, Replicate))
    if not dims or math.prod(mesh.shape[d] for d in dims) == 1:
        return None
    return _mesh_group(mesh, dims)


def any_rank(flags: Tensor, tensors: Sequence[Tensor], mode: str | Topology) -> Tensor:
    """Element-wise OR of a bool/int tensor over the ranks that share ``tensors``' parameters.

    Used so that a decision taken from local data (a non-finite gradient shard, a missing
    gradient) is taken identically on every rank: a rank that raised or skipped alone would
    leave the others waiting in the next collective forever.
    """
    needed, group = _check_group(tensors, mode)
    if not needed:
        return flags
    reduced = flags.to(torch.int32)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
    STATS.collectives += 1
    return reduced.to(flags.dtype)


def all_ranks_agree(
    signature: list, tensors: Sequence[Tensor], mode: str | Topology, what: str
) -> None:
    """Raise ``ValueError`` on every rank unless all ranks pass the same ``signature``."""
    needed, group = _check_group(tensors, mode)
    if not needed:
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
        updates: per-parameter tensors; plain tensors (replicated over the topology's group),
            or ``DTensor`` objects over 1-D or 2-D meshes with any mix of ``Replicate()``,
            ``Shard(d)`` and ``_StridedShard(d)`` placements.
        kernel: ``(X, transposed) -> Y`` on a wide ``(k, m, n)`` stack in ``compute_dtype``.
        compute_dtype: dtype the matrices are stacked and communicated in.
        mode: ``"auto"`` splits work whenever a process group of size > 1 is initialised;
            ``"off"`` processes every matrix locally (DTensor inputs still need the sharded
            path); or a :class:`Topology` (explicit group or mesh, overlap switch).
        layouts: how each update is seen as matrices (:mod:`orthotorch.functional.layout`;
            ``None``: ``flatten`` for all). Each matrix of a layout (an expert, a q/k/v block)
            is processed as its own matrix. A ``batch`` tensor sharded on its leading (expert)
            dimensions holds whole matrices on every rank and needs no gather.
        scale: ``(rows, cols) -> factor`` applied to each result matrix (the optimizer's shape
            scale), with ``(rows, cols)`` the matrix in the layer's ``(out, in)`` orientation.

    Returns:
        One direction per update, shaped like its local tensor (``local(update)``), in
        ``compute_dtype``.
    """
    layouts = [FLATTEN] * len(updates) if layouts is None else list(layouts)
    if len(layouts) != len(updates):
        raise ValueError(f"map_matrices: {len(layouts)} layouts for {len(updates)} updates")
    topology = _topology(mode)
    if any(is_dtensor(u) for u in updates):
        return _map_mesh(updates, layouts, kernel, compute_dtype, scale, topology)
    found = _replicated(topology)
    world, group = (None, None) if found is None else (found[:2], found[2])
    return _map_plain(
        updates, layouts, kernel, compute_dtype, scale, world, group, overlap=topology.overlap
    )[0]


def _map_plain(
    updates: list[Tensor],
    layouts: list[MatrixLayout],
    kernel: Kernel,
    compute_dtype: torch.dtype,
    scale: Callable[[tuple[int, int]], float] | None,
    world: tuple[int, int] | None,
    group: Any = None,
    counter: int = 0,
    overlap: bool = False,
) -> tuple[list[Tensor], int]:
    """Plain (or local) tensors: every matrix locally, or round-robin owners + all_gather."""
    matrices = layout_matrices(updates, layouts)
    if world is None:
        buckets = bucket_by_shape(matrices, compute_dtype)
        for b in buckets:
            b.X = kernel(b.X, b.transposed)
            if not torch.compiler.is_compiling():  # a global counter would recompile each step
                STATS.matrices_processed += len(b.index)
    else:
        buckets, counter = _map_replicated(
            matrices, kernel, compute_dtype, *world, group, counter, overlap
        )
    results: list[Tensor] = [None] * len(matrices)  # type: ignore[list-item]
    for b in buckets:
        factor = 1.0 if scale is None else scale(b.shape)
        if factor != 1.0:
            b.X.mul_(factor)
        for j, d in zip(b.index, b.directions(), strict=True):
            results[j] = d
    return _assemble(updates, layouts, results), counter


def _assemble(
    tensors: list[Tensor], layouts: list[MatrixLayout], matrices: list[Tensor]
) -> list[Tensor]:
    """Per-tensor results from per-matrix results (the inverse of ``layout_matrices``)."""
    out, position = [], 0
    for t, layout in zip(tensors, layouts, strict=True):
        count = len(layout.block_shapes(t.shape))
        out.append(layout.assemble(matrices[position : position + count], t.shape, t.device))
        position += count
    return out


def _row_blocks_of(tensors: Sequence[Tensor], what: str) -> tuple[Any, int]:
    """``(mesh, dim)`` shared by ``tensors``, all row blocks (:func:`row_block_dim`) on the same
    mesh dimension; ``ValueError`` naming the first that is not."""
    found = None
    for t in tensors:
        dim = row_block_dim(t)
        here = None if dim is None else (t.device_mesh, dim)
        if here is None or (found is not None and here != found):
            placement = getattr(t, "placements", "plain tensor")
            raise ValueError(
                f"{what} supports DTensors sharded on dim 0 along one mesh dimension (the "
                "others replicated) and all alike; got shape "
                f"{tuple(t.shape)} with {placement}. Do not mix DTensor and plain parameters "
                "in one group."
            )
        found = here
    assert found is not None
    return found


# ----------------------------------------------------------------- any mesh: owners over the mesh
# Bytes (in the compute dtype) of whole matrices per bucket of the mesh path. With overlap, the
# exchange of bucket k + 1 runs while bucket k is processed: large enough to batch same-shape
# matrices into one kernel call, small enough that a model has several buckets to pipeline.
BUCKET_BYTES = 8 * 2**20


@lru_cache(maxsize=4096)
def _index_map(
    shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    placements: tuple,
    coord: tuple[int, ...],
    device: torch.device,
) -> Tensor | slice:
    """Flat global indices of the elements the rank at mesh ``coord`` holds, in its local order
    (a ``slice`` when they are one contiguous range, as for ``Shard(0)`` on a 1-D mesh).

    Each mesh dimension's placement splits ``arange(numel)`` in turn with the placement's own
    split (``torch.chunk`` semantics; ``_StridedShard`` interleaves): no communication, and
    exactly DTensor's layout for every placement it defines. Cached per shape, placement,
    coordinate and device (a map costs 8 bytes per element, only for strided or column
    shards; contiguous ranges are kept as slices).
    """
    t = torch.arange(math.prod(shape), device=device).view(shape)
    for size, placement, c in zip(mesh_shape, placements, coord, strict=True):
        if _is_shard(placement):
            t = placement._split_tensor(t, size, with_padding=False, contiguous=False)[0][c]
    flat = t.reshape(-1)
    first = int(flat[0]) if flat.numel() else 0
    if torch.equal(flat, torch.arange(first, first + flat.numel(), device=device)):
        return slice(first, first + flat.numel())
    return flat.clone()


def _numel(index: Tensor | slice) -> int:
    return index.stop - index.start if isinstance(index, slice) else index.numel()


@dataclass(frozen=True)
class _Peers:
    """The ranks that differ from this one only along some mesh dimensions."""

    group: Any  # None: a group of one (this rank)
    coords: tuple[tuple[int, ...], ...]  # mesh coordinate of each group rank
    me: int  # this rank's group rank


def _peers(mesh: Any, dims: tuple[int, ...]) -> _Peers:
    coord = tuple(mesh.get_coordinate())
    if math.prod(mesh.shape[d] for d in dims) == 1:
        return _Peers(None, (coord,), 0)
    group = _mesh_group(mesh, dims)
    grid = mesh.mesh
    coords = tuple(
        tuple(int(x) for x in (grid == r).nonzero()[0]) for r in dist.get_process_group_ranks(group)
    )
    return _Peers(group, coords, dist.get_rank(group))


@dataclass
class _Part:
    """One matrix in the mesh path: its owner and where every shard peer's piece of it lies.

    A ``flatten`` update is one matrix; an update with another layout (a fused q/k/v, an
    expert stack sharded by rows or columns) is one part per matrix of the layout, each with
    its own owner, so the work splits per matrix rather than per parameter.
    """

    i: int  # position in map_matrices' updates
    shape: tuple[int, int]  # the matrix (out, in), as the layout sees it
    replica: int  # the replica slice (rank in the replicated-dims group) that owns it
    owner: int  # the owner's rank in that slice's shard group
    maps: list[Tensor | slice]  # per shard-group rank: flat positions of its piece in the matrix
    sizes: list[int]  # per shard-group rank: numel of its piece
    sel: Tensor | slice | None  # flat positions of my piece in my local tensor (None: all)


@lru_cache(maxsize=4096)
def _block_maps(
    shape: tuple[int, ...],
    mesh_shape: tuple[int, ...],
    placements: tuple,
    coords: tuple[tuple[int, ...], ...],
    device: torch.device,
    layout: MatrixLayout,
    block: int,
) -> tuple[tuple[Tensor | slice, ...], tuple[Tensor | slice, ...]]:
    """For matrix ``block`` of ``layout`` over a tensor of global ``shape``: per rank at mesh
    coordinate ``coords[s]``, where its elements of the matrix lie in the matrix (flat,
    row-major) and in its local tensor (flat). No communication; cached like
    :func:`_index_map`."""
    numel = math.prod(shape)
    index = layout.matrices(torch.arange(numel, device=device).view(shape))[block]
    inverse = torch.full((numel,), -1, dtype=torch.long, device=device)
    inverse[index.reshape(-1)] = torch.arange(index.numel(), device=device)
    dests, sels = [], []
    for coord in coords:
        held = _index_map(shape, mesh_shape, placements, coord, device)
        position = inverse[held]
        sel = (position >= 0).nonzero().squeeze(1)
        dests.append(_as_slice(position[sel]))
        sels.append(_as_slice(sel))
    return tuple(dests), tuple(sels)


def _as_slice(index: Tensor) -> Tensor | slice:
    """``index`` as a ``slice`` when it is one contiguous ascending range (cheap copies)."""
    first = int(index[0]) if index.numel() else 0
    step = torch.arange(first, first + index.numel(), device=index.device)
    return slice(first, first + index.numel()) if torch.equal(index, step) else index


def _take(t: Tensor, sel: Tensor | slice | None) -> Tensor:
    flat = t.reshape(-1)
    return flat if sel is None else flat[sel]


@dataclass
class _Pending:
    """A collective in flight (``work`` from ``async_op=True``) and the buffer it fills."""

    work: Any
    buffer: Tensor

    def wait(self) -> Tensor:
        if self.work is not None:
            self.work.wait()
        return self.buffer


def _cat(pieces: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype, device=device)


def _map_mesh(
    updates: list[Tensor],
    layouts: list[MatrixLayout],
    kernel: Kernel,
    compute_dtype: torch.dtype,
    scale: Callable[[tuple[int, int]], float] | None,
    topology: Topology,
) -> list[Tensor]:
    """DTensors on any mesh (and plain tensors beside them, replicated over the topology's
    group): owners over the mesh dimensions that shard each update, replicas splitting them."""
    results: list[Tensor] = [None] * len(updates)  # type: ignore[list-item]
    plain = [i for i, u in enumerate(updates) if not is_dtensor(u)]
    if plain:
        found = _replicated(topology)
        world, group = (None, None) if found is None else (found[:2], found[2])
        directions, _ = _map_plain(
            [updates[i] for i in plain],
            [layouts[i] for i in plain],
            kernel,
            compute_dtype,
            scale,
            world,
            group,
            overlap=topology.overlap,
        )
        for i, d in zip(plain, directions, strict=True):
            results[i] = d
    by_sharding: dict[tuple[Any, tuple[int, ...]], list[int]] = defaultdict(list)
    for i, u in enumerate(updates):
        if is_dtensor(u):
            dims = tuple(d for d, p in enumerate(u.placements) if _is_shard(p))
            by_sharding[(u.device_mesh, dims)].append(i)
    counters: dict[Any, int] = defaultdict(int)
    for (mesh, shard_dims), index in by_sharding.items():
        replica_dims = tuple(d for d in range(mesh.ndim) if d not in shard_dims)
        shard, replica = _peers(mesh, shard_dims), _peers(mesh, replica_dims)
        # A batch of matrices sharded only on its leading (batch) dimensions, e.g. an expert
        # stack sharded by experts, holds whole matrices on every rank: no gather; the
        # replicated dimensions still split them (round robin + all_gather).
        whole = [
            i
            for i in index
            if layouts[i].batch
            and all(p.dim < updates[i].ndim - 2 for p in updates[i].placements if _is_shard(p))
        ]
        if whole:
            world = (replica.me, len(replica.coords)) if len(replica.coords) > 1 else None
            directions, counters[mesh] = _map_plain(
                [local(updates[i]) for i in whole],
                [layouts[i] for i in whole],
                kernel,
                compute_dtype,
                scale,
                world,
                replica.group,
                counters[mesh],
                topology.overlap,
            )
            for i, d in zip(whole, directions, strict=True):
                results[i] = d
        rest = [i for i in index if i not in whole]
        if rest:
            parts = _plan(updates, layouts, rest, mesh, shard_dims, shard, replica, counters[mesh])
            counters[mesh] += len(parts)
            _exchange(
                updates, parts, kernel, compute_dtype, scale, shard, replica, topology, results
            )
    return results


def _plan(
    updates: list[Tensor],
    layouts: list[MatrixLayout],
    index: list[int],
    mesh: Any,
    shard_dims: tuple[int, ...],
    shard: _Peers,
    replica: _Peers,
    counter: int,
) -> list[_Part]:
    """Owners round robin over the mesh's ranks in row-major order, one matrix at a time
    (same-shape matrices adjacent, so they batch on their owners): every rank of the mesh
    does its share +-1 matrix, whichever dimensions shard which update. Every rank computes
    the same plan, so the collectives match."""
    replica_dims = tuple(d for d in range(mesh.ndim) if d not in shard_dims)
    owner_of = {tuple(c[d] for d in shard_dims): s for s, c in enumerate(shard.coords)}
    replica_of = {tuple(c[d] for d in replica_dims): r for r, c in enumerate(replica.coords)}
    entries = []
    for i in index:
        shapes = layouts[i].block_shapes(tuple(updates[i].shape))
        for block, shape in enumerate(shapes):
            entries.append((shape, tuple(updates[i].shape), str(layouts[i]), i, block))
    entries.sort()
    parts = []
    for j, (shape, _, _, i, block) in enumerate(entries):
        u = updates[i]
        coord = _unravel((counter + j) % math.prod(mesh.shape), tuple(mesh.shape))
        key = (tuple(u.shape), tuple(u.device_mesh.shape), tuple(u.placements))
        device = local(u).device
        if layouts[i].is_flatten:
            maps: Sequence[Tensor | slice] = [_index_map(*key, c, device) for c in shard.coords]
            sel = None
        else:
            maps, sels = _block_maps(*key, shard.coords, device, layouts[i], block)
            sel = sels[shard.me]
        parts.append(
            _Part(
                i,
                shape,
                replica_of[tuple(coord[d] for d in replica_dims)],
                owner_of[tuple(coord[d] for d in shard_dims)],
                list(maps),
                [_numel(m) for m in maps],
                sel,
            )
        )
    return parts


def _unravel(k: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    coord = []
    for size in reversed(shape):
        k, c = divmod(k, size)
        coord.append(c)
    return tuple(reversed(coord))


def _buckets(parts: list[_Part], dtype: torch.dtype) -> list[list[_Part]]:
    buckets: list[list[_Part]] = [[]]
    size, limit = 0, BUCKET_BYTES // torch.empty(0, dtype=dtype).element_size()
    for part in parts:
        numel = part.shape[0] * part.shape[1]
        if buckets[-1] and size + numel > limit:
            buckets.append([])
            size = 0
        buckets[-1].append(part)
        size += numel
    return buckets


def _exchange(
    updates: list[Tensor],
    parts: list[_Part],
    kernel: Kernel,
    dtype: torch.dtype,
    scale: Callable[[tuple[int, int]], float] | None,
    shard: _Peers,
    replica: _Peers,
    topology: Topology,
    results: list[Tensor],
) -> None:
    """Pieces to owners, whole updates processed there, pieces back, replicas completed.

    Per bucket, in every rank's slice (the ranks sharing its replicated coordinates):
    ``all_to_all`` over the shard group brings each piece of an update the slice owns to its
    owner; the owner places the pieces by their index maps, runs the layout's matrices, and a
    second ``all_to_all`` returns the pieces; an ``all_gather`` over the replica group then
    gives each rank its pieces of the updates the other slices own. With ``topology.overlap``
    the exchange of the next bucket is in flight while this one is processed.
    """
    device = local(updates[parts[0].i]).device
    S, me = len(shard.coords), shard.me
    overlap = topology.overlap

    def to_owners(bucket: list[_Part]) -> tuple[list[_Part], list[int], list[int], _Pending]:
        slice_parts = [p for p in bucket if p.replica == replica.me]
        by_owner = [[p for p in slice_parts if p.owner == s] for s in range(S)]
        owned = by_owner[me]
        send = _cat(
            [_take(local(updates[p.i]), p.sel).to(dtype) for s in range(S) for p in by_owner[s]],
            dtype,
            device,
        )
        send_sizes = [sum(p.sizes[me] for p in by_owner[s]) for s in range(S)]
        recv_sizes = [sum(p.sizes[s] for p in owned) for s in range(S)]
        pending = _start_all_to_all(send, send_sizes, recv_sizes, shard, overlap)
        return slice_parts, send_sizes, recv_sizes, pending

    def process(bucket: list[_Part], sent: tuple) -> tuple:
        slice_parts, send_sizes, recv_sizes, pending = sent
        owned = [p for p in slice_parts if p.owner == me]
        pieces = pending.wait().split(recv_sizes)
        whole = [torch.empty(p.shape, dtype=dtype, device=device) for p in owned]
        for s in range(S):
            for p, piece, full in zip(owned, pieces[s].split([p.sizes[s] for p in owned]), whole):
                full.view(-1)[p.maps[s]] = piece
        flat = [FLATTEN] * len(owned)
        directions, _ = _map_plain(whole, flat, kernel, dtype, scale, None)
        back = _cat(
            [d.reshape(-1)[p.maps[s]] for s in range(S) for p, d in zip(owned, directions)],
            dtype,
            device,
        )
        return (
            slice_parts,
            send_sizes,
            _start_all_to_all(back, recv_sizes, send_sizes, shard, overlap),
        )

    def complete(bucket: list[_Part], returned: tuple) -> tuple:
        slice_parts, send_sizes, pending = returned
        by_owner = pending.wait().split(send_sizes)
        mine: dict[int, Tensor] = {}
        for s in range(S):
            owned_by_s = [p for p in slice_parts if p.owner == s]
            for p, piece in zip(owned_by_s, by_owner[s].split([p.sizes[me] for p in owned_by_s])):
                mine[id(p)] = piece
        R = len(replica.coords)
        per_replica = [sum(p.sizes[me] for p in bucket if p.replica == r) for r in range(R)]
        # Same sizes on every rank of the replica group (same shard coordinate): an all-empty
        # gather (this rank's pieces of the bucket are empty shards) is skipped by all of them.
        if R == 1 or max(per_replica) == 0:
            empty = torch.empty(0, dtype=dtype, device=device)
            return bucket, {id(p): mine.get(id(p), empty) for p in bucket}, None
        block = torch.zeros(max(per_replica), dtype=dtype, device=device)
        if slice_parts:
            torch.cat([mine[id(p)] for p in slice_parts], out=block[: per_replica[replica.me]])
        return bucket, per_replica, _start_all_gather(block, replica, overlap)

    def unpack(done: tuple) -> None:
        bucket, got, pending = done
        if pending is None:
            pieces = got
        else:
            per_replica, pieces = got, {}
            blocks = pending.wait().view(len(replica.coords), -1)
            for r, block in enumerate(blocks):
                in_r = [p for p in bucket if p.replica == r]
                sizes = [p.sizes[me] for p in in_r]
                for p, piece in zip(in_r, block[: per_replica[r]].split(sizes)):
                    pieces[id(p)] = piece
        for p in bucket:
            if p.sel is None:
                results[p.i] = pieces[id(p)].reshape(local(updates[p.i]).shape)
            else:  # one matrix of a layout: its elements in this rank's local tensor
                if p.i not in assembled:
                    numel = local(updates[p.i]).numel()
                    assembled[p.i] = torch.empty(numel, dtype=dtype, device=device)
                assembled[p.i][p.sel] = pieces[id(p)]

    # The matrices of a layout partition its tensor: every element is written once.
    assembled: dict[int, Tensor] = {}
    buckets = _buckets(parts, dtype)
    if not overlap:
        for bucket in buckets:
            unpack(complete(bucket, process(bucket, to_owners(bucket))))
    else:
        _pipeline(buckets, to_owners, process, complete, unpack)
    for i, flat_result in assembled.items():
        results[i] = flat_result.view(local(updates[i]).shape)


def _pipeline(
    buckets: list[list[_Part]],
    to_owners: Callable,
    process: Callable,
    complete: Callable,
    unpack: Callable,
) -> None:
    """Bucket k + 1's pieces travel while bucket k is processed; the returns and the replica
    gathers are all in flight before the first is waited for."""
    sent = to_owners(buckets[0])
    returned = []
    for k, bucket in enumerate(buckets):
        following = to_owners(buckets[k + 1]) if k + 1 < len(buckets) else None
        returned.append(process(bucket, sent))
        sent = following
    done = [complete(bucket, r) for bucket, r in zip(buckets, returned, strict=True)]
    for d in done:
        unpack(d)


def _start_all_to_all(
    send: Tensor, send_sizes: list[int], recv_sizes: list[int], peers: _Peers, async_op: bool
) -> _Pending:
    if peers.group is None:
        return _Pending(None, send)
    recv = torch.empty(sum(recv_sizes), dtype=send.dtype, device=send.device)
    work = dist.all_to_all_single(
        recv, send.contiguous(), recv_sizes, send_sizes, group=peers.group, async_op=async_op
    )
    STATS.collectives += 1
    STATS.bytes_sent += (sum(send_sizes) - send_sizes[peers.me]) * send.element_size()
    return _Pending(work, recv)


def _start_all_gather(block: Tensor, peers: _Peers, async_op: bool) -> _Pending:
    world = len(peers.coords)
    out = torch.empty(world * block.numel(), dtype=block.dtype, device=block.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(out, block, group=peers.group, async_op=async_op)
    STATS.collectives += 1
    STATS.bytes_sent += block.numel() * block.element_size() * (world - 1)
    return _Pending(work, out)


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
    overlap: bool = False,
) -> tuple[list[Bucket], int]:
    # With overlap, each shape's all_gather runs while the next shape is orthogonalized.
    gathers = []
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
        work = _all_gather_single(received, send, group, async_op=overlap)
        gathers.append((shape, index, owners, per_rank, received, work))
    buckets = []
    for shape, index, owners, per_rank, received, work in gathers:
        if work is not None:
            work.wait()
        X = torch.empty(
            (len(index), *received.shape[1:]), dtype=received.dtype, device=received.device
        )
        slot = [0] * world
        for i, owner in enumerate(owners):
            X[i] = received[owner * per_rank + slot[owner]]
            slot[owner] += 1
        buckets.append(Bucket(shape, index, X))
    return buckets, counter


def _all_gather_single(
    output: Tensor, input: Tensor, group: Any = None, async_op: bool = False
) -> Any:
    # Renamed in recent torch; the old name still works there but warns.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(output, input, group=group, async_op=async_op)
    STATS.collectives += 1
    STATS.bytes_sent += input.numel() * input.element_size() * (dist.get_world_size(group) - 1)
    return work


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
    shards: list[Tensor],
    rows: int,
    cols: int,
    owners: list[int],
    peers: tuple[int, int, Any],
    dtype: torch.dtype,
) -> tuple[Tensor, _Exchange]:
    """All-to-all of row shards over ``peers = (rank, world, group)``: returns
    ``(len(mine), rows, cols)``, the matrices I own, whole."""
    rank, world, group = peers
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
    recv = _all_to_all(send, ex.send_sizes, ex.recv_sizes, group, rank)
    # Row blocks of a contiguous parameter-orientation buffer: cheap copies.
    pieces = list(recv.split(ex.recv_sizes))
    full = torch.empty((len(mine), rows, cols), dtype=dtype, device=device)
    start = 0
    for s in range(world):
        full[:, start : start + chunks[s]] = pieces[s].view(len(mine), chunks[s], cols)
        start += chunks[s]
    return full, ex


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
        mesh, dim = _row_blocks_of(inputs, "map_owned")
        # The replicas (other mesh dimensions) each repeat the same exchange among their
        # shards: the results are equal everywhere without a collective across replicas.
        rank, world, group = mesh.get_local_rank(dim), mesh.size(dim), mesh.get_group(dim)
    else:
        replicated = _replicated(mode)
        if replicated is None:
            STATS.owned_results += len(inputs)
            return [fn(i, t.reshape(matrix_shape(t.shape))) for i, t in enumerate(inputs)]
        (rank, world, group), mesh = replicated, None
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
            full, ex = _to_owners(shards, rows, cols, bucket_owners, (rank, world, group), dtype)
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
    """In place, each tensor becomes the sum of its values over the shards of ``like``.

    For a projection on the sharded side of a row-sharded ``G``:
    ``P^T G = sum_s P[rows_s]^T G[rows_s]``, each rank holding one term. The sum runs over the
    ranks that hold the other shards of a ``DTensor`` (the mesh dimensions that shard it; a
    replicated dimension, HSDP's, already holds equal terms). ``like`` parallel to
    ``partials`` (same length): each partial is summed over its own tensor's shards; else all
    over the first ``DTensor``'s. One ``all_reduce`` per group and dtype; ``bytes_sent``
    counts the ring algorithm's ``2 (W - 1) / W`` of the buffer (the least any all-reduce
    sends; the backend may send more).
    """
    if not partials:
        return
    if len(like) == len(partials):
        groups = [_shard_group(t) if is_dtensor(t) else None for t in like]
    else:
        first = next((t for t in like if is_dtensor(t)), None)
        groups = [None if first is None else _shard_group(first)] * len(partials)
    keys = [(id(g), t.dtype) for g, t in zip(groups, partials, strict=True)]
    for index in _positions(keys).values():
        group = groups[index[0]]
        if group is None:
            continue
        world = dist.get_world_size(group)
        flat = torch.cat([partials[i].reshape(-1) for i in index])
        dist.all_reduce(flat, group=group)
        STATS.collectives += 1
        STATS.bytes_sent += 2 * (world - 1) * flat.numel() * flat.element_size() // world
        for i, piece in zip(index, flat.split([partials[i].numel() for i in index]), strict=True):
            partials[i].copy_(piece.view_as(partials[i]))
