"""ARO (adaptively rotated optimization) as pure functions.

Per matrix, with momentum ``M`` (``m x n`` in the *wide* orientation, ``m <= n``: tall
parameters are handled through their transpose, so the rotation acts on the smaller side) and the
previous rotation ``R_{t-1}`` (``m x m``, orthogonal):

.. math::

    M_t = \\beta M_{t-1} + (1 - \\beta) G_t, \\qquad
    R_t = \\mathrm{Q}\\big(\\mathrm{QR}\\big(M_t\\, f(R_{t-1}^\\top M_t)^\\top\\big)\\big), \\qquad
    \\Delta W_t = -\\eta\\, s\\, R_t\\, f(R_t^\\top M_t),

where ``f`` is the SinkGD normalisation (Scetbon et al., 2025, "Gradient Multi-Normalization
for Stateless and Scalable LLM Training"): alternately rescale every row and then every column
to unit RMS, a few times. Steepest descent under ``f``'s norm is taken in the coordinates
``R^T M`` and rotated back; the rotation is refreshed each step from the momentum (one QR of an
``m x m`` matrix). ``f`` ends with a column pass, so ``||f(Y)||_F = sqrt(mn)`` (up to the
:data:`SINKHORN_EPS` floor) and, ``R`` being orthogonal, the update has RMS 1; ``s = 0.2`` then
matches AdamW's typical update RMS (as ``match_rms_adamw`` does for Muon), so AdamW's learning
rate and weight decay carry over.

Reference: "ARO: adaptively rotated optimization" (claims ~1.3x sample efficiency over AdamW and
~1.1x over Muon in LLM pretraining); ``shared/ALGORITHMS.md`` ("ARO").

Distribution: the rotation is state of each matrix, so the kernel works on a *packed* wide
stack ``[M | R_{t-1}]`` (``m x (n + m)``) and returns ``[R_t f(R_t^T M) | R_t]``. Under
:func:`orthotorch.distributed.map_matrices` the owner of a matrix computes both, and the
all-gather hands every rank the new rotation with the direction, so the replicated state stays
identical on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "RMS_SCALE",
    "SINKHORN_EPS",
    "aro_kernel",
    "aro_reference",
    "pack",
    "rotation_update",
    "sinkhorn_normalize",
    "unpack",
]

RMS_SCALE = 0.2  # update RMS of AdamW in steady state (Liu et al., 2025)
# Floor of a row's (column's) RMS, relative to the RMS of the whole matrix. Why: a momentum of
# rank r < m (a gradient from a small batch) gives R^T M rows that are pure rounding noise
# (~1e-7 relative), and normalising them blows them up to unit RMS: a full-size update along
# directions chosen by rounding (measured: 1e-7 gradient differences became 2e-2 weight
# differences in 3 steps). With the floor such rows stay ~1e-3 of the rest.
SINKHORN_EPS = 1e-4


def _rms(Y: Tensor, dim: int) -> Tensor:
    return Y.square().mean(dim=dim, keepdim=True).sqrt()


def sinkhorn_normalize(Y: Tensor, iters: int = 5, eps: float = SINKHORN_EPS) -> Tensor:
    """``f(Y)``: ``iters`` rounds of (rows to unit RMS, then columns to unit RMS); batched.

    Computed in Sinkhorn's scaling-vector form ``f(Y) = diag(r) Y_0 diag(c)`` on
    ``Y_0 = Y / rms(Y)``: each round recomputes ``r = 1 / (rms_rows(Y_0 diag(c)) + eps)``, then
    ``c = 1 / (rms_cols(diag(r) Y_0) + eps)``. With ``eps = 0`` this is exactly the alternating
    normalisation; with ``eps > 0`` the scale of a noise row is bounded by ``1 / eps`` *in
    total*, whereas dividing by ``rms + eps`` pass after pass would still compound it to one
    (see :data:`SINKHORN_EPS`). The result's columns have RMS ``1 - O(eps)``; an all-zero matrix
    stays zero. Sign-equivariant per row and column (``f(S Y T) = S f(Y) T`` for diagonal signs),
    which is why the sign convention of the QR factor does not change the update.
    """
    tiny = torch.finfo(Y.dtype).tiny
    Y0 = Y / (Y.square().mean(dim=(-2, -1), keepdim=True).sqrt() + tiny)
    c = torch.ones_like(Y0[..., :1, :])
    r = torch.ones_like(Y0[..., :, :1])
    for _ in range(iters):
        r = 1 / (_rms(Y0 * c, -1) + eps)
        c = 1 / (_rms(r * Y0, -2) + eps)
    return r * Y0 * c


def rotation_update(M: Tensor, R: Tensor, iters: int = 5) -> Tensor:
    """``R_t = Q(QR(M f(R_{t-1}^T M)^T))`` with the sign of ``Q``'s columns fixed.

    ``Q``'s columns are flipped so that ``diag`` of the triangular factor is non-negative: the
    update does not depend on the signs (see :func:`sinkhorn_normalize`), but a deterministic
    choice keeps the stored state reproducible across devices and ranks.
    """
    A = M @ sinkhorn_normalize(R.mT @ M, iters).mT
    Q, T = torch.linalg.qr(A)
    signs = torch.where(T.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * signs.unsqueeze(-2)


def pack(M: Tensor, R: Tensor) -> Tensor:
    """``[M_wide | R]``: a parameter-orientation momentum and its rotation as one wide matrix."""
    rows, cols = M.shape[0], M[0].numel()
    M = M.reshape(rows, cols)
    wide = M.mT if rows > cols else M
    return torch.cat([wide.to(R.dtype), R], dim=-1)


def unpack(Y: Tensor) -> tuple[Tensor, Tensor]:
    """Split a kernel output ``[D_wide | R]`` (last two dims ``m x (n + m)``)."""
    m = Y.shape[-2]
    n = Y.shape[-1] - m
    return Y[..., :n], Y[..., n:]


def aro_kernel(X: Tensor, transposed: bool = False, *, iters: int = 5) -> Tensor:
    """The map_matrices kernel: ``[M | R_{t-1}] -> [R_t f(R_t^T M) | R_t]`` on a wide stack.

    ``transposed`` is ignored: the packed matrices are wide by construction.
    """
    del transposed
    M, R = unpack(X)
    R = rotation_update(M, R, iters)
    D = R @ sinkhorn_normalize(R.mT @ M, iters)
    return torch.cat([D, R], dim=-1)


def aro_reference(M: Tensor, R: Tensor, iters: int = 5) -> tuple[Tensor, Tensor]:
    """Readable float64 reference for one wide matrix: ``(direction, new rotation)``.

    Written without batching or the packed layout, with ``f`` as explicit row/column loops of
    the definition, for tests to compare the kernel against.
    """
    M, R = M.to(torch.float64), R.to(torch.float64)

    def f(Y: Tensor) -> Tensor:
        m, n = Y.shape
        Y0 = Y / (Y.norm() / (m * n) ** 0.5)
        r, c = torch.ones(m, dtype=Y.dtype), torch.ones(n, dtype=Y.dtype)
        for _ in range(iters):
            for i in range(m):
                r[i] = 1 / ((Y0[i] * c).norm() / n**0.5 + SINKHORN_EPS)
            for j in range(n):
                c[j] = 1 / ((r * Y0[:, j]).norm() / m**0.5 + SINKHORN_EPS)
        return r[:, None] * Y0 * c[None, :]

    Q, T = torch.linalg.qr(M @ f(R.T @ M).T)
    Q = Q * torch.where(torch.diagonal(T) < 0, -1.0, 1.0).to(Q.dtype)
    return Q @ f(Q.T @ M), Q
