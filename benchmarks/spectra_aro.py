"""Step time of SPECTRA(AdamW) vs AdamW and of ARO vs orthotorch.Muon on the reference set.

One process, interleaved rounds (these machines are noisy), 3 warm-up steps, median of the
rest, reported as ratios. Targets (issue 7): SPECTRA overhead <= 1.5x AdamW; ARO <= 1.5x Muon.

    python benchmarks/spectra_aro.py [--repeats 10] [--device cpu] [--layers 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import orthotorch
from orthotorch.bench import reference
from orthotorch.bench.reference import reference_named_parameters, set_random_gradients

BUILDERS = {
    "torch.optim.AdamW": lambda hidden, adamw: torch.optim.AdamW(
        [p for _, p in hidden + adamw], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1
    ),
    # The post-clip on every matrix the base updates: hidden matrices, embedding and head.
    "SPECTRA(AdamW)": lambda hidden, adamw: orthotorch.SPECTRA(
        torch.optim.AdamW(
            [p for _, p in hidden + adamw], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1
        ),
        clip=10.0,
    ),
    "orthotorch.Muon": lambda hidden, adamw: orthotorch.Muon(
        [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}], lr=0.02, adamw_lr=1e-3
    ),
    "orthotorch.ARO": lambda hidden, adamw: orthotorch.ARO(
        [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}], lr=1e-3
    ),
}
TARGETS = (
    ("SPECTRA(AdamW)", "torch.optim.AdamW", 1.5),
    ("orthotorch.ARO", "orthotorch.Muon", 1.5),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--layers", type=int, default=reference.LAYERS, help="transformer layers (default 4)"
    )
    args = parser.parse_args()
    reference.LAYERS = args.layers  # fewer layers for a quick look on a busy CPU

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    runs = {}
    for name, build in BUILDERS.items():
        hidden, adamw = reference_named_parameters(0, args.device)
        params = [p for _, p in hidden + adamw]
        runs[name] = (build(hidden, adamw), params)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(3 + args.repeats):
        for name, (opt, params) in runs.items():  # interleaved: drift hits every row alike
            set_random_gradients(params, seed=step)
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            if step >= 3:
                times[name].append(time.perf_counter() - start)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {device}; layers: {args.layers}; median of {args.repeats} steps")
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in median.items():
        print(f"{name:20s} {t * 1e3:10.1f} ms")
    for row, base, target in TARGETS:
        ratio = median[row] / median[base]
        verdict = "meets" if ratio <= target else "misses"
        print(f"{row} / {base}: {ratio:.2f}x ({verdict} target <= {target}x)")


if __name__ == "__main__":
    main()
