"""Dion (distributed orthonormalized updates) as pure functions.

Per ``m x n`` matrix, Dion keeps the momentum ``M`` and a right factor ``Q`` (``n x r``) and
takes one step of amortized power iteration with error feedback (Ahn et al., 2025, Algorithm 1):

.. math::

    M \\leftarrow M + G, \\quad P = \\mathrm{orth}(M Q), \\quad R = M^\\top P, \\quad
    M \\leftarrow M - (1 - \\mu) P R^\\top, \\quad Q \\leftarrow R\\, \\mathrm{diag}(
    \\lVert R_{:,j} \\rVert + \\epsilon)^{-1}, \\quad \\Delta W = -\\eta\\, s(m, n)\\, P Q^\\top .

The error feedback keeps in ``M`` what the rank-``r`` update did not take (all of it, times
``mu``, for what it did take), so directions outside the current subspace accumulate until the
power iteration picks them up. ``P Q^T`` has rank ``<= r``; at ``r = min(m, n)`` on a fixed
matrix it converges to ``U V^T`` (rate ``(s_{i+1} / s_i)^2`` per step), but one step is not the
polar factor. As in microsoft/dion, the algorithm runs on the orientation whose ``P`` is on the
*larger* side (``Q`` on the smaller one): a wide matrix is handled through its transpose.

**Orthonormalization** (:data:`QR_METHODS`): ``"householder"`` is ``torch.linalg.qr`` of the whole
``P``; ``"cholesky"`` is randomized Cholesky-QR (microsoft/dion's RCQR: the QR of a sketch
``S P`` (``1.25 r x r``, ``S`` Gaussian) preconditions ``P``, then one Cholesky-QR pass
``P <- P chol(P^T P)^{-1}``). Cholesky-QR only needs ``r x r`` and ``1.25 r x r`` sums over
``P``'s rows, so a row-sharded ``P`` is orthonormalized with two small all-reduces and no
gather. Measured (float32, ``benchmarks/normuon_dion.py --only qr``): plain Cholesky-QR loses
orthogonality as ``cond(P)^2 eps`` (``||P^T P - I||`` 1.6 at cond 1e4, Cholesky fails at 1e6);
with the sketch it stays at 1e-5 up to cond 1e8 (Householder: 3e-6); but on this CPU Householder
is faster (one thread: 22 vs 36 ms for 2048 x 128, 1.5 vs 11.6 ms for 512 x 128). Hence
``"auto"`` (default): Householder wherever ``P`` is whole, Cholesky-QR for a row-sharded ``P``.
Both give the thin-QR factor with ``diag(R) > 0``, equal up to the factor's own sensitivity
(~``cond(P) eps``). The sketch is drawn once per shape from a seeded
generator and reused (``P`` does not depend on it, so a fixed ``S`` embeds every ``P``'s column
space as well as a fresh one would, with high probability).

**Sharded rows** (FSDP2 ``Shard(0)``): every function here takes the *local* rows of ``M`` and a
``reduce`` callback that sums a list of tensors over the shards in place (no-op unsharded):

- ``P`` on the rows (a tall weight): ``P = M Q`` is row-local; orthonormalization reduces
  ``S P`` and ``P^T P``; ``R = M^T P`` reduces ``n x r``. ``Q`` (``n x r``) is replicated.
- ``P`` on the columns (a wide weight, handled as ``M^T``): ``P = M^T Q`` reduces ``n x r``, then
  every rank orthonormalizes the same whole ``P``; ``R``'s rows are this rank's rows, and the
  column norms of ``R`` reduce ``r`` numbers. ``Q`` (``m x r``) is sharded like the rows.

Only ``r``-column factors cross the network, never the ``m x n`` matrix. Reference: Ahn, Xu,
Abreu, Langford, "Dion: Distributed Orthonormalized Updates" (2025, arXiv:2504.05295);
github.com/microsoft/dion (``dion_reference.py``, ``dion_simple.py``);
``shared/ALGORITHMS.md`` ("Dion").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "DION_ADJUST_LR",
    "QR_METHODS",
    "SKETCH_OVERSAMPLE",
    "cholesky_qr",
    "dion_reference",
    "dion_scale",
    "dion_step_",
    "initial_right_factor",
    "orthonormalize",
    "p_on_rows",
]

QR_METHODS: tuple[str, ...] = ("auto", "householder", "cholesky")
DION_ADJUST_LR: tuple[str, ...] = ("spectral_norm", "original", "match_rms_adamw")
SKETCH_OVERSAMPLE = 1.25  # rows of the sketch per column of P (microsoft/dion's default)

Reduce = Callable[[list[Tensor]], None]


def _no_reduce(tensors: list[Tensor]) -> None:
    del tensors


def p_on_rows(shape: tuple[int, int]) -> bool:
    """Whether ``P`` lives on the matrix's rows (``m >= n``); else on its columns."""
    return shape[0] >= shape[1]


def dion_scale(shape: tuple[int, int], adjust_lr: str) -> float:
    """The learning-rate multiplier of a Dion update of an ``m x n`` (``out x in``) matrix.

    ``"spectral_norm"``: ``sqrt(m / n)`` (the paper's and microsoft/dion's; below 1 for wide
    matrices); ``"original"``: Muon's ``sqrt(max(1, m / n))``; ``"match_rms_adamw"``:
    ``0.2 sqrt(max(m, n))`` (AdamW's update RMS at full rank).
    """
    m, n = shape
    if adjust_lr == "spectral_norm":
        return math.sqrt(m / n)
    if adjust_lr == "original":
        return math.sqrt(max(1.0, m / n))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    raise ValueError(f"adjust_lr must be one of {DION_ADJUST_LR}, got {adjust_lr!r}")


def initial_right_factor(k: int, r: int, seed: int, dtype: torch.dtype) -> Tensor:
    """The starting ``Q`` (``k x r``, standard Gaussian) for a matrix whose small side is ``k``.

    Drawn from a generator seeded by ``(seed, k, r)`` on the CPU in float64, so every rank and
    every world size starts from the same ``Q`` without communicating (microsoft/dion broadcasts
    a random one instead).
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + k) * 1_000_033 + r)
    return torch.randn(k, r, generator=gen, dtype=torch.float64).to(dtype)


@lru_cache(maxsize=64)
def _sketch(rows: int, r: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    k = math.ceil(SKETCH_OVERSAMPLE * r)
    gen = torch.Generator().manual_seed(rows * 1_000_003 + r)
    S = torch.randn(k, rows, generator=gen, dtype=torch.float64) / math.sqrt(k)
    return S.to(dtype=dtype, device=device)


def cholesky_qr(
    P: Tensor, reduce: Reduce = _no_reduce, rows: tuple[int, int, int] | None = None
) -> Tensor:
    """Orthonormal columns spanning ``P``'s (``(..., m, r)``, possibly a row shard), by
    randomized Cholesky-QR: ``P <- P R_s^{-1}`` with ``R_s`` from the QR of ``S P``, then
    ``P <- P R_c^{-1}`` with ``R_c^T R_c = P^T P``.

    ``rows = (start, stop, total)`` places a row shard in the whole ``P`` (the sketch's columns
    for these rows); ``reduce`` sums ``S P`` and ``P^T P`` over the shards. Columns that are
    (numerically) zero stay zero instead of becoming NaN.
    """
    start, stop, total = rows if rows is not None else (0, P.shape[-2], P.shape[-2])
    r = P.shape[-1]
    S = _sketch(total, r, P.dtype, P.device)[:, start:stop]
    SP = S @ P
    reduce([SP])
    R = torch.linalg.qr(SP, mode="r")[1]
    # Positive pivots: then P (R_c R_s)^{-1} is *the* thin QR factor of P (positive diag(R)),
    # the same basis Householder QR gives after its sign fix. The direction depends on the
    # basis, not only on its span (the column normalisation of R does not commute with
    # rotations), so every method must produce this one.
    R = R * _signs(R).unsqueeze(-1)
    P = _solve_right(P, R)
    gram = P.mT @ P
    reduce([gram])
    # A zero column of P (a momentum of rank < r) makes the Gram matrix singular: a shift far
    # below rounding keeps the Cholesky factor finite and leaves the column zero. (A shift of
    # eps * trace, as in shifted Cholesky-QR, cost 100x in orthogonality: 1e-3 vs 1e-5 for a
    # 2048 x 128 float32 P, measured; after the sketch P is well conditioned and needs none.)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    floor = torch.finfo(P.dtype).eps ** 2 * trace + torch.finfo(P.dtype).tiny
    eye = torch.eye(r, dtype=P.dtype, device=P.device)
    L = torch.linalg.cholesky_ex(gram + floor[..., None, None] * eye)[0]
    return _solve_right(P, L.mT)


def _signs(R: Tensor) -> Tensor:
    """``sign(diag(R))`` with zeros counted as positive."""
    diag = R.diagonal(dim1=-2, dim2=-1)
    return torch.where(diag < 0, -1.0, 1.0).to(R.dtype)


def _solve_right(P: Tensor, R: Tensor) -> Tensor:
    """``P R^{-1}`` for upper-triangular ``R``, with (near-)zero pivots giving zero columns."""
    diag = R.diagonal(dim1=-2, dim2=-1)
    scale = diag.abs().amax(dim=-1, keepdim=True)
    dead = diag.abs() <= torch.finfo(R.dtype).eps * scale + torch.finfo(R.dtype).tiny
    # Replacing a dead pivot by 1 keeps the solve finite; the column is zeroed afterwards.
    R = R + torch.diag_embed(dead.to(R.dtype))
    X = torch.linalg.solve_triangular(R, P, upper=True, left=False)
    return X.masked_fill(dead.unsqueeze(-2), 0.0)


def orthonormalize(
    P: Tensor, method: str, reduce: Reduce = _no_reduce, rows: tuple[int, int, int] | None = None
) -> Tensor:
    """The Q factor of the thin QR of ``P`` (``(..., m, r)``) with ``diag(R) > 0``, by one
    of :data:`QR_METHODS` (all give the same basis up to rounding).

    ``"householder"`` needs the whole ``P`` (``reduce`` must be a no-op); ``"auto"`` is
    Householder for a whole ``P`` and Cholesky-QR for a row shard (``rows`` given).
    """
    if method == "auto":
        method = "householder" if rows is None else "cholesky"
    if method == "cholesky":
        return cholesky_qr(P, reduce, rows)
    if method == "householder":
        Q, R = torch.linalg.qr(P)
        return Q * _signs(R).unsqueeze(-2)
    raise ValueError(f"qr_method must be one of {QR_METHODS}, got {method!r}")


def dion_step_(
    M: Tensor,
    Q: Tensor,
    *,
    rows_side: bool,
    mu: float,
    eps: float,
    method: str,
    error_feedback: bool = True,
    reduce: Reduce = _no_reduce,
    rows: tuple[int, int, int] | None = None,
) -> Tensor:
    """One Dion step on a stack of matrices; updates ``M`` (error feedback) and ``Q`` in place
    and returns the unscaled direction ``P Q^T`` in ``M``'s orientation.

    Args:
        M: ``(k, m_local, n)`` momenta (gradient already added), this rank's rows.
        Q: ``(k, n, r)`` when ``rows_side`` (``P`` on the rows: ``m >= n``), else
            ``(k, m_local, r)``, this rank's rows of the right factor of ``M^T``.
        rows_side: see :func:`p_on_rows` (decided by the whole matrix's shape).
        mu: momentum ``mu``; the error feedback removes ``(1 - mu) P R^T`` from ``M``.
        eps: added to the column norms of ``R``.
        method: orthonormalization, one of :data:`QR_METHODS`.
        error_feedback: ``False`` leaves ``M`` alone (an ablation; with it the momentum is a
            plain sum of gradients).
        reduce: sums a list of tensors over the row shards in place (no-op unsharded).
        rows: ``(start, stop, total)`` rows of this shard (``None``: all rows).

    A column of ``R`` that is exactly zero (a momentum of rank ``< r``, or zero) keeps its old
    ``Q`` column, so the power iteration can pick the direction up later; it contributes
    nothing to this step's direction.
    """
    if rows_side:
        P = orthonormalize(M @ Q, method, reduce, rows)
        R = M.mT @ P  # (k, n, r)
        reduce([R])
        norms = R.norm(dim=-2, keepdim=True)
        if error_feedback:
            M.baddbmm_(P, R.mT, alpha=-(1 - mu))
        Q_update = R / (norms + eps)
        Q.copy_(torch.where(norms > 0, Q_update, Q))
        return P @ Q_update.mT
    P = M.mT @ Q  # (k, n, r), the sum over row shards
    reduce([P])
    P = orthonormalize(P, method)
    R = M @ P  # (k, m_local, r): this rank's rows of R = (M^T)^T P
    squares = R.square().sum(dim=-2, keepdim=True)
    reduce([squares])
    norms = squares.sqrt()
    if error_feedback:
        M.baddbmm_(R, P.mT, alpha=-(1 - mu))
    Q_update = R / (norms + eps)
    Q.copy_(torch.where(norms > 0, Q_update, Q))
    return Q_update @ P.mT


def dion_reference(
    grads: list[Tensor],
    Q0: Tensor,
    *,
    mu: float = 0.95,
    eps: float = 1e-8,
    error_feedback: bool = True,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """The paper's Algorithm 1 written out for one ``m x n`` matrix (float64 test oracle).

    ``Q0`` is the starting right factor of the orientation :func:`p_on_rows` chooses (``n x r``
    for ``m >= n``, else ``m x r``, the right factor of ``M^T``). Returns, per step, the unscaled
    direction ``P Q^T`` (in ``M``'s orientation), the momentum after the error feedback, and
    ``Q``. Orthonormalization by Householder QR with the signs fixed so ``diag(R) >= 0`` (the
    span, and so the direction, does not depend on the method).
    """
    m, n = grads[0].shape
    transpose = not p_on_rows((m, n))
    M = torch.zeros_like(grads[0].T if transpose else grads[0])
    Q = Q0.clone()
    directions, momenta, factors = [], [], []
    for G in grads:
        M = M + (G.T if transpose else G)
        P, T = torch.linalg.qr(M @ Q)
        P = P * torch.where(T.diagonal() < 0, -1.0, 1.0).to(P.dtype)
        R = M.T @ P
        if error_feedback:
            M = M - (1 - mu) * P @ R.T
        Q = R / (torch.linalg.norm(R, dim=0, keepdim=True) + eps)
        D = P @ Q.T
        directions.append(D.T if transpose else D)
        momenta.append(M.T.clone() if transpose else M.clone())
        factors.append(Q.clone())
    return directions, momenta, factors
