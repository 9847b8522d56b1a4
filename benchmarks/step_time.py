"""optimizer.step() time on the reference parameter set, as ratios to torch.optim.Muon.

One process, interleaved rounds (these machines are noisy), warm-up steps excluded (the first
step of an orthotorch optimizer also measures its dispatch plans, see
``orthotorch.linalg.dispatch``), then the median and the minimum of the rest. Ratios are given
both ways: median/median and min/min. Also reports the orthogonality error of each orthogonalized
update on a reference gradient, since the speed target is "faster at equal or better
orthogonality error", and the dispatch plan chosen for each bucket.

Peers installed without touching torch (``pip install --no-deps pytorch_optimizer heavyball``)
run in the same rounds when importable: ``pytorch_optimizer.Muon`` by default, ``heavyball.Muon``
with ``--peers pytorch_optimizer,heavyball`` (eager: heavyball compiles every step function by
default, 137 s for its first step here, and its eager step is ~1 s per 512x512 matrix on this
CPU, so it is opt-in).

    python benchmarks/step_time.py [--repeats 15] [--device cpu] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import orthotorch
from orthotorch.bench.optimizers import optimizer_state_bytes
from orthotorch.bench.reference import reference_named_parameters, set_random_gradients
from orthotorch.linalg import orthogonality_error, plan_table

LR = 0.02
ADAMW_LR = 3e-3


class WithAdamW:
    """A hidden-matrix optimizer + torch.optim.AdamW on the rest: the closest equivalent of one
    orthotorch.Muon object for libraries without AdamW groups."""

    def __init__(self, hidden_opt, adamw_params):
        self.hidden_opt = hidden_opt
        self.adamw = torch.optim.AdamW(adamw_params, lr=ADAMW_LR, betas=(0.9, 0.95))

    def step(self):
        self.hidden_opt.step()
        self.adamw.step()


def _groups(hidden, adamw):
    return [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}]


# name -> (hidden, adamw, weight_decay) -> optimizer. ROOT runs with adjust_lr="original" so that
# update_error can divide out the same scale as for Muon (the scale changes no timing).
BUILDERS: dict[str, Callable] = {
    "torch.optim.AdamW": lambda h, a, wd: torch.optim.AdamW(
        [p for _, p in h + a], lr=ADAMW_LR, betas=(0.9, 0.95)
    ),
    "torch.optim.Muon": lambda h, a, wd: WithAdamW(
        torch.optim.Muon([p for _, p in h], lr=LR, weight_decay=wd), [p for _, p in a]
    ),
    "orthotorch.ROOT": lambda h, a, wd: orthotorch.ROOT(
        _groups(h, a), lr=LR, adamw_lr=ADAMW_LR, weight_decay=wd, adjust_lr="original"
    ),
    "orthotorch.AuON": lambda h, a, wd: orthotorch.AuON(
        _groups(h, a), lr=0.1, adamw_lr=ADAMW_LR, weight_decay=wd
    ),
    "orthotorch.AuON[hybrid]": lambda h, a, wd: orthotorch.AuON(
        _groups(h, a), lr=0.1, adamw_lr=ADAMW_LR, weight_decay=wd, hybrid=True
    ),
    "orthotorch.ARO": lambda h, a, wd: orthotorch.ARO(
        _groups(h, a), lr=LR, adamw_lr=ADAMW_LR, weight_decay=wd
    ),
    # The lighter-state option: bf16 momentum (stochastic rounding) on the hidden matrices and
    # a bf16 first moment in the AdamW group.
    "orthotorch.Muon(bf16 state)": lambda h, a, wd: orthotorch.Muon(
        [
            {"params": [p for _, p in h], "momentum_dtype": torch.bfloat16},
            {"params": [p for _, p in a], "algorithm": "adamw", "momentum_dtype": torch.bfloat16},
        ],
        lr=LR,
        adamw_lr=ADAMW_LR,
        weight_decay=wd,
    ),
}


def state_bytes(opt) -> int:
    if isinstance(opt, WithAdamW):
        return optimizer_state_bytes(opt.hidden_opt) + optimizer_state_bytes(opt.adamw)
    return optimizer_state_bytes(opt)


def _pytorch_optimizer_muon(h, a, wd):
    po = importlib.import_module("pytorch_optimizer")
    groups = [
        {"params": [p for _, p in h], "use_muon": True},
        {"params": [p for _, p in a], "use_muon": False},
    ]
    return po.Muon(groups, lr=LR, weight_decay=wd, adamw_lr=ADAMW_LR, adamw_wd=0.0)


def _heavyball_muon(h, a, wd):
    hb = importlib.import_module("heavyball")
    hb.utils.compile_mode = None  # eager (see the module docstring)
    return WithAdamW(hb.Muon([p for _, p in h], lr=LR, weight_decay=wd), [p for _, p in a])


PEERS: dict[str, tuple[str, Callable]] = {
    "pytorch_optimizer": ("pytorch_optimizer.Muon", _pytorch_optimizer_muon),
    "heavyball": ("heavyball.Muon", _heavyball_muon),
}

# (row, baseline, target ratio) from issues 4 and 17.
TARGETS = (
    ("orthotorch.Muon[polar_express]", "torch.optim.Muon", 0.75),
    ("orthotorch.Muon[aol]", "torch.optim.Muon", 0.75),
    ("orthotorch.ROOT", "orthotorch.Muon[polar_express]", 1.1),
    ("orthotorch.AuON", "torch.optim.AdamW", 1.3),
    ("orthotorch.AuON[hybrid]", "orthotorch.Muon[polar_express]", 0.4),
    ("orthotorch.ARO", "orthotorch.Muon[polar_express]", 1.5),
    ("pytorch_optimizer.Muon", "torch.optim.Muon", None),
    ("heavyball.Muon", "torch.optim.Muon", None),
)


def named_parameters(device: str, quick: bool):
    """The reference set, or for ``--quick`` the same layout at 1/8 of every dimension."""
    hidden, adamw = reference_named_parameters(0, device)
    if quick:

        def shrink(named):
            return [
                (n, nn.Parameter(p.detach()[tuple(slice(0, s // 8) for s in p.shape)].clone()))
                for n, p in named
            ]

        hidden, adamw = shrink(hidden), shrink(adamw)
    return hidden, adamw


def build(name: str, device: str, quick: bool, builders: dict, weight_decay: float = 0.1):
    hidden, adamw = named_parameters(device, quick)
    if name.startswith("orthotorch.Muon["):
        method = name.split("[")[1].rstrip("]")
        opt = orthotorch.Muon(
            _groups(hidden, adamw),
            lr=LR,
            adamw_lr=ADAMW_LR,
            ns_method=method,
            weight_decay=weight_decay,
        )
    else:
        opt = builders[name](hidden, adamw, weight_decay)
    return opt, [p for _, p in hidden + adamw], len(hidden)


def update_error(name: str, device: str, quick: bool, builders: dict) -> float:
    """Orthogonality error of the direction a fresh optimizer steps along for one gradient
    (weight decay off, lr and shape scale divided out), averaged over the hidden matrices."""
    orthogonal = name == "torch.optim.Muon" or name.startswith(
        ("orthotorch.Muon", "orthotorch.ROOT")
    )
    if not orthogonal:
        return float("nan")
    opt, params, n_hidden = build(name, device, quick, builders, weight_decay=0.0)
    hidden = params[:n_hidden]
    before = [p.detach().clone() for p in hidden]
    set_random_gradients(params, seed=123)
    opt.step()
    errs = [
        orthogonality_error((b - p) / (LR * max(1, p.shape[0] / p.shape[1]) ** 0.5)).item()
        for b, p in zip(before, hidden)
    ]
    return statistics.mean(errs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--methods", default="polar_express,aol,muon")
    ap.add_argument("--no-extra", action="store_true", help="skip the ROOT, AuON and ARO rows")
    ap.add_argument("--peers", default="pytorch_optimizer", help="comma list, or 'none'")
    ap.add_argument("--quick", action="store_true", help="1/8-size set, 2 rounds (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.threads = 2, 1, args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    builders = dict(BUILDERS)
    names = ["torch.optim.AdamW", "torch.optim.Muon"] + [
        f"orthotorch.Muon[{m}]" for m in args.methods.split(",")
    ]
    if not args.no_extra:
        names += [n for n in BUILDERS if n.startswith("orthotorch.")]
    skipped = []
    for peer in [] if args.peers == "none" else args.peers.split(","):
        row, builder = PEERS[peer]
        try:
            importlib.import_module(peer)
        except ImportError as err:
            skipped.append(f"{row}: not importable ({err}); pip install --no-deps {peer}")
            continue
        builders[row] = builder
        names.append(row)
    built = {}
    for n in names:
        try:
            built[n] = build(n, args.device, args.quick, builders)
        except Exception as err:  # a peer that does not run on this torch is reported, not fatal
            if n.startswith(("orthotorch.", "torch.")):
                raise
            skipped.append(f"{n}: {type(err).__name__}: {err}")
    names = [n for n in names if n in built]
    times: dict[str, list[float]] = {n: [] for n in names}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for r in range(args.warmup + args.repeats):
        for n in names:  # interleaved: drift in machine speed hits every optimizer alike
            opt, params, _ = built[n]
            set_random_gradients(params, seed=r)
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            if r >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    ref_med = statistics.median(times["torch.optim.Muon"])
    ref_min = min(times["torch.optim.Muon"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"{args.repeats} rounds{' (quick: 1/8-size set)' if args.quick else ''}"
    )
    print(
        "| optimizer | step ms (median) | step ms (min) | ratio to torch.optim.Muon "
        "(median / min) | update orthogonality error | state MiB (vs AdamW) |"
    )
    print("|---|---|---|---|---|---|")
    adamw_state = state_bytes(built["torch.optim.AdamW"][0])
    for n in names:
        med, low = statistics.median(times[n]), min(times[n])
        err = update_error(n, args.device, args.quick, builders)
        err_s = "-" if err != err else f"{err:.3f}"
        state = state_bytes(built[n][0])
        print(
            f"| {n} | {med * 1e3:.1f} | {low * 1e3:.1f} | "
            f"{med / ref_med:.2f}x / {low / ref_min:.2f}x | {err_s} | "
            f"{state / 2**20:.1f} ({state / adamw_state:.2f}x) |"
        )
    for row, base, target in TARGETS:
        if row in times and base in times:
            med = statistics.median(times[row]) / statistics.median(times[base])
            low = min(times[row]) / min(times[base])
            verdict = (
                ""
                if target is None
                else (f" (target <= {target}x: {'ok' if max(med, low) <= target else 'MISSED'})")
            )
            print(f"{row} / {base}: median {med:.2f}x, min {low:.2f}x{verdict}")
    light = built.get("orthotorch.Muon(bf16 state)")
    if light is not None:
        ratio = state_bytes(light[0]) / adamw_state
        verdict = "ok" if ratio <= 0.5 else "MISSED"
        print(
            f"orthotorch.Muon(bf16 state) state / AdamW state: {ratio:.2f}x "
            f"(target <= 0.5x: {verdict})"
        )
    for line in skipped:
        print(f"skipped {line}")
    table = plan_table()
    if table:
        print("\ndispatch plans (orthotorch.linalg.plan_table()):")
        print("| kernel | stack | dtype | threads | plan | ms | default ms | speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for row in table:
            print(
                f"| {row['kernel']} | {row['count']}x{row['rows']}x{row['cols']} | {row['dtype']} "
                f"| {row['threads']} | {row['plan']} | {row['ms']:.1f} | {row['default_ms']:.1f} "
                f"| {row['speedup']:.2f}x |"
            )


if __name__ == "__main__":
    main()
