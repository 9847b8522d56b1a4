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


def test_refuses_non_flatten_layouts_and_names_rank_range() -> None:
    p = nn.Parameter(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match=r"Dion does not support the matrix layouts 'batch'"):
        orthotorch.Dion([{"params": [p], "layouts": ["batch"]}])
    q = nn.Parameter(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"parameter params\[0\] of shape \(4, 6\).*\[1, 4\]"):
        orthotorch.Dion([q], rank=5)


def test_describe_uses_dion_scale() -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 2))
    table = orthotorch.describe(orthotorch.Dion(orthotorch.param_groups(model), rank=0.5))
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    assert rows["0.weight"][2] == "dion" and rows["0.weight"][-1] == "2"
    assert rows["2.weight"][-1] == "0.7071"  # sqrt(16 / 32), below 1 for wide matrices
