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

A schedule is a function ``(rows, cols, steps) -> list[(a, b, c)]`` so that shape-dependent
tables (ROOT) fit in the same registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

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
    if X.ndim == 2:
        return _newton_schulz_2d(X, coefficients)
    if X.device.type == "cpu":
        # On CPU a loop of 2-D GEMMs beats one bmm (measured 84 vs 115 ms for 16 bf16 512x512
        # matrices, 5 steps: the 2-D path reaches oneDNN's bf16 kernels, bmm does not), so
        # batching pays off only on accelerators.
        for i in range(X.shape[0]):
            X[i] = _newton_schulz_2d(X[i], coefficients)
        return X
    for a, b, c in coefficients:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return X


def _newton_schulz_2d(X: Tensor, coefficients: Sequence[Coefficients]) -> Tensor:
    for a, b, c in coefficients:
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        # a X + B X fused in one addmm: a separate mm + add_ is ~5% faster on CPU but rounds
        # B X to bf16 before the sum, which measurably hurts (2.6% vs 1.7% error against the
        # float64 iteration on a 16x64 input).
        X = torch.addmm(X, B, X, beta=a)
    return X


def iterate_scalar(x: Tensor, coefficients: Sequence[Coefficients]) -> Tensor:
    """Apply the schedule's scalar map ``p_K(...p_1(x))`` to singular values ``x`` (float64).

    Used to document and test each method's output band without any matrix rounding.
    """
    x = x.to(torch.float64)
    for a, b, c in coefficients:
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return x
