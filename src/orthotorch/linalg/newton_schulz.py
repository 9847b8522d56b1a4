"""Newton–Schulz iterations for the polar factor, with their coefficient schedules as data.

Every method here iterates on a *wide* matrix ``X`` (rows <= cols; callers transpose tall
input) after normalising it so that its spectral norm is at most one:

.. math::

    X_0 = G / (s \\, \\lVert G \\rVert_F + \\varepsilon), \\qquad
    A_k = X_k X_k^\\top, \\quad
    X_{k+1} = a_k X_k + (b_k A_k + c_k A_k^2) X_k .

Each step applies the odd quintic ``p_k(x) = a_k x + b_k x^3 + c_k x^5`` to every singular
value of ``X`` while leaving the singular vectors alone, so the whole iteration is the scalar
map ``x -> p_K(...p_1(x))`` on the spectrum. The schedules differ only in ``(a_k, b_k, c_k)``:

- ``muon``: one fixed quintic (Jordan et al., 2024), chosen for a steep slope at zero; it does
  not converge, output singular values land roughly in ``[0.7, 1.2]``.
- ``polar_express``: per-step minimax-optimal quintics (Amsel et al., 2025, "The Polar Express"),
  with a 1.02 safety factor in the normalisation.
- ``jiacheng``: per-step coefficients tuned by Jiacheng You.
- ``aol``: AOL-preconditioned start (Boissin et al., 2025, "Turbo-Muon"), four steps of
  quintics fitted for that start (:func:`aol_newton_schulz`).

A schedule is a function ``(rows, cols, steps) -> list[(a, b, c)]`` so that shape-dependent
tables (ROOT) fit in the same registry. On wide stacks every schedule can also run on the Gram
matrix (:func:`iterate_gram_quintic`, fewer products, restarts for bf16); the measured dispatch
decides per bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from .dispatch import run_stack

Coefficients = tuple[float, float, float]
Schedule = Callable[[int, int, int], Sequence[Coefficients]]

MUON_COEFFICIENTS: Coefficients = (3.4445, -4.7750, 2.0315)

POLAR_EXPRESS_COEFFICIENTS: tuple[Coefficients, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

JIACHENG_COEFFICIENTS: tuple[Coefficients, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# Per-step minimax quintics for the AOL start (singular values in [5e-3, 1], 4 steps), fitted by
#     python benchmarks/ns_fit.py --lower 5e-3 --steps 4 --cushion 41.5
# Exact-arithmetic band on [5e-3, 1]: [0.9077, 1.0923]. Lower ends 3e-3 / 7e-3 / 1e-2 and cushion
# 10 were measured too (benchmarks/ns_fit.py docstring): 5e-3 with cushion 41.5 was the best
# compromise between Gaussian, low-rank and log-spaced spectra.
AOL_COEFFICIENTS: tuple[Coefficients, ...] = (
    (7.489474055896614, -20.90350501207529, 15.024176573694486),
    (4.1195607845092646, -3.4787073655320673, 0.7564646745633972),
    (3.217342434728549, -2.432524575197873, 0.5107111827963519),
    (2.2211295255521897, -1.6030361629149503, 0.4153589934965343),
)


def table_schedule(table: Sequence[Coefficients]) -> Schedule:
    """A shape-independent schedule from a per-step table.

    Asking for more steps than the table has repeats its last (most conservative) entry, the
    convention of the Polar Express reference code; fewer steps take the table's prefix.
    """
    table = tuple(tuple(map(float, c)) for c in table)

    def schedule(rows: int, cols: int, steps: int) -> list[Coefficients]:
        del rows, cols
        return [table[min(k, len(table) - 1)] for k in range(steps)]

    return schedule


def newton_schulz(
    X: Tensor,
    coefficients: Sequence[Coefficients],
    *,
    norm_scale: float = 1.0,
    eps: float = 1e-7,
) -> Tensor:
    """Run the quintic Newton–Schulz iteration on a batch of wide matrices.

    Args:
        X: ``(batch, m, n)`` or ``(m, n)`` with ``m <= n``, already in the compute dtype.
        coefficients: one ``(a, b, c)`` per step.
        norm_scale: ``s`` in ``X_0 = X / (s ||X||_F + eps)``; values above one keep the spectral
            norm safely below one despite rounding (Polar Express uses 1.02).
        eps: keeps a zero matrix at zero instead of NaN.

    Returns:
        A new contiguous tensor of the same shape and dtype; ``X`` is not modified.
    """
    if X.shape[-2] > X.shape[-1]:
        raise ValueError(
            f"newton_schulz expects wide matrices (rows <= cols), got {tuple(X.shape)}"
        )
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X = (X / (norm * norm_scale + eps)).contiguous()
    table = tuple((float(a), float(b), float(c)) for a, b, c in coefficients)
    if X.ndim == 2:
        return iterate_quintic(X, table)
    # Batched bmm, a loop of 2-D GEMMs, chunks, float32 compute, the Gram route: which is fastest
    # depends on the machine and the shape (dispatch.py); every plan computes the same iteration,
    # so results differ by rounding only.
    return run_stack(
        f"ns{len(table)}",
        X,
        partial(iterate_quintic, coefficients=table),
        compiled=lambda: partial(_compiled_quintic(), coefficients=table),
        variants=_gram_variant(X, table),
    )


def iterate_quintic(X: Tensor, coefficients: Sequence[Coefficients]) -> Tensor:
    """``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` per step, on ``(m, n)`` or ``(k, m, n)``.

    The spec of every Newton–Schulz plan (:mod:`~orthotorch.linalg.dispatch`); ``X`` is already
    normalised. ``a X + B X`` is fused in one ``addmm``: a separate mm + add_ is ~5% faster on
    CPU but rounds ``B X`` to bf16 before the sum, which measurably hurts (2.6% vs 1.7% error
    against the float64 iteration on a 16x64 input). ``X X^T`` and ``A A`` are symmetric, but
    computing only half of them (three of four 2x2 blocks, then mirroring) measured slower on
    CPU (bf16, 1 thread: 75 vs 56 ms for 16x512x512, 108 vs 57 ms for 4x512x2048; torch exposes
    no symmetric rank-k product), so the plain products stay.
    """
    batched = X.ndim == 3
    addmm = torch.baddbmm if batched else torch.addmm
    for a, b, c in coefficients:
        A = X @ X.mT
        B = addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = addmm(X, B, X, beta=a)  # a X + B X
    return X


def gram_restarts(steps: int) -> tuple[int, ...]:
    """The steps before which :func:`iterate_gram_quintic` rebuilds ``X`` and its Gram matrix:
    every other step from the second, ``(1, 3)`` for five, so that the first step runs alone
    and no stretch on the Gram matrix is longer than two steps (the pattern measured below;
    longer stretches were not, and other step counts keep it rather than extrapolate).

    Measured in bf16 with the Polar Express table (``python benchmarks/gram_restarts.py``:
    log-spaced spectra at condition numbers 1e3 and 1e6, low-rank-plus-noise and Gaussian
    inputs from 64x256 to 512x2048, two seeds each), worst largest output singular value
    against the direct iteration's 1.142:

    - no restart: 6e7 (the Gram iteration diverges); before step 1 alone: 4883;
    - one restart before step 3: 6.6 (at 64x256, condition 1e6; 1.15 from 256x1024 up);
    - one before step 2: 2.3; before steps 2 and 4: 1.20;
    - before steps 1 and 3: 1.154.
    """
    return tuple(range(1, steps, 2))


def gram_products(rows: int, cols: int, steps: int, restarts: Sequence[int]) -> int:
    """Multiply-adds of :func:`iterate_gram_quintic` on one ``rows x cols`` matrix."""
    m, n = rows, cols
    restarts = set(restarts)
    wide = 2 + 2 * len(restarts)  # R0 and the final Q X; X <- Q X and R <- X X^T per restart
    square = 0
    for k in range(steps):
        fresh = k == 0 or k in restarts  # Q is still the identity: Q <- P costs nothing
        square += 1 + (0 if fresh else 1)  # Z, Q P
        if k < steps - 1 and k + 1 not in restarts:
            square += 2  # R <- P R P
    return wide * m * m * n + square * m**3


def _gram_variant(
    X: Tensor,
    table: Sequence[Coefficients],
    restarts: Sequence[int] | None = None,
    kernel: Callable[..., Tensor] | None = None,
) -> dict[str, Callable[..., Tensor]]:
    # Offered to the dispatch only where it does fewer multiply-adds than the direct iteration
    # (cols > 1.5 rows for five steps); the measurement decides whether that pays.
    m, n, k = X.shape[-2], X.shape[-1], len(table)
    restarts = gram_restarts(k) if restarts is None else tuple(restarts)
    if gram_products(m, n, k, restarts) >= k * (2 * m * m * n + m**3):
        return {}
    kernel = iterate_gram_quintic if kernel is None else kernel
    return {"gram": partial(kernel, coefficients=table, restarts=restarts)}


def iterate_gram_quintic(
    X: Tensor,
    coefficients: Sequence[Coefficients],
    restarts: Sequence[int] = (),
    gram: Tensor | None = None,
) -> Tensor:
    """The quintic iteration of :func:`iterate_quintic` run on the ``m x m`` Gram matrix.

    Every iterate is a polynomial in ``R_0 = X_0 X_0^T`` times ``X_0``, so with
    ``P_k = a_k I + b_k R_k + c_k R_k^2``:

    .. math::

        Q_{k+1} = Q_k P_k, \\qquad R_{k+1} = P_k R_k P_k, \\qquad X_K = Q_K X_0,

    all ``m x m`` products but the Gram and the final ``Q X`` (Gram Newton–Schulz, Dao AI Lab,
    2026). ``P_k`` multiplies in through the GEMM epilogue (``a Q + Q Z``), so
    ``a I`` is never rounded into ``Z``.

    In bf16, ``R`` drifts from ``Q R_0 Q^T`` as rounding accumulates and grows spurious
    negative eigenvalues that the quintics amplify; at each step in ``restarts`` the iteration
    rebuilds ``X_k = Q_k X_0`` and ``R_k = X_k X_k^T`` (:func:`gram_restarts`). Five steps with
    restarts before steps 1 and 3 cost ``6 m^2 n + 11 m^3`` multiply-adds against
    ``10 m^2 n + 5 m^3`` directly: 0.78x at ``n = 4m``, 0.69x at ``n = 8m``, more than 1x below
    ``n = 1.5m`` (:func:`gram_products`). ``X`` is wide and normalised, ``(m, n)`` or
    ``(k, m, n)``; ``gram`` is ``X X^T`` when the caller already has it (the AOL start).
    """
    addmm = torch.baddbmm if X.ndim == 3 else torch.addmm
    restarts = set(restarts)
    R = X @ X.mT if gram is None else gram
    Q: Tensor | None = None
    last = len(coefficients) - 1
    for k, (a, b, c) in enumerate(coefficients):
        if k in restarts and Q is not None:
            X = Q @ X
            R = X @ X.mT
            Q = None
        Z = addmm(R, R, R, beta=b, alpha=c)  # b R + c R^2
        if Q is None:
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            Q = addmm(Q, Q, Z, beta=a)  # Q P = a Q + Q Z
        if k < last and k + 1 not in restarts:
            RP = addmm(R, R, Z, beta=a)  # R P
            R = addmm(RP, Z, RP, beta=a)  # P R P
    return X if Q is None else Q @ X


_COMPILED: dict[str, Callable[..., Tensor]] = {}


def _compiled_quintic() -> Callable[..., Tensor]:
    # Built on first use only: torch.compile imports the compiler stack (seconds).
    # dynamic=False: one graph per (shape, coefficients), as the buckets are.
    fn = _COMPILED.get("quintic")
    if fn is None:
        fn = _COMPILED["quintic"] = torch.compile(iterate_quintic, dynamic=False)
    return fn


def aol_newton_schulz(
    X: Tensor, coefficients: Sequence[Coefficients], *, eps: float = 1e-7
) -> Tensor:
    """Newton–Schulz from the AOL start (Turbo-Muon), reusing its Gram matrix for step one.

    .. math::

        A = X X^\\top, \\quad D = \\operatorname{diag}\\Big(\\big(\\textstyle\\sum_j |A_{ij}|
        \\big)^{-1/2}\\Big), \\quad X_0 = D X, \\quad A_0 = X_0 X_0^\\top = D A D .

    ``||D X||_2 <= 1`` (Prach & Lampert, 2022, "Almost-orthogonal layers"), and ``D X`` has
    normalised singular values several times larger than ``X / ||X||_F`` (5x at the median on
    512x512 Gaussian matrices, 7x on 512x2048: ``benchmarks/ns_fit.py --check``), so one step
    fewer reaches the same band. ``A_0`` comes from ``A`` by two diagonal scalings, so the start
    costs one Gram product that the first step would have computed anyway. The iteration
    approximates the polar factor of ``D X``, not of ``X``; the two differ where rows of ``X``
    have very different norms (measured: orthogonality error and distance to ``polar(X)``
    below Polar Express's five steps on Gaussian and low-rank-plus-noise inputs, slightly above
    on log-spaced spectra down to 1e-4; always below Muon's fixed quintic).

    ``X`` is first divided by its Frobenius norm so that ``A`` cannot overflow (float16) and
    ``sum_j |A_ij| >= eps`` means a numerically non-zero row; zero rows stay zero.
    """
    if X.shape[-2] > X.shape[-1]:
        raise ValueError(
            f"aol_newton_schulz expects wide matrices (rows <= cols), got {tuple(X.shape)}"
        )
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X = (X / (norm + eps)).contiguous()
    table = tuple((float(a), float(b), float(c)) for a, b, c in coefficients)
    if X.ndim == 2:
        return iterate_aol(X, table, eps)
    return run_stack(
        f"aol{len(table)}",
        X,
        partial(iterate_aol, coefficients=table, eps=eps),
        variants=_gram_variant(X, table, AOL_GRAM_RESTARTS, partial(iterate_aol_gram, eps=eps)),
    )


# Restarts of the AOL Gram route, measured like gram_restarts (benchmarks/gram_restarts.py;
# worst largest output singular value, direct 1.096): before step 1 alone 2.04, before 2 alone
# 1.40, before 3 alone 78, before 1 and 3 1.165, before 1 and 2 1.108. Only the last two steps
# run on the Gram matrix: 6 m^2 n + 7 m^3 multiply-adds against 8 m^2 n + 4 m^3 (0.86x at
# n = 4m).
AOL_GRAM_RESTARTS = (1, 2)


def iterate_aol_gram(
    X: Tensor, coefficients: Sequence[Coefficients], restarts: Sequence[int], eps: float = 1e-7
) -> Tensor:
    """:func:`iterate_aol` on the Gram route (:func:`iterate_gram_quintic`), which starts from
    the AOL Gram ``D A D`` at no extra product."""
    X, A = _aol_start(X, eps)
    return iterate_gram_quintic(X, coefficients, restarts, gram=A)


def _aol_start(X: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(D X, D A D)``: ``A = X X^T``, ``D`` the AOL row scaling (:func:`aol_newton_schulz`)."""
    A = X @ X.mT
    d = A.abs().sum(dim=-1, keepdim=True).clamp_min(eps).rsqrt()
    return X * d, A * d * d.mT


def iterate_aol(X: Tensor, coefficients: Sequence[Coefficients], eps: float = 1e-7) -> Tensor:
    """The AOL iteration on ``(m, n)`` or ``(k, m, n)`` (see :func:`aol_newton_schulz`)."""
    addmm = torch.baddbmm if X.ndim == 3 else torch.addmm
    X, A = _aol_start(X, eps)
    (a, b, c), rest = coefficients[0], coefficients[1:]
    B = addmm(A, A, A, beta=b, alpha=c)
    X = addmm(X, B, X, beta=a)
    return iterate_quintic(X, rest)


def iterate_scalar(x: Tensor, coefficients: Sequence[Coefficients]) -> Tensor:
    """Apply the schedule's scalar map ``p_K(...p_1(x))`` to singular values ``x`` (float64).

    Used to document and test each method's output band without any matrix rounding.
    """
    x = x.to(torch.float64)
    for a, b, c in coefficients:
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return x
