"""Orthogonal parametrizations: forward + backward time against torch's, side by side.

For each shape, one ``nn.Linear`` per parametrization; one timed call is
``weight = layer.weight; (weight * G).sum().backward()`` (the cost a training step pays for the
constraint). Rounds are interleaved (every map once per round, in the same order) after one
warm-up, and the median of ``--repeats`` rounds is reported with the ratio
``torch time / orthotorch time`` (> 1: orthotorch is faster). The torch maps are
:func:`torch.nn.utils.parametrizations.orthogonal` with its default (``matrix_exp`` for square
weights, ``householder`` otherwise, both with ``use_trivialization=True``), ``householder``
and ``cayley``.

A second table compares the compact WY form of the Householder product (the fast path) with
``k`` sequential rank-1 updates (the reference), forward + backward.

    python benchmarks/parametrizations.py [--repeats 15] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrizations as torch_param

from orthotorch.linalg import orthogonality_error
from orthotorch.nn.parametrizations import (
    householder_semi_orthogonal,
    householder_semi_orthogonal_reference,
    orthogonal,
)

SHAPES = [(64, 64), (256, 256), (512, 128), (128, 512), (512, 512)]

MAPS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "ours householder": lambda m: orthogonal(m, method="householder"),
    "ours cayley": lambda m: orthogonal(m, method="cayley"),
    "torch default": lambda m: torch_param.orthogonal(m),
    "torch householder": lambda m: torch_param.orthogonal(m, orthogonal_map="householder"),
    "torch cayley": lambda m: torch_param.orthogonal(m, orthogonal_map="cayley"),
}


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def forward_backward(layer: nn.Linear, G: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        (layer.weight * G).sum().backward()

    return step


def interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for step in steps.values():  # warm-up (allocations, LAPACK workspace)
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step))
    return {name: statistics.median(t) for name, t in times.items()}


def compare_with_torch(repeats: int, shapes: list[tuple[int, int]] = SHAPES) -> None:
    print("== forward + backward of the parametrized weight, median ms; ratio = torch / ours")
    for m, n in shapes:
        torch.manual_seed(0)
        G = torch.randn(m, n)
        layers = {}
        for name, register in MAPS.items():
            # Same initial weight for every map. No perturbation of the parameters: torch's
            # householder map reads column signs from int(diagonal), which must stay +-1.
            torch.manual_seed(1)
            layers[name] = register(nn.Linear(n, m, bias=False))
        med = interleaved_medians(
            {name: forward_backward(layer, G) for name, layer in layers.items()}, repeats
        )
        print(f"-- {m}x{n}")
        for name, t in med.items():
            err = float(orthogonality_error(layers[name].weight.detach()))
            line = f"   {name:18s} {t * 1e3:9.2f} ms   orthogonality error {err:.1e}"
            if name.startswith("ours"):
                vs = [
                    f"{med[other] / t:6.2f}x vs {other.removeprefix('torch ')}"
                    for other in med
                    if other.startswith("torch")
                ]
                line += "   " + ", ".join(vs)
            print(line)


def product_step(
    fn: Callable[[torch.Tensor, int], torch.Tensor], U: torch.Tensor, G: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        U.grad = None
        (fn(U, G.shape[-1]) * G).sum().backward()

    return step


def compare_wy_with_rank1(repeats: int, shapes: list[tuple[int, int]] = SHAPES) -> None:
    print("== Householder product, forward + backward: compact WY vs k rank-1 updates")
    for p, q in dict.fromkeys((max(s), min(s)) for s in shapes):
        torch.manual_seed(0)
        U = torch.randn(p, q, requires_grad=True)
        G = torch.randn(p, q)

        med = interleaved_medians(
            {
                "wy": product_step(householder_semi_orthogonal, U, G),
                "rank-1": product_step(householder_semi_orthogonal_reference, U, G),
            },
            max(3, repeats // 3),
        )
        print(
            f"   {p}x{q} (k={q}): WY {med['wy'] * 1e3:8.2f} ms, rank-1 "
            f"{med['rank-1'] * 1e3:8.2f} ms, WY {med['rank-1'] / med['wy']:.1f}x faster"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (>= 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--skip-rank1", action="store_true", help="skip the WY vs rank-1 table")
    parser.add_argument("--quick", action="store_true", help="smoke test: 32x16, 1 round")
    args = parser.parse_args()
    shapes = [(32, 16)] if args.quick else SHAPES
    if args.quick:
        args.repeats = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, CPU")
    compare_with_torch(args.repeats, shapes)
    if not args.skip_rank1:
        compare_wy_with_rank1(args.repeats, shapes)


if __name__ == "__main__":
    main()
