"""Optimizer step time and bytes sent per step, 1 vs 2 processes, on the reference parameter set.

Replicated (DDP-style plain tensors) and sharded (FSDP2-style DTensors, Shard(0)) layouts, gloo
on CPU. Each configuration runs in freshly spawned processes; median of --repeats steps after
3 warm-up steps; rank 0 reports. "sent / ortho. bytes" divides the bytes this rank sent per step
by the fp32 size of the orthogonalized (or low-rank) matrices; the issue's target is <= 2x.

Optimizers: ``Muon``; ``DCTAdamW-ortho`` (DCTAdamW, orthogonalize=True, rank 1/4, subspace
refresh every ``--update-every`` steps, default 200 as in GaLore, so the measured steps are
steady-state ones); ``DCTAdamW-ortho-refresh`` (refresh at every step: the worst case, each
gradient gathered whole on its owner every step).

    python benchmarks/distributed_step.py [--repeats 10] [--optimizers Muon,DCTAdamW-ortho]
    python benchmarks/distributed_step.py --quick  # smoke test

``--layouts`` (issue 15) instead measures Muon on 4 processes at production layouts: DDP
(plain tensors), FSDP 1x4 (``Shard(0)``), HSDP 2x2 (``Replicate, Shard(0)``), FSDP+TP 2x2
(``_StridedShard(0), Shard(0)`` for column-parallel weights, ``Shard(0), Shard(1)`` for
row-parallel ``wo``/``down``) and TP 2x2 (``Replicate, Shard(0|1)``): bytes sent per step by
the busiest rank as a fraction of the orthogonalized parameters' fp32 size, and step time with
and without overlap (two optimizers over the same parameters, stepped alternately, so both see
the same machine load; one thread per process). With ``--quick``: 2 repeats on a quarter-width
parameter set.

    python benchmarks/distributed_step.py --layouts [--repeats 10] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import orthotorch
from orthotorch import distributed as odist
from orthotorch.bench.reference import reference_named_parameters, set_random_gradients

try:
    from torch.distributed.tensor import Shard, distribute_tensor
except ImportError:  # pragma: no cover
    Shard = distribute_tensor = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_optimizer(name: str, hidden: list, adamw: list, update_every: int):
    groups = [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}]
    if name == "Muon":
        return orthotorch.Muon(groups, lr=0.02, adamw_lr=3e-3)
    if name.startswith("DCTAdamW-ortho"):
        every = 1 if name.endswith("-refresh") else update_every
        return orthotorch.DCTAdamW(
            groups, lr=0.02, rank=0.25, orthogonalize=True, update_every=every, adamw_lr=3e-3
        )
    raise ValueError(f"unknown optimizer {name!r}; use Muon, DCTAdamW-ortho[-refresh]")


def worker(
    rank: int,
    world: int,
    port: int,
    layout: str,
    repeats: int,
    queue,
    name: str = "Muon",
    update_every: int = 200,
    quick: bool = False,
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    hidden, adamw = reference_named_parameters(0)
    if quick:  # a smoke test: two matrices and one AdamW tensor of the reference set
        hidden, adamw = hidden[:2], adamw[-1:]
    warmup = 1 if quick else 3
    if layout == "sharded":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))

        def shard(named):
            return [
                (n, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))) for n, p in named
            ]

        hidden, adamw = shard(hidden), shard(adamw)
    opt = make_optimizer(name, hidden, adamw, update_every)
    params = [p for _, p in hidden + adamw]
    times, sent = [], []
    for r in range(warmup + repeats):
        if layout == "sharded":
            gen = torch.Generator().manual_seed(r)
            for p in params:
                full = torch.randn(p.shape, generator=gen)
                p.grad = distribute_tensor(full, p.device_mesh, [Shard(0)])
        else:
            set_random_gradients(params, seed=r)
        odist.STATS.reset()
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        dist.barrier()
        if r >= warmup:
            times.append(time.perf_counter() - t0)
            sent.append(odist.STATS.bytes_sent)
    ortho_bytes = sum(p.numel() * 4 for _, p in hidden)
    if rank == 0:
        queue.put((statistics.median(times), statistics.median(sent), ortho_bytes))
        # put() hands the item to a feeder thread; os._exit below would kill that thread
        # before it writes, leaving the parent waiting for a result that never comes.
        queue.close()
        queue.join_thread()
    dist.barrier()
    # Skip gloo teardown, which intermittently aborts after the work is done.
    os._exit(0)


def run(
    world: int,
    layout: str,
    repeats: int,
    name: str = "Muon",
    update_every: int = 200,
    quick: bool = False,
) -> tuple[float, float, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=worker,
            args=(r, world, port, layout, repeats, queue, name, update_every, quick),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join()
    return result


# ------------------------------------------------------------------ production layouts, 4 ranks
ROWWISE = (".wo", ".down")  # row-parallel (Shard(1) under TP); the others column-parallel
LAYOUTS = ("ddp", "fsdp_1x4", "hsdp_2x2", "fsdp_tp_2x2", "tp_2x2")


def layout_placements(layout: str, name: str) -> tuple[tuple[int, ...], tuple[str, ...], list]:
    """Mesh shape, mesh dim names and placements of weight ``name`` under ``layout``."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.placement_types import _StridedShard

    rowwise = name.endswith(ROWWISE)
    if layout == "fsdp_1x4":
        return (4,), ("shard",), [Shard(0)]
    if layout == "hsdp_2x2":
        return (2, 2), ("rep", "shard"), [Replicate(), Shard(0)]
    if layout == "fsdp_tp_2x2":
        tp = [Shard(0), Shard(1)] if rowwise else [_StridedShard(0, split_factor=2), Shard(0)]
        return (2, 2), ("dp", "tp"), tp
    if layout == "tp_2x2":
        return (2, 2), ("dp", "tp"), [Replicate(), Shard(1) if rowwise else Shard(0)]
    raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")


def layout_worker(
    rank: int, world: int, port: int, layout: str, repeats: int, quick: bool, queue
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    hidden, adamw = reference_named_parameters(0)
    if quick:  # a quarter of each dimension: the same structure, 1/16 of the work
        hidden = [(n, p.detach()[::4, ::4].clone()) for n, p in hidden]
        adamw = [(n, p.detach()[..., ::4].clone()) for n, p in adamw]
    meshes: dict = {}

    def place(name: str, p: torch.Tensor) -> torch.Tensor:
        if layout == "ddp":
            return p.detach().clone()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate

        shape, names, placements = layout_placements(layout, name)
        if p.ndim == 1:  # norms: replicated
            placements = [Replicate()] * len(shape)
        if (shape, names) not in meshes:
            meshes[(shape, names)] = init_device_mesh("cpu", shape, mesh_dim_names=names)
        # Every rank holds the same full tensor: split locally, no scatter.
        return distribute_tensor(p.detach(), meshes[(shape, names)], placements, src_data_rank=None)

    hidden = [(n, nn.Parameter(place(n, p))) for n, p in hidden]
    adamw = [(n, nn.Parameter(place(n, p))) for n, p in adamw]
    groups = [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}]
    opts = {
        flag: orthotorch.Muon(groups, lr=0.02, adamw_lr=3e-3, overlap=flag)
        for flag in (True, False)
    }
    params = [p for _, p in hidden + adamw]
    times: dict = {True: [], False: []}
    sent = []
    for r in range(2 + repeats):
        # Alternate which runs first: the second of a pair was measurably favoured.
        for flag in (True, False) if r % 2 else (False, True):
            opt = opts[flag]
            gen = torch.Generator().manual_seed(r)
            for p in params:
                g = torch.randn(p.shape, generator=gen)
                if odist.is_dtensor(p):
                    g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                p.grad = g
            odist.STATS.reset()
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            dist.barrier()
            if r >= 2:
                times[flag].append(time.perf_counter() - t0)
                sent.append(odist.STATS.bytes_sent)
    ortho_bytes = sum(p.numel() * 4 for _, p in hidden)
    busiest = torch.tensor([max(sent)], dtype=torch.float64)
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
    if rank == 0:
        queue.put((times[True], times[False], float(busiest), ortho_bytes))
        queue.close()
        queue.join_thread()
    dist.barrier()
    os._exit(0)  # skip gloo teardown, which intermittently aborts after the work is done


def run_layout(layout: str, repeats: int, quick: bool) -> tuple:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=layout_worker, args=(r, 4, port, layout, repeats, quick, queue))
        for r in range(4)
    ]
    for p in procs:
        p.start()
    result = queue.get(timeout=1800)
    for p in procs:
        p.join()
    return result


def main_layouts(repeats: int, quick: bool) -> None:
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, gloo, 4 processes, Muon")
    print(
        "| layout | MB sent / step / rank (max) | sent / ortho. bytes | step ms, overlap "
        "(median / min) | step ms, no overlap (median / min) | overlap / no overlap (median) |"
    )
    print("|---|---|---|---|---|---|")
    for layout in LAYOUTS:
        on, off, sent, ortho = run_layout(layout, repeats, quick)
        med_on, med_off = statistics.median(on), statistics.median(off)
        cells = [
            layout,
            f"{sent / 1e6:.2f}",
            f"{sent / ortho:.2f}x",
            f"{med_on * 1e3:.0f} / {min(on) * 1e3:.0f}",
            f"{med_off * 1e3:.0f} / {min(off) * 1e3:.0f}",
            f"{med_on / med_off:.2f}",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--optimizers", default="Muon,DCTAdamW-ortho,DCTAdamW-ortho-refresh")
    ap.add_argument("--update-every", type=int, default=200)
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: Muon, sharded, 2 processes, 1 step"
    )
    ap.add_argument(
        "--layouts", action="store_true", help="Muon at production layouts on 4 processes"
    )
    args = ap.parse_args()
    if args.layouts:
        main_layouts(2 if args.quick else args.repeats, args.quick)
        return
    layouts, worlds = ("replicated", "sharded"), (1, 2)
    if args.quick:
        args.optimizers, args.repeats, layouts, worlds = "Muon", 1, ("sharded",), (2,)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, gloo")
    print(
        "| optimizer | layout | processes | step ms (median) | MB sent / step / rank "
        "| sent / ortho. bytes |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.optimizers.split(","):
        for layout in layouts:
            for world in worlds:
                step, sent, ortho = run(
                    world, layout, args.repeats, name, args.update_every, args.quick
                )
                cells = [
                    name,
                    layout,
                    world,
                    f"{step * 1e3:.0f}",
                    f"{sent / 1e6:.1f}",
                    f"{sent / ortho:.2f}x",
                ]
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
