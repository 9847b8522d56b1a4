"""DDP and FSDP2 on CPU/gloo with 2 spawned processes, compared with single-process runs."""

from __future__ import annotations

import multiprocessing as mp
import socket
from pathlib import Path

import pytest
import torch

import dist_workers

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)
WORLD = 2
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(scenario: str, tmp_path: Path, name: str = "Muon") -> list[dict]:
    """Run a scenario on WORLD spawned ranks; a hang fails the test after TIMEOUT_S."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(
            target=dist_workers.worker, args=(rank, WORLD, port, scenario, str(tmp_path), name)
        )
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"scenario {scenario!r} hung for {TIMEOUT_S}s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_close_to(reference: dict, params: dict) -> None:
    assert reference.keys() == params.keys()
    for key, ref in reference.items():
        err = ((params[key] - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (key, err)


def total_matrices() -> int:
    model = dist_workers.make_model()
    return sum(
        1
        for g in dist_workers.orthotorch.param_groups(model)
        if "algorithm" not in g
        for _ in g["params"]
    )


@pytest.mark.parametrize("name", ["Muon", "ROOT"])
@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_matches_single_process_and_splits_work(scenario: str, name: str, tmp_path: Path) -> None:
    results = run(scenario, tmp_path, name)
    reference = dist_workers.reference(name)
    for r in results:
        assert_close_to(reference, r["params"])
    per_step = [r["stats"]["matrices_processed"] / dist_workers.STEPS for r in results]
    assert sum(per_step) == total_matrices()
    assert max(per_step) - min(per_step) <= 1
    # Bytes sent per step stay under twice the orthogonalized parameters (fp32 here).
    ortho_bytes = 4 * sum(
        p.numel()
        for name, p in dist_workers.make_model().named_parameters()
        if p.ndim == 2 and not name.startswith(("embed", "head"))
    )
    for r in results:
        assert r["stats"]["bytes_sent"] / dist_workers.STEPS <= 2 * ortho_bytes


def test_fsdp_checkpoint_resumes_on_one_rank(tmp_path: Path) -> None:
    results = run("fsdp_checkpoint", tmp_path)
    resumed = dist_workers.resume_single_process(str(tmp_path), "Muon")
    assert_close_to(results[0]["params"], resumed)


def test_gradient_on_one_rank_and_small_groups_do_not_hang(tmp_path: Path) -> None:
    results = run("no_hang", tmp_path)
    assert all(r["lonely_moved"] for r in results)
    assert torch.equal(results[0]["shared"], results[1]["shared"])


def test_ranks_with_different_parameters_raise_instead_of_hanging(tmp_path: Path) -> None:
    results = run("mismatch", tmp_path)
    for r in results:
        assert "ranks disagree on the parameters of Muon" in r["error"]


def test_nan_in_one_shard_stops_every_rank(tmp_path: Path) -> None:
    results = run("nan_on_one_rank", tmp_path)
    for r in results:
        assert "gradient of parameter 'up.weight'" in r["error"] or "contains NaN" in r["error"]


# ------------------------------------------------------------------- low-rank optimizers
LOWRANK = list(dist_workers.LOWRANK_VARIANTS)


def ortho_bytes() -> int:
    """fp32 bytes of the matrices in the orthogonalized (here: low-rank) groups."""
    return 4 * sum(
        p.numel()
        for name, p in dist_workers.make_model().named_parameters()
        if p.ndim == 2 and not name.startswith(("embed", "head"))
    )


@pytest.fixture(scope="module")
def lowrank_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One spawn for every low-rank variant under DDP and FSDP2 (each spawn costs seconds)."""
    return run("lowrank", tmp_path_factory.mktemp("lowrank"), ",".join(LOWRANK))


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
@pytest.mark.parametrize("variant", LOWRANK)
def test_lowrank_matches_single_process_and_splits_work(
    lowrank_runs: list[dict], variant: str, layout: str
) -> None:
    runs = [r[variant][layout] for r in lowrank_runs]
    reference = dist_workers.reference(variant)
    for r in runs:
        assert_close_to(reference, r["params"])
    # The subspaces (int32 DCT indices, SVD bases) are the same on every rank, bit for bit.
    for a, b in zip(runs[0]["subspaces"], runs[1]["subspaces"], strict=True):
        assert torch.equal(a, b)
    matrices = total_matrices()
    refreshes = len(range(0, dist_workers.STEPS, 2))  # update_every=2
    found = [r["stats"]["owned_results"] for r in runs]
    assert sum(found) == refreshes * matrices
    assert max(found) - min(found) <= refreshes
    done = [r["stats"]["matrices_processed"] / dist_workers.STEPS for r in runs]
    if variant.endswith("-ortho"):
        assert sum(done) == matrices
        assert max(done) - min(done) <= 1
    else:
        assert sum(done) == 0
    for r in runs:
        assert r["stats"]["bytes_sent"] / dist_workers.STEPS <= 2 * ortho_bytes()


def test_lowrank_fsdp_checkpoint_resumes_on_one_rank(tmp_path: Path) -> None:
    """DCP save on 2 ranks (row-sharded and replicated moments, int32 indices), resume on 1."""
    run("lowrank_checkpoint", tmp_path, ",".join(LOWRANK))
    for variant in LOWRANK:
        saved = torch.load(tmp_path / variant / "rank0.pt", weights_only=False)["params"]
        resumed = dist_workers.resume_single_process(str(tmp_path / variant), variant)
        assert_close_to(saved, resumed)


def test_lowrank_no_hang_plain_and_sharded(tmp_path: Path) -> None:
    results = run("lowrank_no_hang", tmp_path, ",".join(LOWRANK))
    for variant in LOWRANK:
        per_rank = [r[variant] for r in results]
        # Where the gradient is missing it counts as zero: Adam variants then leave the weight
        # there (their moments are per rank), orthogonalized ones take the owner's result.
        assert per_rank[0]["plain"]["lonely_moved"], variant
        assert torch.equal(per_rank[0]["plain"]["shared"], per_rank[1]["plain"]["shared"])
        for r in per_rank:
            assert all(r["sharded_moved"]) and r["sharded_finite"], variant
        for a, b in zip(per_rank[0]["sharded"], per_rank[1]["sharded"], strict=True):
            assert torch.equal(a, b), variant
    # An unsupported DTensor layout is refused when the optimizer is built, naming the weight.
    for r in results:
        assert (
            "parameter params[0]: it is a DTensor with placements (Replicate()"
            in (r["layout_error"])
        )
