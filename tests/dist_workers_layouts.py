"""Worker functions for tests/test_distributed_layouts.py, run in 4 spawned gloo processes.

Parameters are placed directly as ``DTensor`` objects with the placements that HSDP, FSDP2 +
tensor parallelism, tensor parallelism alone and expert parallelism produce (``fully_shard`` /
``parallelize_module`` give the same placements; examples/fsdp_tp.py runs the real thing), and
get the same gradients as a single-process run: ``g = noise(step) + 0.1 * p``. Each scenario
returns what it observed; :func:`worker` saves them to ``{out}/rank{rank}.pt``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

import orthotorch
from orthotorch import distributed as odist

STEPS = 5
WORLD = 4

# name -> (shape, matrix layout). Odd shapes on purpose: 57 and 37 rows do not split over 2
# or 4 ranks, a 1-row matrix leaves ranks with empty shards, three 24x24 matrices cannot be
# shared evenly; one fused projection (split) and one expert stack (batch).
SHAPES: dict[str, tuple[tuple[int, ...], str]] = {
    "q": ((24, 24), "flatten"),
    "k": ((24, 24), "flatten"),
    "v": ((24, 24), "flatten"),
    "up": ((57, 24), "flatten"),
    "down": ((24, 57), "flatten"),
    "gate": ((1, 24), "flatten"),
    "qkv": ((36, 16), "split(rows=12,12,12)"),
    "conv": ((8, 4, 3, 3), "flatten"),
    "experts": ((4, 12, 20), "batch"),
    "wide": ((37, 64), "flatten"),
}
# Tensor-parallel style per weight: colwise (Shard(0) on tp), rowwise (Shard(1) on tp).
ROWWISE = {"down", "wide", "k"}

_STRIDED = _StridedShard(0, split_factor=2)
# layout name -> (mesh shape, mesh dim names, placements(name) -> placements)
LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[str, ...], Callable[[str], list]]] = {
    "fsdp_1x4": ((4,), ("shard",), lambda name: [Shard(0)]),
    "replicate_1x4": ((4,), ("rep",), lambda name: [Replicate()]),
    "hsdp_2x2": ((2, 2), ("rep", "shard"), lambda name: [Replicate(), Shard(0)]),
    # FSDP2 on top of TP: dim-0 sharding of a colwise (dim-0) TP shard is strided.
    "fsdp_tp_2x2": (
        (2, 2),
        ("dp", "tp"),
        lambda name: [Shard(0), Shard(1)] if name in ROWWISE else [_STRIDED, Shard(0)],
    ),
    "tp_2x2": (
        (2, 2),
        ("dp", "tp"),
        lambda name: [Replicate(), Shard(1) if name in ROWWISE else Shard(0)],
    ),
    # Expert parallel: the expert stack sharded by experts over both mesh dims (no gather),
    # dense weights FSDP-sharded over "dp" and replicated over "ep".
    "ep_2x2": (
        (2, 2),
        ("dp", "ep"),
        lambda name: [Shard(0), Shard(0)] if name == "experts" else [Shard(0), Replicate()],
    ),
    "replicate_2x2": ((2, 2), ("a", "b"), lambda name: [Replicate(), Replicate()]),
    # FSDP2 over column-parallel TP only: every weight split by rows, strided (ARO's rotation
    # shards with such rows).
    "fsdp_tp_colwise_2x2": ((2, 2), ("dp", "tp"), lambda name: [_STRIDED, Shard(0)]),
}

# optimizer name -> (class, kwargs)
OPTIMIZERS: dict[str, tuple[str, dict]] = {
    "Muon": ("Muon", dict(lr=0.02, ns_dtype=torch.float32)),
    "Muon-row_norm": ("Muon", dict(lr=0.02, update="row_norm")),
    "ROOT": ("ROOT", dict(lr=0.02, ns_dtype=torch.float32)),
    "AuON": ("AuON", dict(lr=0.05)),
    "AuON-hybrid": ("AuON", dict(lr=0.05, hybrid=True, ns_dtype=torch.float32)),
    "SPECTRA": ("SPECTRA", dict(clip=0.5)),
    # Optimizers with per-row / per-matrix state of their own (flatten layouts only for
    # sharded weights; no column sharding). update_every=2: subspace refreshes at steps 0, 2, 4.
    "ARO": ("ARO", dict(lr=0.02)),
    "NorMuon": ("NorMuon", dict(lr=0.01, ns_dtype=torch.float32)),
    "Dion": ("Dion", dict(lr=0.02, rank=0.5, qr_method="cholesky")),
    "DCTAdamW": ("DCTAdamW", dict(lr=0.01, rank=0.25, update_every=2)),
    "DCTAdamW-ortho": (
        "DCTAdamW",
        dict(lr=0.01, rank=0.5, update_every=2, orthogonalize=True, ns_dtype=torch.float32),
    ),
    "GaLoreAdamW": ("GaLoreAdamW", dict(lr=0.01, rank=0.25, update_every=2)),
}
# The weights these optimizers take sharded: all flatten (per-matrix state of a sharded expert
# stack or fused projection is refused at construction).
STATEFUL_SHAPES = ["q", "k", "up", "down", "gate", "conv", "wide"]
# Placements that split rows only (ARO: its rotation shards with the rows) and row blocks on
# one mesh dimension, the others replicated (low-rank, Dion, NorMuon).
ROWS_LAYOUTS = [
    "fsdp_1x4",
    "replicate_1x4",
    "hsdp_2x2",
    "fsdp_tp_colwise_2x2",
    "ep_2x2",
    "replicate_2x2",
]
ROW_BLOCK_LAYOUTS = ["fsdp_1x4", "hsdp_2x2", "ep_2x2"]
STATEFUL_LAYOUTS = {
    "ARO": ROWS_LAYOUTS,
    "NorMuon": ROW_BLOCK_LAYOUTS,
    "Dion": ROW_BLOCK_LAYOUTS,
    "DCTAdamW": ROW_BLOCK_LAYOUTS,
    "DCTAdamW-ortho": ROW_BLOCK_LAYOUTS,
    "GaLoreAdamW": ROW_BLOCK_LAYOUTS,
}
# Checkpoint chains (saved after each layout; the test process resumes the last on one rank).
CHAINS = {"ARO": ("hsdp_2x2", "fsdp_1x4", "fsdp_tp_colwise_2x2")}
DEFAULT_CHAIN = ("hsdp_2x2", "fsdp_1x4", "fsdp_tp_2x2")
STATEFUL_CHAIN = ("hsdp_2x2", "fsdp_1x4", "ep_2x2")


def names_for(opt_name: str) -> list[str]:
    return STATEFUL_SHAPES if opt_name in STATEFUL_LAYOUTS else list(SHAPES)


def layouts_for(opt_name: str) -> list[str]:
    if opt_name in STATEFUL_LAYOUTS:
        return STATEFUL_LAYOUTS[opt_name]
    return [layout for layout in LAYOUTS if layout != "fsdp_tp_colwise_2x2"]


def chain_for(opt_name: str) -> tuple[str, str, str]:
    return CHAINS.get(opt_name, STATEFUL_CHAIN if opt_name in STATEFUL_LAYOUTS else DEFAULT_CHAIN)


def initial(name: str) -> torch.Tensor:
    shape, _ = SHAPES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(shape, generator=gen) / shape[-1] ** 0.5


def noise(name: str, step: int) -> torch.Tensor:
    shape, _ = SHAPES[name]
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * step + len(name)))


def make_optimizer(
    opt_name: str, params: list, names: list[str], **topology
) -> torch.optim.Optimizer:
    cls_name, kwargs = OPTIMIZERS[opt_name]
    group = {
        "params": params,
        "param_names": names,
        "layouts": [SHAPES[n][1] for n in names],
    }
    if cls_name == "SPECTRA":
        base = torch.optim.AdamW([group], lr=1e-2)
        return orthotorch.SPECTRA(base, **kwargs, **topology)
    return getattr(orthotorch, cls_name)([group], **kwargs, **topology)


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p


def set_grads(params: dict[str, torch.Tensor], step: int, missing: set[str] = frozenset()) -> None:
    for name, p in params.items():
        # The split of noise + 0.1 p is split(noise) + 0.1 * (local p): no communication.
        if isinstance(p, DTensor):
            grad = _place(noise(name, step), p.device_mesh, p.placements) + 0.1 * p.detach()
        else:
            grad = noise(name, step) + 0.1 * p.detach()
        p.grad = None if name in missing else grad


def reference(opt_name: str, names: list[str], steps: range, start=None) -> dict:
    """The single-process run every layout must reproduce (``distributed="off"``)."""
    params = {n: nn.Parameter((initial(n) if start is None else start[n]).clone()) for n in names}
    opt = make_optimizer(opt_name, list(params.values()), names, distributed="off")
    for step in steps:
        set_grads(params, step)
        opt.step()
    return {n: p.detach().clone() for n, p in params.items()}


def placed(layout: str, names: list[str]) -> tuple[dict[str, nn.Parameter], object]:
    mesh_shape, dim_names, placements = LAYOUTS[layout]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=dim_names)
    params = {n: nn.Parameter(_place(initial(n), mesh, placements(n))) for n in names}
    return params, mesh


def _place(t: torch.Tensor, mesh, placements: list) -> DTensor:
    # Every rank holds the same full tensor: split locally (src_data_rank=None), no scatter,
    # which _StridedShard also needs for shapes that do not divide evenly.
    return distribute_tensor(t, mesh, placements, src_data_rank=None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def matrices_per_step(names: list[str]) -> int:
    from orthotorch.functional import parse_layout

    return sum(len(parse_layout(SHAPES[n][1]).block_shapes(SHAPES[n][0])) for n in names)


# ---------------------------------------------------------------------------------- scenarios
def scenario_layouts(rank: int, out: str, arg: str) -> dict:
    """Every layout x every optimizer of ``arg`` (comma-separated): 5 steps, compared with the
    single-process run; per-rank matrices processed and bytes sent per step."""
    results: dict = {}
    for opt_name in arg.split(","):
        names = names_for(opt_name)
        ref = reference(opt_name, names, range(STEPS)) if rank == 0 else None
        for layout in layouts_for(opt_name):
            params, _ = placed(layout, names)
            opt = make_optimizer(opt_name, list(params.values()), names)
            odist.STATS.reset()
            for step in range(STEPS):
                set_grads(params, step)
                opt.step()
            got = {n: full(p.detach()) for n, p in params.items()}
            entry = {
                "matrices": odist.STATS.matrices_processed / STEPS,
                "bytes": odist.STATS.bytes_sent / STEPS,
                "total_matrices": matrices_per_step(names),
                "fp32_bytes": 4 * sum(initial(n).numel() for n in names),
            }
            if rank == 0:
                entry["err"] = {n: rel_err(got[n], ref[n]) for n in names}
                entry["moved"] = min(rel_err(ref[n], initial(n)) for n in names)
            results[(opt_name, layout)] = entry
    return results


def scenario_edge_cases(rank: int, out: str, arg: str) -> dict:
    """A gradient missing on one rank; groups smaller than the world (process_group= for plain
    parameters, device_mesh= for DTensors on a 2-rank sub-mesh); refusals at construction."""
    names = list(SHAPES)
    results: dict = {}
    # (1) The gradient of "up" exists on rank 0 only, under HSDP: every rank updates it (zero
    # gradient where missing) and stays consistent.
    params, _ = placed("hsdp_2x2", names)
    opt = make_optimizer("Muon", list(params.values()), names)
    before = full(params["up"].detach()).clone()
    for step in range(3):
        set_grads(params, step, missing=set() if rank == 0 else {"up"})
        opt.step()
    after = {n: full(p.detach()) for n, p in params.items()}
    results["missing_grad_moved"] = not torch.equal(before, after["up"])
    results["missing_grad_finite"] = all(bool(t.isfinite().all()) for t in after.values())
    results["missing_grad_up"] = after["up"]

    # (1b) One update per bucket (many buckets in flight; the 1-row "gate" leaves the ranks
    # of shard coordinate 1 a bucket of empty pieces), with and without overlap.
    saved, odist.BUCKET_BYTES = odist.BUCKET_BYTES, 1
    ref = reference("Muon", names, range(2)) if rank == 0 else None
    for flag in (True, False):
        for layout in ("hsdp_2x2", "fsdp_tp_2x2"):
            params, _ = placed(layout, names)
            opt = make_optimizer("Muon", list(params.values()), names, overlap=flag)
            for step in range(2):
                set_grads(params, step)
                opt.step()
            got = {n: full(p.detach()) for n, p in params.items()}
            if rank == 0:
                err = max(rel_err(got[n], ref[n]) for n in names)
                results[f"tiny_buckets_{layout}_{flag}"] = err
    odist.BUCKET_BYTES = saved

    # (2) Two optimizers on disjoint halves of the world: plain tensors with process_group=
    # (each pair its own data), DTensors with device_mesh= on the pair's 1-D sub-mesh.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = pairs[rank // 2]
    small = names[:6]
    offset = 10 * (rank // 2)  # the two pairs train different runs
    plain = {n: nn.Parameter(initial(n) + offset) for n in small}
    opt = make_optimizer("Muon", list(plain.values()), small, process_group=mine)
    odist.STATS.reset()
    for step in range(STEPS):
        set_grads(plain, step)
        opt.step()
    results["group_plain"] = {n: p.detach().clone() for n, p in plain.items()}
    results["group_plain_matrices"] = odist.STATS.matrices_processed / STEPS
    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pair", "shard"))
    sub = mesh2d["shard"]
    sharded = {n: nn.Parameter(_place(initial(n) + offset, sub, [Shard(0)])) for n in small}
    opt = make_optimizer("Muon", list(sharded.values()), small, device_mesh=sub)
    odist.STATS.reset()
    for step in range(STEPS):
        set_grads(sharded, step)
        opt.step()
    results["group_mesh"] = {n: full(p.detach()) for n, p in sharded.items()}
    results["group_mesh_matrices"] = odist.STATS.matrices_processed / STEPS
    if rank in (0, 2):
        start = {n: initial(n) + offset for n in small}
        results["group_reference"] = reference("Muon", small, range(STEPS), start)

    # (3) Refusals at construction, naming the parameter and the placement: a row-parallel
    # (Shard(1)) weight for the optimizers with per-row / per-matrix state; also a strided
    # (FSDP + TP) one for those that need contiguous row blocks.
    rowwise, _ = placed("tp_2x2", ["down"])
    strided, _ = placed("fsdp_tp_colwise_2x2", ["up"])
    for cls in ("ARO", "NorMuon", "Dion", "DCTAdamW", "GaLoreAdamW"):
        cases = [("rowwise", rowwise, "down")]
        if cls != "ARO":
            cases.append(("strided", strided, "up"))
        for kind, held, name in cases:
            try:
                group = {"params": list(held.values()), "param_names": [name]}
                getattr(orthotorch, cls)([group])
                results[f"refused_{cls}_{kind}"] = ""
            except ValueError as err:
                results[f"refused_{cls}_{kind}"] = str(err)
    hsdp, _ = placed("hsdp_2x2", ["q"])
    try:
        orthotorch.Muon(list(hsdp.values()), device_mesh=mesh2d["pair"])
        results["refused_mesh"] = ""
    except ValueError as err:
        results["refused_mesh"] = str(err)
    return results


def scenario_disagree(rank: int, out: str, arg: str) -> dict:
    """Ranks that shard a weight differently (rank 3 by columns) and a NaN on one rank: a
    ValueError on every rank, not a hang."""
    results: dict = {}
    mesh = init_device_mesh("cpu", (WORLD,))
    shape = (8, 8)
    placement = Shard(1) if rank == 3 else Shard(0)
    local = torch.ones(2, 8) if rank != 3 else torch.ones(8, 2)
    p = nn.Parameter(
        DTensor.from_local(local, mesh, [placement], run_check=False, shape=shape, stride=(8, 1))
    )
    opt = orthotorch.Muon([{"params": [p], "param_names": ["w"]}])
    p.grad = DTensor.from_local(
        local.clone(), mesh, [placement], run_check=False, shape=shape, stride=(8, 1)
    )
    try:
        opt.step()
        results["disagree"] = ""
    except ValueError as err:
        results["disagree"] = str(err)

    names = ["up", "qkv"]
    params, _ = placed("fsdp_tp_2x2", names)
    opt = make_optimizer("Muon", list(params.values()), names)
    set_grads(params, 0)
    if rank == 2:
        params["qkv"].grad.to_local().view(-1)[0] = float("nan")
    try:
        opt.step()
        results["nan"] = ""
    except FloatingPointError as err:
        results["nan"] = str(err)
    return results


class Holder(nn.Module):
    """A module holding the parameters, so torch.distributed.checkpoint.state_dict keys them
    by name and reshards them (and the optimizer state) between layouts."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        for n, p in params.items():
            self.register_parameter(n, p)


def _load(opt_name: str, params: dict, names: list[str], path: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = Holder(params)
    opt = make_optimizer(opt_name, [getattr(model, n) for n in names], names)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return model, opt


def _save(model: nn.Module, opt, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def scenario_checkpoint(rank: int, out: str, arg: str) -> dict:
    """HSDP 2x2 (2 steps) -> save -> FSDP 1x4 (1 step) -> save -> a third 2x2 layout (FSDP+TP,
    or the optimizer's :func:`chain_for`; 1 step) -> save; the test process loads the last
    checkpoint on one process and takes step 5."""
    for opt_name in arg.split(","):
        names = names_for(opt_name)
        first, second, third = chain_for(opt_name)
        base = os.path.join(out, opt_name)
        params, _ = placed(first, names)
        model = Holder(params)
        opt = make_optimizer(opt_name, [getattr(model, n) for n in names], names)
        for step in range(2):
            set_grads(params, step)
            opt.step()
        _save(model, opt, os.path.join(base, first))
        for layout, source, step in ((second, first, 2), (third, second, 3)):
            params, _ = placed(layout, names)  # initial values, overwritten by the load
            model, opt = _load(opt_name, params, names, os.path.join(base, source))
            set_grads({n: getattr(model, n) for n in names}, step)
            opt.step()
            _save(model, opt, os.path.join(base, layout))
    return {}


def resume_single_process(out: str, opt_name: str) -> dict[str, torch.Tensor]:
    """Load the last checkpoint of the chain into one process (no process group) and take
    step 5."""
    names = names_for(opt_name)
    params = {n: nn.Parameter(torch.zeros(SHAPES[n][0])) for n in names}
    last = chain_for(opt_name)[-1]
    model, opt = _load(opt_name, params, names, os.path.join(out, opt_name, last))
    live = {n: getattr(model, n) for n in names}
    set_grads(live, 4)
    opt.step()
    return {n: p.detach().clone() for n, p in live.items()}


def scenario_overlap(rank: int, out: str, arg: str) -> dict:
    """Step time with and without overlap, interleaved, on the HSDP and FSDP+TP layouts."""
    import statistics

    names = list(SHAPES)
    times: dict = {}
    for layout in ("hsdp_2x2", "fsdp_tp_2x2"):
        params, _ = placed(layout, names)
        opts = {
            flag: make_optimizer("Muon", list(params.values()), names, overlap=flag)
            for flag in (True, False)
        }
        samples: dict = {True: [], False: []}
        for step in range(int(arg or 6)):
            for flag, opt in opts.items():
                set_grads(params, step)
                dist.barrier()
                t0 = time.perf_counter()
                opt.step()
                dist.barrier()
                samples[flag].append(time.perf_counter() - t0)
        times[layout] = {flag: statistics.median(s) for flag, s in samples.items()}
    return times


SCENARIOS: dict[str, Callable[[int, str, str], dict]] = {
    "layouts": scenario_layouts,
    "edge_cases": scenario_edge_cases,
    "disagree": scenario_disagree,
    "checkpoint": scenario_checkpoint,
    "overlap": scenario_overlap,
}


def worker(rank: int, world: int, port: int, scenarios: str, out: str, args: dict) -> None:
    """Run each of ``scenarios`` (comma-separated) with its ``args`` entry in one process group
    (spawning is the slow part) and save ``{scenario: result}`` to ``{out}/rank{rank}.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for scenario in scenarios.split(","):
        results[scenario] = SCENARIOS[scenario](rank, out, args.get(scenario, ""))
        dist.barrier()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    # Skip interpreter and gloo teardown (intermittent aborts after the results are on disk).
    os._exit(0)
