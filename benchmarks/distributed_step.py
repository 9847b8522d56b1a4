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
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    hidden, adamw = reference_named_parameters(0)
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
    for r in range(3 + repeats):
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
        if r >= 3:
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
    world: int, layout: str, repeats: int, name: str = "Muon", update_every: int = 200
) -> tuple[float, float, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=worker, args=(r, world, port, layout, repeats, queue, name, update_every)
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--optimizers", default="Muon,DCTAdamW-ortho,DCTAdamW-ortho-refresh")
    ap.add_argument("--update-every", type=int, default=200)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, gloo")
    print(
        "| optimizer | layout | processes | step ms (median) | MB sent / step / rank "
        "| sent / ortho. bytes |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.optimizers.split(","):
        for layout in ("replicated", "sharded"):
            for world in (1, 2):
                step, sent, ortho = run(world, layout, args.repeats, name, args.update_every)
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
