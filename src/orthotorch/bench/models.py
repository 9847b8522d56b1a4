"""The models behind the built-in tasks: a byte-level transformer, a digits CNN, a factorization.

They are deliberately plain (no fused kernels, no custom init tricks) so the optimizer is the only
thing that differs between runs of a comparison.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ByteTransformer", "DigitsCNN", "Factorization"]


def _rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # Rotate pairs (x1, x2) of the head dimension by a position-dependent angle (Su et al. 2021).
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(width)
        # Separate q, k, v matrices: Muon orthogonalizes each projection on its own, which is what
        # the reference implementations do (a fused qkv would be orthogonalized as one 3d x d).
        self.wq = nn.Linear(width, width, bias=False)
        self.wk = nn.Linear(width, width, bias=False)
        self.wv = nn.Linear(width, width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)
        self.norm2 = nn.RMSNorm(width)
        self.up = nn.Linear(width, 4 * width, bias=False)
        self.down = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, D = x.shape
        h = self.norm1(x)

        def split(t: Tensor) -> Tensor:
            return t.view(B, T, self.heads, D // self.heads).transpose(1, 2)

        q = _apply_rope(split(self.wq(h)), cos, sin)
        k = _apply_rope(split(self.wk(h)), cos, sin)
        att = F.scaled_dot_product_attention(q, k, split(self.wv(h)), is_causal=True)
        x = x + self.wo(att.transpose(1, 2).reshape(B, T, D))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class ByteTransformer(nn.Module):
    """Pre-norm causal transformer over bytes: RoPE attention, GELU MLP, untied head.

    Routing (:func:`orthotorch.param_groups`): the attention and MLP matrices are hidden
    matrices (orthogonalized); the byte embedding, the head (the last ``nn.Linear``) and the
    RMSNorm gains go to AdamW.
    """

    def __init__(
        self, vocab: int = 256, width: int = 128, depth: int = 2, heads: int = 4, context: int = 128
    ) -> None:
        super().__init__()
        if width % heads or (width // heads) % 2:
            raise ValueError(f"width {width} must split into {heads} heads of even size")
        self.context = context
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        cos, sin = _rope_tables(context, width // heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                # GPT-2 style: small normal init; the residual output projections scaled by depth.
                std = (
                    0.02 / math.sqrt(2 * depth)
                    if name.endswith(("wo.weight", "down.weight"))
                    else 0.02
                )
                nn.init.normal_(p, std=std)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(B, T, vocab)`` for byte ids ``(B, T)``, ``T <= context``."""
        T = idx.shape[1]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.cos[:T], self.sin[:T])
        return self.head(self.norm(x))


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions and two linear layers for 8x8 grey images.

    The convolution kernels (4-D) and the first linear layer are orthogonalized (as
    ``(out, in*kh*kw)`` matrices); the classifier (the last ``nn.Linear``) and biases use AdamW.
    """

    def __init__(self, channels: int = 32, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(channels * 16, hidden)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, classes)`` for images ``(B, 1, 8, 8)``."""
        return self.classifier(F.relu(self.fc(self.features(x).flatten(1))))


class Factorization(nn.Module):
    """``W = left @ right``: a two-factor linear map ``x -> W x`` (plain parameters, no head).

    Both factors are hidden matrices, so both are orthogonalized; there is no AdamW group.
    """

    def __init__(self, rows: int, cols: int, inner: int, init_scale: float = 1e-2) -> None:
        super().__init__()
        self.left = nn.Parameter(torch.randn(rows, inner) * init_scale / math.sqrt(inner))
        self.right = nn.Parameter(torch.randn(inner, cols) * init_scale / math.sqrt(cols))

    def matrix(self) -> Tensor:
        """The product ``left @ right``."""
        return self.left @ self.right

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W^T`` for inputs ``(B, cols)``."""
        return (x @ self.right.T) @ self.left.T
