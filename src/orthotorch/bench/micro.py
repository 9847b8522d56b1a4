"""``orthotorch bench``: kernel and optimizer-step micro-benchmarks, measured in one process.

Kernels: every registered orthogonalization method on every reference shape, with the achieved
GFLOP/s, the fraction of a plain matmul's GFLOP/s measured in the same run (same shape, same
dtype: the practical peak of this machine), and the orthogonality error of the output.

Newton–Schulz FLOPs per step on an ``m x n`` input (``m <= n`` after the transpose):
``A = X X^T`` costs ``2 m^2 n``, ``B = b A + c A^2`` costs ``2 m^3``, ``X <- a X + B X`` costs
``2 m^2 n``: ``4 m^2 n + 2 m^3`` per step, plus ``~3 m n`` for the Frobenius normalisation.
SVD has no such count (its cost depends on the LAPACK algorithm), so its GFLOP/s is n/a.
The matmul peak times ``X X^T`` (``2 m^2 n`` FLOPs), the dominant product of a step.

Steps: every optimizer of the bench registry on the reference parameter set
(:mod:`orthotorch.bench.reference`), timed interleaved (optimizer A, B, C, A, B, C, ...) so slow
drifts of a noisy machine hit all of them alike, 3 warm-up steps, then the median of the rest;
reported as ratios to ``torch.optim.Muon`` (``torch-muon``) and ``torch.optim.AdamW``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..linalg import available_methods, get_method, orthogonality_error, orthogonalize
from .optimizers import OPTIMIZERS, get_optimizer, optimizer_state_bytes
from .reference import KERNEL_SHAPES, reference_named_parameters, set_random_gradients
from .report import environment

__all__ = [
    "QUICK_SHAPES",
    "BenchResult",
    "KernelTiming",
    "StepTiming",
    "bench",
    "bench_kernels",
    "bench_steps",
    "newton_schulz_flops",
    "parse_shape",
]

QUICK_SHAPES: tuple[tuple[int, int], ...] = ((64, 64), (128, 512))
WARMUP = 3


@dataclass
class KernelTiming:
    """One (method, shape) measurement. Times in milliseconds."""

    method: str
    shape: tuple[int, int]
    dtype: str
    steps: int | None
    ms: float
    repeats: int
    gflops: float | None
    matmul_ms: float
    matmul_gflops: float
    peak_fraction: float | None
    orthogonality_error: float


@dataclass
class StepTiming:
    """One optimizer's step time on the reference parameter set."""

    optimizer: str
    ms: float
    repeats: int
    vs_torch_muon: float | None
    vs_adamw: float | None
    state_bytes: int


@dataclass
class BenchResult:
    """Everything ``bench`` measured, with the environment; ``.table()`` / ``.to_dict()``."""

    kernels: list[KernelTiming] = field(default_factory=list)
    steps: list[StepTiming] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "config": self.config,
            "environment": self.environment,
            "kernels": [asdict(k) for k in self.kernels],
            "steps": [asdict(s) for s in self.steps],
        }

    def table(self) -> str:
        """Two plain-text tables: kernels, then optimizer steps."""
        out = []
        if self.kernels:
            rows = [
                (
                    "method",
                    "shape",
                    "dtype",
                    "steps",
                    "ms",
                    "GFLOP/s",
                    "matmul GFLOP/s",
                    "of peak",
                    "orth. err",
                )
            ]
            for k in self.kernels:
                rows.append(
                    (
                        k.method,
                        f"{k.shape[0]}x{k.shape[1]}",
                        k.dtype,
                        "-" if k.steps is None else str(k.steps),
                        f"{k.ms:.3f}",
                        "n/a" if k.gflops is None else f"{k.gflops:.1f}",
                        f"{k.matmul_gflops:.1f}",
                        "n/a" if k.peak_fraction is None else f"{k.peak_fraction:.0%}",
                        f"{k.orthogonality_error:.3g}",
                    )
                )
            out.append(_render(rows))
        if self.steps:
            rows = [
                ("optimizer", "step ms", "vs torch.optim.Muon", "vs torch.optim.AdamW", "state")
            ]
            for s in self.steps:
                rows.append(
                    (
                        s.optimizer,
                        f"{s.ms:.2f}",
                        "n/a" if s.vs_torch_muon is None else f"{s.vs_torch_muon:.2f}x",
                        "n/a" if s.vs_adamw is None else f"{s.vs_adamw:.2f}x",
                        f"{s.state_bytes / 2**20:.1f} MiB",
                    )
                )
            out.append(_render(rows))
            out.append(
                f"step times: median of {self.steps[0].repeats} interleaved steps after "
                f"{WARMUP} warm-up steps; {self.config.get('param_set', '')}"
            )
        return "\n\n".join(out)


def _render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int]:
    """``"512x2048"`` -> ``(512, 2048)``; ``ValueError`` otherwise."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape must look like 512x2048, got {text!r}")
    return int(parts[0]), int(parts[1])


def newton_schulz_flops(rows: int, cols: int, steps: int) -> float:
    """FLOPs of ``steps`` quintic Newton–Schulz steps on a ``rows x cols`` matrix."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3) + 3 * m * n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(
    fn: Callable[[], Any], device: torch.device, repeats: int, budget_s: float
) -> tuple[float, int]:
    """Median seconds of ``fn`` over up to ``repeats`` calls (at least 3 unless over budget)."""
    fn()  # warm-up: kernel selection, allocator
    _sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats:
        start = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - start
        times.append(dt)
        spent += dt
        # Slow cases (2048x8192 SVD on a CPU) stop early once the budget is spent, never below
        # 3 samples unless one call alone exceeds the budget.
        if spent > budget_s and (len(times) >= 3 or dt > budget_s):
            break
    return statistics.median(times), len(times)


def bench_kernels(
    methods: Sequence[str] | None = None,
    shapes: Sequence[tuple[int, int]] = KERNEL_SHAPES,
    *,
    device: str | torch.device = "cpu",
    repeats: int = 10,
    budget_s: float = 5.0,
    seed: int = 0,
) -> list[KernelTiming]:
    """Time each method on each shape in its default dtype and steps (see module docstring)."""
    device = torch.device(device)
    results = []
    for rows, cols in shapes:
        gen = torch.Generator().manual_seed(seed)
        G = torch.randn(rows, cols, generator=gen).to(device)
        peaks: dict[torch.dtype, tuple[float, float]] = {}
        for name in methods or available_methods():
            spec = get_method(name)
            dtype = spec.default_dtype
            if dtype not in peaks:
                X = (G if rows <= cols else G.T).to(dtype)
                m, n = X.shape
                mm_s, _ = _time(lambda X=X: X @ X.T, device, repeats, budget_s)
                peaks[dtype] = (mm_s, 2 * m * m * n / mm_s / 1e9)
            mm_s, mm_gflops = peaks[dtype]
            seconds, count = _time(
                lambda n=name, G=G: orthogonalize(G, n), device, repeats, budget_s
            )
            steps = spec.default_steps
            gflops = None
            if spec.schedule is not None and steps is not None:
                gflops = newton_schulz_flops(rows, cols, steps) / seconds / 1e9
            error = float(orthogonality_error(orthogonalize(G, name)))
            results.append(
                KernelTiming(
                    method=name,
                    shape=(rows, cols),
                    dtype=str(dtype).removeprefix("torch."),
                    steps=steps,
                    ms=seconds * 1e3,
                    repeats=count,
                    gflops=gflops,
                    matmul_ms=mm_s * 1e3,
                    matmul_gflops=mm_gflops,
                    peak_fraction=None if gflops is None else gflops / mm_gflops,
                    orthogonality_error=error,
                )
            )
    return results


def bench_steps(
    optimizers: Sequence[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    repeats: int = 10,
    quick: bool = False,
    seed: int = 0,
) -> list[StepTiming]:
    """Step time of each optimizer on the reference parameter set, interleaved in one process.

    ``quick`` keeps only layer 0 and the final norm of the reference set (no 8192x512
    embedding/head) so that a test can run it in a second.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    names = list(optimizers or OPTIMIZERS)
    # torch-muon and adamw are the denominators of the ratios: always measure them.
    for required in ("torch-muon", "adamw"):
        if required not in names:
            names.append(required)
    instances = {}
    for name in names:
        spec = get_optimizer(name)
        hidden, adamw = reference_named_parameters(seed, device)
        if quick:
            hidden = [(n, p) for n, p in hidden if n.startswith("layers.0.")]
            adamw = [(n, p) for n, p in adamw if n.startswith(("layers.0.", "final_norm"))]
        groups = [{"params": hidden}, {"params": adamw, "algorithm": "adamw"}]
        lr = spec.default_lr("*")
        optimizer = spec.build(groups, lr, get_optimizer("adamw").default_lr("*"))
        instances[name] = (optimizer, [p for _, p in hidden + adamw])
    # One set of gradients per step, shared by all optimizers (copied in, not timed).
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(WARMUP + repeats):
        grads_seed = seed * 1000 + step
        for name in names:
            optimizer, params = instances[name]
            set_random_gradients(params, grads_seed)
            _sync(device)
            start = time.perf_counter()
            optimizer.step()
            _sync(device)
            if step >= WARMUP:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return [
        StepTiming(
            optimizer=name,
            ms=medians[name] * 1e3,
            repeats=len(times[name]),
            vs_torch_muon=medians[name] / medians["torch-muon"],
            vs_adamw=medians[name] / medians["adamw"],
            state_bytes=optimizer_state_bytes(instances[name][0]),
        )
        for name in names
    ]


def bench(
    *,
    methods: Sequence[str] | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    optimizers: Sequence[str] | None = None,
    quick: bool = False,
    device: str | torch.device = "cpu",
    kernels: bool = True,
    steps: bool = True,
    repeats: int | None = None,
) -> BenchResult:
    """Run the kernel and step benchmarks; ``quick`` uses small shapes and few repeats.

    Args:
        methods: orthogonalization methods (default: all registered).
        shapes: kernel shapes (default: :data:`KERNEL_SHAPES`, or :data:`QUICK_SHAPES` if quick).
        optimizers: bench-registry optimizers (default: all; torch-muon and adamw always run).
        quick: small shapes, reduced parameter set, 3 (kernels) / 3 (steps) repeats.
        device: where to run.
        kernels, steps: which halves to run.
        repeats: override the repeat count (kernels and steps).
    """
    for name in methods or ():
        get_method(name)
    for name in optimizers or ():
        get_optimizer(name)
    shapes = tuple(shapes) if shapes else (QUICK_SHAPES if quick else KERNEL_SHAPES)
    kernel_repeats = repeats or (3 if quick else 10)
    step_repeats = repeats or (3 if quick else 10)
    result = BenchResult(
        config={
            "methods": list(methods or available_methods()),
            "shapes": [list(s) for s in shapes],
            "quick": quick,
            "device": str(device),
            "kernel_repeats": kernel_repeats,
            "step_repeats": step_repeats,
            "warmup_steps": WARMUP,
            "param_set": "reference layer 0 only (quick)"
            if quick
            else "reference set: 4 layers d=512 + 8192x512 embedding and head",
        },
        environment=environment(),
    )
    if kernels:
        result.kernels = bench_kernels(
            methods, shapes, device=device, repeats=kernel_repeats, budget_s=1.0 if quick else 5.0
        )
    if steps:
        result.steps = bench_steps(optimizers, device=device, repeats=step_repeats, quick=quick)
    return result
