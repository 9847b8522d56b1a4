"""Where the Gram route of Newton–Schulz must restart in bf16: the measurement behind
``linalg.newton_schulz.gram_restarts`` and ``AOL_GRAM_RESTARTS``.

For each restart pattern, the largest output singular value of the Gram route in bf16, against
the direct iteration's, over log-spaced spectra (condition numbers 1e3 and 1e6), low-rank (8)
plus 1e-2 noise and Gaussian inputs, several sizes and seeds. Without restarts rounding in
``R = X Xᵀ`` grows spurious negative eigenvalues that the quintics amplify; a good pattern keeps
the worst case at the direct iteration's.

    python benchmarks/gram_restarts.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib

import torch

ns = importlib.import_module("orthotorch.linalg.newton_schulz")  # the module, not the function

PATTERNS = {
    "polar_express": [(), (1,), (2,), (3,), (2, 4), (1, 3)],
    "aol": [(1,), (2,), (3,), (1, 3), (1, 2)],
}


def inputs(kind: str, count: int, m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(count, m, n, generator=gen, dtype=torch.float64)
    if kind == "lowrank+noise":
        low = torch.randn(count, m, 8, generator=gen, dtype=torch.float64)
        low = low @ torch.randn(count, 8, n, generator=gen, dtype=torch.float64)
        return low + 0.01 * torch.randn(count, m, n, generator=gen, dtype=torch.float64)
    cond = float(kind.removeprefix("cond"))
    U, _ = torch.linalg.qr(torch.randn(count, m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(count, n, m, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), m, dtype=torch.float64)
    return (U * s) @ V.mT


def run(method: str, X: torch.Tensor, restarts: tuple[int, ...] | None) -> torch.Tensor:
    """bf16 output of ``method`` on normalised ``X``; ``restarts=None``: the direct iteration."""
    if method == "polar_express":
        table = ns.POLAR_EXPRESS_COEFFICIENTS
        if restarts is None:
            return ns.iterate_quintic(X, table)
        return ns.iterate_gram_quintic(X, table, restarts)
    table = ns.AOL_COEFFICIENTS
    if restarts is None:
        return ns.iterate_aol(X, table)
    return ns.iterate_aol_gram(X, table, restarts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small size, one seed")
    args = ap.parse_args()
    sizes = [(64, 256)] if args.quick else [(64, 256), (128, 512), (256, 1024), (512, 2048)]
    seeds = [0] if args.quick else [0, 1]
    kinds = ["gaussian", "cond1e3", "cond1e6", "lowrank+noise"]
    for method, patterns in PATTERNS.items():
        scale = 1.02 if method == "polar_express" else 1.0
        worst: dict[str, float] = {}
        for m, n in sizes:
            for kind in kinds:
                for seed in seeds:
                    G = inputs(kind, 4, m, n, seed)
                    norm = torch.linalg.matrix_norm(G, keepdim=True)
                    X = (G / (norm * scale + 1e-6)).bfloat16()
                    for restarts in [None, *patterns]:
                        label = "direct" if restarts is None else f"restarts {restarts}"
                        top = torch.linalg.svdvals(run(method, X, restarts).double()).max().item()
                        worst[label] = max(worst.get(label, 0.0), top)
        print(f"\n{method}: largest output singular value in bf16, worst over inputs")
        print("| route | worst |")
        print("|---|---|")
        for label, value in worst.items():
            print(f"| {label} | {value:.4g} |")


if __name__ == "__main__":
    main()
