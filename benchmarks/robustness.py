"""Final loss of AdamW, Muon, ROOT and AuON, clean vs with injected gradient outliers.

Task: scikit-learn's digits (1797 8x8 images, 10 classes), a small MLP (64-128-128-10),
full-batch training on a fixed 1,400-image split; the headline is the loss on the other 397
(every optimizer drives the train loss to ~0 on this small set, clean or not). Corruption:
every step, a fixed random 0.1% of the entries of every gradient (seeded) is multiplied by
1000 before the optimizer sees it. Each optimizer uses its own usual learning rate (not tuned
here beyond a sanity check), the same for clean and corrupted runs; ROOT is also run with its
outlier clip switched off. (Its other mechanism, the per-shape coefficients, is inactive here:
no digits-MLP shape is in ROOT's table, so ns_method="muon" would give the same numbers.)

    python benchmarks/robustness.py [--steps 200] [--seeds 0,1] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import orthotorch

OPTIMIZERS = {
    "AdamW": lambda g: torch.optim.AdamW(
        [p for group in g for p in group["params"]], lr=3e-3, weight_decay=0.1
    ),
    "Muon": lambda g: orthotorch.Muon(g, lr=0.02, adamw_lr=3e-3),
    "ROOT": lambda g: orthotorch.ROOT(g, lr=3e-3, adamw_lr=3e-3),
    "ROOT (no clip)": lambda g: orthotorch.ROOT(g, lr=3e-3, adamw_lr=3e-3, outlier_quantile=None),
    "AuON": lambda g: orthotorch.AuON(g, lr=0.1, adamw_lr=3e-3),
    "Hybrid-AuON": lambda g: orthotorch.AuON(g, lr=0.05, adamw_lr=3e-3, hybrid=True),
}


def data() -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return x[train], y[train], x[test], y[test]


def run(name: str, corrupt: bool, steps: int, seed: int, split) -> tuple[float, float, float]:
    x, y, xt, yt = split
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    opt = OPTIMIZERS[name](orthotorch.param_groups(model))
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1000 + seed)
    masks = [torch.rand(p.shape, generator=gen) < 1e-3 for p in params]
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if corrupt:
            for p, mask in zip(params, masks, strict=True):
                p.grad[mask] *= 1000.0
        opt.step()
    with torch.no_grad():
        train_loss = nn.functional.cross_entropy(model(x), y).item()
        logits = model(xt)
        test_loss = nn.functional.cross_entropy(logits, yt).item()
        acc = (logits.argmax(1) == yt).float().mean().item()
    finite = all(torch.isfinite(p).all() for p in params)
    return (train_loss, test_loss, acc) if finite else (float("nan"),) * 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 steps")
    args = ap.parse_args()
    if args.quick:
        args.steps = 3
    seeds = [int(s) for s in args.seeds.split(",")]
    split = data()
    t0 = time.perf_counter()
    print(f"digits MLP, {args.steps} full-batch steps, seeds {seeds} (mean); corruption: fixed")
    print("0.1% of gradient entries x1000 every step\n")
    print(
        "| optimizer | test loss clean | test loss corrupted | ratio | train loss clean | "
        "train loss corrupted | test acc clean | test acc corrupted |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in OPTIMIZERS:
        res = {c: [run(name, c, args.steps, s, split) for s in seeds] for c in (False, True)}
        mean = {c: [statistics.mean(r[i] for r in res[c]) for i in range(3)] for c in res}
        clean, bad = mean[False], mean[True]
        ratio = bad[1] / clean[1] if clean[1] > 0 else float("nan")
        print(
            f"| {name} | {clean[1]:.4f} | {bad[1]:.4f} | {ratio:.2f}x | {clean[0]:.2e} | "
            f"{bad[0]:.2e} | {clean[2]:.3f} | {bad[2]:.3f} |",
            flush=True,
        )
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
