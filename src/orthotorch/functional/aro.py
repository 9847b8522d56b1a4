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

Cost per matrix: four ``m x m`` by ``m x n`` products, one ``m x m`` Householder QR (float32:
QR has no bf16 kernel and the rotation is carried from step to step), and ``f`` twice, each
``f`` a few elementwise passes plus ``2 iters`` matrix-vector products. ``refresh=False`` in
:func:`aro_kernel` keeps ``R_t = R_{t-1}`` (no QR, two products): the optimizer's opt-in
``rotation_every`` approximation.

``dtype=torch.bfloat16`` in :func:`aro_kernel` (the optimizer's ``matmul_dtype``) runs the four
products on bf16 operands (each output rounded to bf16, accumulated in float32 by the GEMM), as
Muon runs Newton–Schulz: on a CPU with AVX512-bf16 a 256 x 256 by 256 x 1024 product took 1/6 of
float32's time (1 thread). The QR, the Sinkhorn scalings (their reductions and matrix-vector
products), the final column scaling and the stored rotation stay float32. The price is
precision: ``R^T M`` is known to ~``2^-8`` relative, far above :data:`SINKHORN_EPS`, so for a
momentum of rank ``< k`` the rows that are rounding noise get normalised to (near) unit RMS
instead of staying at ``~1e-3``: a full-rank momentum (the usual case after a few steps of large
batches) is unaffected, but use float32 when the momentum can be rank-deficient (measured, 64 x
192 of rank 32, 4 steps: 48% of ``||D||^2`` outside the momentum's column space in bf16, 0.02%
in float32). Square matrices are the other weak case: there the QR input ``M f(R^T M)^T`` is
ill-conditioned (its smallest singular directions decide ``R``'s last columns), and the
direction moved ~9% from float32's per step on 512 x 512 random momenta, against ~0.4% for 512 x
2048 (``benchmarks/spectra_aro.py``). And the speed-up needs large matrices: per-op overhead and
the conversions eat it on small ones (measured, 8 matrices, 1 thread: 64 x 192 the same time as
float32, 64 x 64 15% slower; 4 x 256 x 1024 29% faster).

Reference: Gong et al., "ARO: A New Lens On Matrix Optimization For Large Models" (2026,
arXiv:2602.09006; claims ~1.3x sample efficiency over AdamW and ~1.1x over Muon in LLM
pretraining); ``shared/ALGORITHMS.md`` ("ARO").

Distribution and state layout: the rotation is state of each matrix, and under FSDP2 every
piece of state must shard with the parameter's rows. So the rotation is *stored in row layout*:
its ``k^2`` entries (``k = min(rows, cols)``), row-major and zero-padded, as a
``(rows, ceil(k^2 / rows))`` matrix (:func:`rotation_layout`); for a wide or square parameter
that is exactly ``R``. The kernel works on the packed parameter-orientation matrix
``P = [M | R_rows]`` (:func:`pack`) and returns ``[D | R_t rows]``, so
:func:`orthotorch.distributed.map_matrices` can move it like any update: under DDP the owner
computes both halves and the all-gather hands every rank the new rotation (replicated state stays
identical), under FSDP2 the owner assembles the full ``P`` from the row shards and sends back
each rank its rows of the direction *and* of the new rotation. A stored rotation of all zeros
stands for ``R_0 = I``: zeros are how sharded state is created without communication, and an
orthogonal matrix is never zero.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from ..linalg.dispatch import Plan, run_stack

__all__ = [
    "MATMUL_DTYPES",
    "RMS_SCALE",
    "SINKHORN_EPS",
    "aro_kernel",
    "aro_reference",
    "pack",
    "packed_cols",
    "param_cols",
    "rotation_from_rows",
    "rotation_layout",
    "rotation_to_rows",
    "rotation_update",
    "sinkhorn_normalize",
    "sinkhorn_scalings",
]

RMS_SCALE = 0.2  # update RMS of AdamW in steady state (Liu et al., 2025)
# Floor of a row's (column's) RMS, relative to the RMS of the whole matrix. Why: a momentum of
# rank r < m (a gradient from a small batch) gives R^T M rows that are pure rounding noise
# (~1e-7 relative), and normalising them blows them up to unit RMS: a full-size update along
# directions chosen by rounding (measured: 1e-7 gradient differences became 2e-2 weight
# differences in 3 steps). With the floor such rows stay ~1e-3 of the rest.
SINKHORN_EPS = 1e-4


def sinkhorn_scalings(
    Y: Tensor, iters: int = 5, eps: float = SINKHORN_EPS
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Y_a, r, c)`` with ``f(Y) = diag(r) Y_a diag(c)`` and ``Y_a = Y / max|Y|``.

    ``r`` is ``(..., m, 1)``, ``c`` is ``(..., 1, n)``; see :func:`sinkhorn_normalize` for
    ``f``. Callers that multiply ``f(Y)`` into a matrix product apply the two diagonals to the
    product's other operand or to its output instead of materialising ``f(Y)``. Every factor is
    bounded (``|Y_a| <= 1``, ``r <= 1 / eps``, ``c <= sqrt(mn) / eps``), whatever the scale of
    ``Y``: folding ``1 / rms(Y)`` into a scaling instead overflows for tiny ``Y`` and gives
    ``inf * 0 = NaN`` for a zero ``Y``.
    """
    m, n = Y.shape[-2], Y.shape[-1]
    tiny = torch.finfo(Y.dtype).tiny
    # Divide by max |Y| before anything is squared, so that no finite Y overflows (the squares
    # of entries above ~1e19 are inf in float32). Then mean(Ya^2) >= 1 / (mn), and the
    # remaining 1 / rms(Ya) <= sqrt(mn) is folded into the (bounded) scalings.
    # (aminmax, or amax and amin: plain reductions are ~8x faster than the inf-norm kernel.)
    if Y.ndim == 2:
        lo, hi = torch.aminmax(Y)  # one read (per-dim aminmax takes only a single dim)
        peak = torch.maximum(hi, lo.neg())
    else:
        peak = torch.maximum(
            Y.amax(dim=(-2, -1), keepdim=True), Y.amin(dim=(-2, -1)).neg_()[..., None, None]
        )
    Ya = Y / (peak + tiny)
    S = Ya.square()
    # Round 1 starts from c = 1, so its row sums of S also give mean(Ya^2) (no extra pass);
    # an all-zero Y has Ya = 0 whatever the clamp.
    rowsums = S.sum(dim=-1, keepdim=True)
    ms = (rowsums.sum(dim=-2, keepdim=True) / (m * n)).clamp_min_(tiny)
    r = torch.ones_like(Y[..., :, :1])
    c = torch.ones_like(Y[..., :1, :])
    for i in range(iters):
        row_ms = rowsums if i == 0 else S @ c.square().mT
        r = (row_ms / (n * ms)).sqrt_().add_(eps).reciprocal_()
        c = ((r.square().mT @ S) / (m * ms)).sqrt_().add_(eps).reciprocal_()
    return Ya, r, c / ms.sqrt()


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

    The row (column) mean squares of ``Y_0 diag(c)`` (``diag(r) Y_0``) are matrix-vector
    products of ``Y_0^2`` with ``c^2`` (``r^2``), so after squaring once each round reads one
    matrix twice and writes only vectors (:func:`sinkhorn_scalings`): the cost is a few
    elementwise passes over ``m x n``, not ``4 iters`` of them.
    """
    Ya, r, c = sinkhorn_scalings(Y, iters, eps)
    return (Ya * r).mul_(c)


def _householder_q(A: Tensor) -> Tensor:
    """``Q`` of ``A = QT`` with ``diag(T) >= 0``, from LAPACK's Householder QR.

    ``geqrf`` leaves ``T``'s diagonal in place, so this skips the triangular copy that
    ``torch.linalg.qr`` builds. ``Q``'s columns are flipped so that ``diag(T)`` is non-negative:
    the update does not depend on the signs (see :func:`sinkhorn_normalize`), but a
    deterministic choice keeps the stored state reproducible across devices and ranks.
    """
    H, tau = torch.geqrf(A)
    Q = torch.linalg.householder_product(H, tau)
    signs = torch.where(H.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * signs.unsqueeze(-2)


# Largest |Q^T Q - I| entry accepted from the shifted CholeskyQR before falling back to
# Householder.
CHOLESKY_QR_TOLERANCE = 1e-5


def _shifted_cholesky_qr(A: Tensor) -> tuple[Tensor, Tensor]:
    """``(Q, ok)``: shifted CholeskyQR3 in float64 (Fukaya et al., 2020); ``ok`` says per matrix
    that every factorisation succeeded and ``Q`` is orthonormal to
    :data:`CHOLESKY_QR_TOLERANCE`.

    Each pass factors the Gram matrix ``QᵀQ = L Lᵀ`` and sets ``Q <- Q L^{-T}``. The first pass
    adds ``s I`` with ``s = 11 (mk + k(k+1)) u ||A||_F^2`` to the Gram matrix, so that its
    Cholesky factorisation succeeds for condition numbers up to ~``1/u`` rather than
    ``1/sqrt(u)``. ARO's ``M f(RᵀM)ᵀ`` is roughly a square of the momentum, whose condition
    number exceeds ``1/sqrt(u) = 1e8`` often enough that plain CholeskyQR2 fell back on most
    steps on an H200. Two plain passes then restore orthogonality.

    ``T = L_3ᵀ L_2ᵀ L_1ᵀ`` has a positive diagonal: the sign convention of
    :func:`_householder_q`, so for a full-rank ``A`` both give the same ``Q`` up to rounding. A
    numerically rank-deficient ``A`` leaves ``Q`` short of orthonormal: ``ok`` is false.
    """
    Q = A.double()
    m, k = Q.shape[-2], Q.shape[-1]
    unit = torch.finfo(torch.float64).eps / 2
    shift = 11 * (m * k + k * (k + 1)) * unit * Q.square().sum(dim=(-2, -1), keepdim=True)
    eye = torch.eye(k, dtype=Q.dtype, device=Q.device)
    ok = torch.ones(A.shape[:-2], dtype=torch.bool, device=A.device)
    for shifted in (True, False, False):
        gram = Q.mT @ Q
        if shifted:
            gram = gram + shift * eye
        L, info = torch.linalg.cholesky_ex(gram)
        ok &= info == 0
        Q = torch.linalg.solve_triangular(L.mT, Q, upper=True, left=False)
    error = (Q.mT @ Q - eye).abs().amax(dim=(-2, -1))
    ok &= error <= CHOLESKY_QR_TOLERANCE  # also false for NaN
    return Q.to(A.dtype), ok


def _qr_q(A: Tensor, route: str | None = None) -> Tensor:
    """``Q`` of ``A = QT`` with ``diag(T) >= 0`` for a stack of square matrices.

    ``route``: ``"householder"`` (LAPACK/cuSOLVER ``geqrf``) or ``"cholesky"``
    (:func:`_shifted_cholesky_qr`, shifted CholeskyQR3, falling back to Householder for the whole
    stack when any matrix fails it, which costs one host sync); ``None`` picks Householder on the
    CPU and Cholesky elsewhere. Measured for 24 ``512 x 512`` float32 matrices
    (``benchmarks/qr_routes.py``): on an H200 Householder took 44 ms (cuSOLVER's ``geqrf`` runs
    a panel kernel per column block, ~85% of ARO's step there) and CholeskyQR2 in float64
    3.4 ms; on the CPU CholeskyQR2 was 8.9x slower than Householder.
    """
    if route is None:
        route = "householder" if A.device.type == "cpu" else "cholesky"
    if route == "cholesky":
        Q, ok = _shifted_cholesky_qr(A)
        if bool(ok.all()):
            return Q
    elif route != "householder":
        raise ValueError(f"route must be 'householder' or 'cholesky', got {route!r}")
    return _householder_q(A)


MATMUL_DTYPES = (torch.float32, torch.bfloat16)  # valid dtype= of aro_kernel besides None


def _mm(A: Tensor, B: Tensor, dtype: torch.dtype | None, out: torch.dtype) -> Tensor:
    """``A @ B`` on ``dtype`` operands (``None``: as they are), returned in dtype ``out``."""
    if dtype is None:
        return (A @ B).to(out)
    return (A.to(dtype) @ B.to(dtype)).to(out)


def rotation_update(
    M: Tensor, R: Tensor, iters: int = 5, dtype: torch.dtype | None = None
) -> Tensor:
    """``R_t = Q(QR(M f(R_{t-1}^T M)^T))`` with ``diag`` of the triangular factor ``>= 0``.

    ``dtype``: operand dtype of the two matrix products (see :func:`aro_kernel`); the QR and
    ``f``'s scalings are computed in ``R``'s dtype.
    """
    Ya, r, c = sinkhorn_scalings(_mm(R.mT, M, dtype, R.dtype), iters)
    # M f(Y)^T = M diag(c) Y_a^T diag(r): scale M's columns, the m x m product's columns after.
    return _qr_q(_mm(M * c.to(M.dtype), Ya.mT, dtype, R.dtype).mul_(r.mT))


def rotation_layout(shape: tuple[int, int]) -> tuple[int, int]:
    """Shape ``(rows, ceil(k^2 / rows))`` of the stored rotation of a ``rows x cols`` matrix."""
    rows, cols = shape
    k = min(rows, cols)
    return rows, -(-(k * k) // rows)


def packed_cols(shape: tuple[int, int]) -> int:
    """Columns of :func:`pack`'s ``[M | R_rows]`` for a ``rows x cols`` parameter matrix."""
    return shape[1] + rotation_layout(shape)[1]


def param_cols(rows: int, width: int) -> int:
    """Invert :func:`packed_cols`: the parameter's columns from the packed ``rows x width``.

    Unique: a wide parameter packs to more than ``2 rows`` columns, and for ``cols <= rows``
    the packed width ``cols + ceil(cols^2 / rows)`` is strictly increasing in ``cols``.
    """
    if width > 2 * rows:
        return width - rows
    lo, hi = 1, rows
    while lo < hi:
        mid = (lo + hi) // 2
        if packed_cols((rows, mid)) < width:
            lo = mid + 1
        else:
            hi = mid
    if packed_cols((rows, lo)) != width:
        raise ValueError(f"{rows} x {width} is not a packed ARO matrix (see pack)")
    return lo


def rotation_to_rows(R: Tensor, rows: int) -> Tensor:
    """A batch of ``k x k`` rotations in row layout ``(..., rows, ceil(k^2 / rows))``."""
    k = R.shape[-1]
    c = -(-(k * k) // rows)
    flat = R.reshape(*R.shape[:-2], k * k)
    if rows * c == k * k:
        return flat.view(*R.shape[:-2], rows, c)
    return torch.nn.functional.pad(flat, (0, rows * c - k * k)).view(*R.shape[:-2], rows, c)


def rotation_from_rows(S: Tensor, k: int) -> Tensor:
    """Inverse of :func:`rotation_to_rows`; an all-zero stored rotation becomes ``I``.

    Returns a new tensor (``S`` is never modified). "Unset" is read from the first row alone:
    a row of an orthogonal matrix has norm 1, so only the zero state has a zero first row.
    """
    # The k*k leading entries, copied (contiguous): no data-pointer test to find out whether
    # reshape already copied, which torch.compile cannot trace.
    R = S.reshape(*S.shape[:-2], -1)[..., : k * k].clone().view(*S.shape[:-2], k, k)
    unset = (R[..., 0, :] == 0).all(dim=-1, keepdim=True).to(R.dtype)
    R.diagonal(dim1=-2, dim2=-1).add_(unset)
    return R


def pack(M: Tensor, R_rows: Tensor) -> Tensor:
    """``[M | R_rows]``: a momentum (flattened to ``(shape[0], -1)``) beside its stored rotation.

    Both in parameter orientation, so the pair shards by rows together: for ``DTensor`` inputs
    sharded on dim 0 the concatenation is local to each rank.
    """
    M = M.reshape(M.shape[0], -1)
    return torch.cat([M.to(R_rows.dtype), R_rows], dim=-1)


_CPU_LOOP_FROM = 1 << 16  # packed entries per matrix from which the CPU kernel loops


def aro_kernel(
    X: Tensor,
    transposed: bool = False,
    *,
    iters: int = 5,
    refresh: bool = True,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The map_matrices kernel: ``[M | R_{t-1}] -> [R_t f(R_t^T M) | R_t]``, batched.

    ``X`` is a stack of packed matrices (:func:`pack`) in map_matrices' wide orientation
    (``transposed``: stored as ``P^T``); the result has the same layout. ``refresh=False``
    keeps ``R_t = R_{t-1}`` (no QR, half the matrix products): the optimizer's
    ``rotation_every > 1`` approximation. ``dtype``: operand dtype of the matrix products,
    ``None`` (``X``'s dtype) or one of :data:`MATMUL_DTYPES` (bf16: see the module docstring;
    float16 is excluded because the Sinkhorn scalings reach ``sqrt(mn) / eps``, beyond its
    range). Everything else, the output included, is computed in ``X``'s dtype.
    """
    if dtype is not None and dtype not in MATMUL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in MATMUL_DTYPES)
        raise ValueError(f"dtype must be None or one of {names}, got {dtype!r}")
    if dtype == X.dtype:
        dtype = None
    P = X.mT if transposed else X
    cols = param_cols(P.shape[-2], P.shape[-1])
    run = partial(_aro_stack, cols=cols, iters=iters, refresh=refresh, dtype=dtype)
    if P.ndim == 2:
        out = run(P)
    else:
        # Batched, looped or chunked is measured per bucket (linalg.dispatch), as for
        # Newton–Schulz. Unmeasured buckets (small ones, or measuring off) keep the rule that
        # one measurement gave: on the CPU a loop for large matrices (2-D GEMMs beat bmm, and
        # one matrix's temporaries stay in cache), a batch for small ones, where per-op overhead
        # dominates (8 packed matrices, 1 thread: 128x256 loop 13.5 vs batch 8.0 ms, 256x512
        # 33.7 vs 45.7).
        small = P.device.type == "cpu" and P.shape[-2] * P.shape[-1] < _CPU_LOOP_FROM
        default = Plan("batched", P.shape[0]) if small else None  # None: the device's default
        products = "input" if dtype is None else str(dtype).removeprefix("torch.")
        kernel = f"aro{iters}{'' if refresh else '-kept'}-{products}"
        out = run_stack(kernel, P, run, default=default)
    return out.mT if transposed else out


def _aro_stack(
    P: Tensor, cols: int, iters: int, refresh: bool, dtype: torch.dtype | None
) -> Tensor:
    """:func:`_aro_packed` into a new tensor: the batch-agnostic kernel the dispatch runs."""
    out = torch.empty(P.shape, dtype=P.dtype, device=P.device)
    _aro_packed(P, out, cols, iters, refresh, dtype)
    return out


def _aro_packed(
    P: Tensor, out: Tensor, cols: int, iters: int, refresh: bool, dtype: torch.dtype | None
) -> None:
    """Write ``[R_t f(R_t^T M) | R_t rows]`` of the packed ``P`` (parameter orientation) to
    ``out``."""
    rows = P.shape[-2]
    k = min(rows, cols)
    tall = rows > cols
    M = P[..., :cols]
    M = M.mT if tall else M  # the rotation acts on the smaller side
    R = rotation_from_rows(P[..., cols:], k)
    if dtype is not None:
        M = M.to(dtype)  # one conversion for the three products that read M
    if refresh:
        R = rotation_update(M, R, iters, dtype)
    Ya, r, c = sinkhorn_scalings(_mm(R.mT, M, dtype, R.dtype), iters)
    # R f(Y) = (R diag(r)) Y_a diag(c); the last scaling writes straight into the packed output
    # (in R's dtype: type promotion makes the bf16 product's scaling a float32 multiply).
    D = out[..., :cols]
    D = D.mT if tall else D
    if torch.compiler.is_compiling():
        # Dynamo refuses a non-contiguous out=; the traced graph fuses the copy anyway.
        D.copy_(_mm(R * r.mT, Ya, dtype, dtype or Ya.dtype) * c)
    else:
        torch.mul(_mm(R * r.mT, Ya, dtype, dtype or Ya.dtype), c, out=D)
    out[..., cols:] = rotation_to_rows(R, rows)


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
