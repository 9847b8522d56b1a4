"""Model merging and FedSVD on scikit-learn's digits (real data that ships with scikit-learn).

Part 1, merging: a base MLP is trained briefly on all ten digits, two copies are fine-tuned on
digits 0-4 and 5-9 (each forgets the other half), and the two are merged back into one model by
every registered merge at its default settings (``merge_state_dicts(base, [a, b], method)``), then
by task arithmetic and orthogonal merging over a small scale sweep (best of the sweep on the test
set: an upper bound, not a method). Accuracy is reported on both halves of the test set and
overall, per seed and as mean +- standard deviation over the seeds. ``--bn`` uses an MLP with
batch norm and adds each merge followed by ``recompute_batchnorm_statistics`` on 8 training
batches (the REPAIR-style reset).

Part 2, FedSVD: a base MLP trained on digits 0-4 only is adapted to all ten digits by five
clients holding random fifths of the training set, training rank-4 LoRA factors on every layer
(one local epoch per round). The server aggregates either by FedAvg of the factors or by FedSVD
(SVD of the mean product, orthonormal A, truncated back to rank 4). Test accuracy is reported
per round. (With two digits per client, a harder non-IID split, neither aggregator gets past
~55% in 10 rounds of this set-up.)

Run: ``python examples/merge_digits.py [--seeds 5] [--bn] [--quick]`` (``--quick``: one seed,
short training, a few seconds).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from orthotorch.merge import (
    fedavg_lora,
    fedsvd_aggregate,
    merge_state_dicts,
    recompute_batchnorm_statistics,
)

torch.manual_seed(0)
torch.set_num_threads(1)

X, y = load_digits(return_X_y=True)
Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
Xtr, Xte = (torch.tensor(a, dtype=torch.float32) / 16.0 for a in (Xtr, Xte))
ytr, yte = torch.tensor(ytr), torch.tensor(yte)
LOW, HIGH = ytr < 5, ytr >= 5
TEST_LOW, TEST_HIGH = yte < 5, yte >= 5
DEFAULT_METHODS = ("average", "task_arithmetic", "orthogonal", "orthomerge", "ties")


def mlp(bn: bool = False) -> nn.Sequential:
    if bn:
        return nn.Sequential(
            nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def train(model: nn.Module, x: Tensor, t: Tensor, epochs: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, mask: Tensor | None = None) -> float:
    model.eval()
    pred = model(Xte).argmax(1)
    hit = (pred == yte).float()
    return 100.0 * float(hit[mask].mean() if mask is not None else hit.mean())


def scores(model: nn.Module) -> tuple[float, float, float]:
    return accuracy(model, TEST_LOW), accuracy(model, TEST_HIGH), accuracy(model)


def merge_experiment(seed: int, *, bn: bool = False, epochs: tuple[int, int] = (2, 5)) -> dict:
    """One seed of part 1: ``{row label: (acc 0-4, acc 5-9, acc overall)}``."""
    torch.manual_seed(seed)
    base = mlp(bn)
    train(base, Xtr, ytr, epochs=epochs[0], lr=1e-3, seed=10 * seed)
    experts = []
    for mask, offset in ((LOW, 1), (HIGH, 2)):
        expert = copy.deepcopy(base)
        train(expert, Xtr[mask], ytr[mask], epochs=epochs[1], lr=1e-3, seed=10 * seed + offset)
        experts.append(expert)
    rows = {"base": scores(base), "fine-tuned 0-4": scores(experts[0])}
    rows["fine-tuned 5-9"] = scores(experts[1])
    sds = [e.state_dict() for e in experts]
    merged = mlp(bn)
    gen = torch.Generator().manual_seed(seed)
    reset_batches = [Xtr[torch.randint(len(Xtr), (64,), generator=gen)] for _ in range(8)]

    def run(method: str, **options: object) -> tuple[float, float, float]:
        merged.load_state_dict(merge_state_dicts(base.state_dict(), sds, method, **options))
        return scores(merged)

    for method in DEFAULT_METHODS:
        rows[f"{method} (default)"] = run(method)
        if bn:
            recompute_batchnorm_statistics(merged, reset_batches)
            rows[f"{method} (default) + BN reset"] = scores(merged)
    for method, sweep in (("task_arithmetic", (0.3, 0.4, 0.5, 0.7, 1.0)),
                          ("orthogonal", (0.2, 0.3, 0.4, 0.5, 0.7, 1.0))):  # fmt: skip
        for scale in sweep:
            rows[f"{method}, scale {scale}"] = run(method, scale=scale)
        best = max((k for k in rows if k.startswith(f"{method}, scale")), key=lambda k: rows[k][2])
        rows[f"{method}, best of sweep"] = rows[best]
    return rows


def part1_merging(seeds: list[int], bn: bool, quick: bool) -> None:
    print(f"== Part 1: merging two fine-tuned models, seeds {seeds} (test accuracy, %) ==")
    epochs = (1, 2) if quick else (2, 5)
    per_seed = [merge_experiment(s, bn=bn, epochs=epochs) for s in seeds]
    print(f"{'model':<40s} {'0-4':>12s} {'5-9':>12s} {'overall':>12s}")
    for label in per_seed[0]:
        cells = []
        for column in range(3):
            values = [rows[label][column] for rows in per_seed]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):6.1f} ± {spread:3.1f}")
        print(f"{label:<40s} {cells[0]:>12s} {cells[1]:>12s} {cells[2]:>12s}")


# ----------------------------------------------------------------------------- part 2: FedSVD


def lora_forward(base: nn.Sequential, loras: list[tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
    linears = [m for m in base if isinstance(m, nn.Linear)]
    for k, (layer, (B, A)) in enumerate(zip(linears, loras)):
        x = nn.functional.linear(x, layer.weight + B @ A, layer.bias)
        if k < len(linears) - 1:
            x = torch.relu(x)
    return x


def local_train(
    base: nn.Sequential, start: list[tuple[Tensor, Tensor]], x: Tensor, t: Tensor, seed: int
) -> list[tuple[Tensor, Tensor]]:
    loras = [(B.clone().requires_grad_(), A.clone().requires_grad_()) for B, A in start]
    opt = torch.optim.Adam([p for pair in loras for p in pair], lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(1):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            loss = nn.functional.cross_entropy(lora_forward(base, loras, x[idx]), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return [(B.detach(), A.detach()) for B, A in loras]


def part2_fedsvd(rank: int = 4, rounds: int = 12) -> None:
    print(f"\n== Part 2: federated LoRA (rank {rank}), 5 IID clients, test accuracy % ==")
    base = mlp()
    train(base, Xtr[LOW], ytr[LOW], epochs=5, lr=1e-3, seed=3)
    base.requires_grad_(False)
    print(f"base trained on 0-4 only: overall {accuracy(base):.1f}")
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(7))
    clients = list(perm.chunk(5))
    sizes = [len(c) for c in clients]
    gen = torch.Generator().manual_seed(4)
    # The usual LoRA start: B = 0, A random, so the first round starts at the base model.
    init = [
        (torch.zeros(m.out_features, rank), torch.randn(rank, m.in_features, generator=gen) * 0.1)
        for m in base
        if isinstance(m, nn.Linear)
    ]
    state = {"fedavg": init, "fedsvd": init}
    print(f"{'round':>5s} {'fedavg':>8s} {'fedsvd':>8s}")
    for r in range(rounds):
        row = []
        for name in ("fedavg", "fedsvd"):
            updates = [
                local_train(base, state[name], Xtr[c], ytr[c], seed=100 * r + i)
                for i, c in enumerate(clients)
            ]
            per_layer = [
                {f"layer{k}": pair for k, pair in enumerate(u)} for u in updates
            ]  # the mapping form: one dict of (B, A) per client
            if name == "fedavg":
                agg = fedavg_lora(per_layer, weights=sizes)
            else:
                agg = fedsvd_aggregate(per_layer, rank=rank, weights=sizes)
            state[name] = [agg[f"layer{k}"] for k in range(len(init))]
            with torch.no_grad():
                pred = lora_forward(base, state[name], Xte).argmax(1)
            row.append(100.0 * float((pred == yte).float().mean()))
        print(f"{r + 1:5d} {row[0]:8.1f} {row[1]:8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds of part 1 (default 5)")
    parser.add_argument("--bn", action="store_true", help="MLP with batch norm + BN reset rows")
    parser.add_argument("--part", choices=["all", "merge", "fedsvd"], default="all")
    parser.add_argument("--quick", action="store_true", help="one seed, short runs (seconds)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.part in ("all", "merge"):
        part1_merging(list(range(1 if args.quick else args.seeds)), args.bn, args.quick)
    if args.part in ("all", "fedsvd"):
        part2_fedsvd(rounds=2 if args.quick else 12)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
