"""orthotorch.Muon against torch.optim.Muon / torch.optim.AdamW and its own invariants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthotorch
from orthotorch.functional import matrix_shape, shape_scale
from orthotorch.linalg import orthogonalize


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8)
    )


def step_with(model: nn.Module, opt, steps: int = 3, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon(adjust_lr: str, nesterov: bool) -> None:
    torch.manual_seed(0)
    ours, ref = mlp(), mlp()
    ref.load_state_dict(ours.state_dict())
    weights = lambda m: [p for p in m.parameters() if p.ndim == 2]  # noqa: E731
    common = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "nesterov": nesterov}
    opt_ref = torch.optim.Muon(weights(ref), ns_steps=5, adjust_lr_fn=adjust_lr, **common)
    opt = orthotorch.Muon(
        weights(ours),
        ns_method="muon",
        ns_steps=5,
        ns_dtype=torch.bfloat16,
        adjust_lr=adjust_lr,
        **common,
    )
    for m in (ours, ref):
        for p in m.parameters():
            if p.ndim == 1:
                p.requires_grad_(False)
    step_with(ours, opt)
    step_with(ref, opt_ref)
    for a, b in zip(weights(ours), weights(ref), strict=True):
        assert (a - b).norm() / b.norm() < 1e-2


def test_adamw_groups_equal_torch_adamw() -> None:
    torch.manual_seed(0)
    ours, ref = mlp(), mlp()
    ref.load_state_dict(ours.state_dict())
    hp = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.05}
    opt = orthotorch.Muon([{"params": list(ours.parameters()), "algorithm": "adamw", **hp}])
    opt_ref = torch.optim.AdamW(ref.parameters(), **hp)
    step_with(ours, opt, steps=5)
    step_with(ref, opt_ref, steps=5)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    sa, sb = opt.state_dict()["state"], opt_ref.state_dict()["state"]
    for k in sb:
        torch.testing.assert_close(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"], rtol=1e-6, atol=1e-12)
        assert float(sa[k]["step"]) == float(sb[k]["step"]) == 5


def test_adamw_lr_default_only_fills_missing_lr() -> None:
    model = mlp()
    opt = orthotorch.Muon(orthotorch.param_groups(model), lr=0.02, adamw_lr=3e-3)
    # The orthogonalized group, then AdamW with and without weight decay (head vs biases).
    assert [g["lr"] for g in opt.param_groups] == [0.02, 3e-3, 3e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    opt = orthotorch.Muon(
        orthotorch.param_groups(model, adamw={"lr": 1e-4}), lr=0.02, adamw_lr=3e-3
    )
    assert opt.param_groups[1]["lr"] == opt.param_groups[2]["lr"] == 1e-4


def test_adamw_groups_never_inherit_the_orthogonalized_lr() -> None:
    """Regression: Muon(param_groups(model), lr=0.02) ran embeddings, head and norms on AdamW
    at 0.02 (the AdamW groups' lr defaulted to the orthogonalized lr)."""
    opt = orthotorch.Muon(orthotorch.param_groups(mlp()), lr=0.02)
    assert [g["lr"] for g in opt.param_groups if g["algorithm"] == "adamw"] == [1e-3, 1e-3]
    assert orthotorch.Muon(orthotorch.param_groups(mlp())).param_groups[0]["lr"] == 0.02


def test_single_step_is_the_documented_update() -> None:
    """p1 = (1 - lr wd) p0 - lr * scale * polar(M), M = (1 - mu) g + mu (1 - mu) g for step 1."""
    torch.manual_seed(0)
    conv = nn.Parameter(torch.randn(8, 3, 3, 3))
    tall = nn.Parameter(torch.randn(40, 12))
    p0 = [conv.detach().clone(), tall.detach().clone()]
    grads = [torch.randn_like(conv), torch.randn_like(tall)]
    lr, wd, mu = 0.05, 0.1, 0.9
    opt = orthotorch.Muon(
        [conv, tall],
        lr=lr,
        weight_decay=wd,
        momentum=mu,
        ns_method="svd",
        adjust_lr="match_rms_adamw",
    )
    for p, g in zip((conv, tall), grads, strict=True):
        p.grad = g.clone()
    opt.step()
    for p, before, g in zip((conv, tall), p0, grads, strict=True):
        shape = matrix_shape(p.shape)
        m = (1 - mu) * g + mu * (1 - mu) * g
        expected = (1 - lr * wd) * before - lr * shape_scale(shape, "match_rms_adamw") * (
            orthogonalize(m.reshape(shape), "svd").reshape(p.shape)
        )
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_batched_same_shape_equals_separate_optimizers() -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(24, 48)) for _ in range(3)]
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    together = orthotorch.Muon(params, lr=0.02, ns_dtype=torch.float32)
    alone = [orthotorch.Muon([c], lr=0.02, ns_dtype=torch.float32) for c in copies]
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for p, c in zip(params, copies, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            c.grad = p.grad.clone()
        together.step()
        for o in alone:
            o.step()
    for p, c in zip(params, copies, strict=True):
        torch.testing.assert_close(p, c, rtol=1e-5, atol=1e-6)


def test_conv_kernel_is_flattened_and_scaled_by_flat_shape() -> None:
    conv = nn.Parameter(torch.randn(4, 2, 3, 3))
    assert matrix_shape(conv.shape) == (4, 18)
    opt = orthotorch.Muon([conv], lr=1.0, weight_decay=0.0, ns_method="svd")
    before = conv.detach().clone()
    conv.grad = torch.randn_like(conv)
    opt.step()
    delta = (before - conv.detach()).reshape(4, 18)
    # Wide matrix: scale 1, rows orthonormal.
    torch.testing.assert_close(delta @ delta.T, torch.eye(4), atol=1e-5, rtol=0)


def test_torch_compile_of_the_model() -> None:
    torch.manual_seed(0)
    model = mlp()
    compiled = torch.compile(model, backend="aot_eager")
    opt = orthotorch.Muon(orthotorch.param_groups(compiled), lr=0.02, adamw_lr=3e-3)
    x = torch.randn(64, 16)
    target = torch.randn(64, 8)
    losses = []
    for _ in range(20):
        loss = (compiled(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_state_dict_holds_momentum_and_adamw_state() -> None:
    model = mlp()
    opt = orthotorch.Muon(orthotorch.param_groups(model), lr=0.02)
    step_with(model, opt, steps=1)
    state = opt.state_dict()
    names = {frozenset(s) for s in state["state"].values()}
    assert names == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}
    assert [g["algorithm"] for g in state["param_groups"]] == ["muon", "adamw", "adamw"]
