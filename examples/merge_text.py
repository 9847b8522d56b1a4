"""Merging two fine-tuned byte-level transformers: Python code vs English prose (stdlib text).

The second model family of the merging comparison (the first: ``examples/merge_digits.py``).
Two corpora come from the running interpreter's standard library, nothing is downloaded:

- **code**: the Python source of the ``email``, ``json``, ``http``, ``xml`` and ``logging``
  packages;
- **prose**: the English text of the ``pydoc`` help topics (``pydoc_data.topics.topics``).

Each corpus is split 90/10 into train and held-out text by position. A small causal transformer
(``orthotorch.bench.models.ByteTransformer``) is trained on both corpora (the base), then one copy
is fine-tuned on code only and one on prose only. The two are merged back by every registered
merge at its default settings, then by task arithmetic and the orthogonal merge over a scale
sweep (best of the sweep on the held-out text: an upper bound, not a method). Reported: held-out
bits per byte on each corpus (lower is better), mean +- standard deviation over the seeds.

Run: ``python examples/merge_text.py [--seeds 5] [--quick]`` (``--quick``: one seed, a few
training steps; seconds). The default run takes a few minutes on one core.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sysconfig
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from orthotorch.bench.models import ByteTransformer
from orthotorch.merge import available_merge_methods, merge_state_dicts

CONTEXT = 64
CODE_PACKAGES = ("email", "json", "http", "xml", "logging")


def corpora() -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (train bytes, held-out bytes)}`` for the code and prose corpora."""
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    code = b"".join(
        f.read_bytes() + b"\0" for p in CODE_PACKAGES for f in sorted((root / p).rglob("*.py"))
    )
    prose = "\0".join(topics[k] for k in sorted(topics)).encode("utf-8")
    out = {}
    for name, text in (("code", code), ("prose", prose)):
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        cut = int(0.9 * len(data))
        out[name] = (data[:cut], data[cut:])
    return out


def batch(data: Tensor, size: int, gen: torch.Generator) -> Tensor:
    start = torch.randint(len(data) - CONTEXT - 1, (size,), generator=gen)
    return torch.stack([data[s : s + CONTEXT + 1] for s in start.tolist()])


def lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))


def train(model: nn.Module, sources: list[Tensor], steps: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        tokens = torch.cat([batch(s, 16 // len(sources), gen) for s in sources])
        loss = lm_loss(model, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def bits_per_byte(model: nn.Module, data: Tensor, windows: int = 128) -> float:
    """Held-out loss on ``windows`` fixed, evenly spaced windows (the same for every model)."""
    model.eval()
    starts = torch.linspace(0, len(data) - CONTEXT - 2, windows).long().tolist()
    tokens = torch.stack([data[s : s + CONTEXT + 1] for s in starts])
    return float(lm_loss(model, tokens)) / math.log(2)


def experiment(
    seed: int, data: dict, steps: tuple[int, int], windows: int = 128, quick: bool = False
) -> dict[str, tuple[float, float]]:
    """One seed: ``{row label: (code bits/byte, prose bits/byte)}``."""
    torch.manual_seed(seed)
    make = lambda: ByteTransformer(width=64, depth=2, heads=4, context=CONTEXT)  # noqa: E731
    base = make()
    train(base, [data["code"][0], data["prose"][0]], steps[0], 3e-3, seed=100 * seed)
    experts = []
    for i, name in enumerate(("code", "prose")):
        expert = copy.deepcopy(base)
        train(expert, [data[name][0]], steps[1], 1e-3, seed=100 * seed + i + 1)
        experts.append(expert)

    def score(model: nn.Module) -> tuple[float, float]:
        code, prose = (bits_per_byte(model, data[k][1], windows) for k in ("code", "prose"))
        return code, prose

    rows = {"base": score(base), "fine-tuned on code": score(experts[0])}
    rows["fine-tuned on prose"] = score(experts[1])
    sds = [e.state_dict() for e in experts]
    merged = make()
    for method in available_merge_methods():
        merged.load_state_dict(merge_state_dicts(base.state_dict(), sds, method))
        rows[f"{method} (default)"] = score(merged)
    sweeps = {"task_arithmetic": (0.3, 0.5, 0.7, 1.0), "orthogonal": (0.2, 0.3, 0.5, 0.7, 1.0)}
    if quick:
        sweeps = {"task_arithmetic": (0.5,), "orthogonal": (0.5,)}
    for method, sweep in sweeps.items():
        for scale in sweep:
            sd = merge_state_dicts(base.state_dict(), sds, method, scale=scale)
            merged.load_state_dict(sd)
            rows[f"{method}, scale {scale}"] = score(merged)
        best = min(
            (k for k in rows if k.startswith(f"{method}, scale")), key=lambda k: sum(rows[k])
        )
        rows[f"{method}, best of sweep"] = rows[best]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = corpora()
    sizes = ", ".join(f"{k} {len(v[0]) / 1e6:.2f} MB" for k, v in data.items())
    steps = (4, 2) if args.quick else (400, 200)
    seeds = list(range(1 if args.quick else args.seeds))
    print(f"train text: {sizes}; steps base/fine-tune {steps}; seeds {seeds}")
    windows = 16 if args.quick else 128
    per_seed = [experiment(s, data, steps, windows, args.quick) for s in seeds]
    print(f"{'model (held-out bits/byte)':<36s} {'code':>13s} {'prose':>13s} {'mean':>13s}")
    for label in per_seed[0]:
        cells = []
        for column in (0, 1, None):
            values = [
                r[label][column] if column is not None else sum(r[label]) / 2 for r in per_seed
            ]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):6.3f} ± {spread:5.3f}")
        print(f"{label:<36s} {cells[0]:>13s} {cells[1]:>13s} {cells[2]:>13s}")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
