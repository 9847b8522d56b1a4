"""Step time of SPECTRA(AdamW) vs AdamW and of ARO vs orthotorch.Muon on the reference set.

One process, interleaved rounds (these machines are noisy), 3 warm-up steps, median of the
rest, reported as ratios. Targets (issue 7): SPECTRA overhead <= 1.5x AdamW; ARO <= 1.5x Muon.

SPECTRA rows: the default ``route="auto"`` (``eigh`` of the small-side Gram matrix on a CPU,
matmul-only Gram Newton–Schulz elsewhere), each explicit route (``polar`` on ``[X, cI]`` was
the only one before), and the default with the embedding and head left to plain AdamW
(``"clip": None`` on their group). A breakdown times the clip kernel alone per reference shape
(batched as SPECTRA batches it), so that the wrapper's own cost (copy of X_k, recovery of U,
re-application) is the rest.

ARO rows: the default (float32 products), ``matmul_dtype=torch.bfloat16`` (then also the
kernel's per-step deviation from float32 on the reference shapes) and ``rotation_every=4``.

    python benchmarks/spectra_aro.py [--repeats 10] [--device cpu] [--layers 4] [--only spectra]
        [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import orthotorch
from orthotorch.bench import reference
from orthotorch.bench.reference import reference_named_parameters, set_random_gradients


def _spectra(hidden, adamw, route: str, hidden_only: bool = False) -> orthotorch.SPECTRA:
    groups = [{"params": [p for _, p in hidden]}, {"params": [p for _, p in adamw]}]
    if hidden_only:
        groups[1]["clip"] = None
    base = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return orthotorch.SPECTRA(base, clip=10.0, route=route)


BUILDERS = {
    "torch.optim.AdamW": lambda hidden, adamw: torch.optim.AdamW(
        [p for _, p in hidden + adamw], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1
    ),
    # The post-clip on every matrix the base updates: hidden matrices, embedding and head (as
    # the paper's code does with its default apply_to="2d").
    "SPECTRA(AdamW)": lambda hidden, adamw: _spectra(hidden, adamw, "auto"),
    "SPECTRA gram": lambda hidden, adamw: _spectra(hidden, adamw, "gram"),
    "SPECTRA eigh": lambda hidden, adamw: _spectra(hidden, adamw, "eigh"),
    "SPECTRA polar": lambda hidden, adamw: _spectra(hidden, adamw, "polar"),
    "SPECTRA hidden only": lambda hidden, adamw: _spectra(hidden, adamw, "auto", hidden_only=True),
    "orthotorch.Muon": lambda hidden, adamw: orthotorch.Muon(
        [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}], lr=0.02, adamw_lr=1e-3
    ),
    "orthotorch.ARO": lambda hidden, adamw: orthotorch.ARO(
        [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}], lr=1e-3
    ),
    # Not the default: the four matrix products on bf16 operands (as Muon's Newton–Schulz).
    "orthotorch.ARO bf16": lambda hidden, adamw: orthotorch.ARO(
        [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}],
        lr=1e-3,
        matmul_dtype=torch.bfloat16,
    ),
    # Not the default: the rotation (QR + half the products) refreshed every 4th step only.
    "orthotorch.ARO every=4": lambda hidden, adamw: orthotorch.ARO(
        [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}], lr=1e-3, rotation_every=4
    ),
}
TARGETS = (
    ("SPECTRA(AdamW)", "torch.optim.AdamW", 1.5),
    ("SPECTRA hidden only", "torch.optim.AdamW", 1.5),
    ("orthotorch.ARO", "orthotorch.Muon", 1.5),
    ("orthotorch.ARO bf16", "orthotorch.Muon", 1.5),
)
GROUPS = {
    "spectra": ("torch.optim.AdamW", "SPECTRA"),
    "aro": ("orthotorch.Muon", "orthotorch.ARO"),
}


def kernel_breakdown(device: str, repeats: int, sync) -> None:
    """Median time of the clip alone on each reference shape, stacked as SPECTRA stacks it."""
    from orthotorch.linalg.spectral import spectral_clip_kernel

    hidden, adamw = reference_named_parameters(0, device)
    shapes: dict[tuple[int, int], int] = {}
    for _, p in hidden + adamw:
        if p.ndim == 2:
            wide = (min(p.shape), max(p.shape))
            shapes[wide] = shapes.get(wide, 0) + 1
    routes = ("gram", "eigh", "polar")
    print("clip kernel alone (ms, median of", max(1, repeats // 3), "):", " ".join(routes))
    total = dict.fromkeys(routes, 0.0)
    for (m, n), count in shapes.items():
        X = torch.randn(count, m, n, device=device)
        row = []
        for route in routes:
            kernel, _ = spectral_clip_kernel(10.0, route=route)
            kernel(X, False)
            t = []
            for _ in range(max(1, repeats // 3)):
                sync()
                start = time.perf_counter()
                kernel(X, False)
                sync()
                t.append(time.perf_counter() - start)
            row.append(statistics.median(t))
            total[route] += row[-1]
        cells = " ".join(f"{v * 1e3:8.1f}" for v in row)
        print(f"  {count:2d} x {m}x{n:<5d} {cells}")
    print("  total        " + " ".join(f"{total[r] * 1e3:8.1f}" for r in routes))


def aro_bf16_deviation(device: str, steps: int) -> None:
    """Per step, ``||D_bf16 - D_f32|| / ||D_f32||`` of the ARO kernel on each reference shape.

    Both kernels get the same input: the float32 trajectory's momentum (random gradients, as the
    timed rows) and rotation, so the error does not compound; the median over the matrices of a
    shape is printed per step. Random gradients give full-rank momenta; square ones are the
    ill-conditioned case (the QR input's small singular directions decide R's last columns).
    """
    from orthotorch.functional.aro import aro_kernel, pack

    hidden, _ = reference_named_parameters(0, device)
    mats = [p for _, p in hidden if p.ndim == 2]
    momenta = [torch.zeros_like(p) for p in mats]
    rotations: list[torch.Tensor | None] = [None] * len(mats)
    print("ARO kernel, bf16 products vs float32: relative deviation of the direction per step")
    for step in range(steps):
        set_random_gradients(mats, seed=step)
        by_shape: dict[tuple[int, int], list[float]] = {}
        for i, p in enumerate(mats):
            momenta[i].lerp_(p.grad, 0.05)
            rows, cols = p.shape
            k = min(rows, cols)
            R = rotations[i]
            if R is None:
                R = torch.zeros(rows, -(-(k * k) // rows), device=device)
            P = pack(momenta[i], R)
            tall = P.shape[0] > P.shape[1]
            X = P.mT if tall else P
            full = aro_kernel(X, tall)
            low = aro_kernel(X, tall, dtype=torch.bfloat16)
            full, low = (full.mT, low.mT) if tall else (full, low)
            D, D_low = full[:, :cols], low[:, :cols]
            dev = ((D_low - D).norm() / D.norm()).item()
            by_shape.setdefault((rows, cols), []).append(dev)
            rotations[i] = full[:, cols:].clone()
        cells = "  ".join(
            f"{m}x{n}: {statistics.median(v):.2e}" for (m, n), v in sorted(by_shape.items())
        )
        print(f"  step {step + 1}: {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--layers", type=int, default=reference.LAYERS, help="transformer layers (default 4)"
    )
    parser.add_argument(
        "--only", choices=sorted(GROUPS), default=None, help="time only these rows (and baseline)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (a loaded CPU: 1)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1 layer of width 32, vocab 256, 1 step"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reference.LAYERS = args.layers  # fewer layers for a quick look on a busy CPU
    if args.quick:  # the reference set's module globals, read when the set is built
        reference.LAYERS, reference.WIDTH, reference.VOCAB = 1, 32, 256
        args.layers, args.repeats = 1, 1
    builders = {
        name: build
        for name, build in BUILDERS.items()
        if args.only is None or name.startswith(GROUPS[args.only])
    }

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    runs = {}
    for name, build in builders.items():
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
    print(
        f"device: {device}; threads: {torch.get_num_threads()}; layers: {args.layers}; "
        f"median of {args.repeats} steps"
    )
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in median.items():
        print(f"{name:20s} {t * 1e3:10.1f} ms")
    for name, t in median.items():
        if name.startswith("SPECTRA") and "torch.optim.AdamW" in median:
            print(f"{name} / torch.optim.AdamW: {t / median['torch.optim.AdamW']:.2f}x")
    for row, base, target in TARGETS:
        if row not in median or base not in median:
            continue
        ratio = median[row] / median[base]
        verdict = "meets" if ratio <= target else "misses"
        print(f"{row} / {base}: {ratio:.2f}x ({verdict} target <= {target}x)")
    if "orthotorch.ARO every=4" in times:
        # One step in 4 refreshes: the mean is its cost, not the median (--repeats 12 times
        # exactly 3 refreshes).
        ratio = statistics.fmean(times["orthotorch.ARO every=4"]) / median["orthotorch.Muon"]
        print(f"orthotorch.ARO every=4 (mean) / orthotorch.Muon: {ratio:.2f}x")
    if args.only in (None, "spectra"):
        kernel_breakdown(args.device, args.repeats, sync)
    if args.only in (None, "aro"):
        aro_bf16_deviation(args.device, steps=4)


if __name__ == "__main__":
    main()
