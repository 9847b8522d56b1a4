"""THE registry of orthogonalization methods.

A method is data: how to iterate on a batch of wide matrices, its default step count and
compute dtype, and the band its output singular values are documented to land in. Adding a
method is one :func:`register_method` call; ``orthogonalize``, every optimizer's ``ns_method``,
``orthotorch bench`` and the shared tests pick it up from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._registry import Registry
from .newton_schulz import (
    AOL_COEFFICIENTS,
    JIACHENG_COEFFICIENTS,
    MUON_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    Schedule,
    aol_newton_schulz,
    newton_schulz,
    table_schedule,
)
from .root import root_iterate, root_schedule

__all__ = [
    "OrthogonalizationMethod",
    "available_methods",
    "get_method",
    "newton_schulz_method",
    "register_method",
]


@dataclass(frozen=True)
class OrthogonalizationMethod:
    """One way to compute (an approximation of) the polar factor ``U V^T``.

    Attributes:
        name: registry key.
        iterate: ``(X, steps) -> Y`` on a ``(batch, m, n)`` tensor with ``m <= n`` in the compute
            dtype; must not modify ``X``.
        default_steps: steps used when the caller passes ``steps=None`` (``None``: not iterative).
        default_dtype: compute dtype used when the caller passes ``dtype=None``.
        dtypes: compute dtypes the method accepts.
        band: ``(lo, hi)``: every output singular value is ``<= hi``; the output singular value of
            each input direction whose normalised singular value ``sigma / ||G||_F`` is at least
            ``band_from`` lies in ``[lo, hi]`` (bf16 rounding included).
        band_from: see ``band``. Directions below it are still moving towards 1 when the
            iteration stops: no fixed number of steps can lift a ``1e-7`` singular value.
        schedule: ``(rows, cols, steps) -> coefficients`` for Newton–Schulz methods, used by
            ``bench`` to count FLOPs and by tests to check the band in exact arithmetic.
        norm_scale: normalisation safety factor of Newton–Schulz methods.
        description: one line for ``describe``/``bench`` tables.
    """

    name: str
    iterate: Callable[[Tensor, int | None], Tensor]
    default_steps: int | None
    default_dtype: torch.dtype
    dtypes: tuple[torch.dtype, ...]
    band: tuple[float, float]
    band_from: float
    description: str
    schedule: Schedule | None = None
    norm_scale: float = 1.0


_METHODS: Registry[OrthogonalizationMethod] = Registry("orthogonalization method", "methods")


def register_method(method: OrthogonalizationMethod, *, overwrite: bool = False) -> None:
    """Add ``method`` to the registry under ``method.name``."""
    _METHODS.register(method.name, method, overwrite=overwrite)


def available_methods() -> list[str]:
    """Names of every registered method, in registration order."""
    return _METHODS.names()


def get_method(name: str) -> OrthogonalizationMethod:
    """Look a method up, with an error that lists the valid names."""
    return _METHODS.get(name)


_NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def newton_schulz_method(
    name: str,
    schedule: Schedule,
    *,
    default_steps: int,
    band: tuple[float, float],
    band_from: float,
    description: str,
    norm_scale: float = 1.0,
    eps: float = 1e-7,
) -> OrthogonalizationMethod:
    """Build a registry entry for a quintic Newton–Schulz schedule."""

    def iterate(X: Tensor, steps: int | None) -> Tensor:
        k = default_steps if steps is None else steps
        coefficients = schedule(X.shape[-2], X.shape[-1], k)
        return newton_schulz(X, coefficients, norm_scale=norm_scale, eps=eps)

    return OrthogonalizationMethod(
        name=name,
        iterate=iterate,
        default_steps=default_steps,
        default_dtype=torch.bfloat16,
        dtypes=_NS_DTYPES,
        band=band,
        band_from=band_from,
        description=description,
        schedule=schedule,
        norm_scale=norm_scale,
    )


def _svd_iterate(X: Tensor, steps: int | None) -> Tensor:
    del steps
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    # Directions with (numerically) zero singular value map to zero, as in every Newton–Schulz
    # method: U V^T of a rank-deficient matrix would otherwise fill them with arbitrary vectors,
    # and a zero gradient would produce a full-norm update.
    tol = S[..., :1] * (max(X.shape[-2:]) * torch.finfo(S.dtype).eps)
    keep = (S > tol).to(X.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


# The bands below were measured by iterating each schedule's scalar map on 2e5 log-spaced points
# in [1e-8, 1] (float64), then widened by 0.05 on each side for bf16 rounding; the tests check
# them in exact arithmetic (tests/test_linalg.py::test_documented_band_holds_in_exact_arithmetic)
# and on real matrices (test_method_band_random, test_method_band_ill_conditioned).
register_method(
    newton_schulz_method(
        "muon",
        table_schedule([MUON_COEFFICIENTS]),
        default_steps=5,
        band=(0.63, 1.25),
        band_from=3e-3,
        description="fixed quintic (3.4445, -4.7750, 2.0315); fast, not convergent",
    )
)
register_method(
    newton_schulz_method(
        "polar_express",
        table_schedule(POLAR_EXPRESS_COEFFICIENTS),
        default_steps=5,
        band=(0.80, 1.19),
        band_from=1e-3,
        norm_scale=1.02,
        eps=1e-6,
        description="per-step minimax quintics (Polar Express); best on small singular values",
    )
)
register_method(
    newton_schulz_method(
        "jiacheng",
        table_schedule(JIACHENG_COEFFICIENTS),
        default_steps=5,
        band=(0.92, 1.20),
        band_from=3e-3,
        description="per-step quintics tuned by Jiacheng You",
    )
)
register_method(
    OrthogonalizationMethod(
        name="svd",
        iterate=_svd_iterate,
        default_steps=None,
        default_dtype=torch.float32,
        dtypes=(torch.float32, torch.float64),
        band=(1 - 1e-5, 1 + 1e-5),  # float32 rounding
        # Directions below max(m, n) * eps of the largest are numerically zero and map to zero.
        band_from=1e-4,
        description="exact U V^T from torch.linalg.svd (reference; slow)",
    )
)


def _aol_iterate(X: Tensor, steps: int | None) -> Tensor:
    k = 4 if steps is None else steps
    return aol_newton_schulz(X, _AOL_SCHEDULE(X.shape[-2], X.shape[-1], k))


_AOL_SCHEDULE = table_schedule(AOL_COEFFICIENTS)

# Registered after the methods above: keeps the registry's order (and every table that lists it)
# unchanged for them.
register_method(
    OrthogonalizationMethod(
        name="root",
        iterate=root_iterate,
        default_steps=5,
        default_dtype=torch.bfloat16,
        dtypes=_NS_DTYPES,
        # Union over ROOT's guarded table and Muon's fallback of the exact 5-step band
        # (upper 1.2353 from the (2048, 3072) entry, lower 0.652 from (2048, 8192)), widened
        # by 0.05 for bf16 rounding, as for the methods above.
        band=(0.60, 1.29),
        band_from=3e-3,
        schedule=root_schedule,
        description="ROOT: per-shape quintics (guarded), Muon's elsewhere; safe normalisation",
    )
)
register_method(
    OrthogonalizationMethod(
        name="aol",
        iterate=_aol_iterate,
        default_steps=4,
        default_dtype=torch.bfloat16,
        dtypes=_NS_DTYPES,
        # Exact band of the fitted table on AOL-normalised values >= 5e-3: [0.908, 1.092],
        # widened by 0.05 for bf16 rounding as above. band_from is in the Frobenius-normalised
        # units of the tests; AOL-normalised values are larger (5-7x at the median).
        band=(0.85, 1.15),
        band_from=5e-3,
        schedule=_AOL_SCHEDULE,
        description="AOL-preconditioned start (Turbo-Muon), 4 fitted quintics; one step fewer",
    )
)
