"""QK-Clip (orthotorch.nn.qk_clip): exact per-head scaling, fused/split/GQA/transposed weights,
the nn.MultiheadAttention hook, and a model whose attention logits are driven to grow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthotorch
from orthotorch.nn import QKClip, attention_max_logits, fused_qk_parts, qk_clip_, qk_clip_factors


def _heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, h: int) -> torch.Tensor:
    """(B, L, d) -> (B, h, L, head_dim) through the projection ``w`` (out, in)."""
    y = F.linear(x, w, b)
    return y.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)


def _brute_max_logits(q, k, scale, keep=None):
    """Per-head max by explicit loops, float64."""
    H, G = q.shape[1], k.shape[1]
    out = torch.full((H,), -math.inf, dtype=torch.float64)
    for h in range(H):
        s = q[:, h].double() @ k[:, h // (H // G)].double().transpose(-2, -1) * scale
        if keep is not None:
            s = s.masked_fill(~keep[:, h] if keep.ndim == 4 else ~keep, -math.inf)
        out[h] = s.max()
    return out


def test_attention_max_logits_matches_brute_force_with_masks_and_gqa():
    torch.manual_seed(0)
    q, k = torch.randn(3, 4, 5, 8), torch.randn(3, 2, 7, 8)
    got = attention_max_logits(q, k)
    torch.testing.assert_close(got.double(), _brute_max_logits(q, k, 8**-0.5), rtol=1e-6, atol=0)
    causal = torch.ones(5, 7, dtype=torch.bool).tril(2)
    got = attention_max_logits(q, k, scale=0.3, is_causal=True)
    torch.testing.assert_close(
        got.double(), _brute_max_logits(q, k, 0.3, causal), rtol=1e-6, atol=0
    )
    keep = torch.rand(3, 4, 5, 7) > 0.5
    got = attention_max_logits(q, k, attn_mask=keep)
    torch.testing.assert_close(
        got.double(), _brute_max_logits(q, k, 8**-0.5, keep), rtol=1e-6, atol=0
    )


def test_clip_scales_exactly_the_heads_over_tau_split_weights():
    torch.manual_seed(1)
    d, h = 16, 4
    Wq, Wk = torch.randn(d, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64)
    bq, bk = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    x = torch.randn(2, 6, d, dtype=torch.float64)
    before = attention_max_logits(_heads(x, Wq, bq, h), _heads(x, Wk, bk, h)).double()
    tau = float(before.median())  # about half of the heads are over
    over = before > tau
    assert 0 < int(over.sum()) < h
    Wq0, Wk0 = Wq.clone(), Wk.clone()
    gamma = qk_clip_([Wq, bq], [Wk, bk], before, tau, num_heads=h)
    torch.testing.assert_close(gamma.double(), torch.where(over, tau / before, 1.0))
    after = attention_max_logits(_heads(x, Wq, bq, h), _heads(x, Wk, bk, h)).double()
    # Every logit of head h is multiplied by exactly gamma_h: the clipped ones land on tau.
    torch.testing.assert_close(after, before * gamma.double(), rtol=1e-6, atol=0)
    assert bool((after <= tau * (1 + 1e-6)).all())
    rows = torch.arange(d).view(h, -1)
    for head in range(h):
        if not over[head]:  # untouched, bit for bit
            assert torch.equal(Wq[rows[head]], Wq0[rows[head]])
            assert torch.equal(Wk[rows[head]], Wk0[rows[head]])


def test_gqa_leaves_shared_keys_untouched_and_other_heads_exact():
    torch.manual_seed(2)
    h, g, hd, d = 4, 2, 4, 12
    Wq, Wk = (
        torch.randn(h * hd, d, dtype=torch.float64),
        torch.randn(g * hd, d, dtype=torch.float64),
    )
    x = torch.randn(2, 5, d, dtype=torch.float64)
    before = attention_max_logits(_heads(x, Wq, None, h), _heads(x, Wk, None, g)).double()
    tau = float(before.max()) * 0.5
    Wk0 = Wk.clone()
    gamma = qk_clip_(Wq, Wk, before, tau, num_heads=h, num_kv_heads=g)
    assert torch.equal(Wk, Wk0)
    after = attention_max_logits(_heads(x, Wq, None, h), _heads(x, Wk, None, g)).double()
    torch.testing.assert_close(after, before * gamma.double(), rtol=1e-6, atol=0)
    assert bool((after <= tau * (1 + 1e-6)).all())


def test_fused_and_transposed_fused_weights_clip_like_split_ones():
    """A fused [q | k | v] weight (nn.MultiheadAttention / qkv Linear) and GPT-2's transposed
    c_attn ``(d, 3d)`` are clipped through views; v stays bitwise unchanged."""
    torch.manual_seed(3)
    h, g, hd, d = 4, 2, 4, 16
    q_size, k_size = h * hd, g * hd
    W = torch.randn(q_size + 2 * k_size, d)
    b = torch.randn(q_size + 2 * k_size)
    logits = torch.tensor([1.0, 9.0, 3.0, 20.0])
    Wq, Wk = W[:q_size].clone(), W[q_size : q_size + k_size].clone()
    bq = b[:q_size].clone()
    qk_clip_([Wq, bq], Wk, logits, 4.0, num_heads=h, num_kv_heads=g)

    fused, fused_bias = W.clone(), b.clone()
    q, k = fused_qk_parts(fused, fused_bias, q_size=q_size, k_size=k_size)
    qk_clip_(q, k, logits, 4.0, num_heads=h, num_kv_heads=g)
    assert torch.equal(fused[:q_size], Wq) and torch.equal(fused_bias[:q_size], bq)
    assert torch.equal(fused[q_size : q_size + k_size], Wk)
    assert torch.equal(fused[q_size + k_size :], W[q_size + k_size :])

    stored = W.t().contiguous()  # Conv1D storage (in, out)
    q, k = fused_qk_parts(stored, b.clone(), q_size=q_size, k_size=k_size, transposed=True)
    qk_clip_(q, k, logits, 4.0, num_heads=h, num_kv_heads=g, transposed=True)
    assert torch.equal(stored.t(), fused)


def test_multihead_attention_hook_records_true_logits_and_clip_bounds_them():
    torch.manual_seed(4)
    d, h = 16, 4
    mha = nn.MultiheadAttention(d, h, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.mul_(4.0)  # large logits
    clip = QKClip(tau=5.0)
    assert clip.attach(nn.Sequential(mha)) == ["0"]
    x = torch.randn(3, 6, d)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True  # padded keys do not count
    mha(x, x, x, key_padding_mask=pad, need_weights=False)
    qw, kw, _ = mha.in_proj_weight.detach().chunk(3)
    qb, kb, _ = mha.in_proj_bias.detach().chunk(3)
    keep = (~pad).view(3, 1, 1, 6).expand(3, h, 6, 6)
    expected = _brute_max_logits(_heads(x, qw, qb, h), _heads(x, kw, kb, h), (d // h) ** -0.5, keep)
    recorded = clip.max_logits()["0"]
    torch.testing.assert_close(recorded.double(), expected, rtol=1e-5, atol=0)
    v_before = mha.in_proj_weight[2 * d :].clone()
    out_before = mha.out_proj.weight.clone()
    gamma = clip.step()["0"]
    assert bool((gamma < 1).any())
    assert clip.max_logits() == {}  # records are used once
    assert torch.equal(mha.in_proj_weight[2 * d :], v_before)
    assert torch.equal(mha.out_proj.weight, out_before)
    mha(x, x, x, key_padding_mask=pad, need_weights=False)
    assert float(clip.max_logits()["0"].max()) <= 5.0 * (1 + 1e-5)


def test_bad_input_raises_before_anything_changes():
    W, K = torch.randn(8, 4), torch.randn(8, 4)
    W0 = W.clone()
    logits = torch.full((4,), 10.0)
    with pytest.raises(ValueError, match="tau must be a positive finite number"):
        qk_clip_(W, K, logits, 0.0, num_heads=4)
    with pytest.raises(ValueError, match=r"max_logits must have shape \(4,\)"):
        qk_clip_(W, K, torch.ones(3), 1.0, num_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads must be a positive divisor"):
        qk_clip_(W, K, logits, 1.0, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"k\[0\] has shape \(6, 4\)"):
        qk_clip_(W, torch.randn(6, 4), logits, 1.0, num_heads=4)
    with pytest.raises(ValueError, match="has no q block"):
        fused_qk_parts(W, q_size=6, k_size=6)
    with pytest.raises(ValueError, match="was not registered"):
        QKClip(1.0).record(nn.Linear(2, 2), logits)
    assert torch.equal(W, W0)
    torch.testing.assert_close(qk_clip_factors(torch.tensor([-math.inf, 1.0, 4.0]), 2.0),
                               torch.tensor([1.0, 1.0, 0.5]))  # fmt: skip


class _RetrievalNet(nn.Module):
    """Copy the token at position 2 to the output: sharp attention pays, so logits grow.

    One ``nn.MultiheadAttention`` (fused ``in_proj``) and one hand-written grouped-query
    attention with split ``q_proj``/``k_proj``, reporting its own logits to the clip.
    """

    def __init__(self, clip: QKClip, vocab: int = 16, d: int = 32, length: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.5)
        self.mha = nn.MultiheadAttention(d, 4, batch_first=True)
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(d, d),
            nn.Linear(d, d // 2),
            nn.Linear(d, d // 2),
        )
        self.head = nn.Linear(2 * d, vocab)
        self.clip = clip
        clip.attach(self)
        clip.add(self, q=[self.q_proj.weight, self.q_proj.bias], k=self.k_proj.weight,
                 num_heads=4, num_kv_heads=2, name="gqa")  # fmt: skip

    def gqa_logits(self, e: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(e[:, -1:]).view(e.shape[0], 1, 4, -1).transpose(1, 2)
        k = self.k_proj(e).view(e.shape[0], e.shape[1], 2, -1).transpose(1, 2)
        return q, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x) + self.pos[: x.shape[1]]
        a, _ = self.mha(e[:, -1:], e, e, need_weights=False)
        q, k = self.gqa_logits(e)
        v = self.v_proj(e).view(e.shape[0], e.shape[1], 2, -1).transpose(1, 2)
        self.clip.record(self, attention_max_logits(q, k))
        b = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.head(torch.cat([a[:, 0], b.transpose(1, 2).reshape(e.shape[0], -1)], -1))


def _train(tau: float, clip_on: bool, steps: int = 30) -> list[float]:
    """The max logit recorded at each step (before that step's update)."""
    torch.manual_seed(0)
    clip = QKClip(tau)
    model = _RetrievalNet(clip)
    optimizer = orthotorch.Muon(orthotorch.param_groups(model), lr=0.05)
    data = torch.Generator().manual_seed(1)
    recorded = []
    for _ in range(steps):
        x = torch.randint(0, 16, (64, 8), generator=data)
        loss = F.cross_entropy(model(x), x[:, 2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        recorded.append(max(float(s.max()) for s in clip.max_logits().values()))
        if clip_on:
            clip.step()
        else:
            clip.reset()
    return recorded


def test_logits_driven_to_grow_stay_under_tau_with_clip():
    """Without the clip the retrieval task drives the max logit past 2 tau in 30 steps; with it
    the logits stay at tau plus what one optimizer step adds (the clip uses the logits of the
    forward before the update, as in K2; the exact bound on those is tested above)."""
    tau = 5.0
    free = _train(tau, clip_on=False)
    clipped = _train(tau, clip_on=True)
    assert free[-1] > 2 * tau, free
    assert max(clipped) < 1.5 * tau, clipped
    assert max(clipped[-10:]) < 0.6 * free[-1], (clipped, free)
