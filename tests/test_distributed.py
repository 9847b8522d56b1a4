"""DDP and FSDP2 on CPU/gloo with 2 spawned processes, compared with single-process runs."""

from __future__ import annotations

import multiprocessing as mp
import socket
from collections.abc import Callable
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


def spawn_ranks(
    target: Callable[..., None], args: Callable[[int, int], tuple], out: Path, what: str
) -> list[dict]:
    """Run ``target(*args(rank, port))`` on WORLD spawned ranks and load each ``rank{r}.pt``
    from ``out``; a hang fails the test after TIMEOUT_S instead of blocking the suite."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=args(rank, port)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{what} hung for {TIMEOUT_S}s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def run(scenario: str, tmp_path: Path, name: str = "Muon") -> list[dict]:
    """Run a :mod:`dist_workers` scenario on WORLD spawned ranks."""
    return spawn_ranks(
        dist_workers.worker,
        lambda rank, port: (rank, WORLD, port, scenario, str(tmp_path), name),
        tmp_path,
        f"scenario {scenario!r}",
    )


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


def orthogonalized_shapes() -> list[tuple[int, ...]]:
    """Shapes of the parameters in the orthogonalized (or low-rank) groups."""
    model = dist_workers.make_model()
    return [
        tuple(named[1].shape)
        for g in dist_workers.orthotorch.param_groups(model)
        if "algorithm" not in g
        for named in g["params"]
    ]


ORTHO = ["Muon", "ROOT"]
LOWRANK = list(dist_workers.LOWRANK_VARIANTS)


def ortho_bytes() -> int:
    """fp32 bytes of the matrices in the orthogonalized (or low-rank) groups."""
    return 4 * sum(
        p.numel()
        for name, p in dist_workers.make_model().named_parameters()
        if p.ndim == 2 and not name.startswith(("embed", "head"))
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One spawn trains every optimizer under DDP and under FSDP2 (each spawn costs seconds)."""
    return run("train_all", tmp_path_factory.mktemp("train_all"), ",".join(ORTHO + LOWRANK))


@pytest.mark.parametrize("name", ORTHO)
@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_matches_single_process_and_splits_work(
    trained: list[dict], scenario: str, name: str
) -> None:
    results = [r[name][scenario] for r in trained]
    reference = dist_workers.reference(name)
    for r in results:
        assert_close_to(reference, r["params"])
    per_step = [r["stats"]["matrices_processed"] / dist_workers.STEPS for r in results]
    assert sum(per_step) == total_matrices()
    assert max(per_step) - min(per_step) <= 1
    # Bytes sent per step stay under twice the orthogonalized parameters (fp32 here).
    for r in results:
        assert r["stats"]["bytes_sent"] / dist_workers.STEPS <= 2 * ortho_bytes()


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One spawn: for each optimizer, 3 steps on 2 FSDP2 ranks, a DCP save, 2 more steps."""
    out = tmp_path_factory.mktemp("checkpoint")
    run("lowrank_checkpoint", out, ",".join(["Muon", *LOWRANK]))
    return out


def assert_resumes(out: Path, name: str) -> None:
    saved = torch.load(out / name / "rank0.pt", weights_only=False)["params"]
    resumed = dist_workers.resume_single_process(str(out / name), name)
    assert_close_to(saved, resumed)


def test_fsdp_checkpoint_resumes_on_one_rank(checkpointed: Path) -> None:
    assert_resumes(checkpointed, "Muon")


@pytest.fixture(scope="module")
def no_hang(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run("lowrank_no_hang", tmp_path_factory.mktemp("no_hang"), ",".join(["Muon", *LOWRANK]))


def test_gradient_on_one_rank_and_small_groups_do_not_hang(no_hang: list[dict]) -> None:
    results = [r["Muon"]["plain"] for r in no_hang]
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
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
@pytest.mark.parametrize("variant", LOWRANK)
def test_lowrank_matches_single_process_and_splits_work(
    trained: list[dict], variant: str, layout: str
) -> None:
    runs = [r[variant][layout] for r in trained]
    reference = dist_workers.reference(variant)
    for r in runs:
        assert_close_to(reference, r["params"])
    # The subspaces (int32 DCT indices, SVD bases) are the same on every rank, bit for bit.
    for a, b in zip(runs[0]["subspaces"], runs[1]["subspaces"], strict=True):
        assert torch.equal(a, b)
    matrices = total_matrices()
    refreshes = len(range(0, dist_workers.STEPS, 2))  # update_every=2
    owned = matrices
    if layout == "fsdp" and variant.startswith("DCT"):
        # Tall sharded weights are scored by every rank on its rows (all-reduced totals).
        owned -= sum(rows > cols for rows, cols in orthogonalized_shapes())
    found = [r["stats"]["owned_results"] for r in runs]
    assert sum(found) == refreshes * owned
    assert max(found) - min(found) <= refreshes
    done = [r["stats"]["matrices_processed"] / dist_workers.STEPS for r in runs]
    if variant.endswith("-ortho"):
        assert sum(done) == matrices
        assert max(done) - min(done) <= 1
    else:
        assert sum(done) == 0
    for r in runs:
        assert r["stats"]["bytes_sent"] / dist_workers.STEPS <= 2 * ortho_bytes()


@pytest.mark.parametrize("variant", LOWRANK)
def test_lowrank_fsdp_checkpoint_resumes_on_one_rank(checkpointed: Path, variant: str) -> None:
    """Row-sharded and replicated moments and int32 indices reshard from 2 ranks to 1; the
    resumed run refreshes its subspace (and rotates moments) at step 4."""
    assert_resumes(checkpointed, variant)


def test_lowrank_no_hang_plain_and_sharded(no_hang: list[dict]) -> None:
    results = no_hang
    for variant in ["Muon", *LOWRANK]:
        per_rank = [r[variant] for r in results]
        # Where the gradient is missing it counts as zero: Adam variants then leave the weight
        # there (their moments are per rank), orthogonalized ones take the owner's result.
        assert per_rank[0]["plain"]["lonely_moved"], variant
        assert torch.equal(per_rank[0]["plain"]["shared"], per_rank[1]["plain"]["shared"])
        for r in per_rank:
            assert all(r["sharded_moved"]) and r["sharded_finite"], variant
        for a, b in zip(per_rank[0]["sharded"], per_rank[1]["sharded"], strict=True):
            assert torch.equal(a, b), variant
    # A layout the low-rank state cannot serve is refused when the optimizer is built, naming
    # the weight; Muon (all whole-matrix work in map_matrices) takes any 1-D/2-D mesh layout.
    for r in results:
        assert (
            "parameter params[0]: it is a DTensor with placements (Replicate()"
            in r["layout_error_DCTAdamW"]
        )
        assert r["layout_error_Muon"] == ""
