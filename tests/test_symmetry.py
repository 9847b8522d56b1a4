"""Symmetry-compatible update rules: each one's equivariance property, and the routing policy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthotorch
from orthotorch.functional import get_update_rule
from orthotorch.linalg import polar


def rule(name: str, M: torch.Tensor) -> torch.Tensor:
    """Apply a registered rule to one matrix in its own orientation, like the optimizer does."""
    kernel, dtype = get_update_rule(name).prepare(
        {"ns_method": "svd", "ns_steps": None, "ns_dtype": torch.float64}
    )
    transposed = M.shape[0] > M.shape[1]
    X = (M.mT if transposed else M).to(dtype).unsqueeze(0)
    Y = kernel(X.contiguous(), transposed)[0]
    return (Y.mT if transposed else Y).to(torch.float64)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q


SHAPES = [(12, 7), (7, 12)]


@pytest.mark.parametrize("shape", SHAPES)
def test_spectral_commutes_with_rotations(shape: tuple[int, int]) -> None:
    M = torch.randn(*shape, dtype=torch.float64)
    P, Q = orthogonal(shape[0], 1), orthogonal(shape[1], 2)
    torch.testing.assert_close(rule("spectral", P @ M @ Q), P @ rule("spectral", M) @ Q)


@pytest.mark.parametrize("shape", SHAPES)
def test_row_norm_permutes_rows_and_commutes_with_column_rotations(shape) -> None:
    M = torch.randn(*shape, dtype=torch.float64)
    perm = torch.randperm(shape[0])
    Q = orthogonal(shape[1], 3)
    torch.testing.assert_close(
        rule("row_norm", M[perm]), rule("row_norm", M)[perm], atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(
        rule("row_norm", M @ Q), rule("row_norm", M) @ Q, atol=1e-6, rtol=1e-5
    )
    # Equal row norms, scaled so that the whole update has the polar factor's Frobenius norm.
    norms = rule("row_norm", M).norm(dim=1)
    expected = min(1.0, shape[1] / shape[0]) ** 0.5
    torch.testing.assert_close(norms, torch.full_like(norms, expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_col_norm_permutes_columns_and_commutes_with_row_rotations(shape) -> None:
    M = torch.randn(*shape, dtype=torch.float64)
    perm = torch.randperm(shape[1])
    P = orthogonal(shape[0], 4)
    torch.testing.assert_close(
        rule("col_norm", M[:, perm]), rule("col_norm", M)[:, perm], atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(
        rule("col_norm", P @ M), P @ rule("col_norm", M), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_centered_row_norm_ignores_a_common_row_shift(shape) -> None:
    M = torch.randn(*shape, dtype=torch.float64)
    shift = torch.randn(1, shape[1], dtype=torch.float64)
    perm = torch.randperm(shape[0])
    out = rule("centered_row_norm", M)
    torch.testing.assert_close(rule("centered_row_norm", M + shift), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rule("centered_row_norm", M[perm]), out[perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["row_norm", "col_norm", "centered_row_norm", "left_spectral"])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9), (40, 10), (10, 40)])
def test_every_rule_has_the_polar_factors_frobenius_norm(name: str, shape) -> None:
    # The optimizer's shape scale and lr are calibrated for the spectral rule; a rule with a
    # larger norm on tall (row_norm) or wide (col_norm) matrices silently takes bigger steps.
    M = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    expected = polar(M).norm()
    # left_spectral's ridge shrinks the weakest directions of a random square matrix a little.
    rtol = 2e-3 if name == "left_spectral" else 1e-6
    torch.testing.assert_close(rule(name, M).norm(), expected, atol=0, rtol=rtol)


def test_rows_and_columns_without_momentum_are_left_unchanged() -> None:
    # Embedding rows of tokens never seen have exactly zero momentum: the normalised update must
    # stay exactly zero there (no 0/0, no eps-sized step), for the row and column rules.
    M = torch.randn(10, 6, dtype=torch.float64)
    M[[1, 4, 7]] = 0.0
    assert torch.isfinite(rule("row_norm", M)).all()
    assert (rule("row_norm", M)[[1, 4, 7]] == 0).all()
    assert (rule("col_norm", M.mT)[:, [1, 4, 7]] == 0).all()
    embed = nn.Embedding(10, 6)
    before = embed.weight.detach().clone()
    opt = orthotorch.Muon(
        orthotorch.param_groups(embed, policy="symmetry"), lr=0.1, weight_decay=0.0
    )
    for _ in range(3):
        embed(torch.tensor([0, 2, 3, 5])).square().sum().backward()
        opt.step()
        opt.zero_grad()
    unused = [1, 4, 6, 7, 8, 9]
    assert torch.equal(embed.weight.detach()[unused], before[unused])
    assert not torch.equal(embed.weight.detach()[[0, 2]], before[[0, 2]])


@pytest.mark.parametrize("shape", SHAPES)
def test_left_spectral_is_equivariant_and_close_to_polar(shape) -> None:
    M = torch.randn(*shape, dtype=torch.float64)
    P, Q = orthogonal(shape[0], 5), orthogonal(shape[1], 6)
    out = rule("left_spectral", M)
    torch.testing.assert_close(rule("left_spectral", P @ M @ Q), P @ out @ Q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, polar(M), atol=1e-3, rtol=1e-3)


def test_rules_in_the_optimizer_use_the_parameter_orientation() -> None:
    tall = nn.Parameter(torch.randn(20, 6))
    before = tall.detach().clone()
    opt = orthotorch.Muon(
        [{"params": [tall], "update": "row_norm"}],
        lr=1.0,
        weight_decay=0.0,
        momentum=0.0,
        nesterov=False,
    )
    tall.grad = torch.randn(20, 6)
    opt.step()
    # Rows of norm sqrt(6/20) (the polar factor's Frobenius norm) times the shape scale
    # sqrt(20/6): unit rows; the wrong orientation would have normalised the columns instead.
    delta = before - tall.detach()
    torch.testing.assert_close(delta.norm(dim=1), torch.ones(20), atol=1e-5, rtol=0)


class MiniLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.q_proj = nn.Linear(16, 16)
        self.gate_proj = nn.Linear(16, 32)
        self.up_proj = nn.Linear(16, 32)
        self.down_proj = nn.Linear(32, 16)
        self.router = nn.Linear(16, 4)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 40, bias=False)


def test_symmetry_policy_assigns_rules_by_role_and_describe_shows_them() -> None:
    groups = orthotorch.param_groups(MiniLM(), policy="symmetry")
    got = {n: g.get("update", g.get("algorithm")) for g in groups for n, _ in g["params"]}
    assert got["embed.weight"] == "row_norm"
    assert got["q_proj.weight"] == "spectral"
    assert got["gate_proj.weight"] == got["up_proj.weight"] == "row_norm"
    assert got["down_proj.weight"] == "col_norm"
    assert got["router.weight"] == got["lm_head.weight"] == "centered_row_norm"
    assert got["norm.weight"] == got["q_proj.bias"] == "adamw"
    table = orthotorch.describe(orthotorch.Muon(groups, lr=0.02))
    assert any(
        line.split()[:4] == ["down_proj.weight", "16x32", "muon", "col_norm"]
        for line in table.splitlines()
    )


def test_symmetry_policy_trains_and_bad_names_raise() -> None:
    model = nn.Sequential(
        nn.Embedding(30, 16), nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16), nn.Linear(16, 30)
    )
    opt = orthotorch.Muon(orthotorch.param_groups(model, policy="symmetry"), lr=0.02)
    tokens = torch.randint(0, 30, (16, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(
            model(tokens[:, :-1]).reshape(-1, 30), ((tokens[:, :-1] + 1) % 30).reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="policy must be one of 'default', 'symmetry'"):
        orthotorch.param_groups(model, policy="sym")
    with pytest.raises(ValueError, match=r"route\['1.\*'\] must be one of .*'row_norm'"):
        orthotorch.param_groups(model, route={"1.*": "rownorm"})
    with pytest.raises(
        ValueError, match="unknown update rule 'rownorm'; valid rules: spectral, row_norm"
    ):
        orthotorch.Muon([{"params": [nn.Parameter(torch.randn(3, 3))], "update": "rownorm"}])
