"""optimizer.step() time on the reference parameter set, as ratios to torch.optim.Muon.

One process, interleaved rounds (these machines are noisy), 3 warm-up steps, median of the
rest. Also reports the orthogonality error of each Muon's update on a reference gradient, since
the speed target is "faster at equal or better orthogonality error".

    python benchmarks/step_time.py [--repeats 15] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import orthotorch
from orthotorch.bench.reference import reference_named_parameters, set_random_gradients
from orthotorch.linalg import orthogonality_error


class TorchMuonWithAdamW:
    """torch.optim.Muon on the hidden matrices + torch.optim.AdamW on the rest: the closest
    torch-only equivalent of one orthotorch.Muon object."""

    def __init__(self, hidden, adamw, lr=0.02, adamw_lr=3e-3, weight_decay=0.1):
        self.muon = torch.optim.Muon([p for _, p in hidden], lr=lr, weight_decay=weight_decay)
        self.adamw = torch.optim.AdamW([p for _, p in adamw], lr=adamw_lr, betas=(0.9, 0.95))

    def step(self):
        self.muon.step()
        self.adamw.step()


LR = 0.02

# Rows beyond Muon. ROOT runs with adjust_lr="original" so that update_error can divide out
# the same scale as for Muon (the scale changes no timing).
EXTRA = {
    "orthotorch.ROOT": lambda groups, wd: orthotorch.ROOT(
        groups, lr=LR, adamw_lr=3e-3, weight_decay=wd, adjust_lr="original"
    ),
    "orthotorch.AuON": lambda groups, wd: orthotorch.AuON(
        groups, lr=0.1, adamw_lr=3e-3, weight_decay=wd
    ),
    "orthotorch.AuON[hybrid]": lambda groups, wd: orthotorch.AuON(
        groups, lr=0.1, adamw_lr=3e-3, weight_decay=wd, hybrid=True
    ),
}
# (row, baseline, target ratio) from issue 4.
TARGETS = (
    ("orthotorch.ROOT", "orthotorch.Muon[polar_express]", 1.1),
    ("orthotorch.AuON", "torch.optim.AdamW", 1.3),
    ("orthotorch.AuON[hybrid]", "orthotorch.Muon[polar_express]", 0.4),
)


def build(name: str, device: str, weight_decay: float = 0.1):
    hidden, adamw = reference_named_parameters(0, device)
    params = [p for _, p in hidden + adamw]
    if name == "torch.optim.AdamW":
        opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95))
    elif name == "torch.optim.Muon":
        opt = TorchMuonWithAdamW(hidden, adamw, lr=LR, weight_decay=weight_decay)
    elif name in EXTRA:
        groups = [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}]
        opt = EXTRA[name](groups, weight_decay)
    else:
        method = name.split("[")[1].rstrip("]")
        opt = orthotorch.Muon(
            [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}],
            lr=LR,
            adamw_lr=3e-3,
            ns_method=method,
            weight_decay=weight_decay,
        )
    return opt, params


def update_error(name: str, device: str) -> float:
    """Orthogonality error of the direction a fresh optimizer steps along for one gradient
    (weight decay off, lr and shape scale divided out), averaged over the hidden matrices."""
    if name == "torch.optim.AdamW" or name.startswith("orthotorch.AuON"):
        return float("nan")  # not orthogonal by design
    opt, params = build(name, device, weight_decay=0.0)
    hidden = params[: 4 * 6]
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
    ap.add_argument("--methods", default="polar_express,muon,jiacheng")
    ap.add_argument("--no-extra", action="store_true", help="skip the ROOT and AuON rows")
    args = ap.parse_args()
    names = ["torch.optim.AdamW", "torch.optim.Muon"] + [
        f"orthotorch.Muon[{m}]" for m in args.methods.split(",")
    ]
    if not args.no_extra:
        names += list(EXTRA)
    built = {n: build(n, args.device) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for r in range(args.warmup + args.repeats):
        for n in names:  # interleaved: drift in machine speed hits every optimizer alike
            opt, params = built[n]
            set_random_gradients(params, seed=r)
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            if r >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    ref = statistics.median(times["torch.optim.Muon"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(
        "| optimizer | step ms (median) | ratio to torch.optim.Muon | update orthogonality error |"
    )
    print("|---|---|---|---|")
    for n in names:
        med = statistics.median(times[n])
        err = update_error(n, args.device)
        err_s = "-" if err != err else f"{err:.3f}"
        print(f"| {n} | {med * 1e3:.1f} | {med / ref:.2f}x | {err_s} |")
    for row, base, target in TARGETS:
        if row in times and base in times:
            ratio = statistics.median(times[row]) / statistics.median(times[base])
            verdict = "ok" if ratio <= target else "MISSED"
            print(f"{row} / {base}: {ratio:.2f}x (target <= {target}x: {verdict})")


if __name__ == "__main__":
    main()
