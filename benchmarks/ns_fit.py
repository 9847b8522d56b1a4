"""Fit per-step minimax Newton–Schulz quintics for a given start interval (Polar Express style).

Each step's odd quintic ``p(x) = a x + b x^3 + c x^5`` minimises ``max |1 - p(x)|`` over the
interval ``[l, u]`` the singular values are known to lie in (a linear program on a dense
log-spaced grid), and the next step's interval is the image ``[min p, max p]`` (Amsel et al.,
2025, "The Polar Express", greedy per-step fit). Two safeguards, both from Polar Express: each
step's lower end is raised to at least ``u / cushion`` (a polynomial fitted on a very wide
interval must not waste its degree on the far tail), and the fitted coefficients are applied to
``x / safety`` (``a/s, b/s^3, c/s^5``) so that rounding that pushes a singular value slightly
above ``u`` is not amplified.

The ``aol`` table of :mod:`orthotorch.linalg.newton_schulz` was produced by

    python benchmarks/ns_fit.py --lower 1e-3 --steps 4

(start interval ``[1e-3, 1]``: after AOL scaling the spectral norm is at most 1, and the
reference set's normalised singular values start well above the Frobenius start's; see
``--check``, which prints the smallest AOL-normalised singular values of Gaussian and
low-rank-plus-noise matrices of the reference shapes next to the Frobenius-normalised ones).

    python benchmarks/ns_fit.py [--lower 1e-3] [--upper 1] [--steps 4] [--check] [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.optimize import linprog


def fit_quintic(lower: float, upper: float, points: int = 4000) -> tuple[float, float, float]:
    """The odd quintic minimising ``max_{x in [lower, upper]} |1 - p(x)|`` (LP on a grid).

    Variables ``(a, b, c, t)``: minimise ``t`` subject to ``-t <= 1 - p(x_i) <= t``.
    """
    x = np.geomspace(lower, upper, points)
    basis = np.stack([x, x**3, x**5], axis=1)
    ones = np.ones((points, 1))
    # p(x) - 1 <= t  ->  basis @ abc - t <= 1;   1 - p(x) <= t  ->  -basis @ abc - t <= -1
    A = np.vstack([np.hstack([basis, -ones]), np.hstack([-basis, -ones])])
    b = np.concatenate([np.ones(points), -np.ones(points)])
    res = linprog(c=[0, 0, 0, 1], A_ub=A, b_ub=b, bounds=[(None, None)] * 4, method="highs")
    if not res.success:
        raise RuntimeError(f"LP failed on [{lower}, {upper}]: {res.message}")
    a, b3, c5, _ = res.x
    return float(a), float(b3), float(c5)


def fit_schedule(
    lower: float,
    upper: float = 1.0,
    steps: int = 4,
    cushion: float = 41.5,
    safety: float = 1.01,
) -> list[tuple[float, float, float]]:
    """Greedy per-step minimax schedule for singular values starting in ``[lower, upper]``."""
    table = []
    lo, hi = lower, upper
    for k in range(steps):
        fit_lo = max(lo, hi / cushion) if k < steps - 1 else lo
        a, b, c = fit_quintic(fit_lo, hi)
        if k < steps - 1:
            a, b, c = a / safety, b / safety**3, c / safety**5
        table.append((a, b, c))
        grid = torch.from_numpy(np.geomspace(lo, hi, 20001))
        y = grid * (a + grid**2 * (b + c * grid**2))
        lo, hi = float(y.min()), float(y.max())
    return table


def aol_scale(X: torch.Tensor) -> torch.Tensor:
    """``diag(1/sqrt(sum_j |X X^T|_ij)) X`` (float64), the AOL start."""
    A = X @ X.mT
    return X * A.abs().sum(-1, keepdim=True).rsqrt()


def check_starts(quick: bool) -> None:
    """Smallest and median normalised singular values under both starts, reference shapes."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(128, 512)] if quick else [(512, 512), (512, 2048)]
    for m, n in shapes:
        gauss = torch.randn(m, n, generator=gen, dtype=torch.float64)
        low = torch.randn(m, 8, generator=gen, dtype=torch.float64) @ torch.randn(
            8, n, generator=gen, dtype=torch.float64
        )
        cases = {"gaussian": gauss, "rank8+noise": 10 * low / n**0.5 + gauss}
        for name, G in cases.items():
            frob = torch.linalg.svdvals(G / torch.linalg.matrix_norm(G))
            aol = torch.linalg.svdvals(aol_scale(G))
            print(
                f"{m}x{n} {name:12s} frobenius: min {frob.min():.2e} median "
                f"{frob.median():.2e} max {frob.max():.3f} | aol: min {aol.min():.2e} "
                f"median {aol.median():.2e} max {aol.max():.3f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lower", type=float, default=5e-3)
    ap.add_argument("--upper", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cushion", type=float, default=41.5)
    ap.add_argument("--safety", type=float, default=1.01)
    ap.add_argument("--check", action="store_true", help="print both starts' singular values")
    ap.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    args = ap.parse_args()
    table = fit_schedule(args.lower, args.upper, args.steps, args.cushion, args.safety)
    print("(")
    for a, b, c in table:
        print(f"    ({a!r}, {b!r}, {c!r}),")
    print(")")
    x = torch.logspace(np.log10(args.lower), np.log10(args.upper), 20001, dtype=torch.float64)
    y = x
    for a, b, c in table:
        y = y * (a + y**2 * (b + c * y**2))
    print(f"band on [{args.lower}, {args.upper}]: [{y.min():.4f}, {y.max():.4f}]")
    if args.check or args.quick:
        check_starts(args.quick)


if __name__ == "__main__":
    main()
