"""SPECTRA under DDP (replicated parameters) and FSDP2 (DTensor row shards), 2 gloo processes.

Reuses the model, data, single-process comparison and port/tolerance helpers of
tests/dist_workers.py and tests/test_distributed.py; the scenarios here wrap AdamW in SPECTRA
with both the gradient pre-clip and the update post-clip active (thresholds below the spectral
norms that occur), so every clip changes the result and is split across the ranks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dist_workers
import orthotorch
from orthotorch import distributed as odist
from test_distributed import WORLD, assert_close_to, spawn_ranks

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available"
)
# Matrices of TinyTransformerish (embed, q, k, v, up, down, gate, head), each clipped twice
# per step (gradient pre-clip and update post-clip).
MATRICES = 8
CLIPS_PER_STEP = 2 * MATRICES


def make_spectra(model: nn.Module, route: str, mode: str = "auto") -> orthotorch.SPECTRA:
    base = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    return orthotorch.SPECTRA(base, clip=1.0, pre_clip=0.5, route=route, distributed=mode)


def reference(route: str) -> dict[str, torch.Tensor]:
    model = dist_workers.make_model()
    dist_workers.train(model, make_spectra(model, route, "off"), range(dist_workers.STEPS))
    return dist_workers.full_state(model)


def scenario_ddp(rank: int, out: str, route: str) -> None:
    model = nn.parallel.DistributedDataParallel(dist_workers.make_model())
    opt = make_spectra(model.module, route)
    odist.STATS.reset()
    dist_workers.train(model, opt, range(dist_workers.STEPS))
    state = dist_workers.full_state(model.module)
    torch.save({"params": state, "stats": vars(odist.STATS).copy()}, Path(out, f"rank{rank}.pt"))


def scenario_fsdp(rank: int, out: str, route: str) -> None:
    model = dist_workers._fsdp_model()
    opt = make_spectra(model, route)
    odist.STATS.reset()
    dist_workers.train(model, opt, range(dist_workers.STEPS))
    state = dist_workers.full_state(model)
    torch.save({"params": state, "stats": vars(odist.STATS).copy()}, Path(out, f"rank{rank}.pt"))


SCENARIOS = {"ddp": scenario_ddp, "fsdp": scenario_fsdp}


def worker(rank: int, port: int, scenario: str, out: str, route: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    SCENARIOS[scenario](rank, out, route)
    dist.barrier()
    # As in dist_workers.worker: gloo teardown intermittently aborts after the work is done.
    os._exit(0)


def run(scenario: str, tmp_path: Path, route: str) -> list[dict]:
    return spawn_ranks(
        worker,
        lambda rank, port: (rank, port, scenario, str(tmp_path), route),
        tmp_path,
        f"scenario {scenario!r}",
    )


@pytest.mark.parametrize(
    "scenario,route",
    [("ddp", "auto"), ("fsdp", "gram")],  # the CPU default (eigh) and the matmul-only route
)
def test_spectra_matches_single_process_and_splits_work(scenario, route, tmp_path) -> None:
    results = run(scenario, tmp_path, route)
    expected = reference(route)
    untouched = dist_workers.full_state(dist_workers.make_model())
    for key in expected:  # the run did move every matrix (so the comparison means something)
        assert not torch.equal(expected[key], untouched[key]), key
    for r in results:
        assert_close_to(expected, r["params"])
    per_step = [r["stats"]["matrices_processed"] / dist_workers.STEPS for r in results]
    assert sum(per_step) == CLIPS_PER_STEP
    assert max(per_step) - min(per_step) <= 2  # one per clip pass at most
