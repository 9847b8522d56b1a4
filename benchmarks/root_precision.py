"""Orthogonality error of every Newton–Schulz method per reference kernel shape.

Checks ROOT's claim that per-shape coefficients are more precise, instead of assuming it: for
each shape in ``orthotorch.bench.reference.KERNEL_SHAPES`` (plus ROOT's other table shapes with
``--all-table-shapes``), the error ``||O O^T - I||_F / sqrt(k)`` of every registered
Newton–Schulz method, plus the *published* (unguarded) ROOT coefficients, at 5 steps in bf16
(the optimizers' default), on two inputs: a Gaussian matrix (flat-ish spectrum with a tail to
zero) and a Gaussian matrix with power-law column scales (``j^-1/2``, a decaying spectrum like a
momentum's). Shapes outside ROOT's table use Muon's coefficients, so ``root`` equals ``muon``
there.

    python benchmarks/root_precision.py [--max-side 8192] [--all-table-shapes] [--quick]
"""

from __future__ import annotations

import argparse

import torch

from orthotorch.bench.reference import KERNEL_SHAPES
from orthotorch.linalg import (
    MUON_COEFFICIENTS,
    ROOT_COEFFICIENTS,
    available_methods,
    get_method,
    newton_schulz,
    orthogonality_error,
    orthogonalize,
)


def inputs(shape: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    gaussian = torch.randn(m, n, generator=gen)
    decay = torch.arange(1, n + 1, dtype=torch.float32) ** -0.5
    return {"gaussian": gaussian, "decaying": torch.randn(m, n, generator=gen) * decay}


def published_root(G: torch.Tensor) -> torch.Tensor:
    """ROOT's table exactly as published (no guard), Muon's coefficients elsewhere."""
    key = (min(G.shape), max(G.shape))
    coefficients = ROOT_COEFFICIENTS.get(key, MUON_COEFFICIENTS)
    X = G.bfloat16()
    X = X.T if X.shape[0] > X.shape[1] else X
    return newton_schulz(X, [coefficients] * 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-side", type=int, default=8192, help="skip shapes with a larger side")
    ap.add_argument("--all-table-shapes", action="store_true", help="add (2048, 3072), ...")
    ap.add_argument("--quick", action="store_true", help="smoke test: the smallest shape only")
    args = ap.parse_args()
    methods = [m for m in available_methods() if get_method(m).schedule is not None]
    shapes = list(KERNEL_SHAPES)
    if args.all_table_shapes:
        shapes += [s for s in ROOT_COEFFICIENTS if s not in shapes]
    shapes = [s for s in shapes if max(s) <= args.max_side]
    if args.quick:
        shapes = [min(shapes, key=lambda s: s[0] * s[1])]
    columns = [*methods, "root (published, unguarded)"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; bf16, 5 steps")
    print("| shape | input | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for shape in shapes:
        table = "in ROOT's table" if (min(shape), max(shape)) in ROOT_COEFFICIENTS else "fallback"
        for name, G in inputs(shape).items():
            errs = [orthogonality_error(orthogonalize(G, m)).item() for m in methods]
            errs.append(orthogonality_error(published_root(G)).item())
            cells = " | ".join(f"{e:.4f}" for e in errs)
            print(f"| {shape[0]}x{shape[1]} ({table}) | {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
