"""Worker functions for tests/test_distributed.py, run in spawned gloo processes.

Each scenario writes what it observed to ``{out}/rank{rank}.pt``; the test process compares.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

import orthotorch
from orthotorch import distributed as odist

STEPS = 5


class TinyTransformerish(nn.Module):
    """Odd shapes on purpose: 37 and 57 rows do not split evenly over 2 ranks, three 24x24
    matrices cannot be shared evenly, a 1-row matrix leaves a rank with an empty shard."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(37, 24)
        self.q = nn.Linear(24, 24)
        self.k = nn.Linear(24, 24)
        self.v = nn.Linear(24, 24)
        self.up = nn.Linear(24, 57)
        self.down = nn.Linear(57, 24)
        self.gate = nn.Linear(24, 1)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 37)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.v(torch.tanh(self.q(h) * self.k(h))) * torch.sigmoid(self.gate(h))
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.head(h)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformerish()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 37, (8, 12), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return nn.functional.cross_entropy(model(x).reshape(-1, 37), y.reshape(-1))


# Low-rank configurations by name: update_every=2 refreshes subspaces (and rotates moments)
# at steps 0, 2 and 4 of a 5-step run, so resharded state and rotations are exercised.
LOWRANK_VARIANTS: dict[str, tuple[str, dict]] = {
    "DCTAdamW-ortho": ("DCTAdamW", dict(orthogonalize=True, update_every=2, rank=0.5)),
    "GaLoreAdamW-ortho": (
        "GaLoreAdamW",
        dict(orthogonalize=True, update_every=2, rank=0.5, rotate_moments=True),
    ),
    "DCTAdamW-adam": ("DCTAdamW", dict(update_every=2, rank=0.5)),
    "GaLoreAdamW-adam": ("GaLoreAdamW", dict(update_every=2, rank=0.5)),
}


def optimizer_class(name: str) -> tuple[type, dict]:
    """``(class, extra kwargs)`` for an optimizer name or a :data:`LOWRANK_VARIANTS` key."""
    cls_name, extra = LOWRANK_VARIANTS.get(name, (name, {}))
    return getattr(orthotorch, cls_name), dict(extra)


def make_optimizer(name: str, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    cls, extra = optimizer_class(name)
    return cls(
        orthotorch.param_groups(model),
        lr=0.02,
        adamw_lr=3e-3,
        ns_dtype=torch.float32,
        **{**extra, **kwargs},
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if odist.is_dtensor(p) else p
        out[name.replace("_orig_mod.", "")] = p.detach().clone()
    return out


def reference(name: str, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The single-process run every distributed run must reproduce."""
    model = make_model()
    train(model, make_optimizer(name, model, distributed="off"), range(steps))
    return full_state(model)


# ---------------------------------------------------------------------------------- scenarios
def scenario_ddp(rank: int, world: int, out: str, name: str) -> None:
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = make_optimizer(name, model.module)
    odist.STATS.reset()
    train(model, opt, range(STEPS))
    torch.save(
        {"params": full_state(model.module), "stats": vars(odist.STATS).copy()},
        os.path.join(out, f"rank{rank}.pt"),
    )


def _fsdp_model(model: nn.Module | None = None) -> nn.Module:
    """``model`` (default :func:`make_model`) under FSDP2: per-Linear shards plus the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = make_model() if model is None else model
    for module in (model.q, model.k, model.v, model.up, model.down):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def scenario_fsdp(rank: int, world: int, out: str, name: str) -> None:
    model = _fsdp_model()
    opt = make_optimizer(name, model)
    odist.STATS.reset()
    train(model, opt, range(STEPS))
    torch.save(
        {"params": full_state(model), "stats": vars(odist.STATS).copy()},
        os.path.join(out, f"rank{rank}.pt"),
    )


def scenario_fsdp_checkpoint(rank: int, world: int, out: str, name: str) -> None:
    """Train 3 steps on 2 ranks, save with torch.distributed.checkpoint, then 2 more."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _fsdp_model()
    opt = make_optimizer(name, model)
    train(model, opt, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out, "ckpt"))
    train(model, opt, range(3, STEPS))
    torch.save({"params": full_state(model)}, os.path.join(out, f"rank{rank}.pt"))


def resume_single_process(out: str, name: str) -> dict[str, torch.Tensor]:
    """Load the 2-rank checkpoint into one process (no process group) and finish the run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = make_model()
    opt = make_optimizer(name, model)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(out, "ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, range(3, STEPS))
    return full_state(model)


def scenario_no_hang(rank: int, world: int, out: str, name: str) -> None:
    """Gradient only on some ranks; a group with fewer matrices than ranks; uneven shapes."""
    torch.manual_seed(0)
    shared = nn.Parameter(torch.randn(5, 3))
    lonely = nn.Parameter(torch.randn(7, 3))  # gets a gradient on rank 0 only
    cls, extra = optimizer_class(name)
    opt = cls([{"params": [shared]}, {"params": [lonely]}], lr=0.1, ns_dtype=torch.float32, **extra)
    before = lonely.detach().clone()
    for _ in range(3):
        shared.grad = torch.ones_like(shared)
        lonely.grad = torch.ones_like(lonely) if rank == 0 else None
        opt.step()
    torch.save(
        {"lonely_moved": not torch.equal(before, lonely.detach()), "shared": shared.detach()},
        os.path.join(out, f"rank{rank}.pt"),
    )


def scenario_mismatch(rank: int, world: int, out: str, name: str) -> None:
    """Ranks built the optimizer over different parameters: a clear error, not a hang."""
    shapes = [(4, 4), (6, 4)] if rank == 0 else [(4, 4), (6, 5)]
    params = [nn.Parameter(torch.randn(*s)) for s in shapes]
    opt = getattr(orthotorch, name)(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    try:
        opt.step()
        message = ""
    except ValueError as err:
        message = str(err)
    torch.save({"error": message}, os.path.join(out, f"rank{rank}.pt"))


def scenario_nan_on_one_rank(rank: int, world: int, out: str, name: str) -> None:
    """A NaN in one FSDP shard must stop every rank (a lone raise would hang the others)."""
    model = _fsdp_model()
    opt = make_optimizer(name, model)
    opt.zero_grad()
    loss_of(model, 0).backward()
    if rank == 1:
        model.up.weight.grad.to_local().view(-1)[0] = float("nan")
    try:
        opt.step()
        message = ""
    except FloatingPointError as err:
        message = str(err)
    torch.save({"error": message}, os.path.join(out, f"rank{rank}.pt"))


def _subspaces(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The low-rank optimizers' subspace state (DCT indices, SVD bases); [] for the others."""
    finder = getattr(opt, "finder", None)
    if finder is None:
        return []
    key = finder.state_key
    return [
        opt.state[p][key].clone()
        for g in opt.param_groups
        for p in g["params"]
        if key in opt.state[p]
    ]


def scenario_train_all(rank: int, world: int, out: str, names: str) -> None:
    """Each optimizer of ``names`` (comma-separated; names or :data:`LOWRANK_VARIANTS` keys)
    trained under DDP, then under FSDP2, in one spawn (each spawn costs seconds).

    Writes ``{name: {"ddp"|"fsdp": {"params", "stats", "subspaces"}}}``.
    """
    results = {}
    for name in names.split(","):
        runs = {}
        for layout in ("ddp", "fsdp"):
            if layout == "ddp":
                ddp = nn.parallel.DistributedDataParallel(make_model())
                model, trained = ddp.module, ddp
            else:
                model = trained = _fsdp_model()
            opt = make_optimizer(name, model)
            odist.STATS.reset()
            train(trained, opt, range(STEPS))
            runs[layout] = {
                "params": full_state(model),
                "stats": vars(odist.STATS).copy(),
                "subspaces": _subspaces(opt),
            }
        results[name] = runs
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


scenario_lowrank = scenario_train_all


def scenario_lowrank_checkpoint(rank: int, world: int, out: str, names: str) -> None:
    """:func:`scenario_fsdp_checkpoint` for each of ``names`` (comma-separated), in
    ``{out}/{name}``."""
    for name in names.split(","):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        dist.barrier()
        scenario_fsdp_checkpoint(rank, world, os.path.join(out, name), name)
    torch.save({}, os.path.join(out, f"rank{rank}.pt"))


def scenario_lowrank_no_hang(rank: int, world: int, out: str, names: str) -> None:
    """:func:`scenario_no_hang` (plain tensors) and its FSDP2 analogue for each of ``names``: row
    shards of uneven size (5 rows, 3 rows), an empty shard (a 1-row weight), a group with one
    matrix, and a weight whose gradient exists on rank 0 only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name in names.split(","):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        scenario_no_hang(rank, world, os.path.join(out, name), name)
        plain = torch.load(os.path.join(out, name, f"rank{rank}.pt"))
        torch.manual_seed(0)
        shapes = [(5, 3), (1, 4), (3, 7)]
        params = [nn.Parameter(distribute_tensor(torch.randn(s), mesh, [Shard(0)])) for s in shapes]
        cls, extra = optimizer_class(name)
        opt = cls(
            [{"params": params[:2]}, {"params": params[2:]}],
            lr=0.1,
            ns_dtype=torch.float32,
            **extra,
        )
        before = [p.full_tensor() for p in params]
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for i, p in enumerate(params):
                # distribute_tensor is a collective: every rank calls it.
                grad = distribute_tensor(torch.randn(p.shape, generator=gen), mesh, [Shard(0)])
                p.grad = None if i == 2 and rank != 0 else grad
            opt.step()
        after = [p.full_tensor() for p in params]
        results[name] = {
            "plain": plain,
            "sharded_moved": [not torch.equal(a, b) for a, b in zip(before, after, strict=True)],
            "sharded_finite": all(bool(a.isfinite().all()) for a in after),
            "sharded": after,
        }
    from torch.distributed.tensor import Replicate

    replicated = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Replicate()]))
    for variant in ("DCTAdamW", "Muon"):
        try:
            optimizer_class(variant)[0]([replicated])
            results[f"layout_error_{variant}"] = ""
        except ValueError as err:
            results[f"layout_error_{variant}"] = str(err)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


SCENARIOS: dict[str, Callable[[int, int, str, str], None]] = {
    "ddp": scenario_ddp,
    "fsdp": scenario_fsdp,
    "fsdp_checkpoint": scenario_fsdp_checkpoint,
    "no_hang": scenario_no_hang,
    "mismatch": scenario_mismatch,
    "nan_on_one_rank": scenario_nan_on_one_rank,
    "train_all": scenario_train_all,
    "lowrank": scenario_lowrank,
    "lowrank_checkpoint": scenario_lowrank_checkpoint,
    "lowrank_no_hang": scenario_lowrank_no_hang,
}


def worker(rank: int, world: int, port: int, scenario: str, out: str, name: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    SCENARIOS[scenario](rank, world, out, name)
    dist.barrier()
    # Skip interpreter and gloo teardown: it intermittently aborts ("terminate called without
    # an active exception", exit code -6) after all work is done and the results are on disk.
    os._exit(0)
