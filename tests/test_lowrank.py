"""DCTAdamW / GaLoreAdamW against a slow float64 reference, state, checkpoints, bad input.

The shared conformance checks (loss goes down, bitwise resume, NaN handling, ...) run from
optim_db.py; this file covers what is specific to the low-rank optimizers.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import orthotorch
from orthotorch.functional import resolve_rank, rotate_moments_
from orthotorch.functional.lowrank import DCT_FINDER, SVD_FINDER
from orthotorch.linalg import dct_basis, polar

CLASSES = [orthotorch.DCTAdamW, orthotorch.GaLoreAdamW]
cls_ids = [c.__name__ for c in CLASSES]


# ----------------------------------------------------------------------- slow reference
def reference_run(
    W: torch.Tensor,
    grads: list[torch.Tensor],
    *,
    finder: str,
    rank: int,
    update_every: int,
    rotate: bool,
    lr: float = 0.1,
    scale: float = 0.25,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
) -> torch.Tensor:
    """Projected Adam written out step by step in float64 (GaLore's Algorithm 1), with the
    subspace from a dense DCT product or an SVD, on the wide view of the weight."""
    W = W.clone().double()
    tall = W.shape[0] > W.shape[1]
    P = None
    M = V = None
    for t, G in enumerate(grads, start=1):
        X = (G.T if tall else G).double()
        k = X.shape[0]
        if (t - 1) % update_every == 0:
            if finder == "dct":
                Q = dct_basis(k, torch.float64)
                scores = (X.T @ Q).norm(dim=0)
                idx = torch.topk(scores, rank).indices.sort().values
                P_new = Q[:, idx]
            else:
                P_new = torch.linalg.svd(X, full_matrices=False)[0][:, :rank]
            if M is None:
                M = torch.zeros(rank, X.shape[1], dtype=torch.float64)
                V = torch.zeros_like(M)
            elif rotate:
                R = P.T @ P_new
                if finder == "dct":
                    R = R.round()  # exact 0/1 for a shared orthonormal basis
                M, V = R.T @ M, (R * R).T @ V
            P = P_new
        Rg = P.T @ X
        M = betas[0] * M + (1 - betas[0]) * Rg
        V = betas[1] * V + (1 - betas[1]) * Rg * Rg
        N = (M / (1 - betas[0] ** t)) / ((V / (1 - betas[1] ** t)).sqrt() + eps)
        U = P @ N
        W = (1 - lr * weight_decay) * W - lr * scale * (U.T if tall else U)
    return W


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (16, 16)], ids=["wide", "tall", "square"])
@pytest.mark.parametrize("finder", ["dct", "svd"])
@pytest.mark.parametrize("rotate", [False, True], ids=["keep", "rotate"])
def test_matches_float64_reference(shape, finder: str, rotate: bool) -> None:
    torch.manual_seed(1)
    W0 = torch.randn(shape, dtype=torch.float64)
    # Gradients that change direction, so that refreshes pick new subspaces.
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(7)]
    rank, every = 4, 3
    expected = reference_run(W0, grads, finder=finder, rank=rank, update_every=every, rotate=rotate)
    cls = orthotorch.DCTAdamW if finder == "dct" else orthotorch.GaLoreAdamW
    W = nn.Parameter(W0.clone())
    opt = cls([W], lr=0.1, rank=rank, update_every=every, rotate_moments=rotate, weight_decay=0.1)
    for G in grads:
        W.grad = G.clone()
        opt.step()
    # The SVD's singular vectors are defined up to sign; the update is sign-invariant.
    torch.testing.assert_close(W.detach(), expected, rtol=1e-9, atol=1e-9)


def test_dct_rotation_is_an_exact_partial_permutation() -> None:
    old = torch.tensor([1, 4, 7], dtype=torch.int32)
    new = torch.tensor([0, 4, 7], dtype=torch.int32)
    R = DCT_FINDER.rotation(old, new)
    Q = dct_basis(10, torch.float64)
    expected = Q[:, old.long()].T @ Q[:, new.long()]
    torch.testing.assert_close(R.double(), expected, atol=1e-12, rtol=0)
    M = torch.arange(12.0).reshape(3, 4)  # r x N: row i belongs to column old[i]
    V = M.square()
    M0, V0 = M.clone(), V.clone()
    rotate_moments_([M], [V], [R])
    # Column 0 is new (zero moments); 4 and 7 keep theirs, in their new slots.
    assert torch.equal(M[0], torch.zeros(4)) and torch.equal(M[1:], M0[1:])
    assert torch.equal(V[0], torch.zeros(4)) and torch.equal(V[1:], V0[1:])


def test_svd_rotation_into_the_same_subspace_keeps_the_first_moment() -> None:
    X = torch.randn(8, 30, dtype=torch.float64)
    P = SVD_FINDER.find(X, 3, {})
    Rot = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    M = torch.randn(3, 30, dtype=torch.float64)
    before = P @ M
    M2, V = M.clone(), M.square()
    rotate_moments_([M2], [V], [SVD_FINDER.rotation(P, P @ Rot)])
    torch.testing.assert_close((P @ Rot) @ M2, before)  # the same full-space moment
    assert (V >= 0).all()


# ----------------------------------------------------------------------- orthogonalized
def test_orthogonalized_dct_and_svd_agree_on_a_gradient_in_dct_columns() -> None:
    """polar(R^T A) = R^T polar(A): when both finders find the same span, the orthogonalized
    updates coincide even though the bases differ."""
    k, N, rank = 16, 48, 3
    Q = dct_basis(k, torch.float64)
    G = Q[:, [2, 5, 11]] @ torch.randn(rank, N, dtype=torch.float64)
    updates = []
    for cls in CLASSES:
        W = nn.Parameter(torch.zeros(k, N, dtype=torch.float64))
        opt = cls([W], lr=1.0, rank=rank, orthogonalize=True, ns_method="svd",
                  ns_dtype=torch.float64)  # fmt: skip
        W.grad = G.clone()
        opt.step()
        updates.append(-W.detach())
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-9, atol=1e-9)
    # The update is scale * 0.2 sqrt(N) times a rank-r partial isometry in the gradient's span.
    U = updates[0] / (0.25 * 0.2 * N**0.5)
    S = torch.linalg.svdvals(U)
    torch.testing.assert_close(S[:rank], torch.ones(rank, dtype=torch.float64))
    assert S[rank:].max() < 1e-9
    torch.testing.assert_close(U, polar(G), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cls", CLASSES, ids=cls_ids)
def test_orthogonalized_variant_keeps_only_a_low_rank_momentum(cls) -> None:
    W = nn.Parameter(torch.randn(24, 64))
    opt = cls([W], rank=6, orthogonalize=True)
    W.grad = torch.randn(24, 64)
    opt.step()
    state = opt.state[W]
    assert state["momentum_buffer"].shape == (6, 64)
    assert "exp_avg" not in state and "exp_avg_sq" not in state


# ----------------------------------------------------------------------- state and schedule
def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )


def test_state_holds_only_low_rank_moments_and_int32_indices() -> None:
    W_wide = nn.Parameter(torch.randn(32, 96))
    W_tall = nn.Parameter(torch.randn(96, 32))
    opt = orthotorch.DCTAdamW([W_wide, W_tall], rank=8)
    for W in (W_wide, W_tall):
        W.grad = torch.randn_like(W)
    opt.step()
    wide, tall = opt.state[W_wide], opt.state[W_tall]
    assert set(wide) == {"step", "exp_avg", "exp_avg_sq", "indices"}
    assert wide["exp_avg"].shape == wide["exp_avg_sq"].shape == (8, 96)
    assert tall["exp_avg"].shape == (96, 8)  # projected on the smaller side
    assert wide["indices"].dtype == torch.int32 and wide["indices"].shape == (8,)
    assert wide["step"].device.type == "cpu" and wide["step"].ndim == 0


def test_state_bytes_dct_below_galore_below_adamw() -> None:
    params = {}
    sizes = {}
    for name, cls in [("dct", orthotorch.DCTAdamW), ("galore", orthotorch.GaLoreAdamW),
                      ("adamw", torch.optim.AdamW)]:  # fmt: skip
        ps = [nn.Parameter(torch.randn(64, 256)), nn.Parameter(torch.randn(256, 64))]
        opt = cls(ps, rank=16) if name != "adamw" else cls(ps)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        params[name] = ps
        sizes[name] = _state_bytes(opt)
    assert sizes["dct"] < sizes["galore"] < sizes["adamw"]
    assert sizes["dct"] <= 0.26 * sizes["adamw"]


@pytest.mark.parametrize("cls", CLASSES, ids=cls_ids)
def test_subspace_changes_only_every_update_every_steps(cls) -> None:
    W = nn.Parameter(torch.randn(16, 40))
    opt = cls([W], rank=4, update_every=3)
    key = cls.finder.state_key
    seen = []
    for _ in range(7):
        W.grad = torch.randn(16, 40)
        opt.step()
        seen.append(opt.state[W][key].clone())
    for t in (1, 2, 4, 5):  # steps 2, 3, 5, 6: no refresh
        assert torch.equal(seen[t], seen[t - 1])
    assert not torch.equal(seen[3], seen[2])  # step 4 refreshed (with a new random gradient)


def test_rank_fraction_resolves_per_matrix() -> None:
    assert resolve_rank(0.25, (512, 2048)) == 128
    assert resolve_rank(0.01, (6, 9)) == 1
    assert resolve_rank(1.0, (6, 9)) == 6
    assert resolve_rank(1, (6, 9)) == 1


def test_convolution_kernels_are_flattened() -> None:
    conv = nn.Conv2d(4, 8, 3)  # weight (8, 4, 3, 3) -> 8 x 36 matrix
    opt = orthotorch.DCTAdamW([conv.weight], rank=0.5)
    conv.weight.grad = torch.randn_like(conv.weight)
    before = conv.weight.detach().clone()
    opt.step()
    assert opt.state[conv.weight]["exp_avg"].shape == (4, 36)
    assert not torch.equal(before, conv.weight)
    with pytest.raises(ValueError, match=r"params\[0\] of shape \(8, 4, 3, 3\) \(a 8x36 matrix\)"
                       r": rank must be an int in \[1, 8\]"):  # fmt: skip
        orthotorch.DCTAdamW([conv.weight], rank=9)


# ----------------------------------------------------------------------- checkpoints
def _trained(cls, rank, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(),
                          nn.Linear(48, 3))  # fmt: skip
    opt = cls(orthotorch.param_groups(model), lr=1e-2, rank=rank, **kw)
    return model, opt


def _steps(model, opt, start, n):
    for t in range(start, start + n):
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(16, 20, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("cls", CLASSES, ids=cls_ids)
@pytest.mark.parametrize("orthogonalize", [False, True], ids=["adam", "orth"])
def test_resume_across_subspace_refreshes_is_bitwise(cls, orthogonalize: bool) -> None:
    kw = dict(update_every=3, rotate_moments=True, orthogonalize=orthogonalize)
    model, opt = _trained(cls, 8, **kw)
    _steps(model, opt, 0, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _steps(model, opt, 4, 5)  # refreshes at steps 7 and... crosses two refresh points
    reference = copy.deepcopy(model.state_dict())
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, opt2 = _trained(cls, 8, **kw)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    _steps(model2, opt2, 4, 5)
    for key, value in reference.items():
        assert torch.equal(value, model2.state_dict()[key]), key


@pytest.mark.parametrize("cls", CLASSES, ids=cls_ids)
def test_loading_a_state_saved_with_another_rank_raises(cls) -> None:
    model, opt = _trained(cls, 8)
    _steps(model, opt, 0, 2)
    saved = opt.state_dict()
    _, opt2 = _trained(cls, 4)
    with pytest.raises(ValueError, match=r"saved state of parameter '0\.weight'.*rank 8.*"
                       r"this optimizer uses rank 4"):  # fmt: skip
        opt2.load_state_dict(saved)
    assert len(opt2.state) == 0 and opt2.param_groups[0]["rank"] == 4


def test_int32_indices_survive_load_state_dict_for_bf16_weights() -> None:
    """Regression: ``Optimizer.load_state_dict`` casts every non-"step" state tensor to the
    parameter dtype, which turned the int32 indices into bf16 floats (index 301 -> 300)."""
    k, N = 320, 400
    Q = dct_basis(k)
    G = (Q[:, [5, 301]] @ torch.randn(2, N)).bfloat16()
    W = nn.Parameter(torch.zeros(k, N, dtype=torch.bfloat16))
    opt = orthotorch.DCTAdamW([W], rank=2)
    W.grad = G
    opt.step()
    assert opt.state[W]["indices"].tolist() == [5, 301]
    W2 = nn.Parameter(W.detach().clone())
    opt2 = orthotorch.DCTAdamW([W2], rank=2)
    opt2.load_state_dict(opt.state_dict())
    indices = opt2.state[W2]["indices"]
    assert indices.dtype == torch.int32 and indices.tolist() == [5, 301]
    assert opt2.state[W2]["exp_avg"].dtype == torch.bfloat16


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls", CLASSES, ids=cls_ids)
def test_rank_out_of_range_names_parameter_and_range(cls) -> None:
    named = [("blocks.0.up", nn.Parameter(torch.randn(64, 16))),
             ("blocks.0.down", nn.Parameter(torch.randn(16, 64)))]  # fmt: skip
    with pytest.raises(ValueError, match=r"parameter 'blocks\.0\.up' of shape \(64, 16\).*"
                       r"rank must be an int in \[1, 16\] \(the smaller side\).*17"):  # fmt: skip
        cls(named, rank=17)
    with pytest.raises(
        ValueError, match=r"'blocks\.0\.up'.*rank must be an int in \[1, 16\].*got 0"
    ):
        cls(named, rank=0)
    with pytest.raises(ValueError, match=r"parameter 'bias' has shape \(16,\)"):
        cls([("bias", nn.Parameter(torch.randn(16)))], rank=1)


# ----------------------------------------------------------------------- row shards (FSDP2)
ROW_BLOCKS = [(0, 5), (5, 9), (9, 9), (9, 13)]  # uneven, one empty: as Shard(0) can give


def _blocks(t: torch.Tensor) -> list[torch.Tensor]:
    return [t[a:b] for a, b in ROW_BLOCKS]


@pytest.mark.parametrize("shape", [(13, 6), (13, 20)], ids=["tall", "wide"])
def test_row_block_projections_assemble_the_whole_projection(shape) -> None:
    """Tall: the blocks of G P stack up; wide: the terms P[a:b]^T G[a:b] sum to P^T G."""
    from orthotorch.functional.lowrank import back_project, back_project_rows, project, project_rows

    torch.manual_seed(0)
    G = torch.randn(shape, dtype=torch.float64)
    m, n = shape
    tall = m > n
    P = torch.linalg.qr(torch.randn(min(shape), 3, dtype=torch.float64))[0]
    R = project(G, P)
    if tall:
        parts = [project_rows(b, P, tall=True) for b in _blocks(G)]
        torch.testing.assert_close(torch.cat(parts), R, rtol=1e-12, atol=1e-12)
        U = torch.cat([back_project_rows(r, P, tall=True) for r in _blocks(R)])
    else:
        parts = [project_rows(b, p, tall=False) for b, p in zip(_blocks(G), _blocks(P))]
        torch.testing.assert_close(sum(parts), R, rtol=1e-12, atol=1e-12)
        U = torch.cat([back_project_rows(R, p, tall=False) for p in _blocks(P)])
    full = back_project(R, P)
    torch.testing.assert_close(U, full.mT if tall else full, rtol=1e-12, atol=1e-12)


def test_rotating_row_blocks_of_a_tall_moment_equals_rotating_it_whole() -> None:
    """A row block of an m x r moment can have fewer rows than r, so the orientation must be
    given (the shape alone would rotate the block on the wrong side)."""
    torch.manual_seed(0)
    M = torch.randn(13, 4, dtype=torch.float64)
    V = torch.rand(13, 4, dtype=torch.float64)
    R = DCT_FINDER.rotation(torch.tensor([0, 2, 5, 7]), torch.tensor([2, 3, 5, 6]))
    whole_M, whole_V = M.clone(), V.clone()
    rotate_moments_([whole_M], [whole_V], [R])
    blocks_M, blocks_V = _blocks(M.clone()), _blocks(V.clone())
    rotate_moments_(blocks_M, blocks_V, [R] * len(blocks_M), tall=[True] * len(blocks_M))
    torch.testing.assert_close(torch.cat(blocks_M), whole_M, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(blocks_V), whole_V, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_dct_row_scores_add_up_to_the_whole_gradient_selection(norm: str) -> None:
    """Per-row-block DCT scores, summed (the FSDP2 all-reduce), select what find() selects."""
    torch.manual_seed(0)
    G = torch.randn(13, 16)  # tall: columns (k = 16) are selected
    options = {"score_norm": norm}
    total = sum(DCT_FINDER.row_scores(b, options) for b in _blocks(G))
    selected = DCT_FINDER.select(total, 5, options)
    assert selected.dtype == torch.int32
    assert torch.equal(selected, DCT_FINDER.find(G.mT, 5, options))


@pytest.mark.parametrize("finder", [DCT_FINDER, SVD_FINDER], ids=["dct", "svd"])
def test_allocate_matches_what_find_returns(finder) -> None:
    """Under DDP/FSDP2 non-owners receive the subspace into allocate()'s buffer."""
    X = torch.randn(6, 11, dtype=torch.bfloat16)
    found = finder.find(X, 3, {})
    buffer = finder.allocate(6, 3, X)
    assert (buffer.shape, buffer.dtype) == (found.shape, found.dtype)
