"""The orthonormal DCT-II basis and gradient-aligned column selection (SVD-free subspaces).

The DCT-II basis of size ``n`` is the orthogonal matrix ``Q`` whose column ``j`` is the
``j``-th cosine vector:

.. math::

    Q_{ij} = \\sqrt{2/n}\\, \\cos\\big(\\pi j (2i + 1) / (2n)\\big), \\qquad
    Q_{i0} = \\sqrt{1/n}.

(shared/ALGORITHMS.md writes the same matrix with frequencies along rows; we store its
transpose so that ``Q[:, idx]`` is a projector with orthonormal columns.) ``x @ Q`` is the
orthonormal DCT-II of each row of ``x``.

To find an ``r``-dimensional subspace aligned with a gradient ``G`` (``m x n``) without an SVD,
Modoranu et al. (2025, "SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language
Models") score every basis column by its alignment ``s_j = ||G q_j||`` and keep the top ``r``.
With the l2 score this choice maximises the captured energy ``||G Q[:, idx]||_F^2`` over all
``r``-subsets of the basis, the DCT analogue of the top-``r`` singular vectors.

Two paths compute the scores (tests check that they agree):

- the readable reference, a dense product ``S = G Q``: ``O(m n^2)``;
- the fast path, a DCT-II of each row of ``G`` by a real FFT of half the size (Makhoul, 1980):
  ``O(m n log n)``. ``benchmarks/lowrank.py`` measures it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "clear_dct_cache",
    "column_scores",
    "dct",
    "dct_basis",
    "dct_column_scores",
    "select_columns",
]

ScoreNorm = Literal["l1", "l2"]
SCORE_NORMS: tuple[str, ...] = ("l1", "l2")

# One basis per (size, dtype, device), shared by every layer and optimizer: this sharing is what
# makes the method's memory claim true (the state holds only int32 column indices).
_BASIS_CACHE: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
_TWIDDLE_CACHE: dict[tuple[int, torch.dtype, torch.device], tuple[Tensor, Tensor, Tensor]] = {}


def _device_key(device: str | torch.device | None) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        # "cuda" and "cuda:0" must share one cache entry.
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def dct_basis(
    n: int, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> Tensor:
    """The orthonormal ``n x n`` DCT-II basis ``Q`` (columns = cosine vectors), cached.

    Built once in float64 and rounded to ``dtype``; later calls with the same
    ``(n, dtype, device)`` return the *same* tensor, which must therefore not be modified.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    key = (n, dtype, _device_key(device))
    basis = _BASIS_CACHE.get(key)
    if basis is None:
        i = torch.arange(n, dtype=torch.float64).unsqueeze(1)
        j = torch.arange(n, dtype=torch.float64).unsqueeze(0)
        Q = math.sqrt(2.0 / n) * torch.cos(math.pi * j * (2 * i + 1) / (2 * n))
        Q[:, 0] = math.sqrt(1.0 / n)
        basis = Q.to(dtype=dtype, device=key[2])
        _BASIS_CACHE[key] = basis
    return basis


def clear_dct_cache() -> None:
    """Free every cached basis (e.g. after training, or to reclaim accelerator memory)."""
    _BASIS_CACHE.clear()
    _TWIDDLE_CACHE.clear()


def _fft_dtype(x: Tensor) -> torch.dtype:
    # torch.fft has no bf16/fp16 CPU kernels and half-precision FFTs lose the small scores.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _twiddles(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(perm, w_re, w_im)`` for Makhoul's DCT-II: the even/odd reordering and the scaled
    twiddle factors ``w_k = c_k exp(-i pi k / 2n)``, ``k = 0..n//2`` (``c_0 = sqrt(1/n)``, else
    ``sqrt(2/n)``)."""
    key = (n, dtype, device)
    cached = _TWIDDLE_CACHE.get(key)
    if cached is None:
        perm = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)]).to(device)
        k = torch.arange(n // 2 + 1, dtype=torch.float64)
        scale = torch.full_like(k, math.sqrt(2.0 / n))
        scale[0] = math.sqrt(1.0 / n)
        angle = -math.pi * k / (2 * n)
        w_re = (scale * torch.cos(angle)).to(dtype=dtype, device=device)
        w_im = (scale * torch.sin(angle)).to(dtype=dtype, device=device)
        cached = _TWIDDLE_CACHE[key] = (perm, w_re, w_im)
    return cached


def _half_spectrum(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(z, w_re, w_im)`` with ``z = rfft(v)``, ``v`` the even/odd reordering of ``x``.

    Makhoul's identity: with ``w_k z_k = a_k + i b_k``, the orthonormal DCT-II is
    ``y_k = a_k`` for ``k <= n/2`` and ``y_{n-k} = -b_k`` for ``1 <= k < n/2`` (from the
    conjugate symmetry of the FFT of a real sequence), so one real FFT of length ``n`` gives
    all ``n`` coefficients.
    """
    n = x.shape[-1]
    dtype = _fft_dtype(x)
    perm, w_re, w_im = _twiddles(n, dtype, x.device)
    # index_select also makes a transposed (non-contiguous) input contiguous, in the same pass.
    v = x.index_select(-1, perm).to(dtype)
    if v.numel() == 0:
        # MKL's FFT rejects an empty batch (an FSDP2 row shard can hold 0 rows).
        spectrum_shape = (*v.shape[:-1], n // 2 + 1)
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return v.new_zeros(spectrum_shape, dtype=complex_dtype), w_re, w_im
    return torch.fft.rfft(v), w_re, w_im


def dct(x: Tensor) -> Tensor:
    """Orthonormal DCT-II along the last dimension, by FFT: equals ``x @ dct_basis(n)``.

    Computed in float32 (float64 for float64 input) and returned in that dtype.
    """
    n = x.shape[-1]
    z, w_re, w_im = _half_spectrum(x)
    a = z.real * w_re - z.imag * w_im
    b = z.real * w_im + z.imag * w_re
    return torch.cat([a, -b[..., 1 : (n + 1) // 2].flip(-1)], dim=-1)


def dct_column_scores(G: Tensor, norm: ScoreNorm = "l2") -> Tensor:
    """Fast path of :func:`column_scores` for the DCT basis: ``||G q_j||`` for every ``j``.

    ``G`` is ``(..., m, n)``; returns ``(..., n)`` in float32 (float64 for float64 input).

    For the l2 score the coefficients are never formed: with ``z_j = rfft(v)_j`` over the ``m``
    rows, ``sum_rows (Re(w_j z_j))^2`` is a quadratic form in the 2x2 Gram matrix of
    ``(Re z_j, Im z_j)``, so one batched reduction replaces the complex product and the
    re-assembly (measured ~3x faster than forming ``dct(G)`` on a 4096x1024 input).
    """
    if norm == "l1":
        return torch.linalg.vector_norm(dct(G), ord=1, dim=-2)
    if norm != "l2":
        raise ValueError(f"norm must be one of {SCORE_NORMS}, got {norm!r}")
    n = G.shape[-1]
    z, w_re, w_im = _half_spectrum(G)
    zr = torch.view_as_real(z)  # (..., m, n//2 + 1, 2)
    gram = torch.einsum("...mkc,...mkd->...kcd", zr, zr)
    re2, im2, reim = gram[..., 0, 0], gram[..., 1, 1], gram[..., 0, 1]
    cc, ss, cs = w_re * w_re, w_im * w_im, w_re * w_im
    energy_a = cc * re2 - 2 * cs * reim + ss * im2  # sum_rows (Re(w z))^2
    energy_b = ss * re2 + 2 * cs * reim + cc * im2  # sum_rows (Im(w z))^2
    energy = torch.cat([energy_a, energy_b[..., 1 : (n + 1) // 2].flip(-1)], dim=-1)
    # The quadratic form can round a little below zero for columns orthogonal to G.
    return energy.clamp_min_(0).sqrt_()


def column_scores(G: Tensor, basis: Tensor, norm: ScoreNorm = "l2") -> Tensor:
    """Reference path: the norm of every column of ``S = G @ basis`` (dense product).

    Works for any basis; for the DCT it is the slow ``O(m n^2)`` spec of
    :func:`dct_column_scores`.
    """
    if norm not in SCORE_NORMS:
        raise ValueError(f"norm must be one of {SCORE_NORMS}, got {norm!r}")
    S = G.to(basis.dtype) @ basis
    return torch.linalg.vector_norm(S, ord=1 if norm == "l1" else 2, dim=-2)


def select_columns(
    G: Tensor, basis: Tensor | None, rank: int, *, norm: ScoreNorm = "l2"
) -> tuple[Tensor, Tensor]:
    """Alignment scores of the basis columns with ``G`` and the indices of the top ``rank``.

    Args:
        G: ``(..., m, n)``; the basis acts on the last dimension (pass ``G.mT`` to select in
            the row space).
        basis: an ``n x n`` orthonormal basis (dense reference path), or ``None`` for the DCT-II
            basis of size ``n`` scored by FFT in ``O(m n log n)`` (same result as passing
            ``dct_basis(n)``).
        rank: how many columns to keep, ``1 <= rank <= n``.
        norm: ``"l2"`` (default; maximises the captured energy ``||G Q[:, idx]||_F``) or
            ``"l1"`` (the paper's alternative, less dominated by a few large rows).

    Returns:
        ``(scores, indices)``: ``scores`` is ``(..., n)``; ``indices`` is ``(..., rank)``,
        int32, sorted ascending (so an unchanged selection gives identical state).
    """
    n = G.shape[-1]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
        raise ValueError(f"rank must be an int in [1, {n}], got {rank!r}")
    if basis is None:
        scores = dct_column_scores(G, norm)
    else:
        if basis.shape != (n, n):
            raise ValueError(f"basis must be {n}x{n} for G of shape {tuple(G.shape)}")
        scores = column_scores(G, basis, norm)
    top = torch.topk(scores, rank, dim=-1, sorted=False).indices
    return scores, top.sort(dim=-1).values.to(torch.int32)
