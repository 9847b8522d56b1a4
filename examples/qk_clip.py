"""QK-Clip with Muon: report attention logits, clip q/k after each step (MuonClip, Kimi K2).

A small model copies the token at position 2 to its output, so sharp attention pays and Muon
drives the attention logits up. The model has the two kinds of attention a user has:

- ``nn.MultiheadAttention`` (fused ``in_proj_weight``): ``QKClip.attach(model)`` hooks it and
  recomputes its logits from the module's inputs (it does not expose them);
- a hand-written grouped-query attention (split ``q_proj``/``k_proj``, 4 query heads sharing
  2 key heads) that reports its own per-head maximum with ``attention_max_logits``.

The run is made twice, without and with the clip, and prints the largest logit seen per step::

    python examples/qk_clip.py            # 100 steps
    python examples/qk_clip.py --quick    # 30 steps
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import orthotorch
from orthotorch.nn import QKClip, attention_max_logits


class HandWrittenGQA(nn.Module):
    """Grouped-query attention of the last position over the sequence, reporting its logits."""

    def __init__(self, d: int, heads: int, kv_heads: int, clip: QKClip) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, heads * self.head_dim)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.clip = clip
        # Where this attention's q and k live, so clip.step() can rescale them.
        clip.add(self, q=[self.q_proj.weight, self.q_proj.bias], k=self.k_proj.weight,
                 num_heads=heads, num_kv_heads=kv_heads, name="gqa")  # fmt: skip

    def forward(self, query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, L, S = x.shape[0], query.shape[1], x.shape[1]
        q = self.q_proj(query).view(B, L, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.kv_heads, -1).transpose(1, 2)
        # The one line QK-Clip needs from an attention: its per-head maximum logit.
        self.clip.record(self, attention_max_logits(q, k))
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return out.transpose(1, 2).reshape(B, L, -1)


class Retrieval(nn.Module):
    def __init__(self, clip: QKClip, vocab: int = 16, d: int = 32, length: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.5)
        self.mha = nn.MultiheadAttention(d, 4, batch_first=True)
        self.gqa = HandWrittenGQA(d, 4, 2, clip)
        self.head = nn.Linear(2 * d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x) + self.pos[: x.shape[1]]
        a, _ = self.mha(e[:, -1:], e, e, need_weights=False)
        b = self.gqa(e[:, -1:], e)
        return self.head(torch.cat([a[:, 0], b[:, 0]], dim=-1))


def train(tau: float, use_clip: bool, steps: int) -> list[dict[str, float]]:
    torch.manual_seed(0)
    clip = QKClip(tau)
    model = Retrieval(clip)
    clip.attach(model)  # hooks model.mha
    optimizer = orthotorch.Muon(orthotorch.param_groups(model), lr=0.05)
    data = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        x = torch.randint(0, 16, (64, 8), generator=data)
        loss = F.cross_entropy(model(x), x[:, 2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        logits = {name: float(s.max()) for name, s in clip.max_logits().items()}
        history.append({"loss": loss.item(), **logits})
        if use_clip:
            clip.step()  # after optimizer.step(): rescale heads over tau, clear the records
        else:
            clip.reset()
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tau", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="30 steps")
    args = parser.parse_args()
    steps = 30 if args.quick else args.steps
    runs = {"no clip": train(args.tau, False, steps), "QK-Clip": train(args.tau, True, steps)}
    print(f"largest attention logit per step (tau = {args.tau}); mha = nn.MultiheadAttention")
    print(f"{'step':>4} | " + " | ".join(f"{r:^26}" for r in runs))
    print(f"{'':>4} | " + " | ".join(f"{'mha':>7} {'gqa':>7} {'loss':>8}  " for _ in runs))
    for t in range(0, steps, max(1, steps // 10)):
        cells = [f"{h[t]['mha']:7.2f} {h[t]['gqa']:7.2f} {h[t]['loss']:8.4f}  " for h in (
            runs["no clip"], runs["QK-Clip"])]  # fmt: skip
        print(f"{t:>4} | " + " | ".join(cells))
    for name, h in runs.items():
        peak = max(max(r["mha"], r["gqa"]) for r in h)
        print(f"{name}: peak logit {peak:.2f}, final loss {h[-1]['loss']:.4f}")


if __name__ == "__main__":
    main()
