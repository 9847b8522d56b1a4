"""Worker functions for the distributed NorMuon / Dion tests (in tests/test_dion.py), run in
spawned gloo processes. Each writes what it observed to ``{out}/rank{rank}.pt``.

The model is dist_workers' TinyTransformerish in float64: the comparison with the
single-process run then checks the distribution itself (float32 rounding differences of FSDP's
sharded gradients would otherwise be amplified by the QR of ill-conditioned factors).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

import dist_workers
import orthotorch
from orthotorch import distributed as odist

STEPS = dist_workers.STEPS
CHECKPOINT_STEP = 3

# name -> (class, kwargs); "Muon-bf16" is the reference for bytes per step.
CONFIGS: dict[str, tuple[type, dict]] = {
    "NorMuon": (orthotorch.NorMuon, {"lr": 0.01, "ns_dtype": torch.float64, "beta2": 0.9}),
    "Dion": (orthotorch.Dion, {"lr": 0.02, "rank": 1.0}),
    "Dion-r4": (orthotorch.Dion, {"lr": 0.02, "rank": 0.25}),
    "Dion-cholesky": (orthotorch.Dion, {"lr": 0.02, "rank": 0.5, "qr_method": "cholesky"}),
}
STATE_KEYS = ("second_momentum_buffer", "Q", "momentum_buffer")


def make_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    return dist_workers.make_model().to(dtype)


def make_optimizer(name: str, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    cls, config = CONFIGS[name]
    return cls(orthotorch.param_groups(model), adamw_lr=3e-3, **{**config, **kwargs})


def full_states(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """``{"param_name/state_key": whole tensor}`` of the orthogonalized parameters' state."""
    out = {}
    for name, p in model.named_parameters():
        for key in STATE_KEYS:
            value = opt.state.get(p, {}).get(key)
            if value is not None and (value.ndim > 0):
                whole = value.full_tensor() if odist.is_dtensor(value) else value
                out[f"{name}/{key}"] = whole.detach().clone()
    return out


def state_placements(opt: torch.optim.Optimizer) -> list[str]:
    return sorted(
        {
            f"{key}:{tuple(str(x) for x in value.placements)}"
            for state in opt.state.values()
            for key, value in state.items()
            if key in ("Q", "second_momentum_buffer") and odist.is_dtensor(value)
        }
    )


def reference(name: str, steps: int = STEPS) -> tuple[dict, dict]:
    model = make_model()
    opt = make_optimizer(name, model, distributed="off")
    dist_workers.train(model, opt, range(steps))
    return dist_workers.full_state(model), full_states(model, opt)


def resume_single_process(name: str, checkpoint: str) -> dict[str, torch.Tensor]:
    """Load the 2-rank FSDP2 checkpoint (saved after CHECKPOINT_STEP steps) into one plain
    process and finish the run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = make_model()
    opt = make_optimizer(name, model)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    dist_workers.train(model, opt, range(CHECKPOINT_STEP, STEPS))
    return dist_workers.full_state(model)


def bytes_per_step(rank: int, out: str) -> dict[str, float]:
    """Bytes each rank sends per step under FSDP2 on the float32 model: Muon (bf16 all_to_all
    of whole matrices) against Dion at ranks 1/4 and 1."""
    from orthotorch import Muon

    result = {}
    runs = {
        "Muon": lambda m: Muon(orthotorch.param_groups(m), lr=0.02, adamw_lr=3e-3),
        "Dion-r4": lambda m: make_optimizer("Dion-r4", m),
        "Dion": lambda m: make_optimizer("Dion", m),
    }
    for name, build in runs.items():
        model = dist_workers._fsdp_model(make_model(torch.float32))
        opt = build(model)
        dist_workers.train(model, opt, range(1))  # state creation and the first step
        odist.STATS.reset()
        dist_workers.train(model, opt, range(1, 3))
        result[name] = odist.STATS.bytes_sent / 2
    return result


def worker(rank: int, world: int, port: int, scenario: str, out: str, names: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict = {}
    for name in names.split(","):
        runs = {}
        for layout in ("ddp", "fsdp"):
            if layout == "ddp":
                ddp = nn.parallel.DistributedDataParallel(make_model())
                model, trained = ddp.module, ddp
            else:
                model = trained = dist_workers._fsdp_model(make_model())
            opt = make_optimizer(name, model)
            odist.STATS.reset()
            dist_workers.train(trained, opt, range(CHECKPOINT_STEP))
            if layout == "fsdp":
                model_sd, optim_sd = get_state_dict(model, opt)
                checkpoint = os.path.join(out, f"ckpt-{name}")
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
            dist_workers.train(trained, opt, range(CHECKPOINT_STEP, STEPS))
            runs[layout] = {
                "params": dist_workers.full_state(model),
                "states": full_states(model, opt),
                "placements": state_placements(opt),
                "stats": vars(odist.STATS).copy(),
            }
        results[name] = runs
    if scenario == "with_bytes":
        results["bytes_per_step"] = bytes_per_step(rank, out)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)  # skip gloo teardown, which intermittently aborts (see dist_workers.worker)
