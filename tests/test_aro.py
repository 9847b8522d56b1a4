"""ARO: the functional pieces against their definitions, the optimizer, rotation_every.

The shared conformance checks (loss, resume, dtype, NaN, errors, ...) run ARO through
tests/optim_db.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import orthotorch
from orthotorch.functional import aro as aro_functional
from orthotorch.functional.aro import (
    aro_kernel,
    aro_reference,
    pack,
    packed_cols,
    param_cols,
    rotation_from_rows,
    rotation_layout,
    rotation_to_rows,
    sinkhorn_normalize,
    sinkhorn_scalings,
)
from orthotorch.linalg import dispatch


def test_sinkhorn_normalises_rows_and_columns_and_is_sign_equivariant() -> None:
    gen = torch.Generator().manual_seed(0)
    Y = torch.randn(2, 6, 10, generator=gen, dtype=torch.float64) * torch.rand(2, 6, 1)
    F = sinkhorn_normalize(Y, iters=30)
    rms = lambda x, d: x.square().mean(d, keepdim=isinstance(d, tuple)).sqrt()  # noqa: E731
    assert torch.allclose(rms(F, -2), torch.ones(2, 10, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(rms(F, -1), torch.ones(2, 6, dtype=torch.float64), atol=1e-3)
    # The last pass normalises columns: the RMS of f(Y) is one (to O(eps)) after any iters.
    one = torch.ones(2, 1, 1).double()
    assert torch.allclose(rms(sinkhorn_normalize(Y, 1), (-2, -1)), one, atol=1e-3)
    S = torch.diag(torch.tensor([1.0, -1, 1, -1, -1, 1], dtype=torch.float64))
    assert torch.allclose(sinkhorn_normalize(S @ Y, 5), S @ sinkhorn_normalize(Y, 5))
    assert torch.equal(sinkhorn_normalize(torch.zeros(3, 4)), torch.zeros(3, 4))


def test_sinkhorn_matches_alternating_normalisation_without_eps() -> None:
    """The scaling-vector form equals rescaling the whole matrix pass after pass (eps = 0)."""
    gen = torch.Generator().manual_seed(1)
    Y = torch.randn(3, 7, 11, generator=gen, dtype=torch.float64) * torch.rand(3, 7, 1)
    X = Y / Y.square().mean((-2, -1), keepdim=True).sqrt()
    for _ in range(4):
        X = X / X.square().mean(-1, keepdim=True).sqrt()
        X = X / X.square().mean(-2, keepdim=True).sqrt()
    assert torch.allclose(sinkhorn_normalize(Y, 4, eps=0.0), X, atol=1e-12)
    Ya, r, c = sinkhorn_scalings(Y, 4, eps=0.0)
    assert r.shape == (3, 7, 1) and c.shape == (3, 1, 11)
    assert torch.allclose(r * Ya * c, X, atol=1e-12)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_sinkhorn_and_kernel_stay_finite_on_huge_and_tiny_input(scale: float) -> None:
    Y = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    F = sinkhorn_normalize(Y * scale)
    assert torch.allclose(F, sinkhorn_normalize(Y), rtol=1e-4, atol=1e-5)
    P = pack(Y * scale, torch.zeros(rotation_layout((4, 6))))
    out = aro_kernel(P)
    assert torch.allclose(out, aro_kernel(pack(Y, torch.zeros(4, 4))), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shape", [(5, 12), (12, 5), (7, 7), (20, 16), (48, 16), (1, 6), (6, 1)])
def test_rotation_row_layout_round_trips(shape: tuple[int, int]) -> None:
    k = min(shape)
    R = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(0)))[0]
    S = rotation_to_rows(R, shape[0])
    assert S.shape == rotation_layout(shape) and S.shape[1] <= shape[1]
    assert torch.equal(rotation_from_rows(S, k), R)
    assert S.reshape(-1)[k * k :].eq(0).all()  # padding only
    assert param_cols(shape[0], packed_cols(shape)) == shape[1]
    # Zeros (how the state starts, also as a sharded DTensor) stand for R_0 = I.
    assert torch.equal(rotation_from_rows(torch.zeros(rotation_layout(shape)), k), torch.eye(k))
    if shape[0] <= shape[1]:
        assert torch.equal(S, R)  # wide and square: the row layout is R itself


def test_param_cols_rejects_a_width_no_shape_packs_to() -> None:
    # 4 x 7 would be a 4 x 3 or 4 x 4 parameter: 3 + ceil(9/4) = 6, 4 + 4 = 8.
    with pytest.raises(ValueError, match="4 x 7 is not a packed ARO matrix"):
        param_cols(4, 7)


@pytest.mark.parametrize("path", ["cpu_loop", "batched", "2d", "cholesky"])
def test_kernel_matches_reference_and_rotation_is_orthogonal(path: str, monkeypatch) -> None:
    """The packed kernel (per-matrix CPU loop, batched stack, single 2-D matrix, the
    accelerators' shifted CholeskyQR route forced on the CPU) equals the readable float64 reference,
    for tall and wide matrices, from a given rotation and from the zero (identity) state."""
    # Small matrices run batched; a zero threshold sends them through the loop instead.
    monkeypatch.setattr(aro_functional, "_CPU_LOOP_FROM", 0 if path == "cpu_loop" else 1 << 62)
    if path == "cholesky":
        qr_q = aro_functional._qr_q
        monkeypatch.setattr(aro_functional, "_qr_q", lambda A: qr_q(A, route="cholesky"))
    gen = torch.Generator().manual_seed(0)
    for shape in [(12, 5), (5, 12), (20, 16)]:
        M = torch.randn(3, *shape, generator=gen)
        k, tall = min(shape), shape[0] > shape[1]
        R = torch.linalg.qr(torch.randn(3, k, k, generator=gen))[0]
        for start in (R, torch.zeros(3, k, k)):
            P = torch.stack([pack(M[j], rotation_to_rows(start[j], shape[0])) for j in range(3)])
            transposed = P.shape[-2] > P.shape[-1]
            X = P.mT if transposed else P
            if path == "2d":
                Y = torch.stack([aro_kernel(x, transposed) for x in X.unbind(0)])
            else:
                Y = aro_kernel(X, transposed)
            assert Y.shape == X.shape
            Y = Y.mT if transposed else Y
            for j in range(3):
                wide = M[j].T if tall else M[j]
                D_ref, R_ref = aro_reference(wide, start[j] if start is R else torch.eye(k))
                D = Y[j, :, : shape[1]]
                R_new = rotation_from_rows(Y[j, :, shape[1] :], k).double()
                assert torch.allclose((D.T if tall else D).double(), D_ref, atol=1e-4)
                assert torch.allclose(R_new, R_ref, atol=1e-4)
                eye = torch.eye(k, dtype=torch.float64)
                assert torch.allclose(R_new.T @ R_new, eye, atol=1e-5)


def _packed_stack(count: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(shape)
    R = torch.linalg.qr(torch.randn(count, k, k, generator=gen))[0]
    M = torch.randn(count, *shape, generator=gen)
    return torch.stack([pack(M[j], rotation_to_rows(R[j], shape[0])) for j in range(count)])


@pytest.mark.parametrize("plan", [("batched", 1), ("looped", 1), ("chunked", 2)])
def test_kernel_gives_one_result_under_every_dispatch_plan(plan: tuple[str, int]) -> None:
    P = _packed_stack(4, (20, 12))
    with dispatch.forced("batched"):
        reference = aro_kernel(P)
    with dispatch.forced(*plan):
        assert torch.allclose(aro_kernel(P), reference, atol=1e-5)


def test_kernel_plan_is_measured_per_bucket(isolated_plans) -> None:
    P = _packed_stack(3, (16, 24), seed=1)
    with dispatch.measuring():
        out = aro_kernel(P, dtype=torch.bfloat16)
    (row,) = dispatch.last_measured()
    assert row["kernel"] == "aro5-bfloat16" and row["count"] == 3
    with dispatch.forced("batched"):
        assert torch.allclose(out, aro_kernel(P, dtype=torch.bfloat16), atol=1e-2)


def test_cholesky_qr_route_matches_householder_and_falls_back() -> None:
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(4, 32, 32, generator=gen)
    householder = aro_functional._qr_q(A, route="householder")
    cholesky = aro_functional._qr_q(A, route="cholesky")
    assert (cholesky - householder).abs().max() < 1e-4  # same sign convention: diag(T) > 0
    assert torch.equal(aro_functional._qr_q(A), householder)  # the CPU's default route
    # Condition number 1e10: beyond plain CholeskyQR2 in float64 (1e8), within the shifted one.
    U, _ = torch.linalg.qr(torch.randn(4, 32, 32, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(4, 32, 32, generator=gen, dtype=torch.float64))
    bad = (U * torch.logspace(0, -10, 32, dtype=torch.float64)) @ V.mT
    Q, ok = aro_functional._shifted_cholesky_qr(bad)
    assert ok.all()
    assert (Q - aro_functional._householder_q(bad)).abs().max() < 1e-4
    # Rank 10 of 32 (float32): the shift still factors it; Q is an orthonormal completion with
    # A = Q T, T upper triangular (the QR of a rank-deficient matrix is not unique).
    low = torch.randn(4, 32, 10, generator=gen) @ torch.randn(4, 10, 32, generator=gen)
    Q = aro_functional._qr_q(low, route="cholesky")
    eye = torch.eye(32)
    assert torch.allclose(Q.mT @ Q, eye.expand(4, 32, 32), atol=1e-5)
    T = Q.mT @ low
    assert torch.allclose(Q @ T.triu(), low, atol=1e-4 * low.abs().max())
    # A zero matrix has no Cholesky factor: the whole stack falls back to Householder.
    stack = torch.cat([A[:3], torch.zeros(1, 32, 32)])
    _, ok = aro_functional._shifted_cholesky_qr(stack)
    assert ok.tolist() == [True, True, True, False]
    fallback = aro_functional._qr_q(stack, route="cholesky")
    assert torch.equal(fallback, aro_functional._qr_q(stack, route="householder"))
    with pytest.raises(ValueError, match="route must be 'householder' or 'cholesky', got 'lu'"):
        aro_functional._qr_q(A, route="lu")


def test_step_is_rms_matched_and_state_holds_rotation() -> None:
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(48, 16))  # tall: the rotation is 16 x 16
    opt = orthotorch.ARO([W], lr=0.1, weight_decay=0.0)
    before = W.detach().clone()
    W.grad = torch.randn(48, 16)
    opt.step()
    rms = (W.detach() - before).square().mean().sqrt().item()
    assert abs(rms - 0.1 * 0.2) < 1e-5  # lr * rms_scale: AdamW-like update size
    assert opt.state[W]["rotation"].shape == rotation_layout((48, 16)) == (48, 6)
    R = rotation_from_rows(opt.state[W]["rotation"], 16)
    assert torch.allclose(R.T @ R, torch.eye(16), atol=1e-5)
    # The first step with R_0 = I equals the readable reference on the transposed momentum.
    M = opt.state[W]["momentum_buffer"]
    D_ref, _ = aro_reference(M.T, torch.eye(16))
    assert torch.allclose(before - W.detach(), (0.1 * 0.2 * D_ref.T).float(), atol=1e-5)


def test_rotation_differs_from_identity_and_loss_goes_down() -> None:
    torch.manual_seed(0)
    A = torch.randn(32, 32)
    W = nn.Parameter(torch.zeros(32, 32))
    opt = orthotorch.ARO([W], lr=0.2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = (W - A).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert not torch.allclose(opt.state[W]["rotation"], torch.eye(32), atol=1e-2)


# DDP and FSDP2 runs: tests/test_distributed_aro.py.


# ----------------------------------------------------------------------------- rotation_every
def test_rotation_every_keeps_the_rotation_between_refreshes() -> None:
    """With rotation_every=3 the rotation changes at steps 1 and 4 only, and the steps in
    between are R f(R^T M) with the kept R (the float64 reference's f, rotation unchanged)."""
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(10, 24, dtype=torch.float64))
    opt = orthotorch.ARO([W], lr=0.1, weight_decay=0.0, rotation_every=3)
    seen = []
    for step in range(5):
        before = W.detach().clone()
        W.grad = torch.randn(10, 24, dtype=torch.float64)
        R_prev = rotation_from_rows(opt.state[W]["rotation"], 10) if step else torch.eye(10)
        opt.step()
        R = opt.state[W]["rotation"].clone()
        seen.append(R)
        if step % 3:
            M = opt.state[W]["momentum_buffer"]
            D = R_prev @ sinkhorn_normalize(R_prev.T @ M)
            assert torch.allclose(before - W.detach(), 0.1 * 0.2 * D, atol=1e-12)
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert not torch.allclose(seen[2], seen[3])
    assert torch.equal(seen[3], seen[4])
    assert opt.state[W]["step"] == 5


def test_rotation_every_one_is_the_default_algorithm() -> None:
    torch.manual_seed(0)
    W1 = nn.Parameter(torch.randn(12, 8))
    W2 = nn.Parameter(W1.detach().clone())
    a = orthotorch.ARO([W1], lr=0.05)
    b = orthotorch.ARO([W2], lr=0.05, rotation_every=1)
    for _ in range(3):
        g = torch.randn(12, 8)
        W1.grad, W2.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(W1, W2)


@pytest.mark.parametrize("bad", [0, 1.5, True])
def test_rotation_every_must_be_a_positive_int(bad) -> None:
    with pytest.raises(ValueError, match=rf"rotation_every must be a positive int, got {bad!r}"):
        orthotorch.ARO([nn.Parameter(torch.randn(4, 4))], rotation_every=bad)


# ----------------------------------------------------------------------------- matmul_dtype
@pytest.mark.parametrize("shape", [(48, 144), (144, 48)])
def test_bf16_products_stay_close_to_float32(shape: tuple[int, int]) -> None:
    """bf16 operands (QR and scalings float32): the direction within 2% (relative Frobenius;
    measured 0.4% for full-rank, well-conditioned momenta), the rotation still orthogonal to
    float32 precision and within 1e-2 of float32's, everything returned in float32."""
    gen = torch.Generator().manual_seed(3)
    k = min(shape)
    M = torch.randn(2, *shape, generator=gen)
    R = torch.linalg.qr(torch.randn(2, k, k, generator=gen))[0]
    P = torch.stack([pack(M[j], rotation_to_rows(R[j], shape[0])) for j in range(2)])
    transposed = P.shape[-2] > P.shape[-1]
    X = P.mT if transposed else P
    ref, low = aro_kernel(X, transposed), aro_kernel(X, transposed, dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    assert torch.equal(aro_kernel(X, transposed, dtype=torch.float32), ref)
    ref, low = (ref.mT, low.mT) if transposed else (ref, low)
    D, D_low = ref[..., : shape[1]], low[..., : shape[1]]
    assert ((D_low - D).norm() / D.norm()).item() < 2e-2
    for j in range(2):
        R_ref = rotation_from_rows(ref[j, :, shape[1] :], k)
        R_low = rotation_from_rows(low[j, :, shape[1] :], k)
        assert torch.allclose(R_low.T @ R_low, torch.eye(k), atol=1e-5)
        assert (R_low - R_ref).abs().max().item() < 1e-2


def test_bf16_optimizer_keeps_float32_state_and_tracks_float32() -> None:
    torch.manual_seed(0)
    W1 = nn.Parameter(torch.randn(40, 96))
    W2 = nn.Parameter(W1.detach().clone())
    a = orthotorch.ARO([W1], lr=0.05)
    b = orthotorch.ARO([W2], lr=0.05, matmul_dtype=torch.bfloat16)
    for _ in range(3):
        g = torch.randn(40, 96)
        W1.grad, W2.grad = g.clone(), g.clone()
        a.step()
        b.step()
    state = b.state[W2]
    assert W2.dtype == state["momentum_buffer"].dtype == state["rotation"].dtype == torch.float32
    R = rotation_from_rows(state["rotation"], 40)
    assert torch.allclose(R.T @ R, torch.eye(40), atol=1e-5)
    # Three steps of lr * 0.2 = 1e-2 RMS each; bf16 moves the weights by under 2% of that.
    assert (W2 - W1).square().mean().sqrt().item() < 2e-2 * 3 * 1e-2


@pytest.mark.parametrize("bad", [torch.float16, torch.int8, "bf16"])
def test_matmul_dtype_must_be_float32_or_bfloat16(bad) -> None:
    with pytest.raises(
        ValueError,
        match=r"matmul_dtype must be None or one of float32, bfloat16, got " + re.escape(repr(bad)),
    ):
        orthotorch.ARO([nn.Parameter(torch.randn(4, 4))], matmul_dtype=bad)
    with pytest.raises(ValueError, match=r"dtype must be None or one of float32, bfloat16, got"):
        aro_kernel(pack(torch.randn(4, 6), torch.zeros(4, 4)), dtype=bad)


def test_groups_with_an_update_rule_are_rejected() -> None:
    """ARO computes its own direction, but accepted groups from
    ``param_groups(policy="symmetry")`` (``"update": "row_norm"`` ...) and silently ignored
    the rule."""
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 32), nn.Linear(32, 10))
    groups = orthotorch.param_groups(model, policy="symmetry", lr=1e-3)
    with pytest.raises(ValueError, match=r"ARO param group 0 .*update='row_norm'.*own direction"):
        orthotorch.ARO(groups)
    orthotorch.ARO(orthotorch.param_groups(model))  # the default policy sets no update rule
