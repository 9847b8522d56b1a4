"""DCTAdamW vs GaLoreAdamW vs AdamW: state bytes, subspace-update time, a short training run.

One process, one run, side by side, printed as ratios (these machines are noisy):

1. optimizer state bytes on the reference parameter set (shared/ALGORITHMS.md) at
   ``r = n/4`` of each matrix's smaller side; targets: DCT <= 0.3x AdamW, DCT < GaLore;
2. subspace update time on a 1024x4096 gradient (median of ``--repeats`` interleaved rounds
   after one warm-up): FFT-scored DCT selection, the dense-product DCT selection and GaLore's
   SVD; target: DCT >= 10x faster than the SVD;
3. the ``bytelm`` task of ``orthotorch compare`` (byte-level transformer): final validation
   loss of DCTAdamW and GaLoreAdamW at the same rank, lr and steps (AdamW for reference);
   target: within 2%.

    python benchmarks/lowrank.py [--repeats 5] [--steps 200] [--skip-train] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import orthotorch
from orthotorch.bench.reference import reference_named_parameters, set_random_gradients
from orthotorch.functional.lowrank import DCT_FINDER, SVD_FINDER, resolve_rank
from orthotorch.linalg import dct_basis, select_columns

# ALGORITHMS.md: parameters with a dimension >= 32000 (and 1-D ones) go to AdamW. The reference
# embedding and head (8192 x 512) are below that, so the low-rank group takes them too.
ADAMW_MIN_DIM = 32000


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )


def build(name: str, rank: float, embeddings_lowrank: bool) -> tuple[torch.optim.Optimizer, list]:
    hidden, adamw = reference_named_parameters(0)
    params = [p for _, p in hidden + adamw]
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-3), params
    lowrank = list(hidden)
    rest = []
    for n, p in adamw:
        big = p.ndim == 2 and max(p.shape) < ADAMW_MIN_DIM and embeddings_lowrank
        (lowrank if big else rest).append((n, p))
    cls = orthotorch.DCTAdamW if name == "DCTAdamW" else orthotorch.GaLoreAdamW
    groups = [{"params": lowrank}, {"params": rest, "algorithm": "adamw"}]
    return cls(groups, lr=1e-3, rank=rank), params


def report_state_bytes(rank: float) -> None:
    print(f"== optimizer state bytes, reference parameter set, rank = {rank} x smaller side")
    for embeddings_lowrank in (True, False):
        sizes = {}
        for name in ("AdamW", "GaLoreAdamW", "DCTAdamW"):
            opt, params = build(name, rank, embeddings_lowrank)
            set_random_gradients(params, seed=1)
            opt.step()
            sizes[name] = state_bytes(opt)
            del opt, params
        where = "low-rank group" if embeddings_lowrank else "AdamW group"
        print(f"-- embedding + head (8192x512) in the {where}")
        for name, b in sizes.items():
            print(f"   {name:12s} {b / 2**20:8.1f} MiB   {b / sizes['AdamW']:.3f}x AdamW")
        print(f"   DCT / GaLore = {sizes['DCTAdamW'] / sizes['GaLoreAdamW']:.3f}")
    basis = dct_basis(512)
    print(
        f"   (+ one shared 512x512 DCT basis for all layers: "
        f"{basis.numel() * basis.element_size() / 2**20:.1f} MiB, not per-parameter state)"
    )


def report_subspace_time(repeats: int, shape: tuple[int, int] = (1024, 4096)) -> None:
    rank = resolve_rank(0.25, shape)
    print(f"\n== subspace update, {shape[0]}x{shape[1]} gradient, rank {rank}, "
          f"median of {repeats} (threads: {torch.get_num_threads()})")  # fmt: skip
    G = torch.randn(shape)
    X = G if shape[0] <= shape[1] else G.mT
    k = X.shape[0]
    Q = dct_basis(k)
    candidates = {
        "DCT (FFT scores) + top-k": lambda: DCT_FINDER.find(X, rank, {}),
        "DCT (dense G Q) + top-k": lambda: select_columns(X.mT, Q, rank)[1],
        "SVD (GaLore)": lambda: SVD_FINDER.find(X, rank, {}),
    }
    fast = DCT_FINDER.find(X, rank, {})
    dense = select_columns(X.mT, Q, rank)[1]
    print(f"   FFT and dense selections agree: {torch.equal(fast, dense)}")
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for f in candidates.values():  # warm-up
        f()
    for _ in range(repeats):
        for name, f in candidates.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    svd = statistics.median(times["SVD (GaLore)"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"   {name:26s} {t * 1e3:9.1f} ms   SVD / this = {svd / t:6.1f}x")


def report_training(
    steps: int, lr: float, adamw_lr: float, update_every: int, seed: int, task_name: str = "bytelm"
) -> None:
    from orthotorch.bench.tasks import get_task

    task = get_task(task_name)
    print(f"\n== {task_name} ({task.description}), {steps} steps, seed {seed}")
    results = {}
    for name in ("AdamW", "GaLoreAdamW", "DCTAdamW"):
        setup = task.setup(seed, torch.device("cpu"))
        model = setup.model
        if name == "AdamW":
            opt = torch.optim.AdamW(model.parameters(), lr=adamw_lr, betas=(0.9, 0.95),
                                    weight_decay=0.0)  # fmt: skip
        else:
            cls = getattr(orthotorch, name)
            opt = cls(orthotorch.param_groups(model), lr=lr, rank=0.25,
                      update_every=update_every, adamw_lr=adamw_lr)  # fmt: skip
        start = time.perf_counter()
        model.train()
        for _ in range(steps):
            loss = setup.loss(model, next(setup.batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        elapsed = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            metrics = setup.evaluate(model)
            # bytelm reports "val_loss", digits (the --quick task) "test_loss".
            results[name] = metrics.get("val_loss", metrics.get("test_loss"))
        print(f"   {name:12s} val loss {results[name]:.4f}   train loss {loss.item():.4f}   "
              f"{elapsed:5.1f} s")  # fmt: skip
    ratio = results["DCTAdamW"] / results["GaLoreAdamW"]
    print(f"   DCT / GaLore val loss = {ratio:.4f} ({(ratio - 1) * 100:+.2f}%; target within 2%)")
    print(f"   (low-rank: lr={lr}, rank=0.25, update_every={update_every}, adamw_lr={adamw_lr}; "
          f"AdamW: lr={adamw_lr})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--adamw-lr", type=float, default=3e-3)
    ap.add_argument("--update-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--only-train", action="store_true")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: subspace timing on 64x256, 2 training steps on digits, no state-bytes "
        "table (its GaLore SVDs of the reference set take most of a minute)",
    )
    args = ap.parse_args()
    if args.quick:
        report_subspace_time(1, shape=(64, 256))
        report_training(2, args.lr, args.adamw_lr, args.update_every, args.seed, "digits")
        return
    if not args.only_train:
        report_state_bytes(args.rank)
        report_subspace_time(args.repeats)
    if not args.skip_train:
        report_training(args.steps, args.lr, args.adamw_lr, args.update_every, args.seed)


if __name__ == "__main__":
    main()
