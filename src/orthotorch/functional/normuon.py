"""NorMuon (neuron-wise normalized Muon) as pure functions.

After Muon's orthogonalization ``O_t ~ polar(M_t)`` of an ``m x n`` matrix (``m`` output
neurons, in the layer's ``(out, in)`` orientation), NorMuon keeps an Adam-style second moment
per neuron and divides each row by its root:

.. math::

    v_t = \\beta_2 v_{t-1} + (1 - \\beta_2)\\, \\mathrm{mean}_{\\text{cols}}(O_t \\odot O_t),
    \\qquad \\hat O_t = O_t \\oslash (\\sqrt{v_t} + \\epsilon),
    \\qquad \\Delta W_t = -\\eta\\, \\frac{0.2 \\sqrt{m n}}{\\lVert \\hat O_t \\rVert_F}
    \\, \\hat O_t .

The last factor gives the update RMS ``0.2`` (AdamW's typical RMS, as Muon's
``match_rms_adamw``): the paper's Algorithm 1. The authors' reference code instead keeps the
Frobenius norm of ``O_t`` (``||O_t||_F / ||Ô_t||_F``) and then applies Muon's original shape
scale ``sqrt(max(1, m/n))``; :data:`TARGET_NORMS` names both, and the optimizer picks the one
that goes with its ``adjust_lr`` (``"match_rms_adamw"``: the paper; ``"original"``: the code).
Both are split here into a normalisation to a Frobenius norm (``sqrt(min(m, n))``, the norm of an
exact ``U V^T``, or ``||O_t||_F``) and the shape scale the optimizer applies per matrix
(``0.2 sqrt(max(m, n))`` or ``sqrt(max(1, m/n))``), whose product is the formula above.

``v`` has no bias correction (as in both reference codes): its first values are ``(1 - beta2)``
times too small, but a common factor of all rows cancels in the Frobenius rescaling.

With an exact polar factor the rows of a *wide* ``O`` (``m <= n``) all have norm 1, so the
normalisation only changes tall matrices, and Newton–Schulz outputs (whose singular values are
only approximately 1).

The statistics are per row, so a row shard (FSDP2 ``Shard(0)``) computes them alone; only the two
Frobenius norms are sums over shards (:func:`normalize_rows`'s partial sums, reduced by the
caller). Reference: Li, Liu, Liang, Chen, Zhao, "NorMuon: Making Muon more efficient and
scalable" (ICLR 2026, arXiv:2510.05491); ``shared/ALGORITHMS.md`` ("NorMuon").
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .muon import shape_scale

__all__ = [
    "TARGET_NORMS",
    "normalize_rows",
    "normuon_reference",
    "rescale_factor",
    "target_norm_for",
]

TargetNorm = Literal["polar", "preserve"]
# "polar": scale Ô to sqrt(min(m, n)), the Frobenius norm of an exact U V^T (the paper's RMS
# matching, together with the 0.2 sqrt(max(m, n)) shape scale); "preserve": to ||O||_F (the
# authors' code).
TARGET_NORMS: tuple[str, ...] = ("polar", "preserve")


def target_norm_for(adjust_lr: str) -> str:
    """The Frobenius target that, with ``shape_scale(shape, adjust_lr)``, gives NorMuon's update."""
    return "polar" if adjust_lr == "match_rms_adamw" else "preserve"


def normalize_rows(O: Tensor, v: Tensor, beta2: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Update the per-row second moment ``v`` in place and return ``(Ô, ||Ô||², ||O||²)``.

    Args:
        O: ``(..., m, n)`` orthogonalized update rows (all columns of each row present), in the
            dtype of ``v`` (float32 or float64).
        v: ``(..., m)`` second moment of the rows, updated in place:
            ``v = beta2 v + (1 - beta2) mean_cols(O^2)``.
        beta2: decay of ``v``, in ``[0, 1)``.
        eps: added to ``sqrt(v)`` before dividing.

    Returns:
        ``Ô = O / (sqrt(v) + eps)`` and the squared Frobenius norms of ``Ô`` and ``O`` over the
        rows given, shaped ``O.shape[:-2]``: partial sums when ``O`` is a row shard.
    """
    squares = O.square()
    v.lerp_(squares.mean(dim=-1), 1 - beta2)
    O_hat = O / (v.sqrt() + eps).unsqueeze(-1)
    return O_hat, O_hat.square().sum(dim=(-2, -1)), squares.sum(dim=(-2, -1))


def rescale_factor(hat_sq: Tensor, o_sq: Tensor, shape: tuple[int, int], target: str) -> Tensor:
    """``||target|| / ||Ô||_F`` from the (whole-matrix) squared norms of :func:`normalize_rows`.

    ``target="polar"``: ``sqrt(min(m, n))``; ``"preserve"``: ``||O||_F``. A zero ``Ô`` (zero
    momentum) gives a finite factor, so the update stays zero instead of NaN.
    """
    if target == "polar":
        numerator = torch.full_like(hat_sq, math.sqrt(min(shape)))
    elif target == "preserve":
        numerator = o_sq.sqrt()
    else:
        raise ValueError(f"target must be one of {TARGET_NORMS}, got {target!r}")
    return numerator / hat_sq.sqrt().clamp_min(torch.finfo(hat_sq.dtype).tiny)


def normuon_reference(
    grads: list[Tensor],
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    beta2: float = 0.95,
    eps: float = 1e-8,
    adjust_lr: str = "match_rms_adamw",
) -> list[Tensor]:
    """The scaled update ``D_t`` of each step for a gradient sequence of one ``m x n`` matrix,
    written step by step from the formulas (exact polar factor by SVD; float64 oracle for tests).

    ``W_t = (1 - lr wd) W_{t-1} - lr D_t``.
    """
    G0 = grads[0]
    m, n = G0.shape
    B = torch.zeros_like(G0)
    v = torch.zeros(m, dtype=G0.dtype)
    out = []
    for G in grads:
        B = momentum * B + (1 - momentum) * G
        M = (1 - momentum) * G + momentum * B if nesterov else B
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
        O = U @ Vh
        v = beta2 * v + (1 - beta2) * (O * O).mean(dim=1)
        O_hat = O / (v.sqrt() + eps)[:, None]
        if adjust_lr == "match_rms_adamw":
            D = 0.2 * math.sqrt(m * n) / torch.linalg.norm(O_hat) * O_hat
        else:
            D = torch.linalg.norm(O) / torch.linalg.norm(O_hat) * O_hat
            D = D * shape_scale((m, n), "original")
        out.append(D)
    return out
