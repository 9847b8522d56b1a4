"""AuON's direction as pure functions ("AuON: A Linear-time Alternative to Semi-Orthogonal
Momentum Updates"; code https://github.com/ryyzn9/AuON).

.. math::

    X = \\frac{M}{\\lVert M \\rVert_F + 10^{-7}}, \\quad
    r = \\sqrt{\\operatorname{mean}_{ij} \\cosh^2(X_{ij})}, \\quad
    U = \\frac{X}{r + 10^{-8}}, \\quad
    \\theta \\leftarrow (1 - \\eta\\lambda)\\theta - \\eta \\sqrt{\\max(1, m / n)}\\, U

``M`` is Nesterov momentum, as in Muon. ``||U||_2 <= ||U||_F <= 1``: the update sits inside a
spectral-norm trust region without any matrix product, so a step costs ``O(mn)``. Hybrid-AuON
replaces ``X`` by one Muon Newton–Schulz step ``p(X) = a X + (b A + c A^2) X``, ``A = X X^T``,
before the same rescale (``O(m^2 n)``, a fifth of Muon's five steps).

Choices, where the paper's text and its public code differ (we follow the paper):

- The update is the normalised ``X / r``. The public code divides the *unnormalised* momentum
  by ``r`` (step size proportional to the gradient's norm) and multiplies ``X`` by
  ``gamma = 1.5`` inside ``cosh``.
- What the rescale does, measured honestly: with ``||X||_F = 1`` every entry is small and
  ``cosh^2(x) = 1 + sinh^2(x)``, so ``1 <= r^2 <= 1 + sinh^2(1) / (mn)``. For any matrix with
  more than a few entries ``r`` is 1 to within ``1.4 / (mn)``: AuON is, numerically, a
  Frobenius-normalised Nesterov momentum step. Hybrid-AuON's NS step moves the spectrum
  (small singular values x3.4, the largest towards 1) and so changes the direction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..linalg.newton_schulz import MUON_COEFFICIENTS, newton_schulz

__all__ = [
    "NORM_EPS",
    "RMS_EPS",
    "auon_directions",
    "auon_kernel",
    "cosh_rms",
    "hybrid_auon_kernel",
]

NORM_EPS = 1e-7  # in X = M / (||M||_F + eps)
RMS_EPS = 1e-8  # in U = X / (r + eps)


def cosh_rms(X: Tensor) -> Tensor:
    """``r = sqrt(mean(cosh(X)^2))`` over the last two dimensions, in float32 at least.

    Computed as ``||cosh(X)||_F / sqrt(mn)``. In bf16, ``cosh`` of entries below ~0.06 rounds to
    exactly 1, so the float32 upcast is what keeps the (tiny) deviation of ``r`` from one.
    """
    compute = torch.promote_types(X.dtype, torch.float32)
    n = X.shape[-2] * X.shape[-1]
    return torch.linalg.vector_norm(torch.cosh(X.to(compute)), dim=(-2, -1), keepdim=True) / (
        math.sqrt(n)
    )


def auon_directions(momenta: list[Tensor]) -> list[Tensor]:
    """``U = X / (r + 1e-8)``, ``X = M / (||M||_F + 1e-7)``, for every tensor (new tensors).

    Elementwise and ``foreach`` only: reductions and elementwise maps, no matrix products, so the
    cost is linear in the number of entries (tests/test_auon.py counts the FLOPs).
    """
    if not momenta:
        return []
    norms = torch._foreach_norm(momenta)
    torch._foreach_add_(norms, NORM_EPS)
    X = torch._foreach_div(momenta, norms)
    # r is recomputed from X itself (not from ||M||), so it is exactly the paper's mean over cosh^2.
    rms = torch._foreach_norm(torch._foreach_cosh(X))
    torch._foreach_div_(rms, [math.sqrt(x.numel()) for x in X])
    torch._foreach_add_(rms, RMS_EPS)
    torch._foreach_div_(X, rms)
    return X


def auon_kernel(X: Tensor, transposed: bool) -> Tensor:
    """AuON on a wide ``(k, m, n)`` stack: the same map as :func:`auon_directions`.

    For :func:`orthotorch.distributed.map_matrices` when parameters are sharded (FSDP2), where
    ``||M||_F`` needs the whole matrix; on whole local tensors the ``foreach`` path is cheaper
    (no stacking copy, no communication).
    """
    del transposed  # entrywise and Frobenius: orientation does not matter
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X = X / (norm + NORM_EPS)
    return X.div_((cosh_rms(X) + RMS_EPS).to(X.dtype))


def hybrid_auon_kernel(X: Tensor, transposed: bool) -> Tensor:
    """Hybrid-AuON on a wide ``(k, m, n)`` stack: ``p(X) / (r(p(X)) + 1e-8)``, one Muon step.

    :func:`~orthotorch.linalg.newton_schulz` normalises by ``||M||_F + 1e-7`` first, exactly
    AuON's ``X``.
    """
    del transposed  # p(X^T) = p(X)^T
    Y = newton_schulz(X, [MUON_COEFFICIENTS], eps=NORM_EPS)
    return Y.div_((cosh_rms(Y) + RMS_EPS).to(Y.dtype))
