"""ARO under FSDP2 (DTensor parameters sharded on dim 0) and DDP, 2 spawned gloo processes.

ARO keeps a rotation per matrix. Under FSDP2 it is a DTensor sharded like its parameter's rows
(row layout, see orthotorch.functional.aro), packed beside the momentum so that
orthotorch.distributed.map_matrices hands each matrix's owner the whole ``[M | R]`` and every
rank gets back its rows of the direction and of the new rotation. The runs must reproduce the
single-process run, split the kernels evenly, and end with the same rotations.

In float64: ARO's QR of ``M f(R^T M)^T`` has about ``cond(M)^2``, so rounding-level gradient
differences (FSDP's sharded LayerNorm gradients differ from single-process ones by ~1e-7 in
float32) grow to 5e-4 relative in q.weight after 5 float32 steps (measured; step 1 is bitwise
equal). In float64 the same runs agree to 2e-12, which checks the distribution exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import dist_workers
import orthotorch
from orthotorch import distributed as odist
from test_distributed import WORLD, assert_close_to, spawn_ranks

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def make_aro(model: nn.Module, **kwargs) -> orthotorch.ARO:
    return orthotorch.ARO(orthotorch.param_groups(model), lr=0.02, adamw_lr=3e-3, **kwargs)


def rotations(model: nn.Module, opt: orthotorch.ARO) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        state = opt.state.get(p, {})
        if "rotation" in state:
            R = state["rotation"]
            out[name] = (R.full_tensor() if odist.is_dtensor(R) else R).detach().clone()
    return out


def make_model() -> nn.Module:
    return dist_workers.make_model().double()


def fsdp_model() -> nn.Module:
    """dist_workers' FSDP2 layout (per-Linear shards plus the root), on the float64 model."""
    return dist_workers._fsdp_model(make_model())


def reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = make_model()
    opt = make_aro(model, distributed="off")
    dist_workers.train(model, opt, range(dist_workers.STEPS))
    return dist_workers.full_state(model), rotations(model, opt)


def _worker(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if scenario == "fsdp":
        model = inner = fsdp_model()
    else:
        model = nn.parallel.DistributedDataParallel(make_model())
        inner = model.module
    opt = make_aro(inner)
    odist.STATS.reset()
    if scenario == "fsdp":
        _train_and_checkpoint(model, opt, out)
    else:
        dist_workers.train(model, opt, range(dist_workers.STEPS))
    sharded = [odist.is_dtensor(s["rotation"]) for s in opt.state.values() if "rotation" in s]
    torch.save(
        {
            "params": dist_workers.full_state(inner),
            "rotations": rotations(inner, opt),
            "rotation_is_dtensor": sharded,
            "stats": vars(odist.STATS).copy(),
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.barrier()
    os._exit(0)  # skip gloo teardown, which intermittently aborts (see dist_workers.worker)


def _train_and_checkpoint(model: nn.Module, opt: orthotorch.ARO, out: str) -> None:
    # (The FSDP scenario: its 5 steps are the comparison run and the checkpoint's source.)
    """3 steps, a torch.distributed.checkpoint save of model and optimizer, 2 more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    dist_workers.train(model, opt, range(3))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out, "ckpt"))
    dist_workers.train(model, opt, range(3, dist_workers.STEPS))


def resume_single_process(out: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Load the 2-rank sharded checkpoint into one plain process and finish the run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = make_model()
    opt = make_aro(model)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(out, "ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    dist_workers.train(model, opt, range(3, dist_workers.STEPS))
    steps = [s["step"] for s in opt.state.values() if "rotation" in s]
    return dist_workers.full_state(model), steps


def run(scenario: str, tmp_path: Path) -> list[dict]:
    return spawn_ranks(
        _worker,
        lambda rank, port: (rank, WORLD, port, scenario, str(tmp_path)),
        tmp_path,
        f"scenario {scenario!r}",
    )


@pytest.mark.parametrize("scenario", ["fsdp", "ddp"])
def test_aro_matches_single_process_and_splits_work(scenario: str, tmp_path: Path) -> None:
    results = run(scenario, tmp_path)
    params, rots = reference()
    # q, k, v (24x24), up (57x24), down (24x57); the 1x24 gate is vector-shaped: AdamW.
    matrices = len(rots)
    assert matrices == 5
    for r in results:
        assert_close_to(params, r["params"])
        assert_close_to(rots, r["rotations"])
        # Sharded parameters get sharded rotations (no rank holds every full rotation).
        assert all(r["rotation_is_dtensor"]) == (scenario == "fsdp")
    # Every rank holds the same (replicated or gathered) rotations, bit for bit.
    for name, R in results[0]["rotations"].items():
        assert torch.equal(R, results[1]["rotations"][name]), name
    per_step = [r["stats"]["matrices_processed"] / dist_workers.STEPS for r in results]
    assert sum(per_step) == matrices
    assert max(per_step) - min(per_step) <= 1
    if scenario == "fsdp":
        # The FSDP run saved a torch.distributed.checkpoint after step 3: the sharded rotations
        # (row layout) reshard into one plain process, which continues identically.
        resumed, steps = resume_single_process(str(tmp_path))
        assert_close_to(results[0]["params"], resumed)
        assert steps == [dist_workers.STEPS] * matrices  # step counts were restored too
