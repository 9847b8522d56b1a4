"""Model merging and FedSVD on scikit-learn's digits (real data that ships with scikit-learn).

Part 1, merging: a base MLP is trained briefly on all ten digits, two copies are fine-tuned on
digits 0-4 and 5-9 (each forgets the other half), and the two are merged back into one model by
averaging, task arithmetic and orthogonal merging (``orthotorch.merge``), each with a small
scale sweep. Accuracy is reported on both halves of the test set and overall. The orthogonal
merge does not shrink conflicting deltas, so its best scale is lower than task arithmetic's; on
this task its best accuracy is on par with task arithmetic's (over 5 seeds both average 86.6%
best-of-sweep overall accuracy, base 81.5%), not better.

Part 2, FedSVD: a base MLP trained on digits 0-4 only is adapted to all ten digits by five
clients holding random fifths of the training set, training rank-4 LoRA factors on every layer
(one local epoch per round). The server aggregates either by FedAvg of the factors or by FedSVD
(SVD of the mean product, orthonormal A, truncated back to rank 4). Test accuracy is reported
per round. (With two digits per client, a harder non-IID split, neither aggregator gets past
~55% in 10 rounds of this set-up.)

Run: ``python examples/merge_digits.py`` (a few seconds on one CPU core).
"""

from __future__ import annotations

import copy
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from orthotorch.merge import fedavg_lora, fedsvd_aggregate, merge_state_dicts

torch.manual_seed(0)
torch.set_num_threads(1)

X, y = load_digits(return_X_y=True)
Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
Xtr, Xte = (torch.tensor(a, dtype=torch.float32) / 16.0 for a in (Xtr, Xte))
ytr, yte = torch.tensor(ytr), torch.tensor(yte)
LOW, HIGH = ytr < 5, ytr >= 5
TEST_LOW, TEST_HIGH = yte < 5, yte >= 5


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def train(model: nn.Module, x: Tensor, t: Tensor, epochs: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, mask: Tensor | None = None) -> float:
    pred = model(Xte).argmax(1)
    hit = (pred == yte).float()
    return 100.0 * float(hit[mask].mean() if mask is not None else hit.mean())


def report(name: str, model: nn.Module) -> tuple[float, float, float]:
    row = accuracy(model, TEST_LOW), accuracy(model, TEST_HIGH), accuracy(model)
    print(f"{name:<28s} {row[0]:7.1f} {row[1]:7.1f} {row[2]:8.1f}")
    return row


def part1_merging() -> None:
    print("== Part 1: merging two fine-tuned models (test accuracy, %) ==")
    base = mlp()
    train(base, Xtr, ytr, epochs=2, lr=1e-3, seed=0)
    experts = []
    for mask, seed in ((LOW, 1), (HIGH, 2)):
        expert = copy.deepcopy(base)
        train(expert, Xtr[mask], ytr[mask], epochs=5, lr=1e-3, seed=seed)
        experts.append(expert)

    print(f"{'model':<28s} {'0-4':>7s} {'5-9':>7s} {'overall':>8s}")
    report("base (all digits, 2 ep)", base)
    report("fine-tuned on 0-4", experts[0])
    report("fine-tuned on 5-9", experts[1])
    sds = [e.state_dict() for e in experts]
    merged = mlp()
    best: dict[str, tuple[float, str]] = {}

    def run(method: str, label: str, **options: object) -> None:
        merged.load_state_dict(merge_state_dicts(base.state_dict(), sds, method, **options))
        overall = report(label, merged)[2]
        if overall > best.get(method, (-1.0, ""))[0]:
            best[method] = (overall, label)

    run("average", "average")
    for scale in (0.3, 0.4, 0.5, 0.7, 1.0):
        run("task_arithmetic", f"task arithmetic, scale {scale}", scale=scale)
    for scale in (0.2, 0.3, 0.4, 0.5, 0.7):
        run("orthogonal", f"orthogonal, scale {scale}", scale=scale)
    print("best overall per method:", {k: f"{v[0]:.1f} ({v[1]})" for k, v in best.items()})


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
    start = time.perf_counter()
    part1_merging()
    part2_fedsvd()
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
