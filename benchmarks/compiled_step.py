"""``torch.compile(optimizer.step)`` against the eager step, for every orthotorch optimizer.

For each optimizer: graph breaks of the compiled step (``torch._dynamo.explain``), graphs
compiled per step over the timed steps (0 after the first two = no recompiles), and the step
time of the eager and compiled steps measured interleaved in one process (median and min of
``--repeats`` steps after warm-up), with the ratio compiled / eager (below 1: compiled is faster).

Model: an embedding, ``--layers`` hidden ``Linear`` layers of width ``--width`` with LayerNorm,
and a head (hidden matrices orthogonalized, the rest on AdamW), random gradients, one thread::

    python benchmarks/compiled_step.py --quick          # AuON only, seconds to a minute
    python benchmarks/compiled_step.py --quick --only Muon,AuON,ROOT
    python benchmarks/compiled_step.py --width 512 --layers 4 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo as dynamo
from torch import nn

import orthotorch

OPTIMIZERS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "Muon": (orthotorch.Muon, {"lr": 0.02}),
    "ROOT": (orthotorch.ROOT, {"lr": 0.02}),
    "AuON": (orthotorch.AuON, {"lr": 0.02}),
    "HybridAuON": (orthotorch.AuON, {"lr": 0.02, "hybrid": True}),
    "ARO": (orthotorch.ARO, {"lr": 1e-3}),
    "NorMuon": (orthotorch.NorMuon, {"lr": 0.02}),
    "DCTAdamW": (orthotorch.DCTAdamW, {"lr": 1e-3, "rank": 0.25}),
    "GaLoreAdamW": (orthotorch.GaLoreAdamW, {"lr": 1e-3, "rank": 0.25}),
}
for _name in ("NorMuon", "Dion"):  # newer optimizers, where this version has them
    if hasattr(orthotorch, _name):
        OPTIMIZERS[_name] = (getattr(orthotorch, _name), {"lr": 0.02})


def build(width: int, layers: int, vocab: int) -> nn.Module:
    blocks: list[nn.Module] = [nn.Embedding(vocab, width)]
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.LayerNorm(width)]
    blocks.append(nn.Linear(width, vocab))
    return nn.Sequential(*blocks)


def fill_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cls, kwargs = OPTIMIZERS[name]
    torch.manual_seed(0)
    eager_model, compiled_model = (build(args.width, args.layers, args.vocab) for _ in range(2))
    compiled_model.load_state_dict(eager_model.state_dict())
    eager = cls(orthotorch.param_groups(eager_model), **kwargs)
    compiled = cls(orthotorch.param_groups(compiled_model), **kwargs)
    dynamo.reset()
    fill_grads(compiled_model, 0)
    explained = dynamo.explain(compiled.step)()
    dynamo.reset()
    compiled_model.load_state_dict(eager_model.state_dict())
    compiled.state.clear()
    step = torch.compile(compiled.step)
    graphs_per_step, t_eager, t_compiled = [], [], []
    for i in range(args.warmup + args.repeats):
        fill_grads(eager_model, i)
        fill_grads(compiled_model, i)
        start = time.perf_counter()
        eager.step()
        t_eager.append(time.perf_counter() - start)
        before = dynamo.utils.counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        step()
        t_compiled.append(time.perf_counter() - start)
        graphs_per_step.append(dynamo.utils.counters["stats"]["unique_graphs"] - before)
    t_eager, t_compiled = t_eager[args.warmup :], t_compiled[args.warmup :]
    drift = max(
        float((a - b).detach().abs().max())
        for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True)
    )
    return {
        "name": name,
        "breaks": explained.graph_break_count,
        "graphs": graphs_per_step,
        "eager_ms": (statistics.median(t_eager) * 1e3, min(t_eager) * 1e3),
        "compiled_ms": (statistics.median(t_compiled) * 1e3, min(t_compiled) * 1e3),
        "max_param_diff": drift,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated optimizer names")
    parser.add_argument(
        "--quick", action="store_true", help="width 64, 2 layers, 3 repeats, AuON only"
    )
    args = parser.parse_args()
    if args.quick:
        # Inductor takes about a minute per optimizer on a loaded 2-core CPU: one optimizer.
        args.width, args.layers, args.vocab, args.repeats, args.warmup = 64, 2, 256, 3, 2
        args.only = args.only or "AuON"
    torch.set_num_threads(args.threads)
    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    names = [n for n in args.only.split(",") if n] or list(OPTIMIZERS)
    print(
        f"width {args.width}, {args.layers} layers, vocab {args.vocab}, {args.threads} thread(s), "
        f"{args.repeats} timed steps after {args.warmup}, interleaved"
    )
    header = "optimizer | breaks | new graphs per step | eager ms (median/min) | "
    print(header + "compiled ms (median/min) | compiled/eager (median) | max |param diff|")
    for name in names:
        try:
            r = measure(name, args)
        except Exception as err:  # report and go on: one optimizer must not hide the others
            print(f"{name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            continue
        ratio = r["compiled_ms"][0] / r["eager_ms"][0]
        print(
            f"{name} | {r['breaks']} | {r['graphs']} | {r['eager_ms'][0]:.2f} / "
            f"{r['eager_ms'][1]:.2f} | {r['compiled_ms'][0]:.2f} / {r['compiled_ms'][1]:.2f} | "
            f"{ratio:.2f}x | {r['max_param_diff']:.1e}"
        )


if __name__ == "__main__":
    main()
