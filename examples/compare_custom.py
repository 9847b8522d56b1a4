"""Compare optimizers on your own model and data with ``orthotorch.bench.compare``.

The model, the batches and the loss are yours; ``compare`` sweeps each optimizer's learning
rate on tuning seeds (none of the reported ones), trains the reported seeds with warmup + cosine,
and writes a table, plots and per-run files to ``--out`` (rerun the same command to resume).
Here: a small MLP on scikit-learn's digits.

    python examples/compare_custom.py            # 300 steps, 3 seeds, swept lrs (a minute or two)
    python examples/compare_custom.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from orthotorch.bench import compare

X, y = (torch.as_tensor(a) for a in load_digits(return_X_y=True))
X = X.float() / 16.0
X_train, y_train, X_val, y_val = X[:1400], y[:1400], X[1400:], y[1400:]


def make_model() -> nn.Module:  # called after torch.manual_seed(seed): same init per seed
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))  # fmt: skip


def make_batches(seed: int):  # one epoch of shuffled minibatches; compare re-makes it
    order = torch.randperm(len(X_train), generator=torch.Generator().manual_seed(seed))
    return ((X_train[i], y_train[i]) for i in order.split(64))


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def val_loss(model: nn.Module) -> float:
    return float(F.cross_entropy(model(X_val), y_val))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 steps, 2 seeds, 3-point sweep")
    parser.add_argument("--out", default="runs/compare_custom")
    parser.add_argument("--threads", type=int, default=1, help="a small MLP is fastest on 1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = compare(
        make_model, make_batches, loss_fn, evaluate=val_loss,
        optimizers=["adamw", "muon", "root"],
        steps=30 if args.quick else 300, seeds=2 if args.quick else 3,
        sweep_factors=[0.5, 1, 2] if args.quick else [0.25, 0.5, 1, 2, 4],
        out=args.out, progress=not args.quick, plots=not args.quick, name="digits-mlp",
    )  # fmt: skip
    print(result.table())
