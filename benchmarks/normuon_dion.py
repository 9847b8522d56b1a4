"""NorMuon and Dion on the reference parameter set: step time, state bytes, bytes per step under
FSDP2 / DDP (2 gloo processes), and Dion's orthonormalization (stability and speed).

Step times are interleaved rounds in one process (median and min of the rounds after warm-up),
as ratios to orthotorch.Muon measured in the same rounds: absolute times on a shared machine mean
little. Bytes are counted by ``orthotorch.distributed.STATS`` (what each rank sends per step).

    python benchmarks/normuon_dion.py [--only qr,step,state,comm] [--repeats 5] [--threads 1]
                                      [--quick]
"""

from __future__ import annotations

import argparse
import math
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
from orthotorch.functional import dion as D

RANKS = (1.0, 0.5, 0.25, 0.125)


def builders() -> dict:
    def groups(hidden, adamw):
        return [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}]

    out = {
        "Muon": lambda h, a: orthotorch.Muon(groups(h, a), lr=0.02, adamw_lr=3e-3),
        "NorMuon": lambda h, a: orthotorch.NorMuon(groups(h, a), lr=8e-3, adamw_lr=3e-3),
    }
    for r in RANKS:
        out[f"Dion r={r:g}"] = lambda h, a, r=r: orthotorch.Dion(
            groups(h, a), lr=0.02, rank=r, adamw_lr=3e-3
        )
    return out


def named_parameters(quick: bool):
    hidden, adamw = reference_named_parameters(0)
    if quick:  # same layout at 1/8 of every dimension

        def shrink(named):
            return [
                (n, nn.Parameter(p.detach()[tuple(slice(0, max(1, s // 8)) for s in p.shape)]))
                for n, p in named
            ]

        hidden, adamw = shrink(hidden), shrink(adamw)
    return [p for _, p in hidden], [p for _, p in adamw]


def state_bytes(opt: torch.optim.Optimizer, params: list) -> int:
    ids = {id(p) for p in params}
    return sum(
        v.numel() * v.element_size()
        for p, state in opt.state.items()
        if id(p) in ids
        for v in state.values()
        if torch.is_tensor(v)
    )


# ------------------------------------------------------------------ step time and state
def bench_step(repeats: int, quick: bool) -> None:
    names = list(builders())
    opts = {}
    for name in names:
        hidden, adamw = named_parameters(quick)
        opts[name] = (builders()[name](hidden, adamw), hidden, adamw)
    times = {name: [] for name in names}
    warmup = 2
    for round_ in range(warmup + repeats):
        for name in names:
            opt, hidden, adamw = opts[name]
            set_random_gradients(hidden + adamw, seed=round_)
            t0 = time.perf_counter()
            opt.step()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
    base_med = statistics.median(times["Muon"])
    base_min = min(times["Muon"])
    print(
        "| optimizer | step ms (median) | min | vs Muon (median / min) | state of hidden matrices |"
    )
    print("|---|---|---|---|---|")
    muon_state = state_bytes(opts["Muon"][0], opts["Muon"][1])
    for name in names:
        med, low = statistics.median(times[name]), min(times[name])
        sb = state_bytes(opts[name][0], opts[name][1])
        print(
            f"| {name} | {med * 1e3:.1f} | {low * 1e3:.1f} | {med / base_med:.2f}x / "
            f"{low / base_min:.2f}x | {sb / 2**20:.1f} MiB ({sb / muon_state:.3f}x Muon) |"
        )


# ------------------------------------------------------------------ QR stability and speed
def _plain_cqr(P: torch.Tensor, passes: int) -> torch.Tensor:
    for _ in range(passes):
        L, _ = torch.linalg.cholesky_ex(P.mT @ P)
        P = torch.linalg.solve_triangular(L.mT, P, upper=True, left=False)
    return P


def bench_qr(repeats: int) -> None:
    methods = {
        "householder": lambda P: D.orthonormalize(P, "householder"),
        "cholesky (sketch + CQR)": lambda P: D.orthonormalize(P, "cholesky"),
        "plain CQR": lambda P: _plain_cqr(P, 1),
        "plain CQR2": lambda P: _plain_cqr(P, 2),
    }
    gen = torch.Generator().manual_seed(0)
    print("orthogonality error ||P^T P - I||_F, float32 (cond = condition number of P):")
    print("| m x r | cond | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for m, r in [(2048, 128), (512, 128)]:
        for cond in (1e1, 1e4, 1e6, 1e8):
            U, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=gen))
            V, _ = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64, generator=gen))
            s = torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)
            P = (U @ torch.diag(s) @ V.T).float()
            cells = []
            for f in methods.values():
                Q = f(P)
                err = (Q.mT @ Q - torch.eye(r)).norm().item()
                cells.append(f"{err:.1e}" if math.isfinite(err) else "NaN")
            print(f"| {m}x{r} | {cond:.0e} | " + " | ".join(cells) + " |")
    print("\ntime (ms, median / min of interleaved rounds, one matrix):")
    print("| m x r | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for m, r in [(2048, 128), (2048, 512), (512, 128)]:
        P = torch.randn(m, r)
        ts = {k: [] for k in methods}
        for i in range(2 + repeats):
            for k, f in methods.items():
                t0 = time.perf_counter()
                f(P)
                if i >= 2:
                    ts[k].append(time.perf_counter() - t0)
        cells = [f"{statistics.median(v) * 1e3:.1f} / {min(v) * 1e3:.1f}" for v in ts.values()]
        print(f"| {m}x{r} | " + " | ".join(cells) + " |")


# ------------------------------------------------------------------ bytes per step
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comm_worker(rank: int, world: int, port: int, layout: str, quick: bool, queue) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    result = {}
    for name, build in builders().items():
        hidden, adamw = named_parameters(quick)
        if layout == "sharded":
            hidden = [nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in hidden]
            adamw = [nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in adamw]
        opt = build(hidden, adamw)
        sent = []
        for step in range(2):
            for p in hidden + adamw:
                full = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
                p.grad = distribute_tensor(full, mesh, [Shard(0)]) if layout == "sharded" else full
            odist.STATS.reset()
            opt.step()
            sent.append(odist.STATS.bytes_sent)
        result[name] = sent[-1]
    if rank == 0:
        fp32 = sum(p.numel() * 4 for p in named_parameters(quick)[0])
        queue.put((result, fp32))
        queue.close()
        queue.join_thread()
    dist.barrier()
    os._exit(0)


def bench_comm(quick: bool) -> None:
    ctx = mp.get_context("spawn")
    print("| bytes sent per step and rank (2 ranks) | " + " | ".join(builders()) + " |")
    print("|---|" + "---|" * len(builders()))
    for layout in ("replicated", "sharded"):
        queue = ctx.Queue()
        port = _free_port()
        procs = [
            ctx.Process(target=_comm_worker, args=(r, 2, port, layout, quick, queue))
            for r in range(2)
        ]
        for p in procs:
            p.start()
        result, fp32 = queue.get(timeout=3600)
        for p in procs:
            p.join()
        cells = [f"{b / 1e6:.2f} MB ({b / fp32:.3f}x)" for b in result.values()]
        label = "DDP (replicated)" if layout == "replicated" else "FSDP2 (Shard(0))"
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("(x: fraction of the fp32 bytes of the orthogonalized parameters)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="qr,step,comm")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1/8-size reference set, 2 repeats")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    only = set(args.only.split(","))
    if "qr" in only:
        bench_qr(repeats)
    if "step" in only or "state" in only:
        print()
        bench_step(repeats, args.quick)
    if "comm" in only:
        print()
        bench_comm(args.quick)


if __name__ == "__main__":
    main()
