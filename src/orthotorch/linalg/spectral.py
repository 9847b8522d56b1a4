"""Soft spectral clipping without an SVD (the primitive behind :class:`orthotorch.SPECTRA`).

.. math::

    H_c(X) = \\left(I + X X^\\top / c^2\\right)^{-1/2} X
           = X \\left(I + X^\\top X / c^2\\right)^{-1/2},
    \\qquad \\sigma \\mapsto \\frac{\\sigma}{\\sqrt{1 + \\sigma^2 / c^2}} < c .

Small singular values pass unchanged, large ones saturate smoothly at ``c``; the singular vectors
are kept. Three routes compute it (``route=``); all work on the *small* side (``X`` wide,
``m <= n``), batched over same-shape matrices:

``"auto"`` (default) picks ``"eigh"`` on the CPU (float32/float64) and ``"gram"`` elsewhere;
:func:`spectral_clip` picks a Newton–Schulz route instead when it is given an option that only
those routes use (``method``, ``steps``, ``polish_steps``): ``"gram"``, or ``"polar"`` for a
method without a coefficient schedule (``"svd"``). ``"eigh"`` runs no Newton–Schulz iteration,
so it refuses those options rather than ignoring them.

``"gram"``: Newton–Schulz on the Gram matrix.
    With ``Z = [X, c I_m]`` (``m x (n + m)``), ``Z Z^T = B := X X^T + c^2 I``, so
    ``polar(Z) = B^{-1/2} Z`` and ``H_c(X) = c B^{-1/2} X``. Every Newton–Schulz iterate on
    ``Z_0 = Z / nu`` has the form ``Y_k = P_k Z_0`` with ``P_k`` ``m x m``, and
    ``Y_k Y_k^T = P_k S_0 P_k^T`` with ``S_0 = B / nu^2``, so the step
    ``Y <- q_k(Y Y^T) Y`` (``q_k(x) = a + b x + c x^2``, the method's coefficients) is
    ``P <- q_k(P S_0 P^T) P``: the whole iteration runs on ``m x m`` matrices (4 products of
    ``m^3`` per step instead of 2 of ``m^2 (n + m)``), then one ``m x m`` by ``m x n`` product;
    matmul-only, the fast route on accelerators. Two traps: ``P`` is a polynomial in ``B``
    only in exact arithmetic, and rounding breaks its symmetry, so ``P S_0 P^T`` (not
    ``P S_0 P``) must be used — with it the iteration *is* Newton–Schulz on ``Y = P Z_0``,
    rounding and all; with ``P S_0 P`` it diverged at ``s/c = 300`` even in float64. And
    ``S`` is recomputed from ``P`` each step rather than updated as ``q S q``, so rounding
    in ``P`` is seen and corrected by the next step. ``nu^2 = ||B||_F >= lambda_max(B)``: the
    smallest normalised singular value is ``c / nu >= 1 / (m^{1/4} sqrt(1 + s_max^2/c^2))``.
``"eigh"``: ``torch.linalg.eigh`` of the ``m x m`` Gram matrix ``X X^T = Q diag(l) Q^T``, then
    ``Q diag((1 + l/c^2)^{-1/2}) Q^T X``. ``I + X X^T / c^2`` has eigenvalues ``>= 1``: no
    clamping, no breakdown. The faster route on a CPU (batched LAPACK).
``"polar"``: any polar routine of :mod:`orthotorch.linalg.registry` on the ``m x (n + m)``
    matrix ``[X, c I]`` itself, ``H_c(X) = c * polar([X, c I])[:, :n]``: the slow readable
    reference of the ``"gram"`` route (same iterates in exact arithmetic), and the most
    accurate in float32.

Accuracy. The Gram routes square ``X``'s condition: rounding in ``X X^T`` is ``eps * s_max^2``,
so directions with ``s <~ c`` see a relative perturbation of their ``1 + s^2/c^2`` of up to
``eps (1 + s_max^2/c^2)``, i.e. a relative error of up to about half that in their clipped
value, while mixing between large and small directions is damped by the inverse square root.
Measured in float32 against the SVD definition (relative Frobenius error, log-spaced spectra
from ``s/c = 300`` down to ``1/100``): ``"gram"`` ~1e-3, ``"eigh"`` ~4e-3, ``"polar"`` ~1e-5;
at ``s_max / c = 30``: 4e-5, 2e-5, 2e-6. In float64 all are below 1e-8. The saturated
directions are not exact either: both Gram routes form an ``m x m`` multiplier whose
eigenvalues run from ``c / s_max`` (the top direction) to about one, so its rounding, of order
``eps`` absolute, is a relative error of order ``eps * s_max / c`` in the top clipped value.
Measured (8 seeds, float32): at most ``0.7 eps s_max / c`` off the exact value, i.e. ``2e-5``
at ``s/c = 300``, where the exact value is ``c (1 - 5.6e-6)``; so in float32 the spectral norm
of the result may exceed ``c`` by that much (``"polar"``, which never forms the Gram matrix:
``0.03 eps s_max / c``). (AdamW updates with
``c = 10`` have ``s_max / c`` of about 1-10.) On GPUs, TF32 matmuls
(``torch.backends.cuda.matmul.allow_tf32``) round like bf16 does and cost the Gram routes the
same ~1%. Both Gram routes first scale ``X`` by
``r = max(max|X|, c)`` (``H_c(X) = r H_{c/r}(X / r)``) so that ``X X^T`` cannot overflow (the
``"polar"`` route too, for ``||Z||_F``).

Newton–Schulz details (routes ``"gram"`` and ``"polar"``):

- The default runs the method's steps plus 3, which lifts the smallest normalised singular
  value (``>= 7e-5`` for ``m = 2048``, ``s/c = 300`` with ``||Z||_F`` normalisation) into the
  method's band (checked with :func:`~orthotorch.linalg.iterate_scalar`).
- The fast schedules (Muon, Polar Express) are not convergent: their output singular values
  land in a band such as ``[0.8, 1.2]``, i.e. a 10-20% error in the clip. ``polish`` steps of the
  convergent quintic ``(15/8, -10/8, 3/8)`` (cubic convergence to 1 on ``(0, 1.5)``) finish the
  job; two of them bring the band to ``1 +- 1e-6``. Both run in float32 by default: bf16
  rounding alone is ~1%.

No shortcut for small inputs: the soft clip changes every singular value
(``s / sqrt(1 + s^2/c^2) != s``), and deciding per matrix whether a truncated series would do
needs a host sync or computing both; AdamW-like updates have ``||U||_F >> c`` anyway.

Reference: Jiang, Semenov, Stich, "Enhancing LLM Training via Spectral Clipping" (SPECTRA,
arXiv:2603.14315; post-clip ``c = 10``); see ``shared/ALGORITHMS.md`` ("SPECTRA").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .registry import OrthogonalizationMethod, get_method

__all__ = [
    "CLIP_ROUTES",
    "DEFAULT_METHOD",
    "DEFAULT_POLISH_STEPS",
    "ClipRoute",
    "auto_route",
    "check_clip",
    "check_route",
    "polish",
    "resolve_route",
    "spectral_clip",
    "spectral_clip_eigh",
    "spectral_clip_gram",
    "spectral_clip_kernel",
    "spectral_clip_polar",
    "spectral_clip_reference",
    "spectral_clip_unchecked",
]

ClipRoute = Literal["auto", "gram", "eigh", "polar"]
CLIP_ROUTES: tuple[str, ...] = ("auto", "gram", "eigh", "polar")
DEFAULT_METHOD = "polar_express"
DEFAULT_POLISH_STEPS = 2
# Extra steps over the method's default, so that c / ||Z||_F (>= 7e-5 at s/c = 300, m = 2048)
# reaches the method's band before polishing; see the module docstring.
_EXTRA_STEPS = 3
# The classical convergent quintic: p(1) = 1, p'(1) = p''(1) = 0.
_POLISH = (15 / 8, -10 / 8, 3 / 8)


def check_clip(c: object, name: str = "c") -> float:
    """Return ``float(c)``, or raise ``ValueError`` naming ``name`` unless ``0 < c < inf``."""
    ok = isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 0
    if not ok:
        raise ValueError(f"{name} must be a positive finite number (clip threshold), got {c!r}")
    return float(c)


def check_route(route: object) -> str:
    """Return ``route`` or raise ``ValueError`` listing :data:`CLIP_ROUTES`."""
    if not isinstance(route, str) or route not in CLIP_ROUTES:
        valid = ", ".join(map(repr, CLIP_ROUTES))
        raise ValueError(f"route must be one of {valid}, got {route!r}")
    return route


def polish(Y: Tensor, steps: int = DEFAULT_POLISH_STEPS) -> Tensor:
    """``steps`` convergent Newton–Schulz steps on a nearly orthogonal wide ``Y`` (no rescale).

    Singular values in ``(0, 1.5)`` converge cubically to one; unlike
    :func:`~orthotorch.linalg.newton_schulz`, ``Y`` is *not* renormalised first, since it is
    already close to its limit.
    """
    a, b, c = _POLISH
    for _ in range(steps):
        A = Y @ Y.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if A.ndim == 3 else b * A + c * (A @ A)
        Y = a * Y + B @ Y
    return Y


def _overflow_safe(X: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """``(X / r, c / r)`` with ``r = max(max|X|, c)`` per matrix: ``H_c(X) = r H_{c/r}(X/r)``.

    Entries of ``X / r`` are at most one, so ``X X^T`` is at most ``n`` and cannot overflow,
    and ``c / r <= 1``; no host sync (``r`` stays a tensor).
    """
    r = X.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(c)
    return X / r, c / r


def spectral_clip_eigh(X: Tensor, c: float) -> Tensor:
    """Route ``"eigh"`` on a wide ``(batch, m, n)`` stack (compute dtype, no validation).

    ``H_c(X) = Q diag((1 + l / c^2)^{-1/2}) Q^T X`` from ``X X^T = Q diag(l) Q^T``.
    """
    Xs, cs = _overflow_safe(X, c)
    l, Q = torch.linalg.eigh(Xs @ Xs.mT)
    # Rounding can make an eigenvalue of the PSD Gram matrix slightly negative: clamp to 0.
    f = torch.rsqrt(1 + l.clamp_min(0) / cs.squeeze(-1).square())
    return ((Q * f.unsqueeze(-2)) @ Q.mT) @ X


def spectral_clip_gram(
    X: Tensor,
    c: float,
    coefficients: list[tuple[float, float, float]],
    polish_steps: int = DEFAULT_POLISH_STEPS,
) -> Tensor:
    """Route ``"gram"`` on a wide ``(batch, m, n)`` stack (compute dtype, no validation).

    Newton–Schulz on ``[X, c I]`` carried out on ``m x m`` matrices (module docstring):
    ``S_0 = (X X^T + c^2 I) / nu^2``, ``P_0 = I``, ``P_{k+1} = q_k(P_k S_0 P_k^T) P_k`` (the
    transpose matters once rounding breaks ``P``'s symmetry; module docstring), then
    ``H_c(X) = (c / nu) P_K X``. ``coefficients`` are the method's ``(a, b, c)`` per step;
    ``polish_steps`` convergent steps follow.
    """
    Xs, cs = _overflow_safe(X, c)
    B = Xs @ Xs.mT
    B.diagonal(dim1=-2, dim2=-1).add_(cs.squeeze(-1).square())
    # ||B||_F >= lambda_max(B) = nu^2; the eps keeps 0/0 out of a (batch-padding) zero block.
    nu2 = torch.linalg.matrix_norm(B, keepdim=True).clamp_min(torch.finfo(B.dtype).tiny)
    S0 = B / nu2
    steps = list(coefficients) + [_POLISH] * polish_steps  # never empty: steps >= 1
    P = None
    for a, b, cc in steps:
        S = S0 if P is None else P @ (S0 @ P.mT)
        # q(S) = a I + b S + cc S^2, formed as b S + cc S^2 with a I added on the diagonal.
        Qk = torch.baddbmm(S, S, S, beta=b, alpha=cc) if S.ndim == 3 else b * S + cc * (S @ S)
        Qk.diagonal(dim1=-2, dim2=-1).add_(a)
        P = Qk if P is None else Qk @ P
    # P -> S_0^{-1/2} = nu B^{-1/2}, and B is the Gram matrix of [X / r, (c / r) I]:
    # H_c(X) = r H_{c/r}(X / r) = r (c / r) B^{-1/2} (X / r) = (c / nu) P (X / r).
    return (P @ Xs).mul_(c * torch.rsqrt(nu2))


def spectral_clip_polar(
    X: Tensor,
    c: float,
    spec: OrthogonalizationMethod,
    steps: int | None,
    polish_steps: int = DEFAULT_POLISH_STEPS,
) -> Tensor:
    """Route ``"polar"`` on a wide ``(batch, m, n)`` stack: ``c * polar([X, c I])[:, :n]``."""
    batch, m, n = X.shape
    if steps is None and spec.default_steps is not None:
        steps = spec.default_steps + _EXTRA_STEPS
    # The same rescaling as the Gram routes: ||Z||_F would overflow first otherwise.
    Xs, cs = _overflow_safe(X, c)
    Z = torch.zeros((batch, m, n + m), dtype=X.dtype, device=X.device)
    Z[..., :n].copy_(Xs)
    Z[..., n:].diagonal(dim1=-2, dim2=-1).copy_(cs.squeeze(-1).expand(batch, m))
    P = polish(spec.iterate(Z, steps), polish_steps)
    return P[..., :n].mul_(c)


def _gram_coefficients(
    spec: OrthogonalizationMethod, steps: int | None, m: int, n: int
) -> list[tuple[float, float, float]]:
    k = spec.default_steps + _EXTRA_STEPS if steps is None else steps
    return [tuple(map(float, abc)) for abc in spec.schedule(m, n + m, k)]  # type: ignore[misc]


def auto_route(device: torch.device, compute: torch.dtype, iterative: bool = True) -> str:
    """``route="auto"``: ``"eigh"`` for float32/float64 on the CPU, else ``"gram"`` (``"polar"``
    when the method has no coefficient schedule for the Gram route, i.e. ``iterative=False``).

    On a CPU, a batched LAPACK ``eigh`` of the ``m x m`` Gram matrix costs less than the ~40
    ``m^3`` products of the Gram Newton–Schulz route (measured: ``benchmarks/spectra_aro.py``);
    on accelerators batched ``eigh`` is slow and matmuls are cheap.
    """
    if device.type == "cpu" and compute in (torch.float32, torch.float64):
        return "eigh"
    return "gram" if iterative else "polar"


def resolve_route(
    route: str,
    method: str | None,
    steps: int | None,
    polish_steps: int | None,
) -> str:
    """The route :func:`spectral_clip` runs, given which Newton–Schulz options were passed.

    ``method``, ``steps`` and ``polish_steps`` (``None``: not given) configure the Newton–Schulz
    routes only. With ``route="auto"`` any of them selects a Newton–Schulz route (``"gram"``,
    or ``"polar"`` for a method without a coefficient schedule such as ``"svd"``), so that the
    option acts on every device; ``route="eigh"`` refuses them. Otherwise ``route`` is returned
    unchanged (``"auto"`` then resolves per device when the kernel runs).
    """
    given = [
        name
        for name, value in (("method", method), ("steps", steps), ("polish_steps", polish_steps))
        if value is not None
    ]
    if not given:
        return route
    if route == "eigh":
        raise ValueError(
            f"{', '.join(given)} configure(s) the Newton–Schulz routes 'gram' and 'polar'; "
            "route 'eigh' computes the clip from an eigendecomposition and runs no iteration "
            f"(drop {', '.join(given)} or pass route='gram' or 'polar')"
        )
    if route == "auto":
        return "polar" if get_method(method or DEFAULT_METHOD).schedule is None else "gram"
    return route


def spectral_clip_unchecked(
    X: Tensor,
    c: float,
    spec: OrthogonalizationMethod,
    steps: int | None,
    compute: torch.dtype,
    polish_steps: int = DEFAULT_POLISH_STEPS,
    route: str = "auto",
) -> Tensor:
    """:func:`spectral_clip` on a ``(batch, m, n)`` *wide* stack, without validation.

    Returns the clip in the compute dtype (the kernel form used by :class:`~orthotorch.SPECTRA`).
    """
    X = X.to(compute)
    if route == "auto":
        route = auto_route(X.device, compute, spec.schedule is not None)
    if route == "eigh":
        return spectral_clip_eigh(X, c)
    if route == "gram":
        _, m, n = X.shape
        return spectral_clip_gram(X, c, _gram_coefficients(spec, steps, m, n), polish_steps)
    return spectral_clip_polar(X, c, spec, steps, polish_steps)


def spectral_clip_kernel(
    c: float,
    method: str | None = DEFAULT_METHOD,
    steps: int | None = None,
    dtype: torch.dtype | None = torch.float32,
    polish_steps: int | None = DEFAULT_POLISH_STEPS,
    route: ClipRoute = "auto",
) -> tuple[Callable[[Tensor, bool], Tensor], torch.dtype]:
    """Validate once and return ``(kernel, compute_dtype)`` for
    :func:`orthotorch.distributed.map_matrices`: ``kernel(X, transposed) = H_c(X)`` on a wide
    stack (orientation is irrelevant, since ``H_c(X^T) = H_c(X)^T``).

    ``method=None`` / ``polish_steps=None`` mean the defaults (``"polar_express"``, 2). Unlike
    :func:`spectral_clip`, the kernel takes ``route`` as given: ``"auto"`` resolves per device
    (:func:`auto_route`) whatever the options, so callers that want the options to select the
    route pass ``resolve_route(...)``'s answer.
    """
    from . import resolve_compute  # the package imports this module

    c = check_clip(c)
    route = check_route(route)
    method = DEFAULT_METHOD if method is None else method
    polish_steps = DEFAULT_POLISH_STEPS if polish_steps is None else polish_steps
    spec, steps, compute = resolve_compute(method, steps, dtype)
    if isinstance(polish_steps, bool) or not isinstance(polish_steps, int) or polish_steps < 0:
        raise ValueError(f"polish_steps must be a non-negative int, got {polish_steps!r}")
    if route == "eigh" and compute not in (torch.float32, torch.float64):
        raise ValueError(f"route 'eigh' computes in float32 or float64; got dtype={compute}")
    if route == "gram" and spec.schedule is None:
        raise ValueError(
            f"route 'gram' needs a Newton–Schulz method with a coefficient schedule; "
            f"method {method!r} has none (use route='polar' or 'eigh')"
        )

    def kernel(X: Tensor, transposed: bool) -> Tensor:
        del transposed
        return spectral_clip_unchecked(X, c, spec, steps, compute, polish_steps, route)

    return kernel, compute


def spectral_clip(
    X: Tensor,
    c: float,
    method: str | None = None,
    steps: int | None = None,
    dtype: torch.dtype | None = torch.float32,
    polish_steps: int | None = None,
    *,
    route: ClipRoute = "auto",
) -> Tensor:
    """Soft spectral clip ``H_c(X) = (I + X X^T / c^2)^{-1/2} X``, batched, without an SVD.

    Maps every singular value ``s`` of ``X`` to ``s / sqrt(1 + s^2 / c^2)`` (so the spectral norm
    of the result is below ``c``, up to rounding of order ``eps * s_max / c`` relative in the
    compute dtype) and keeps the singular vectors. See the module docstring for the three routes
    and their accuracy.

    Args:
        X: ``(..., m, n)`` real tensor; tall matrices are clipped through their transpose
            (``H_c(X^T) = H_c(X)^T``).
        c: clip threshold, ``0 < c < inf``.
        method: Newton–Schulz schedule of routes ``"gram"``/``"polar"``
            (:func:`~orthotorch.linalg.available_methods`; ``"polar"`` also takes ``"svd"``);
            ``None``: ``"polar_express"``.
        steps: its iterations; ``None``: the method's default plus 3 (see the module docstring).
        dtype: compute dtype (default float32; bf16 alone costs ~1% accuracy); ``None``: the
            method's default.
        polish_steps: convergent Newton–Schulz steps after the method (``None``: 2; 0 keeps
            the method's raw output band).
        route: ``"gram"`` (matmul-only Newton–Schulz on the ``m x m`` Gram matrix),
            ``"eigh"`` (eigendecomposition of the Gram matrix; float32/float64), ``"polar"``
            (polar factor of ``[X, c I]``; the reference route) or ``"auto"`` (default:
            ``"eigh"`` on the CPU in float32/float64, else ``"gram"``; a Newton–Schulz route
            whenever ``method``, ``steps`` or ``polish_steps`` is given, so that they act:
            ``"gram"``, or ``"polar"`` for ``method="svd"``).

    Returns:
        A tensor with ``X``'s shape and dtype. Zero maps to zero.

    Raises:
        ValueError: ``c`` is not a positive finite number, ``X`` is not a finite real
            ``(..., m, n)`` tensor, ``method``/``steps``/``dtype``/``polish_steps``/``route``
            is invalid, or ``method``/``steps``/``polish_steps`` is given with
            ``route="eigh"``, which runs no Newton–Schulz iteration.
    """
    from . import check_matrix_input  # the package imports this module

    route = resolve_route(check_route(route), method, steps, polish_steps)
    kernel, _ = spectral_clip_kernel(c, method, steps, dtype, polish_steps, route)
    check_matrix_input(X, "X")
    tall = X.shape[-2] > X.shape[-1]
    W = X.mT if tall else X
    lead = W.shape[:-2]
    Y = kernel(W.reshape(-1, *W.shape[-2:]), tall)
    Y = Y.reshape(*lead, *W.shape[-2:])
    return (Y.mT if tall else Y).to(X.dtype)


def spectral_clip_reference(X: Tensor, c: float) -> Tensor:
    """The SVD definition of :func:`spectral_clip` in float64 (slow; tests and checks only)."""
    c = check_clip(c)
    U, S, Vh = torch.linalg.svd(X.to(torch.float64), full_matrices=False)
    S = S / torch.sqrt(1 + (S / c) ** 2)
    return ((U * S.unsqueeze(-2)) @ Vh).to(X.dtype)
