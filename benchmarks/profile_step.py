"""Where one optimizer step spends its time: torch.profiler's top operators on the reference set.

For the rows of ``step_time.py`` that stand out on a device (ARO and the bf16-state Muon on the
H200, ``benchmarks/gpu_results``), this prints the operators by self time (device time on CUDA,
CPU time elsewhere) over a few steps after warm-up, so a fix can aim at the real cost.

    python benchmarks/profile_step.py [--device cuda] [--optimizers aro,muon-bf16-state] [--quick]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import orthotorch
from orthotorch.bench.reference import reference_named_parameters, set_random_gradients


def _groups(device: str, momentum_dtype: torch.dtype | None = None) -> tuple[list, list]:
    hidden, adamw = reference_named_parameters(0, device)
    extra = {} if momentum_dtype is None else {"momentum_dtype": momentum_dtype}
    groups = [
        {"params": [p for _, p in hidden], **extra},
        {"params": [p for _, p in adamw], "algorithm": "adamw", **extra},
    ]
    return groups, [p for _, p in hidden + adamw]


BUILDERS = {
    "muon": lambda g: orthotorch.Muon(g, lr=0.02, adamw_lr=3e-3),
    "muon-bf16-state": lambda g: orthotorch.Muon(g, lr=0.02, adamw_lr=3e-3),
    "aro": lambda g: orthotorch.ARO(g, lr=0.02, adamw_lr=3e-3),
    "root": lambda g: orthotorch.ROOT(g, lr=0.02, adamw_lr=3e-3),
    "auon-hybrid": lambda g: orthotorch.AuON(g, lr=0.1, adamw_lr=3e-3, hybrid=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--optimizers", default="aro,muon-bf16-state")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="Muon only, one step (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.optimizers, args.steps, args.top = "muon", 1, 5
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name in args.optimizers.split(","):
        if name not in BUILDERS:
            raise SystemExit(f"--optimizers: unknown {name!r}; valid: {', '.join(BUILDERS)}")
        dtype = torch.bfloat16 if name.endswith("bf16-state") else None
        groups, params = _groups(args.device, dtype)
        opt = BUILDERS[name](groups)
        for step in range(3):  # warm-up: the first step also measures dispatch plans
            set_random_gradients(params, seed=step)
            opt.step()
        with profile(activities=activities) as prof:
            for step in range(args.steps):
                set_random_gradients(params, seed=10 + step)
                opt.step()
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(f"\n== {name} on {args.device}, {args.steps} steps, by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=args.top))


if __name__ == "__main__":
    main()
