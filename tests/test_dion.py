"""Dion: the paper's algorithm step by step in float64 (update, error-feedback buffer, Q),
convergence to U V^T at full rank, rank of the updates, orthonormalization methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthotorch
from orthotorch.functional.dion import (
    cholesky_qr,
    dion_reference,
    dion_scale,
    initial_right_factor,
    orthonormalize,
    p_on_rows,
)


def random_grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, dtype=torch.float64, generator=gen) for _ in range(steps)]


@pytest.mark.parametrize(
    ("shape", "rank", "qr_method", "error_feedback"),
    [
        ((6, 10), 1, "auto", True),
        ((6, 10), 3, "cholesky", True),
        ((6, 10), 1.0, "auto", False),
        ((12, 5), 3, "auto", True),
        ((12, 5), 1.0, "cholesky", True),
        ((12, 5), 2, "cholesky", False),
        ((7, 7), 1.0, "auto", True),
        ((7, 7), 3, "cholesky", True),
    ],
)
def test_matches_float64_reference(shape, rank, qr_method, error_feedback) -> None:
    grads = random_grads(shape, 4)
    W0 = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    p = nn.Parameter(W0.clone())
    lr, wd = 0.1, 0.05
    opt = orthotorch.Dion(
        [p], lr=lr, weight_decay=wd, rank=rank, qr_method=qr_method, error_feedback=error_feedback
    )
    r = min(shape) if isinstance(rank, float) else rank
    k = shape[1] if p_on_rows(shape) else shape[0]
    Q0 = initial_right_factor(k, r, 0, torch.float64)
    W = W0.clone()
    steps = dion_reference(grads, Q0, error_feedback=error_feedback)
    for G, D, M, Q in zip(grads, *steps, strict=True):
        p.grad = G.clone()
        opt.step()
        W = (1 - lr * wd) * W - lr * dion_scale(shape, "spectral_norm") * D
        state = opt.state[p]
        torch.testing.assert_close(p.detach(), W, rtol=0, atol=1e-11)
        torch.testing.assert_close(state["momentum_buffer"], M, rtol=0, atol=1e-11)
        torch.testing.assert_close(state["Q"], Q, rtol=0, atol=1e-10)
        # The update has rank <= r.
        s = torch.linalg.svdvals(D)
        assert (s[r:] <= 1e-12 * s[0]).all()


def test_error_feedback_buffer_follows_the_formula() -> None:
    """M_t = M_{t-1} + G_t - (1 - mu) P_t R_t^T with R_t = M^T P_t, independently of the class."""
    shape, r, mu = (9, 6), 2, 0.9
    grads = random_grads(shape, 3, seed=3)
    p = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = orthotorch.Dion([p], lr=0.0, rank=r, momentum=mu)
    M = torch.zeros(shape, dtype=torch.float64)
    Q = initial_right_factor(shape[1], r, 0, torch.float64)
    for G in grads:
        p.grad = G
        opt.step()
        M = M + G
        P = orthonormalize(M @ Q, "householder")
        R = M.T @ P
        M = M - (1 - mu) * P @ R.T
        Q = R / R.norm(dim=0)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], M, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(24, 10), (10, 24)])
def test_full_rank_constant_gradient_converges_to_polar_factor(shape) -> None:
    """At r = min(m, n), without error feedback, on a fixed gradient the power iteration
    converges to U V^T (rate (s_{i+1}/s_i)^2 per step): check against the SVD."""
    gen = torch.Generator().manual_seed(0)
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k, dtype=torch.float64, generator=gen))
    s = 0.6 ** torch.arange(k, dtype=torch.float64)  # errors shrink 0.36x per step
    G = U @ torch.diag(s) @ V.T
    p = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = orthotorch.Dion([p], lr=1.0, weight_decay=0.0, rank=1.0, error_feedback=False)
    errors = []
    for _ in range(20):
        before = p.detach().clone()
        p.grad = G
        opt.step()
        D = (before - p.detach()) / dion_scale(shape, "spectral_norm")
        errors.append((D - U @ V.T).norm().item())
    assert errors[0] > 0.1  # one step is not the polar factor
    assert errors[-1] < 1e-6


def test_zero_gradient_gives_zero_update_and_keeps_q() -> None:
    p = nn.Parameter(torch.randn(8, 5))
    opt = orthotorch.Dion([p], rank=3)
    before = p.detach().clone()
    p.grad = torch.zeros(8, 5)
    opt.step()
    Q0 = opt.state[p]["Q"].clone()
    torch.testing.assert_close(p.detach(), before * (1 - 0.01 * 0.01))
    p.grad = torch.randn(8, 5)
    opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["Q"]).all()
    assert not torch.equal(opt.state[p]["Q"], Q0)


def test_rank_deficient_momentum_stays_finite() -> None:
    """A momentum of rank 1 with r = 4: zero columns of R keep their Q columns, no NaN."""
    p = nn.Parameter(torch.zeros(10, 6))
    opt = orthotorch.Dion([p], rank=4, lr=1.0, weight_decay=0.0)
    g = torch.outer(torch.randn(10), torch.randn(6))
    for _ in range(3):
        before = p.detach().clone()
        p.grad = g
        opt.step()
        update = (p.detach() - before).double()
        assert torch.isfinite(update).all()
        assert torch.linalg.matrix_rank(update, rtol=1e-5) <= 4
    assert torch.isfinite(opt.state[p]["Q"]).all()


@pytest.mark.parametrize("condition", [1e2, 1e4, 1e6])
def test_cholesky_qr_is_orthonormal_and_matches_householder(condition: float) -> None:
    """Plain Cholesky-QR loses orthogonality as cond^2 * eps; the sketch preconditioning keeps
    float32 orthonormal to ~1e-6 up to cond 1e6, with Householder's (sign-fixed) basis."""
    gen = torch.Generator().manual_seed(0)
    m, r = 256, 16
    U, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64, generator=gen))
    s = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), r, dtype=torch.float64)
    P = (U @ torch.diag(s) @ V.T).float()
    Qc = cholesky_qr(P)
    eye = torch.eye(r)
    assert (Qc.T @ Qc - eye).norm() < 1e-5
    Qh = orthonormalize(P, "householder")
    # The two bases agree to ~cond * eps (the QR factor's own sensitivity).
    assert (Qc - Qh).norm() < 1e-6 * condition + 1e-5


def test_layout_blocks_have_their_own_rank_range() -> None:
    p = nn.Parameter(torch.randn(2, 4, 6))
    orthotorch.Dion([{"params": [p], "layouts": ["batch"]}], rank=4)  # each expert is 4x6
    with pytest.raises(ValueError, match=r"of shape \(2, 4, 6\) \(a 4x6 matrix\).*\[1, 4\]"):
        orthotorch.Dion([{"params": [p], "layouts": ["batch"]}], rank=5)
    q = nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"parameter params\[0\] of shape \(4, 6\).*\[1, 4\]"):
        orthotorch.Dion([q], rank=5)


def test_describe_uses_dion_scale() -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 2))
    table = orthotorch.describe(orthotorch.Dion(orthotorch.param_groups(model), rank=0.5))
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    assert rows["0.weight"][2] == "dion" and rows["0.weight"][-1] == "2"
    assert rows["2.weight"][-1] == "0.7071"  # sqrt(16 / 32), below 1 for wide matrices


# ------------------------------------------------------------------ distributed (2 gloo ranks)
# NorMuon's tests live here too: one spawn trains both under DDP and FSDP2.
DIST_NAMES = ["NorMuon", "Dion", "Dion-r4", "Dion-cholesky"]


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory: pytest.TempPathFactory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    import dist_workers_dion
    from test_distributed import WORLD, spawn_ranks

    out = tmp_path_factory.mktemp("normuon_dion")
    results = spawn_ranks(
        dist_workers_dion.worker,
        lambda rank, port: (rank, WORLD, port, "with_bytes", str(out), ",".join(DIST_NAMES)),
        out,
        "NorMuon/Dion under DDP and FSDP2",
    )
    return out, results


def assert_all_close(reference: dict, got: dict, tol: float = 1e-9) -> None:
    assert reference.keys() == got.keys()
    for key, ref in reference.items():
        err = ((got[key] - ref).norm() / ref.norm().clamp_min(1e-300)).item()
        assert err < tol, (key, err)


@pytest.mark.parametrize("name", DIST_NAMES)
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_distributed_matches_single_process(distributed_runs, name: str, layout: str) -> None:
    """Parameters and state (momentum, Q, NorMuon's v) after 5 steps equal the single-process
    run's, and every rank holds the same values.

    Dion's default ``qr_method="auto"`` uses Householder on a whole ``P`` and Cholesky-QR on a
    row-sharded one: the same basis up to rounding, except along directions the momentum does
    not have (up.weight's gradient has rank 23 < r = 24 at the first step: LayerNorm outputs
    have zero mean), where any orthonormal completion is valid and the methods pick different
    ones. Those Q columns then differ (0.41 relative in Q) while the parameters agree to 3e-10,
    so under FSDP2 "auto" is compared on parameters; "Dion-cholesky" (one method everywhere)
    checks the state exactly.
    """
    import dist_workers_dion

    _, results = distributed_runs
    params, states = dist_workers_dion.reference(name)
    ranks = [r[name][layout] for r in results]
    exact_state = layout == "ddp" or not name.startswith("Dion") or name == "Dion-cholesky"
    for run in ranks:
        assert_all_close(params, run["params"])
        if exact_state:
            assert_all_close(states, run["states"])
    if layout == "ddp":  # replicated state must stay bitwise identical across ranks
        for key, value in ranks[0]["states"].items():
            assert torch.equal(value, ranks[1]["states"][key]), key


def test_distributed_state_is_sharded_like_the_rows(distributed_runs) -> None:
    _, results = distributed_runs
    placements = results[0]["NorMuon"]["fsdp"]["placements"]
    assert placements == ["second_momentum_buffer:('S(0)',)"]
    # Q is on the small side: replicated for tall/square weights (columns), sharded for wide.
    assert results[0]["Dion"]["fsdp"]["placements"] == [
        "Q:('R',)",
        "Q:('S(0)',)",
    ]
    # Under DDP, Dion needs no collective at all (gradients are averaged already).
    assert results[0]["Dion"]["ddp"]["stats"]["bytes_sent"] == 0


@pytest.mark.parametrize("name", ["NorMuon", "Dion"])
def test_fsdp_checkpoint_resumes_in_one_process(distributed_runs, name: str) -> None:
    import dist_workers_dion

    out, _ = distributed_runs
    params, _ = dist_workers_dion.reference(name)
    resumed = dist_workers_dion.resume_single_process(name, str(out / f"ckpt-{name}"))
    assert_all_close(params, resumed)


def expected_dion_bytes(rank: float) -> int:
    """Bytes per step and rank of Dion under FSDP2 on 2 ranks, from the algorithm: float32
    all-reduces (counted as 2 (W - 1) / W = 1 times their size) of the sketch ``S P``
    (``ceil(1.25 r) x r``), the Gram matrix (``r x r``) and ``R`` (``n x r``) for a tall or
    square weight; of ``M^T Q`` (``n x r``) and ``r`` column norms for a wide one."""
    import math

    import dist_workers

    shapes = [
        tuple(p.shape)
        for g in orthotorch.param_groups(dist_workers.make_model())
        if g.get("algorithm") != "adamw"
        for p in (x[1] if isinstance(x, tuple) else x for x in g["params"])
    ]
    assert (57, 24) in shapes and (24, 57) in shapes
    total = 0
    for m, n in shapes:
        r = round(rank * min(m, n))
        if m >= n:
            total += math.ceil(1.25 * r) * r + r * r + n * r
        else:
            total += n * r + r
    return 4 * total


def test_dion_sends_only_rank_r_factors_under_fsdp(distributed_runs) -> None:
    """Nothing of size m x n travels: the bytes are exactly those of the r-column factors, so
    they fall with the rank (Muon's bf16 all_to_all of whole matrices is the comparison; on
    these 24-wide matrices it is as cheap as Dion at r = 6, on the reference set 512 x 2048 at
    r = 128 Dion sends ~0.2x: benchmarks/normuon_dion.py)."""
    _, results = distributed_runs
    for rank_results in results:
        sent = rank_results["bytes_per_step"]
        assert sent["Dion"] == expected_dion_bytes(1.0), sent
        assert sent["Dion-r4"] == expected_dion_bytes(0.25), sent
        assert sent["Dion-r4"] < 0.15 * sent["Dion"]
        assert sent["Muon"] > 0
