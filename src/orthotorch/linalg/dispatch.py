"""Measured dispatch: how a kernel runs over a stack of same-shape matrices.

Every optimizer hands its Newton–Schulz kernel a ``(count, m, n)`` stack of same-shape wide
matrices. The kernel is batch-agnostic (``X @ X.mT`` works on 2-D and 3-D tensors alike), so it
can run as

- ``batched``: one call on the whole stack (``bmm``),
- ``looped``: one call per matrix (2-D GEMMs),
- ``chunked``: one call per ``chunk`` consecutive matrices,

and, for half-precision input, in the input's dtype or in float32 (upcast in, round back out),
eager or ``torch.compile``-d. A kernel may also offer *variants*: other routes to the same result
in exact arithmetic, such as the Gram route of Newton–Schulz on wide matrices
(:func:`~orthotorch.linalg.iterate_gram_quintic`, fewer multiply-adds), timed
beside the direct route. The fastest of these depends on the machine, the shape, the count,
the dtype and the thread count: on one 2-core CPU a loop of bf16 2-D GEMMs beat ``bmm`` (84 vs
115 ms for 16 512x512 matrices), on another the opposite held (162 vs 105 ms), and float32
compute halved a small model's step. So no fixed rule is right everywhere; this module times the
candidates once per *bucket* ``(kernel, m, n, count, dtype, device, threads)`` and remembers the
winner (:func:`plan_table` shows the choices; :func:`orthotorch.tune` measures them up front).

Every plan computes the same iteration; the results differ only by rounding (float32 compute
rounds *less* than bf16, so choosing it never makes the result less accurate). Within a process
a bucket keeps its plan, so runs are reproducible there; two processes may measure different
winners and then differ by rounding. For bitwise reproducibility across processes use the disk
cache (same machine) or ``ORTHOTORCH_DISPATCH=default`` (no timing decides anything).

Which buckets are measured. Timing costs a few extra kernel runs on the first call, worth it only
where the work is large: buckets below :data:`MEASURE_FROM_FLOPS` (and every bucket while
measurement is off, :func:`configure`) use the fixed default plan (:func:`default_plan`:
``looped`` on the CPU, ``batched`` elsewhere), which is also what every test of the numerics sees
unless it forces a plan (:func:`forced`). ``torch.compile`` candidates are tried only when
enabled (``configure(compile=True)`` or ``tune(..., compile=True)``): compiling takes seconds
(reported as ``compile_s``) and would otherwise land on the first training step.

On-disk cache. ``configure(cache_path=...)`` (or the ``ORTHOTORCH_DISPATCH_CACHE`` environment
variable) keeps measured plans across processes in a JSON file stamped with the machine, the
torch version and the thread count; a file with another stamp is ignored (not trusted), a
corrupt one is reported with a warning and rewritten on the next save.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "MEASURE_FROM_FLOPS",
    "ROUTES",
    "STRATEGIES",
    "BucketKey",
    "Plan",
    "bucket_key",
    "clear_plans",
    "configure",
    "default_plan",
    "forced",
    "last_measured",
    "machine_stamp",
    "measuring",
    "plan_for",
    "plan_table",
    "run_stack",
]

Strategy = Literal["batched", "looped", "chunked"]
STRATEGIES: tuple[str, ...] = ("batched", "looped", "chunked")
ROUTES: tuple[str, ...] = ("direct", "gram")
Kernel = Callable[[Tensor], Tensor]

# A Newton-Schulz call on 16 bf16 512x512 matrices (~2e10 flops) takes ~0.1 s on one CPU core;
# below ~1e9 flops (a few ms) the candidates' differences are below timing noise and measuring
# them would cost more than it can save.
MEASURE_FROM_FLOPS = 1e9

_HALF = (torch.bfloat16, torch.float16)
_CACHE_VERSION = 2  # 2: plans carry a route


@dataclass(frozen=True)
class BucketKey:
    """What a plan is measured for. ``kernel`` names the kernel and its work (``"ns5"``:
    five Newton–Schulz steps); ``threads`` is ``torch.get_num_threads()`` at the time."""

    kernel: str
    rows: int
    cols: int
    count: int
    dtype: str
    device: str
    threads: int

    def text(self) -> str:
        return "|".join(map(str, asdict(self).values()))

    @classmethod
    def from_text(cls, text: str) -> BucketKey:
        kernel, rows, cols, count, dtype, device, threads = text.split("|")
        return cls(kernel, int(rows), int(cols), int(count), dtype, device, int(threads))


@dataclass(frozen=True)
class Plan:
    """How to run a kernel on a stack.

    Attributes:
        strategy: ``"batched"``, ``"looped"`` or ``"chunked"``.
        chunk: matrices per call (``count`` for batched, 1 for looped).
        compute: ``"input"`` (the stack's dtype) or ``"float32"`` (upcast, round back).
        compiled: run the ``torch.compile``-d kernel.
        route: ``"direct"`` (the kernel itself) or the name of one of its variants (``"gram"``);
            a kernel without that variant runs directly.
        seconds: measured time of this plan (``nan``: not measured, the default plan).
        baseline_seconds: measured time of the default plan in the same run.
        compile_s: first-call (compile) time of the compiled candidates when they were tried.
        source: ``"default"``, ``"measured"``, ``"cache"`` or ``"forced"``.
    """

    strategy: str
    chunk: int
    compute: str = "input"
    compiled: bool = False
    route: str = "direct"
    seconds: float = math.nan
    baseline_seconds: float = math.nan
    compile_s: float = 0.0
    source: str = "default"

    def label(self) -> str:
        text = self.strategy if self.strategy != "chunked" else f"chunked({self.chunk})"
        if self.compute != "input":
            text += f"+{self.compute}"
        if self.compiled:
            text += "+compiled"
        if self.route != "direct":
            text += f"+{self.route}"
        return text


@dataclass
class _Config:
    measure: bool = True
    compile: bool = False
    variants: bool = True
    cache_path: Path | None = None
    forced: Plan | None = None
    # Inside measuring(): measure every stack, even small or already planned ones.
    remeasure: bool = False


_CONFIG = _Config(
    cache_path=Path(p) if (p := os.environ.get("ORTHOTORCH_DISPATCH_CACHE")) else None,
    measure=os.environ.get("ORTHOTORCH_DISPATCH", "measure") != "default",
)
_PLANS: dict[BucketKey, Plan] = {}
_DISK_LOADED: set[Path] = set()
_COMPILE_FAILED: set[str] = set()
_MEASURED_LOG: list[BucketKey] = []


def configure(
    *,
    measure: bool | None = None,
    compile: bool | None = None,
    cache_path: str | os.PathLike[str] | Literal[False] | None = None,
    variants: bool | None = None,
) -> None:
    """Set the dispatch policy for this process.

    Args:
        measure: ``False`` uses :func:`default_plan` for every bucket (reproducible across
            machines: no timing decides anything). Also set by ``ORTHOTORCH_DISPATCH=default``.
        compile: try ``torch.compile``-d candidates when measuring.
        cache_path: JSON file for measured plans (``False`` turns the disk cache off).
        variants: time the kernels' other routes (the Gram route of Newton–Schulz); ``False``
            keeps every measured plan on the direct route, whose bf16 rounding is smaller.
    """
    if measure is not None:
        if not isinstance(measure, bool):
            raise ValueError(f"measure must be a bool, got {measure!r}")
        _CONFIG.measure = measure
    if compile is not None:
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be a bool, got {compile!r}")
        _CONFIG.compile = compile
    if variants is not None:
        if not isinstance(variants, bool):
            raise ValueError(f"variants must be a bool, got {variants!r}")
        _CONFIG.variants = variants
    if cache_path is False:
        _CONFIG.cache_path = None
    elif cache_path is not None:
        _CONFIG.cache_path = Path(cache_path)


def clear_plans() -> None:
    """Forget every plan measured or loaded in this process."""
    _PLANS.clear()
    _DISK_LOADED.clear()


@contextlib.contextmanager
def forced(
    strategy: str,
    chunk: int = 1,
    compute: str = "input",
    compiled: bool = False,
    route: str = "direct",
) -> Iterator[None]:
    """Run every stack with one plan inside the block (tests, and reproducing a plan).

    ``chunk`` is used by ``"chunked"`` only. ``route`` applies to the kernels that offer it
    (``"gram"``: Newton–Schulz on wide matrices); the others run directly. Raises
    ``ValueError`` on an unknown strategy, compute dtype or route.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if compute not in ("input", "float32"):
        raise ValueError(f"compute must be 'input' or 'float32', got {compute!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    previous = _CONFIG.forced
    _CONFIG.forced = Plan(strategy, chunk, compute, compiled, route, source="forced")
    try:
        yield
    finally:
        _CONFIG.forced = previous


@contextlib.contextmanager
def measuring(compile: bool = False) -> Iterator[None]:
    """Measure every stack run inside the block anew (:func:`orthotorch.tune`), with
    ``torch.compile``-d candidates too when ``compile``."""
    previous = (_CONFIG.remeasure, _CONFIG.compile)
    _CONFIG.remeasure, _CONFIG.compile = True, compile or _CONFIG.compile
    _MEASURED_LOG.clear()
    try:
        yield
    finally:
        _CONFIG.remeasure, _CONFIG.compile = previous


def last_measured() -> list[dict[str, Any]]:
    """:func:`plan_table` rows of the buckets measured since the last :func:`measuring` began."""
    keys = {k.text() for k in _MEASURED_LOG}
    return [row for row in plan_table() if row["key"] in keys]


def default_plan(device_type: str, count: int) -> Plan:
    """The plan used without measurement: a loop on the CPU, one batched call elsewhere.

    On accelerators one ``bmm`` launch keeps the device busy where per-matrix launches would
    not; on the CPU the 2-D GEMMs reach oneDNN's bf16 kernels (bmm does not on some builds).
    """
    if device_type == "cpu":
        return Plan("looped", 1)
    return Plan("batched", max(count, 1))


def bucket_key(kernel: str, X: Tensor) -> BucketKey:
    """The bucket of a ``(count, m, n)`` stack for ``kernel``."""
    count, rows, cols = X.shape
    dtype = str(X.dtype).removeprefix("torch.")
    # Reading the thread count breaks a torch.compile graph; compiled steps use one key.
    threads = 0 if torch.compiler.is_compiling() else torch.get_num_threads()
    return BucketKey(kernel, rows, cols, count, dtype, X.device.type, threads)


def machine_stamp() -> dict[str, Any]:
    """What a cached plan is valid for: this machine, this torch, this thread count."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return {
        "version": _CACHE_VERSION,
        "host": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _run_plan(
    plan: Plan,
    X: Tensor,
    fn: Kernel,
    compiled: Callable[[], Kernel] | None,
    variants: Mapping[str, Kernel],
) -> Tensor:
    if plan.route in variants:
        kernel = variants[plan.route]
    else:
        kernel = compiled() if (plan.compiled and compiled is not None) else fn
    if plan.compute == "float32" and X.dtype in _HALF:  # never a downcast of float64 input
        upcast = replace(plan, compute="input")
        return _run_plan(upcast, X.float(), fn, compiled, variants).to(X.dtype)
    count = X.shape[0]
    if plan.strategy == "batched" or plan.chunk >= count:
        return kernel(X)
    out = torch.empty_like(X)
    if plan.strategy == "looped":
        for i in range(count):
            out[i] = kernel(X[i])
        return out
    for start in range(0, count, plan.chunk):
        out[start : start + plan.chunk] = kernel(X[start : start + plan.chunk])
    return out


def _candidates(key: BucketKey, compile_ok: bool, routes: Iterable[str] = ()) -> list[Plan]:
    count = key.count
    shapes = [Plan("batched", count), Plan("looped", 1)]
    for chunk in (count // 2, count // 4):
        if 2 <= chunk < count and all(p.chunk != chunk for p in shapes):
            shapes.append(Plan("chunked", chunk))
    computes = ["input", "float32"] if key.dtype in ("bfloat16", "float16") else ["input"]
    plans = [replace(p, compute=c) for c in computes for p in shapes]
    if compile_ok:
        # One compiled candidate per compute dtype: every other stack shape would be one more
        # graph to compile (seconds each), and on the shapes measured the batched graph won.
        plans += [Plan("batched", count, compute=c, compiled=True) for c in computes]
    for route in routes:
        # A variant runs batched and looped only (chunks seldom won for the direct route).
        plans += [replace(p, compute=c, route=route) for c in computes for p in shapes[:2]]
    return plans


def _time(
    plan: Plan, X: Tensor, fn: Kernel, compiled: Callable | None, variants: Mapping[str, Kernel]
) -> tuple[float, Tensor]:
    sync = torch.cuda.synchronize if X.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = _run_plan(plan, X, fn, compiled, variants)
    sync()
    return time.perf_counter() - start, out


def _measure(
    key: BucketKey,
    X: Tensor,
    fn: Kernel,
    compiled: Callable | None,
    variants: Mapping[str, Kernel],
    baseline: Plan,
    rounds: int = 2,
) -> tuple[Plan, Tensor]:
    """Time every candidate ``rounds`` times, interleaved; keep the fastest by its best time."""
    compile_ok = compiled is not None and key.kernel not in _COMPILE_FAILED
    plans = _candidates(key, compile_ok, variants)
    compile_s = 0.0
    if compile_ok:
        # The first call of each compiled candidate compiles; time it apart so that it neither
        # counts against the compiled plan nor goes unreported. A failure (no C++ compiler,
        # unsupported backend) drops the compiled candidates for this kernel.
        try:
            for plan in plans:
                if plan.compiled:
                    compile_s += _time(plan, X, fn, compiled, variants)[0]
        except Exception as err:  # any backend failure means "not available"
            warnings.warn(
                f"torch.compile unavailable for {key.kernel} ({err}); eager only", stacklevel=4
            )
            _COMPILE_FAILED.add(key.kernel)
            plans = [p for p in plans if not p.compiled]
    best = [math.inf] * len(plans)
    outputs: list[Tensor | None] = [None] * len(plans)
    for _ in range(rounds):
        for i, plan in enumerate(plans):
            seconds, outputs[i] = _time(plan, X, fn, compiled, variants)
            best[i] = min(best[i], seconds)
    w = min(range(len(plans)), key=best.__getitem__)
    winner = plans[w]
    baseline_s = next((best[i] for i, p in enumerate(plans) if _same(p, baseline)), math.nan)
    chosen = replace(
        winner,
        seconds=best[w],
        baseline_seconds=baseline_s,
        compile_s=compile_s,
        source="measured",
    )
    out = outputs[w]
    assert out is not None
    return chosen, out


def _same(a: Plan, b: Plan) -> bool:
    fields = ("strategy", "chunk", "compute", "compiled", "route")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def _flops(key: BucketKey) -> float:
    # Per Newton-Schulz step: X X^T (2 m^2 n), A A (2 m^3), B X (2 m^2 n).
    return key.count * (4 * key.rows**2 * key.cols + 2 * key.rows**3)


def plan_for(key: BucketKey) -> Plan | None:
    """The plan recorded for ``key`` (measured, or loaded from the disk cache), else ``None``."""
    _load_disk()
    return _PLANS.get(key)


def run_stack(
    kernel: str,
    X: Tensor,
    fn: Kernel,
    *,
    compiled: Callable[[], Kernel] | None = None,
    variants: Mapping[str, Kernel] | None = None,
    measure: bool | None = None,
    default: Plan | None = None,
) -> Tensor:
    """Run the batch-agnostic ``fn`` on the ``(count, m, n)`` stack ``X`` with the bucket's plan.

    ``kernel`` names ``fn`` and its work (plans are shared by every call with the same name and
    bucket, so two kernels of different cost must not share a name). ``compiled`` returns the
    ``torch.compile``-d ``fn`` (or is ``None``); it is called only when a compiled plan runs, so
    the compiler stack is not imported otherwise. ``variants`` maps route names (:data:`ROUTES`)
    to other batch-agnostic kernels with the same result in exact arithmetic; they are timed as
    candidates beside ``fn`` (never by default: the default plan runs ``fn``). ``measure=True``
    times the candidates now even for a small bucket (:func:`orthotorch.tune`); ``None``
    follows the policy. ``default`` replaces :func:`default_plan` for this kernel where nothing
    was measured (and is the baseline the measurement reports against).
    """
    if X.ndim != 3:
        raise ValueError(f"run_stack expects a (count, m, n) stack, got shape {tuple(X.shape)}")
    variants = variants or {}
    if _CONFIG.forced is not None:
        return _run_plan(_CONFIG.forced, X, fn, compiled, variants)
    key = bucket_key(kernel, X)
    plan = None if _CONFIG.remeasure else plan_for(key)
    if plan is None:
        if _CONFIG.remeasure:
            wanted = True
        elif measure is not None:
            wanted = measure
        else:
            wanted = _CONFIG.measure and _flops(key) >= MEASURE_FROM_FLOPS
        fallback = default if default is not None else default_plan(key.device, key.count)
        if not wanted or torch.compiler.is_compiling():
            return _run_plan(fallback, X, fn, compiled, variants)
        offered = variants if _CONFIG.variants else {}
        plan, out = _measure(key, X, fn, compiled if _CONFIG.compile else None, offered, fallback)
        _PLANS[key] = plan
        _MEASURED_LOG.append(key)
        _save_disk()
        return out
    return _run_plan(plan, X, fn, compiled, variants)


def plan_table() -> list[dict[str, Any]]:
    """One row per measured (or cached) bucket: the bucket, the chosen plan, and its speed-up
    over the default plan measured in the same run. For ``describe()`` / ``orthotorch bench``."""
    _load_disk()
    rows = []
    for key, plan in sorted(_PLANS.items(), key=lambda kv: kv[0].text()):
        speedup = plan.baseline_seconds / plan.seconds if plan.seconds > 0 else math.nan
        rows.append(
            {
                "key": key.text(),
                **asdict(key),
                "plan": plan.label(),
                "ms": plan.seconds * 1e3,
                "default_ms": plan.baseline_seconds * 1e3,
                "speedup": speedup,
                "compile_s": plan.compile_s,
                "source": plan.source,
            }
        )
    return rows


# ---- disk cache -------------------------------------------------------------------------------


def _load_disk() -> None:
    path = _CONFIG.cache_path
    if path is None or path in _DISK_LOADED:
        return
    _DISK_LOADED.add(path)
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("plans"), dict):
            raise ValueError("no 'plans' table")
        if not isinstance(data.get("stamp"), dict):
            raise ValueError("no 'stamp'")
        if data.get("stamp") != machine_stamp():
            return  # another machine, torch or thread count: its timings say nothing here
        loaded = {}
        for text, fields in data["plans"].items():
            key = BucketKey.from_text(text)
            plan = Plan(**fields)
            if (
                plan.strategy not in STRATEGIES
                or plan.compute not in ("input", "float32")
                or plan.route not in ROUTES
            ):
                raise ValueError(f"bad plan {fields!r}")
            loaded[key] = replace(plan, source="cache")
    except (OSError, ValueError, TypeError, KeyError) as err:
        warnings.warn(
            f"orthotorch dispatch cache {path} is corrupt ({err}); ignoring it, it will be rebuilt",
            stacklevel=3,
        )
        return
    for key, plan in loaded.items():
        _PLANS.setdefault(key, plan)


def _save_disk() -> None:
    path = _CONFIG.cache_path
    if path is None:
        return
    stamp = machine_stamp()
    plans = {
        k.text(): {**asdict(p), "source": "measured"}
        for k, p in _PLANS.items()
        if k.threads == stamp["threads"]
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "plans": plans}, indent=1))
        tmp.replace(path)  # atomic: a reader never sees half a file
    except OSError as err:
        warnings.warn(f"could not write orthotorch dispatch cache {path}: {err}", stacklevel=3)
