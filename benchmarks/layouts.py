"""What the matrix layouts change: MoE expert stacks (batch vs flatten) and fused q/k/v (split vs
fused), trained on the standard library's source bytes; plus the step time of an expert stack.

    python benchmarks/layouts.py                 # 3 lrs swept on a tuning seed, then 3 seeds
    python benchmarks/layouts.py --quick         # seconds: one lr, one seed, few steps

The model is a small byte-level transformer whose attention uses one fused ``qkv`` Linear and
whose MLP is a soft mixture of 4 experts stored as ``(E, 2I, d)`` / ``(E, d, I)`` stacks (the
layout of transformers' fused experts). Variants (``orthotorch.param_groups(layout=...)``):

- ``batch+split``: the detected layouts (each expert its own matrix, q/k/v split);
- ``flatten experts``: each expert stack orthogonalized as one ``E x (out*in)`` matrix (the
  behaviour before layouts);
- ``fused qkv``: q, k, v orthogonalized as one ``3d x d`` matrix.

For each variant the lr is chosen on a tuning seed (disjoint from the reported seeds) from a grid,
then the final validation loss (bits per byte) is reported over the seeds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import orthotorch
from orthotorch.bench.tasks import stdlib_corpus


class Experts(nn.Module):
    def __init__(self, experts: int, width: int, inner: int) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = experts, width, inner
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, width) * 0.02)
        self.down_proj = nn.Parameter(torch.randn(experts, width, inner) * 0.02)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        gate, up = torch.einsum("btd,eod->bteo", x, self.gate_up_proj).chunk(2, dim=-1)
        y = torch.einsum("btei,edi->bted", F.silu(gate) * up, self.down_proj)
        return (y * weights.unsqueeze(-1)).sum(-2)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, experts: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, width // heads
        self.norm1 = nn.RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.norm2 = nn.RMSNorm(width)
        self.gate = nn.Linear(width, experts, bias=False)  # the router
        self.experts = Experts(experts, width, 2 * width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(B, T, D))
        h = self.norm2(x)
        return x + self.experts(h, self.gate(h).softmax(-1))


class MoELM(nn.Module):
    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, experts: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.blocks = nn.ModuleList(Block(width, heads, experts) for _ in range(depth))
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, 256, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


VARIANTS = {
    "batch+split": {},
    "flatten experts": {"*.experts.*": "flatten"},
    "fused qkv": {"*.qkv.weight": "flatten"},
}


def train(variant: str, lr: float, seed: int, steps: int, data: tuple[Tensor, Tensor]) -> float:
    train_bytes, val_bytes = data
    torch.manual_seed(seed)
    model = MoELM()
    groups = orthotorch.param_groups(model, layout=VARIANTS[variant])
    opt = orthotorch.Muon(groups, lr=lr, adamw_lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    context, batch = 64, 16
    for _ in range(steps):
        start = torch.randint(0, len(train_bytes) - context - 1, (batch,), generator=gen)
        idx = torch.stack([train_bytes[s : s + context + 1] for s in start.tolist()])
        loss = F.cross_entropy(model(idx[:, :-1]).reshape(-1, 256), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    val_gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        starts = torch.randint(0, len(val_bytes) - context - 1, (64,), generator=val_gen)
        idx = torch.stack([val_bytes[s : s + context + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(idx[:, :-1]).reshape(-1, 256), idx[:, 1:].reshape(-1))
    return loss.item() / math.log(2)


def expert_step_time(repeats: int) -> tuple[float, float]:
    """Median ms of one Muon step on an (8, 512, 1024) expert stack: batch vs flatten."""
    stack = nn.Parameter(torch.randn(8, 512, 1024) * 0.02)
    opts = {
        name: orthotorch.Muon([{"params": [stack], "layouts": [spec]}], lr=1e-4)
        for name, spec in (("batch", "batch"), ("flatten", "flatten"))
    }
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(repeats + 1):  # interleaved; the first round warms up
        for name, opt in opts.items():
            stack.grad = torch.randn_like(stack)
            start = time.perf_counter()
            opt.step()
            times[name].append(1e3 * (time.perf_counter() - start))
    return statistics.median(times["batch"][1:]), statistics.median(times["flatten"][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds: smoke run")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tuning-seed", type=int, default=100)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.02, 0.04])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.seeds, args.lrs = 3, [0], [0.02]
    train_bytes, val_bytes, _ = stdlib_corpus()
    data = (train_bytes, val_bytes)
    print(f"{'variant':<16} {'lr':>6}  final val bits/byte (seeds {args.seeds})")
    for variant in VARIANTS:
        sweep = {lr: train(variant, lr, args.tuning_seed, args.steps, data) for lr in args.lrs}
        best = min(sweep, key=sweep.__getitem__)
        finals = [train(variant, best, seed, args.steps, data) for seed in args.seeds]
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        edge = " (grid edge)" if len(args.lrs) > 1 and best in (args.lrs[0], args.lrs[-1]) else ""
        grid = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in sweep.items())
        print(
            f"{variant:<16} {best:>6g}  {statistics.mean(finals):.3f} ± {spread:.3f}"
            f"   [sweep {grid}]{edge}"
        )
    if not args.quick:
        batch_ms, flat_ms = expert_step_time(repeats=5)
        print(
            f"(8, 512, 1024) expert stack, Muon step: batch {batch_ms:.1f} ms, flatten "
            f"{flat_ms:.1f} ms ({batch_ms / flat_ms:.2f}x)"
        )


if __name__ == "__main__":
    main()
