"""NorMuon: the formulas step by step in float64, per-block statistics of every layout, the RMS
of the update, every orthogonalization method, describe()."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import orthotorch
from orthotorch.functional.normuon import normuon_reference
from orthotorch.linalg import available_methods


def run(params, grads_per_step, layouts=None) -> orthotorch.NorMuon:
    groups = [{"params": params, "layouts": layouts}] if layouts else params
    opt = orthotorch.NorMuon(groups, ns_method="svd", ns_dtype=torch.float64)
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("shape", [(6, 10), (12, 5), (7, 7)])
@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_float64_reference_step_by_step(shape, adjust_lr, nesterov) -> None:
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(*shape, dtype=torch.float64, generator=gen)
    grads = [torch.randn(*shape, dtype=torch.float64, generator=gen) for _ in range(4)]
    p = nn.Parameter(W0.clone())
    lr, wd = 0.1, 0.05
    opt = orthotorch.NorMuon(
        [p],
        lr=lr,
        weight_decay=wd,
        beta2=0.9,
        nesterov=nesterov,
        adjust_lr=adjust_lr,
        ns_method="svd",
        ns_dtype=torch.float64,
    )
    W = W0.clone()
    references = normuon_reference(grads, beta2=0.9, nesterov=nesterov, adjust_lr=adjust_lr)
    for G, D in zip(grads, references, strict=True):
        p.grad = G.clone()
        opt.step()
        W = (1 - lr * wd) * W - lr * D
        torch.testing.assert_close(p.detach(), W, rtol=0, atol=1e-12)
    assert opt.state[p]["second_momentum_buffer"].shape == (shape[0],)


@pytest.mark.parametrize("method", available_methods())
def test_update_rms_is_point_two_for_every_method(method: str) -> None:
    """The paper's scale 0.2 sqrt(mn) / ||Ô||_F makes the update RMS exactly 0.2."""
    torch.manual_seed(0)
    for shape in [(16, 48), (48, 16)]:
        p = nn.Parameter(torch.zeros(shape))
        opt = orthotorch.NorMuon([p], lr=1.0, weight_decay=0.0, ns_method=method)
        for _ in range(2):
            before = p.detach().clone()
            p.grad = torch.randn(shape)
            opt.step()
            rms = (p.detach() - before).square().mean().sqrt().item()
            assert math.isclose(rms, 0.2, rel_tol=1e-5), (method, shape, rms)


def test_normalization_equalizes_neurons_of_a_tall_matrix() -> None:
    """Tall polar factors have rows of unequal norm; after a few steps NorMuon's rows match."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(64, 8, dtype=torch.float64))
    G = torch.randn(64, 8, dtype=torch.float64)
    opt = orthotorch.NorMuon(
        [p], lr=1.0, weight_decay=0.0, beta2=0.0, ns_method="svd", ns_dtype=torch.float64
    )
    before = p.detach().clone()
    p.grad = G
    opt.step()
    rows = (p.detach() - before).norm(dim=1)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar_rows = (U @ Vh).norm(dim=1)
    assert polar_rows.std() / polar_rows.mean() > 0.1  # the premise
    assert rows.std() / rows.mean() < 1e-6  # beta2 = 0: v is this step's row means


@pytest.mark.parametrize(
    ("layout", "shape", "parts"),
    [
        ("batch", (3, 6, 10), "experts"),
        ("split(rows=4,8)", (12, 5), "rows"),
        ("split(cols=3,7)", (6, 10), "cols"),
        ("transposed", (10, 6), "transposed"),
    ],
)
def test_layout_blocks_are_independent_parameters(layout, shape, parts) -> None:
    """Each block of a layout gets its own per-row statistics, norm and shape scale: the same
    trajectory as separate parameters."""
    gen = torch.Generator().manual_seed(1)
    W0 = torch.randn(*shape, dtype=torch.float64, generator=gen)
    grads = [torch.randn(*shape, dtype=torch.float64, generator=gen) for _ in range(3)]

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        if parts == "experts":
            return list(t.unbind(0))
        if parts == "rows":
            return list(t.split([4, 8], dim=0))
        if parts == "cols":
            return list(t.split([3, 7], dim=1))
        return [t.T]

    fused = nn.Parameter(W0.clone())
    run([fused], [[g] for g in grads], layouts=[layout])
    pieces = [nn.Parameter(w.clone().contiguous()) for w in split(W0)]
    run(pieces, [[x.contiguous() for x in split(g)] for g in grads])
    for got, want in zip(split(fused.detach()), pieces, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-12)


def test_describe_uses_normuon_scale() -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 2))
    table = orthotorch.describe(orthotorch.NorMuon(orthotorch.param_groups(model)))
    row = next(line for line in table.splitlines() if line.startswith("0.weight"))
    assert "normuon" in row
    assert row.split()[-1] == f"{0.2 * math.sqrt(32):.4g}"
    table = orthotorch.describe(
        orthotorch.NorMuon(orthotorch.param_groups(model), adjust_lr="original")
    )
    row = next(line for line in table.splitlines() if line.startswith("0.weight"))
    assert row.split()[-1] == "2"


def test_bad_beta2_names_it_and_changes_nothing() -> None:
    p = nn.Parameter(torch.randn(4, 6))
    opt = orthotorch.NorMuon([p])
    with pytest.raises(ValueError, match=r"beta2 must be a number in \[0.0, 1.0\), got 1.5"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "beta2": 1.5})
    assert len(opt.param_groups) == 1
