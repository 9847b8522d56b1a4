"""Run every CUDA code path against the CPU result, and time the optimizers vs torch.optim.Muon.

Kernels: Newton–Schulz under each dispatch plan (batched = the accelerator default, looped,
chunked, float32 compute, ``torch.compile``-d) for every registered Newton–Schulz method, in bf16
and float32, against the float64 CPU iteration. Optimizers: one step of each from identical
parameters and gradients on CPU and CUDA (the AdamW groups run the foreach AdamW, the low-rank
optimizers their DCT/SVD kernels, ARO its rotation kernel), compared entry-wise relative to the
update size. Then step times on CUDA as ratios to torch.optim.Muon (median and min, interleaved),
on the reference set and on a larger one (``--width``, default 2048: square, 4x and 1/4x
matrices as in a transformer block), and the Newton–Schulz kernel on its direct and Gram routes
at transformer shapes (CUDA-event timings, bf16, one batched call).

Exits with status 0 and a message when CUDA is absent (the test suite never needs a GPU).

    python benchmarks/gpu_check.py [--quick] [--repeats 20] [--width 2048] [--skip-kernels]
        [--optimizers torch.optim.Muon,orthotorch.ARO]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import orthotorch
from orthotorch.bench.reference import reference_named_parameters, set_random_gradients
from orthotorch.linalg import available_methods, dispatch, get_method, iterate_scalar

FAILURES: list[str] = []


def report(name: str, error: float, tolerance: float) -> None:
    ok = error <= tolerance
    if not ok:
        FAILURES.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {error:.2e} (tolerance {tolerance:.0e})")


def exact_iteration(G: torch.Tensor, method: str) -> torch.Tensor:
    spec = get_method(method)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    x = S / (torch.linalg.matrix_norm(G).unsqueeze(-1) * spec.norm_scale)
    y = iterate_scalar(x, spec.schedule(G.shape[-2], G.shape[-1], spec.default_steps))
    return (U * y.unsqueeze(-2)) @ Vh


def plan_label(plan: tuple) -> str:
    return f"{plan[0]}/{plan[2]}" + ("/gram" if plan[-1] == "gram" else "")


def check_kernels(quick: bool) -> None:
    count, m, n = (4, 64, 128) if quick else (8, 512, 1024)
    G = torch.randn(count, m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plans = [("batched", 1, "input"), ("looped", 1, "input"), ("chunked", 2, "input")]
    plans += [("batched", 1, "float32"), ("batched", 1, "input", False, "gram")]
    for method in available_methods():
        spec = get_method(method)
        if spec.schedule is None or method == "aol":  # aol: compared with its CPU result below
            continue
        exact = exact_iteration(G, method)
        for plan in plans:
            for dtype, tol in ((torch.bfloat16, 5e-2), (torch.float32, 1e-3)):
                with dispatch.forced(*plan):
                    out = orthotorch.linalg.orthogonalize(G.cuda().to(dtype), method, dtype=dtype)
                err = (out.double().cpu() - exact).abs().max().item()
                # The Gram route rounds Q and R too: twice the direct route's bf16 error on CPU.
                tol = 2 * tol if plan[-1] == "gram" else tol
                report(f"ns {method} {plan_label(plan)} {str(dtype)[6:]}", err, tol)
    cpu = orthotorch.linalg.orthogonalize(G.float(), "aol", dtype=torch.float32)
    for plan in plans:
        with dispatch.forced(*plan):
            out = orthotorch.linalg.orthogonalize(G.float().cuda(), "aol", dtype=torch.float32)
        error = (out.cpu() - cpu).abs().max().item()
        report(f"ns aol {plan_label(plan)} vs CPU", error, 1e-3)
    # Compiled: measured with compile candidates; then forced, against eager on the same device.
    X = G.cuda().bfloat16()
    start = time.perf_counter()
    with dispatch.measuring(compile=True):
        orthotorch.linalg.orthogonalize(X, "polar_express")
    for row in dispatch.last_measured():
        print(
            f"     tuned {row['kernel']} {row['count']}x{row['rows']}x{row['cols']}: "
            f"{row['plan']} {row['ms']:.2f} ms (default {row['default_ms']:.2f} ms), "
            f"compile {row['compile_s']:.1f} s, tune total {time.perf_counter() - start:.1f} s"
        )
    with dispatch.forced("batched", compiled=True):
        compiled = orthotorch.linalg.orthogonalize(X, "polar_express")
    with dispatch.forced("batched"):
        eager = orthotorch.linalg.orthogonalize(X, "polar_express")
    report("ns compiled vs eager (bf16)", (compiled - eager).abs().max().item(), 5e-2)


OPTIMIZERS = {
    "torch.optim.Muon": None,
    "orthotorch.Muon[polar_express]": lambda g: orthotorch.Muon(g, lr=0.02, adamw_lr=3e-3),
    "orthotorch.Muon[aol]": lambda g: orthotorch.Muon(g, lr=0.02, adamw_lr=3e-3, ns_method="aol"),
    "orthotorch.Muon[float32]": lambda g: orthotorch.Muon(
        g, lr=0.02, adamw_lr=3e-3, ns_dtype=torch.float32
    ),
    "orthotorch.ROOT": lambda g: orthotorch.ROOT(g, lr=0.02, adamw_lr=3e-3),
    "orthotorch.AuON[hybrid]": lambda g: orthotorch.AuON(g, lr=0.1, adamw_lr=3e-3, hybrid=True),
    "orthotorch.ARO": lambda g: orthotorch.ARO(g, lr=0.02, adamw_lr=3e-3),
    "orthotorch.DCTAdamW": lambda g: orthotorch.DCTAdamW(g, lr=1e-3, adamw_lr=3e-3),
    "orthotorch.GaLoreAdamW": lambda g: orthotorch.GaLoreAdamW(g, lr=1e-3, adamw_lr=3e-3),
}


class TorchMuon:
    def __init__(self, hidden, adamw):
        self.muon = torch.optim.Muon(hidden, lr=0.02)
        self.adamw = torch.optim.AdamW(adamw, lr=3e-3, betas=(0.9, 0.95))

    def step(self):
        self.muon.step()
        self.adamw.step()


def build(name: str, device: str, quick: bool):
    hidden, adamw = reference_named_parameters(0, "cpu")
    if quick:
        hidden, adamw = (
            [
                (k, nn.Parameter(p.detach()[tuple(slice(0, s // 8) for s in p.shape)].clone()))
                for k, p in named
            ]
            for named in (hidden, adamw)
        )
    hidden = [nn.Parameter(p.detach().to(device)) for _, p in hidden]
    adamw = [nn.Parameter(p.detach().to(device)) for _, p in adamw]
    if name == "torch.optim.Muon":
        return TorchMuon(hidden, adamw), hidden + adamw
    groups = [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}]
    return OPTIMIZERS[name](groups), hidden + adamw


def set_gapped_gradients(params: list[torch.Tensor], seed: int, fraction: float = 0.25) -> None:
    """Gradients whose spectrum has a clear gap at the low-rank optimizers' default rank.

    The top ``r = round(fraction * k)`` singular values are distinct (``1 - i / 2r``), the rest
    are 1e-3. For the SVD-subspace optimizers a Gaussian gradient has tiny gaps at the cut, so
    cuSOLVER and LAPACK pick measurably different bases (GaLoreAdamW's CUDA step differed from
    the CPU's by 6e-2 of the update); a degenerate top block would leave the basis *inside* the
    subspace free, which Adam's entrywise scaling sees. Same on every device (CPU generator).
    """
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        if p.ndim < 2:
            p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
            continue
        rows, cols = p.shape[0], p[0].numel()
        k = min(rows, cols)
        r = max(1, round(fraction * k))
        s = torch.full((k,), 1e-3, dtype=torch.float64)
        s[:r] = 1 - torch.arange(r, dtype=torch.float64) / (2 * r)
        U, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))
        g = ((U * s) @ V.T).view(p.shape)
        p.grad = g.to(device=p.device, dtype=p.dtype)


GAPPED = {"orthotorch.GaLoreAdamW"}


def check_optimizers(quick: bool, repeats: int, names: list[str]) -> None:
    built = {}
    for name in names:
        cpu_opt, cpu_params = build(name, "cpu", quick)
        gpu_opt, gpu_params = build(name, "cuda", quick)
        before = [p.detach().clone() for p in cpu_params]
        draw = set_gapped_gradients if name in GAPPED else set_random_gradients
        for step in range(2):
            draw(cpu_params, seed=step)
            draw(gpu_params, seed=step)
            cpu_opt.step()
            gpu_opt.step()
        worst = 0.0
        for b, c, g in zip(before, cpu_params, gpu_params):
            update = (c.detach() - b).norm().item() or 1.0
            worst = max(worst, (g.detach().cpu() - c.detach()).norm().item() / update)
        inputs = " on gradients with a spectral gap" if name in GAPPED else ""
        report(f"step {name} CUDA vs CPU{inputs} (relative to the update)", worst, 5e-2)
        built[name] = (gpu_opt, gpu_params)
    title = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {repeats} rounds"
    time_steps(built, repeats, lambda params, r: set_random_gradients(params, seed=r), title)


def time_steps(built: dict, repeats: int, set_gradients, title: str) -> None:
    """Interleaved step times after 3 warm-up rounds, as ratios to torch.optim.Muon."""
    times: dict[str, list[float]] = {n: [] for n in built}
    for r in range(3 + repeats):
        for name, (opt, params) in built.items():
            set_gradients(params, r)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            torch.cuda.synchronize()
            if r >= 3:
                times[name].append(time.perf_counter() - t0)
    ref_med = statistics.median(times["torch.optim.Muon"])
    ref_min = min(times["torch.optim.Muon"])
    print(f"\n{title}")
    print("| optimizer | step ms (median) | ratio to torch.optim.Muon (median / min) |")
    print("|---|---|---|")
    for name, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        print(f"| {name} | {med * 1e3:.2f} | {med / ref_med:.2f}x / {low / ref_min:.2f}x |")


def cuda_ms(fn, repeats: int) -> float:
    """Median of ``repeats`` CUDA-event timings after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_routes(repeats: int) -> None:
    """Direct vs Gram route of five Polar Express steps, bf16, one batched call per stack."""
    from orthotorch.linalg import newton_schulz as ns_module

    ns = sys.modules[ns_module.__module__]
    table = ns.POLAR_EXPRESS_COEFFICIENTS
    print("\n| stack (bf16) | direct ms | gram ms | gram / direct | products ratio |")
    print("|---|---|---|---|---|")
    for count, m, n in ((8, 512, 2048), (16, 1024, 4096), (8, 2048, 8192), (4, 4096, 16384)):
        X = torch.randn(count, m, n, device="cuda", dtype=torch.bfloat16) / (m * n) ** 0.5
        restarts = ns.gram_restarts(5)
        direct = cuda_ms(lambda X=X: ns.iterate_quintic(X, table), repeats)
        gram = cuda_ms(lambda X=X, r=restarts: ns.iterate_gram_quintic(X, table, r), repeats)
        ratio = ns.gram_products(m, n, 5, restarts) / (5 * (2 * m * m * n + m**3))
        row = (
            f"| {count}x{m}x{n} | {direct:.2f} | {gram:.2f} | {gram / direct:.2f}x | {ratio:.2f} |"
        )
        print(row)


def time_large(width: int, repeats: int) -> None:
    """Step times on a larger transformer-like set built on the GPU (gradients drawn there)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    layers = 4

    def params():
        hidden = [
            nn.Parameter(torch.randn(s, device="cuda", generator=gen) * s[1] ** -0.5)
            for _ in range(layers)
            for s in shapes
        ]
        adamw = [nn.Parameter(torch.randn(32768, width, device="cuda", generator=gen) * 0.02)]
        return hidden, adamw

    rows = {
        "torch.optim.Muon": lambda h, a: TorchMuon(h, a),
        "orthotorch.Muon[polar_express]": lambda h, a: orthotorch.Muon(
            [{"params": h}, {"params": a, "algorithm": "adamw"}], lr=0.02, adamw_lr=3e-3
        ),
        "orthotorch.Muon[aol]": lambda h, a: orthotorch.Muon(
            [{"params": h}, {"params": a, "algorithm": "adamw"}],
            lr=0.02,
            adamw_lr=3e-3,
            ns_method="aol",
        ),
    }
    built = {}
    for name, make in rows.items():
        hidden, adamw = params()
        built[name] = (make(hidden, adamw), hidden + adamw)

    def draw(ps, r):
        for p in ps:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)

    title = f"width {width}, {layers} layers of {shapes} + a 32768x{width} AdamW embedding"
    time_steps(built, repeats, draw, title)
    print("\ndispatch plans (orthotorch.linalg.plan_table()):")
    for row in orthotorch.linalg.plan_table():
        print(
            f"  {row['kernel']} {row['count']}x{row['rows']}x{row['cols']} {row['dtype']}: "
            f"{row['plan']} {row['ms']:.2f} ms (default {row['default_ms']:.2f} ms)"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--width", type=int, default=2048, help="larger set's width (0: skip it)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of rows")
    ap.add_argument("--skip-kernels", action="store_true", help="optimizer checks only")
    args = ap.parse_args()
    names = args.optimizers.split(",")
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or "torch.optim.Muon" not in names:
        ap.error(
            f"--optimizers must include torch.optim.Muon and come from {', '.join(OPTIMIZERS)}; "
            f"got {args.optimizers!r}"
        )
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; nothing to check.")
        return 0
    repeats = 3 if args.quick else args.repeats
    if not args.skip_kernels:
        check_kernels(args.quick)
    check_optimizers(args.quick, repeats, names)
    if not args.skip_kernels:
        time_routes(repeats)
    if args.width:
        time_large(args.width, repeats)
    if FAILURES:
        print(f"\n{len(FAILURES)} check(s) failed: {', '.join(FAILURES)}")
        return 1
    print("\nall CUDA paths agree with the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
