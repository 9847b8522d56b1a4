"""Matrix layouts: parsing, views, and that every optimizer treats each block as its own matrix."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import orthotorch
from orthotorch.functional import MatrixLayout, parse_layout


def test_parse_round_trips_and_combines_in_any_order() -> None:
    for spec in [
        "flatten",
        "batch",
        "transposed",
        "split(rows=4,2,2)",
        "split(cols=3,5)",
        "per_head(4)",
        "per_head(2,cols)",
        "batch+transposed+split(rows=8,8)",
    ]:
        assert str(parse_layout(spec)) == spec
    assert parse_layout("split(rows=8,8)+batch") == parse_layout("batch+split(rows=8,8)")
    assert parse_layout(None) == MatrixLayout() and str(MatrixLayout()) == "flatten"


@pytest.mark.parametrize(
    "spec,match",
    [
        ("stack", r"unknown layout 'stack' in 'stack'; valid layouts: flatten, batch, transposed"),
        ("split(rows=4,-1)", r"sizes must be positive integers"),
        ("split(depth=4)", r"write split\(rows=a,b,...\) or split\(cols=a,b,...\)"),
        ("split(rows=2)+split(rows=2)", r"splits rows twice"),
        ("batch(2)", r"takes no arguments"),
        ("per_head(4)+split(rows=2,2)", r"both splits and per-head-splits rows"),
    ],
)
def test_bad_specs_name_the_valid_layouts(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_layout(spec)


@pytest.mark.parametrize(
    "shape,spec,match",
    [
        (
            (12, 4),
            "split(rows=4,4)",
            r"split\(rows=...\) blocks add up to 8, but the matrix has 12",
        ),
        ((12, 4), "per_head(5)", r"per_head\(5\) needs the rows \(12\) to be a multiple"),
        ((12, 4), "batch", r"'batch' needs 3 or more dimensions"),
        ((4, 12), "transposed+split(rows=4,4)", r"blocks add up to 8, but the matrix has 12 rows"),
    ],
)
def test_layouts_that_do_not_fit_raise_at_construction(shape, spec, match) -> None:
    p = nn.Parameter(torch.randn(shape))
    group = {"params": [("w", p)], "layouts": [spec]}
    with pytest.raises(ValueError, match=match) as err:
        orthotorch.Muon([group])
    assert f"parameter 'w' of shape {tuple(shape)} with layout {spec!r}" in str(err.value)
    with pytest.raises(ValueError, match=r"layouts must be a list with one layout per parameter"):
        orthotorch.Muon([{"params": [p], "layouts": "flatten"}])


def test_matrices_are_views_in_the_layers_orientation() -> None:
    t = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)
    mats = parse_layout("batch+split(rows=4,2)").matrices(t)
    assert [tuple(m.shape) for m in mats] == [(4, 4), (2, 4), (4, 4), (2, 4)]
    assert torch.equal(mats[3], t[1, 4:])
    mats[3].zero_()
    assert t[1, 4:].abs().sum() == 0  # a view: writing the block writes the tensor
    w = torch.randn(8, 24)  # Conv1D storage (in=8, out=24) of q, k, v each 8 x 8
    _, k, _ = parse_layout("transposed+split(rows=8,8,8)").matrices(w)
    assert torch.equal(k, w[:, 8:16].T)
    assert parse_layout("transposed+split(rows=8,8,8)").block_shapes((8, 24)) == [(8, 8)] * 3


def _step_pair(make_fused, steps: int = 3, **kwargs):
    """The same gradients through a fused parameter with a layout and through separate
    parameters: return both final values."""
    torch.manual_seed(0)
    fused, layout, to_parts = make_fused()
    parts = [nn.Parameter(t.detach().clone()) for t in to_parts(fused.detach())]
    cls = kwargs.pop("cls", orthotorch.Muon)
    a = cls([{"params": [fused], "layouts": [layout]}], **kwargs)
    b = cls([{"params": parts}], **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        g = torch.randn(fused.shape, generator=gen)
        fused.grad = g.clone()
        for p, gp in zip(parts, to_parts(g), strict=True):
            p.grad = gp.clone()
        a.step()
        b.step()
    return to_parts(fused.detach()), [p.detach() for p in parts]


@pytest.mark.parametrize("cls", [orthotorch.Muon, orthotorch.ROOT, orthotorch.AuON])
def test_expert_stack_is_each_expert_as_its_own_matrix(cls) -> None:
    """Regression: a (E, out, in) expert stack was orthogonalized as one E x (out*in) matrix,
    so each expert's update had norm ~0.9 instead of ~sqrt(min(out, in)))."""

    def fused():
        return nn.Parameter(torch.randn(4, 16, 8)), "batch", lambda t: list(t.unbind(0))

    got, expected = _step_pair(fused, cls=cls, lr=0.02)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_batched_update_has_unit_singular_values_per_expert() -> None:
    p = nn.Parameter(torch.zeros(4, 64, 16))
    opt = orthotorch.Muon(
        [{"params": [p], "layouts": ["batch"]}], lr=1.0, weight_decay=0.0, ns_method="svd"
    )
    p.grad = torch.randn(4, 64, 16)
    opt.step()
    # -lr * sqrt(max(1, 64/16)) * U V^T per expert: singular values all 2.
    s = torch.linalg.svdvals(p.detach())
    torch.testing.assert_close(s, torch.full_like(s, 2.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [orthotorch.Muon, orthotorch.ROOT])
def test_split_rows_equals_separate_q_k_v(cls) -> None:
    def fused():
        return (
            nn.Parameter(torch.randn(32, 16)),
            "split(rows=16,8,8)",
            lambda t: list(t.split([16, 8, 8], dim=0)),
        )

    got, expected = _step_pair(fused, cls=cls, lr=0.02)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_transposed_storage_uses_the_layers_shape_scale() -> None:
    """GPT-2's Conv1D stores (in, out); its update and scale are those of the (out, in) Linear
    (a (64, 16) storage is a 16x64 layer: scale 1, not 2)."""

    def fused():
        return nn.Parameter(torch.randn(64, 16)), "transposed", lambda t: [t.T]

    got, expected = _step_pair(fused, lr=0.02)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)


def test_layout_is_saved_and_a_different_one_is_refused_on_load() -> None:
    p = nn.Parameter(torch.randn(4, 8, 8))
    opt = orthotorch.Muon([{"params": [p], "layouts": ["batch"]}])
    p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["layouts"] == ["batch"]
    other = orthotorch.Muon([{"params": [p], "layouts": ["flatten"]}])
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"saved with matrix layout 'batch', but this optimizer"):
        other.load_state_dict(saved)
    assert other.state_dict() == before
    same = orthotorch.Muon([{"params": [p], "layouts": ["batch"]}])
    same.load_state_dict(saved)
    torch.testing.assert_close(
        same.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"], rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (orthotorch.ARO, {"lr": 1e-3}),
        (orthotorch.DCTAdamW, {"lr": 1e-3, "rank": 0.5, "update_every": 2}),
        (orthotorch.GaLoreAdamW, {"lr": 1e-3, "rank": 0.5, "update_every": 2}),
        (orthotorch.Dion, {"lr": 1e-2, "rank": 0.5}),
    ],
    ids=["ARO", "DCTAdamW", "GaLoreAdamW", "Dion"],
)
def test_per_matrix_state_is_kept_per_block(cls, kwargs) -> None:
    """ARO's rotation and the low-rank subspaces are per matrix: an expert stack / a q,k,v
    split gets one per block, exactly as separate parameters would (until this change these
    optimizers refused such layouts)."""

    def experts():
        return nn.Parameter(torch.randn(3, 16, 8)), "batch", lambda t: list(t.unbind(0))

    def qkv():
        return (
            nn.Parameter(torch.randn(8, 24)),
            "transposed+split(rows=8,8,8)",
            lambda t: [b.T for b in t.split(8, dim=1)],
        )

    for make in (experts, qkv):
        got, expected = _step_pair(make, steps=4, cls=cls, **kwargs)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_per_block_state_resumes_bitwise() -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3, 16, 8))
    group = {"params": [p], "layouts": ["batch"]}
    opt = orthotorch.DCTAdamW([group], lr=1e-3, rank=4, update_every=2)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    twin = nn.Parameter(p.detach().clone())
    other = orthotorch.DCTAdamW([{"params": [twin], "layouts": ["batch"]}], lr=1e-3, rank=4)
    other.load_state_dict(saved)
    assert other.state[twin]["blocks"][1]["indices"].dtype == torch.int32
    for _ in range(3):
        g = torch.randn_like(p)
        p.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        other.step()
    assert torch.equal(p.detach(), twin.detach())
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 8\]"):
        orthotorch.DCTAdamW([{"params": [p], "layouts": ["batch"]}], rank=9)


def test_spectra_clips_each_expert_separately() -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(3, 16, 16))
    base = torch.optim.SGD([{"params": [p], "layouts": ["batch"]}], lr=1.0)
    opt = orthotorch.SPECTRA(base, clip=1.0)
    grad = torch.randn(3, 16, 16)
    grad[0] *= 100  # only expert 0 is far above c
    p.grad = grad
    opt.step()
    top = torch.linalg.matrix_norm(p.detach(), ord=2)
    assert (top <= 1.0 + 1e-3).all()
    # Clipped as one matrix, expert 0's norm would have shrunk experts 1 and 2 too; per expert,
    # their update is H_c(-G_e), which keeps most of a small gradient.
    assert torch.linalg.matrix_norm(p.detach()[1:], ord=2).min() > 0.5 * min(
        torch.linalg.matrix_norm(grad[1:], ord=2).min().item(), 1.0
    )
