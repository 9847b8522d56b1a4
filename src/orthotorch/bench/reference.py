"""The reference parameter set and kernel shapes every benchmark uses (shared/ALGORITHMS.md).

4 transformer layers of width 512 (Wq, Wk, Wv, Wo 512x512; W_up 2048x512; W_down 512x2048;
two 512 norms), an 8192x512 embedding and an 8192x512 head (AdamW), a final norm; random normal
gradients from ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

KERNEL_SHAPES: tuple[tuple[int, int], ...] = (
    (512, 512),
    (512, 2048),
    (1024, 4096),
    (2048, 2048),
    (2048, 8192),
)

WIDTH = 512
LAYERS = 4
VOCAB = 8192


def reference_named_parameters(
    seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """``(hidden, adamw)``: named parameters of the reference set, hidden matrices first."""
    gen = torch.Generator().manual_seed(seed)

    def make(*shape: int) -> nn.Parameter:
        w = torch.randn(*shape, generator=gen, dtype=torch.float32) * shape[-1] ** -0.5
        return nn.Parameter(w.to(device=device, dtype=dtype))

    hidden, adamw = [], []
    for layer in range(LAYERS):
        for name in ("wq", "wk", "wv", "wo"):
            hidden.append((f"layers.{layer}.attn.{name}", make(WIDTH, WIDTH)))
        hidden.append((f"layers.{layer}.mlp.up", make(4 * WIDTH, WIDTH)))
        hidden.append((f"layers.{layer}.mlp.down", make(WIDTH, 4 * WIDTH)))
        adamw.append(
            (f"layers.{layer}.norm1", nn.Parameter(torch.ones(WIDTH, device=device, dtype=dtype)))
        )
        adamw.append(
            (f"layers.{layer}.norm2", nn.Parameter(torch.ones(WIDTH, device=device, dtype=dtype)))
        )
    adamw.append(("embedding", make(VOCAB, WIDTH)))
    adamw.append(("head", make(VOCAB, WIDTH)))
    adamw.append(("final_norm", nn.Parameter(torch.ones(WIDTH, device=device, dtype=dtype))))
    return hidden, adamw


def reference_param_groups(
    seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> list[dict]:
    """The reference set as :func:`orthotorch.param_groups`-style groups."""
    hidden, adamw = reference_named_parameters(seed, device, dtype)
    return [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}]


def set_random_gradients(params: list[Tensor], seed: int) -> None:
    """Give every parameter a fresh standard-normal gradient (deterministic in ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
