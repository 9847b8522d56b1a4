"""AuON and Hybrid-AuON: the documented update, linear cost, and the cosh rescale's size."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import orthotorch
from orthotorch import distributed
from orthotorch.functional.auon import auon_directions, auon_kernel, cosh_rms
from orthotorch.linalg import MUON_COEFFICIENTS


def model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 64), nn.Tanh(), nn.Linear(64, 5)
    )


def paper_update(m: torch.Tensor, hybrid: bool) -> torch.Tensor:
    """The formula, written out in float64 on one matrix."""
    X = m.double() / (m.double().norm() + 1e-7)
    if hybrid:
        a, b, c = MUON_COEFFICIENTS
        wide = X if X.shape[0] <= X.shape[1] else X.T
        A = wide @ wide.T
        wide = a * wide + (b * A + c * A @ A) @ wide
        X = wide if X.shape[0] <= X.shape[1] else wide.T
    r = torch.cosh(X).pow(2).mean().sqrt()
    return X / (r + 1e-8)


@pytest.mark.parametrize("hybrid", [False, True])
def test_single_step_is_the_documented_update(hybrid: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Parameter(torch.randn(8, 3, 3, 3))
    tall = nn.Parameter(torch.randn(40, 12))
    wide = nn.Parameter(torch.randn(6, 30))
    params = [conv, tall, wide]
    p0 = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    lr, wd, mu = 0.1, 0.05, 0.9
    opt = orthotorch.AuON(
        params, lr=lr, weight_decay=wd, momentum=mu, hybrid=hybrid, ns_dtype=torch.float32
    )
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()
    for p, before, g in zip(params, p0, grads, strict=True):
        rows = p.shape[0]
        m = ((1 - mu) * g + mu * (1 - mu) * g).reshape(rows, -1)
        scale = math.sqrt(max(1.0, m.shape[0] / m.shape[1]))
        U = paper_update(m, hybrid).float().reshape(p.shape)
        expected = (1 - lr * wd) * before - lr * scale * U
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_plain_auon_step_does_no_matrix_products() -> None:
    """Linear cost: zero matmul/conv FLOPs in a whole non-hybrid step; the hybrid step has them."""
    counts = {}
    for hybrid in (False, True):
        torch.manual_seed(0)
        net = model()
        opt = orthotorch.AuON(orthotorch.param_groups(net), hybrid=hybrid, adamw_lr=1e-3)
        net(torch.randn(4, 3, 8, 8)).sum().backward()
        with FlopCounterMode(display=False) as counter:
            opt.step()
        counts[hybrid] = counter.get_total_flops()
    assert counts[False] == 0
    assert counts[True] > 0


def test_plain_auon_never_calls_linear_algebra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Belt and braces for the FLOP count: forbid every matrix-product entry point."""

    def forbidden(*args, **kwargs):
        raise AssertionError("matrix product in a plain AuON step")

    torch.manual_seed(0)
    net = model()
    opt = orthotorch.AuON(orthotorch.param_groups(net), adamw_lr=1e-3)
    net(torch.randn(4, 3, 8, 8)).sum().backward()
    for name in ("mm", "bmm", "matmul", "addmm", "baddbmm", "einsum", "tensordot"):
        monkeypatch.setattr(torch, name, forbidden)
    monkeypatch.setattr(torch.Tensor, "__matmul__", forbidden)
    monkeypatch.setattr(torch.Tensor, "mm", forbidden)
    monkeypatch.setattr(torch.linalg, "svd", forbidden)
    monkeypatch.setattr(torch.linalg, "qr", forbidden)
    opt.step()


def test_update_is_in_the_unit_frobenius_ball_and_rescale_is_nearly_one() -> None:
    """||U||_F <= 1 (so ||U||_2 <= 1); r^2 - 1 <= sinh(1)^2 / N for unit-Frobenius X."""
    gen = torch.Generator().manual_seed(0)
    momenta = [torch.randn(64, 32, generator=gen), torch.randn(3, 5, generator=gen)]
    momenta.append(torch.zeros(4, 4))
    momenta.append(torch.eye(2) * 1e6)  # few, large entries: r differs most from one
    for M, U in zip(momenta, auon_directions(momenta), strict=True):
        assert U.norm() <= 1 + 1e-6
        X = M.double() / (M.double().norm() + 1e-7)
        r2 = cosh_rms(X.unsqueeze(0)).item() ** 2
        assert 1 <= r2 <= 1 + math.sinh(1) ** 2 / M.numel() + 1e-12


def test_foreach_path_equals_stacked_kernel() -> None:
    """The cheap per-tensor path and the whole-matrix kernel (used for FSDP2 shards) agree."""
    gen = torch.Generator().manual_seed(1)
    momenta = [torch.randn(24, 48, generator=gen), torch.randn(40, 12, generator=gen)]
    momenta.append(torch.randn(24, 48, generator=gen))
    foreach = auon_directions(momenta)
    stacked = distributed.map_matrices(momenta, auon_kernel, torch.float32, "off")
    for d, expected in zip(stacked, foreach, strict=True):
        torch.testing.assert_close(d, expected)


def test_hybrid_differs_from_plain_and_both_train() -> None:
    def run(hybrid: bool) -> float:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        net.append(nn.Linear(64, 4))
        opt = orthotorch.AuON(orthotorch.param_groups(net), lr=0.05, hybrid=hybrid, adamw_lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(128, 16, generator=gen), torch.randint(0, 4, (128,), generator=gen)
        for _ in range(25):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    plain, hybrid = run(False), run(True)
    assert plain < 1.2 and hybrid < 1.2  # from log(4) = 1.39
    assert plain != hybrid


def test_defaults_and_state() -> None:
    net = model()
    opt = orthotorch.AuON(orthotorch.param_groups(net))
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["momentum"], g["hybrid"]) == (0.1, 0.0, 0.95, False)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    names = {frozenset(s) for s in opt.state_dict()["state"].values()}
    assert names == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}
