"""Orthogonalization entry points: input checks, :func:`orthogonalize`, :func:`polar` and the
orthogonality error.

The polar factor of ``G = U S V^T`` is ``U V^T``: the orthogonal (semi-orthogonal, for
rectangular ``G``) matrix nearest to ``G`` in every unitarily invariant norm. Orthogonalized
optimizers step along it instead of along the raw momentum. The methods themselves live in the
registry (:mod:`.registry`); this module validates, orients (tall input is transposed) and
converts dtypes around them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import OrthogonalizationMethod, get_method

__all__ = [
    "check_matrix_input",
    "orthogonality_error",
    "orthogonalize",
    "orthogonalize_unchecked",
    "polar",
    "resolve_compute",
]


def check_matrix_input(G: Tensor, what: str = "G") -> None:
    """Raise ``ValueError`` unless ``G`` is a finite real ``(..., m, n)`` tensor."""
    if not isinstance(G, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(G).__name__}")
    if G.ndim < 2:
        raise ValueError(
            f"{what} must have at least 2 dimensions (..., m, n), got shape {tuple(G.shape)}"
        )
    if G.is_complex() or not G.is_floating_point():
        raise ValueError(f"{what} must be a real floating-point tensor, got dtype {G.dtype}")
    # One host sync; the optimizers skip this and check all gradients at once instead.
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"{what} of shape {tuple(G.shape)} contains NaN or Inf values")


def resolve_compute(
    method: str, steps: int | None, dtype: torch.dtype | None
) -> tuple[OrthogonalizationMethod, int | None, torch.dtype]:
    """Validate ``(method, steps, dtype)`` once and fill in the method's defaults."""
    spec = get_method(method)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int or None, got {steps!r}")
        if spec.default_steps is None:
            raise ValueError(f"method {method!r} is not iterative; pass steps=None")
    compute = spec.default_dtype if dtype is None else dtype
    if compute not in spec.dtypes:
        valid = ", ".join(str(d).removeprefix("torch.") for d in spec.dtypes)
        raise ValueError(f"method {method!r} computes in one of {valid}; got dtype={compute}")
    return spec, steps, compute


def orthogonalize_unchecked(
    G: Tensor, spec: OrthogonalizationMethod, steps: int | None, compute: torch.dtype
) -> Tensor:
    """:func:`orthogonalize` without input validation, for callers that validated already."""
    tall = G.shape[-2] > G.shape[-1]
    X = G.mT if tall else G
    lead = X.shape[:-2]
    # One pass converts the dtype and makes the (possibly transposed) input contiguous.
    X = X.to(compute, memory_format=torch.contiguous_format).reshape(-1, *X.shape[-2:])
    Y = spec.iterate(X, steps).reshape(*lead, *X.shape[-2:])
    if tall:
        Y = Y.mT
    return Y.to(G.dtype)


def orthogonalize(
    G: Tensor,
    method: str = "polar_express",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Approximate polar factor ``U V^T`` of ``G``, batched over leading dimensions.

    Args:
        G: ``(..., m, n)``; any ``m``, ``n`` (tall matrices are transposed internally).
        method: a name from :func:`available_methods` (``"polar_express"``, ``"muon"``,
            ``"jiacheng"``, ``"svd"``, ...).
        steps: iterations for Newton–Schulz methods; ``None`` uses the method's default.
        dtype: compute dtype; ``None`` uses the method's default (bf16 for Newton–Schulz
            methods, float32 for ``"svd"``).

    Returns:
        A tensor with ``G``'s shape and dtype. A zero matrix maps to zeros.

    Raises:
        ValueError: ``G`` has fewer than 2 dimensions or non-finite entries, or an argument is
            not valid for the method.
    """
    check_matrix_input(G)
    spec, steps, compute = resolve_compute(method, steps, dtype)
    return orthogonalize_unchecked(G, spec, steps, compute)


def polar(G: Tensor) -> Tensor:
    """Exact polar factor ``U V^T`` via SVD (float64 for float64 input, else float32).

    Singular directions that are numerically zero map to zero (the partial isometry), matching
    the limit of every Newton–Schulz method.
    """
    compute = torch.float64 if G.dtype == torch.float64 else torch.float32
    return orthogonalize(G, "svd", dtype=compute)


def orthogonality_error(X: Tensor) -> Tensor:
    """Relative Frobenius error ``||X X^T - I||_F / sqrt(k)`` on the small side ``k``.

    Zero for a (semi-)orthogonal matrix; batched over leading dimensions (returns ``X.shape[:-2]``).
    Computed in float64 for float64 input, float32 otherwise.
    """
    if X.ndim < 2:
        raise ValueError(f"X must have at least 2 dimensions, got shape {tuple(X.shape)}")
    compute = torch.float64 if X.dtype == torch.float64 else torch.float32
    X = X.to(compute)
    if X.shape[-2] > X.shape[-1]:
        X = X.mT
    k = X.shape[-2]
    gram = X @ X.mT
    eye = torch.eye(k, dtype=compute, device=X.device)
    return torch.linalg.matrix_norm(gram - eye) / k**0.5
