"""Soft spectral clipping without an SVD (the primitive behind :class:`orthotorch.SPECTRA`).

.. math::

    H_c(X) = \\left(I + X X^\\top / c^2\\right)^{-1/2} X
           = X \\left(I + X^\\top X / c^2\\right)^{-1/2},
    \\qquad \\sigma \\mapsto \\frac{\\sigma}{\\sqrt{1 + \\sigma^2 / c^2}} < c .

Small singular values pass unchanged, large ones saturate smoothly at ``c``; the singular vectors
are kept. The inverse square root is never formed. With ``Z = [X, c I_m]`` (``m x (n + m)``,
``X`` wide), ``Z Z^T = X X^T + c^2 I``, so the polar factor of ``Z`` is
``(X X^T + c^2 I)^{-1/2} Z`` and its first ``n`` columns times ``c`` are exactly ``H_c(X)``:

.. math::

    H_c(X) = c \\cdot \\mathrm{polar}\\big([X,\\ c I]\\big)_{:, :n} .

Why this instead of a coupled Newton–Schulz inverse square root of ``I + X X^T / c^2``: that
matrix has condition number ``1 + s^2/c^2`` (9e4 at ``s/c = 300``) and ~10 coupled steps are
accurate to 1e-2 only while ``s/c <~ 25``; ``Z``'s condition number is the square root of it,
and *every* polar routine of :mod:`orthotorch.linalg.registry` applies unchanged.

Two details make a fast polar routine accurate enough here:

- Newton–Schulz normalises ``Z`` by ``||Z||_F``, so its smallest singular value starts at
  ``c / ||Z||_F >= 1 / (sqrt(m) sqrt(1 + s_max^2 / c^2))`` (7e-5 for ``m = 2048``,
  ``s/c = 300``). The default runs the method's steps plus 3, which lifts such values into the
  method's band (checked with :func:`~orthotorch.linalg.iterate_scalar`).
- The fast schedules (Muon, Polar Express) are not convergent: their output singular values
  land in a band such as ``[0.8, 1.2]``, i.e. a 10-20% error in the clip. ``polish`` steps of the
  convergent quintic ``(15/8, -10/8, 3/8)`` (cubic convergence to 1 on ``(0, 1.5)``) finish the
  job; two of them bring the band to ``1 +- 1e-6``. Both run in float32 by default: bf16
  rounding alone is ~1%.

Reference: SPECTRA, spectral clipping for LLM optimizers (post-clip ``c = 10``); see
``shared/ALGORITHMS.md`` ("SPECTRA").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .registry import OrthogonalizationMethod

__all__ = [
    "DEFAULT_POLISH_STEPS",
    "check_clip",
    "polish",
    "spectral_clip",
    "spectral_clip_kernel",
    "spectral_clip_reference",
    "spectral_clip_unchecked",
]

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


def spectral_clip_unchecked(
    X: Tensor,
    c: float,
    spec: OrthogonalizationMethod,
    steps: int | None,
    compute: torch.dtype,
    polish_steps: int = DEFAULT_POLISH_STEPS,
) -> Tensor:
    """:func:`spectral_clip` on a ``(batch, m, n)`` *wide* stack, without validation.

    Returns the clip in the compute dtype (the kernel form used by :class:`~orthotorch.SPECTRA`).
    """
    batch, m, n = X.shape
    if steps is None and spec.default_steps is not None:
        steps = spec.default_steps + _EXTRA_STEPS
    Z = torch.empty((batch, m, n + m), dtype=compute, device=X.device)
    Z[..., :n].copy_(X)
    Z[..., n:].zero_()
    Z[..., n:].diagonal(dim1=-2, dim2=-1).fill_(c)
    P = polish(spec.iterate(Z, steps), polish_steps)
    return P[..., :n].mul_(c)


def spectral_clip_kernel(
    c: float,
    method: str = "polar_express",
    steps: int | None = None,
    dtype: torch.dtype | None = torch.float32,
    polish_steps: int = DEFAULT_POLISH_STEPS,
) -> tuple[Callable[[Tensor, bool], Tensor], torch.dtype]:
    """Validate once and return ``(kernel, compute_dtype)`` for
    :func:`orthotorch.distributed.map_matrices`: ``kernel(X, transposed) = H_c(X)`` on a wide
    stack (orientation is irrelevant, since ``H_c(X^T) = H_c(X)^T``)."""
    from . import resolve_compute  # the package imports this module

    c = check_clip(c)
    spec, steps, compute = resolve_compute(method, steps, dtype)
    if isinstance(polish_steps, bool) or not isinstance(polish_steps, int) or polish_steps < 0:
        raise ValueError(f"polish_steps must be a non-negative int, got {polish_steps!r}")

    def kernel(X: Tensor, transposed: bool) -> Tensor:
        del transposed
        return spectral_clip_unchecked(X, c, spec, steps, compute, polish_steps)

    return kernel, compute


def spectral_clip(
    X: Tensor,
    c: float,
    method: str = "polar_express",
    steps: int | None = None,
    dtype: torch.dtype | None = torch.float32,
    polish_steps: int = DEFAULT_POLISH_STEPS,
) -> Tensor:
    """Soft spectral clip ``H_c(X) = (I + X X^T / c^2)^{-1/2} X``, batched, without an SVD.

    Maps every singular value ``s`` of ``X`` to ``s / sqrt(1 + s^2 / c^2)`` (so the spectral norm
    of the result is below ``c``) and keeps the singular vectors, via the exact identity
    ``H_c(X) = c * polar([X, c I])[:, :n]`` (see the module docstring).

    Args:
        X: ``(..., m, n)`` real tensor; tall matrices are clipped through their transpose
            (``H_c(X^T) = H_c(X)^T``).
        c: clip threshold, ``0 < c < inf``.
        method: polar routine from :func:`~orthotorch.linalg.available_methods`.
        steps: its iterations; ``None``: the method's default plus 3 (see the module docstring).
        dtype: compute dtype (default float32; bf16 alone costs ~1% accuracy); ``None``: the
            method's default.
        polish_steps: convergent Newton–Schulz steps after the method (default 2; 0 keeps the
            method's raw output band).

    Returns:
        A tensor with ``X``'s shape and dtype. Zero maps to zero.

    Raises:
        ValueError: ``c`` is not a positive finite number, ``X`` is not a finite real
            ``(..., m, n)`` tensor, or ``method``/``steps``/``dtype``/``polish_steps`` is invalid.
    """
    from . import check_matrix_input  # the package imports this module

    kernel, _ = spectral_clip_kernel(c, method, steps, dtype, polish_steps)
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
