"""Results of a comparison: per-run records, the per-optimizer summary, table, Markdown and JSON.

The summary is computed from the recorded curves every time it is asked for (nothing is
hard-coded or cached), so a partial result summarises exactly the runs that finished.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__

__all__ = ["CompareResult", "RunRecord", "Summary", "environment", "finite_json"]

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
BASELINE = "adamw"
# Steps excluded from ms/step: the first steps pay for allocator warm-up and kernel selection.
WARMUP_STEPS = 3


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    import numpy

    return {
        "orthotorch": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


@dataclass
class RunRecord:
    """One training run (one optimizer, one seed): every curve it produced.

    ``metrics[k][i]`` was measured after ``eval_steps[i]`` steps, when ``eval_time_s[i]`` seconds
    of training had elapsed on this run's own clock: the sum of its step times from step 2 on
    (evaluations excluded; the first step, which pays for allocation and kernel selection, and
    the time before it start no clock). ``train_loss``, ``step_time_s`` and ``lr_factor`` (the
    schedule multiplier of each step) have one entry per completed step.

    ``phase`` is ``"final"`` (a reported run) or ``"tune"`` (a sweep run on a tuning seed);
    ``budget_stopped`` marks a run ended by the per-run time budget at step ``stopped_at``;
    ``resumed_from`` is the checkpoint step it continued from (``None``: ran in one go).
    """

    optimizer: str
    seed: int
    lr: float | None
    adamw_lr: float | None = None
    phase: str = "final"
    eval_steps: list[int] = field(default_factory=list)
    eval_time_s: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    train_loss: list[float] = field(default_factory=list)
    step_time_s: list[float] = field(default_factory=list)
    lr_factor: list[float] = field(default_factory=list)
    state_bytes: int = 0
    diverged: bool = False
    diverged_at: int | None = None
    error: str | None = None
    budget_stopped: bool = False
    stopped_at: int | None = None
    resumed_from: int | None = None

    def mark_diverged(self, step: int, why: str) -> None:
        """Record that the run stopped at ``step`` because of a NaN/Inf (``why``)."""
        self.diverged, self.diverged_at, self.error = True, step, why

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (non-finite values are left to :func:`finite_json`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Inverse of :meth:`to_dict` (``null`` curve values, written for NaN, come back NaN)."""
        data = dict(data)
        data["metrics"] = {
            k: [math.nan if v is None else v for v in vs] for k, vs in data["metrics"].items()
        }
        data["train_loss"] = [math.nan if v is None else v for v in data["train_loss"]]
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Summary:
    """One optimizer's row of the comparison table (means over its non-diverged seeds)."""

    optimizer: str
    lr: float | None
    lr_source: str
    seeds: int
    diverged: int
    budget_stopped: int
    final: float | None
    final_std: float | None
    final_range: tuple[float, float] | None
    best: float | None
    steps_to_target: float | None
    time_to_target_s: float | None
    reached: int
    ms_per_step: float | None
    ms_ratio: float | None
    state_bytes: int
    extras: dict[str, float]
    verdict: str


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class CompareResult:
    """Everything a comparison produced; build summaries, tables and files from it.

    Attributes:
        task, metric, metric_label, log_y: what was measured and how to show it.
        config: the run configuration (steps, seeds, learning rates, device, ...).
        environment: versions and machine (:func:`environment`).
        runs: one :class:`RunRecord` per (optimizer, seed), in run order.
        target: explicit target, or ``None`` for the baseline's (AdamW's) mean final value.
        complete: ``False`` while a comparison is still running (partial files).
        sweeps: per swept optimizer, its :class:`~orthotorch.bench.sweep.SweepResult` as a dict
            (grid, scores, chosen lr, edge flag, tuning seeds).
        tuning_runs: the sweep runs (on the tuning seeds; never part of the summary).
    """

    task: str
    metric: str
    metric_label: str
    config: dict[str, Any]
    environment: dict[str, Any]
    log_y: bool = False
    runs: list[RunRecord] = field(default_factory=list)
    target: float | None = None
    complete: bool = False
    extra_metrics: tuple[str, ...] = ()
    sweeps: dict[str, dict[str, Any]] = field(default_factory=dict)
    tuning_runs: list[RunRecord] = field(default_factory=list)

    # ------------------------------------------------------------------ summaries
    def optimizers(self) -> list[str]:
        """Optimizer labels in run order."""
        return list(dict.fromkeys(r.optimizer for r in self.runs))

    def runs_of(self, optimizer: str) -> list[RunRecord]:
        """The runs of one optimizer, in seed order."""
        return [r for r in self.runs if r.optimizer == optimizer]

    def finals(self, optimizer: str) -> list[float]:
        """Final metric per non-diverged seed."""
        return [r.metrics[self.metric][-1] for r in self.runs_of(optimizer) if not r.diverged]

    def resolved_target(self) -> tuple[float | None, str]:
        """``(target, where it came from)``."""
        if self.target is not None:
            return self.target, "given"
        finals = self.finals(BASELINE)
        if finals:
            return statistics.fmean(finals), f"{BASELINE} mean final"
        return None, "none (no finished adamw run)"

    def _verdict(self, optimizer: str) -> str:
        if optimizer == BASELINE:
            return "baseline"
        mine, base = self.finals(optimizer), self.finals(BASELINE)
        if not base:
            return "n/a (no adamw)"
        if not mine:
            return "diverged"
        if len(mine) < 2 or len(base) < 2:
            return "n/a (1 seed: spread unknown)"
        # Non-overlapping seed ranges: every seed of one beats every seed of the other.
        if max(mine) < min(base):
            return "better, beyond seed spread"
        if min(mine) > max(base):
            return "worse, beyond seed spread"
        return "within seed spread"

    def summary(self) -> list[Summary]:
        """One :class:`Summary` per optimizer (computed from the recorded curves)."""
        target, _ = self.resolved_target()
        base_ms = None
        rows = []
        for name in self.optimizers():
            runs = self.runs_of(name)
            ok = [r for r in runs if not r.diverged]
            finals = [r.metrics[self.metric][-1] for r in ok]
            hits_step, hits_time = [], []
            for r in ok:
                run_s = statistics.median(r.step_time_s[WARMUP_STEPS:] or r.step_time_s or [0.0])
                curve = r.metrics[self.metric]
                # Small tolerance so the baseline's own runs count as reaching its mean.
                hit = next(
                    (
                        i
                        for i, v in enumerate(curve)
                        if target is not None and v <= target * (1 + 1e-9)
                    ),
                    None,
                )
                if hit is not None:
                    hits_step.append(r.eval_steps[hit])
                    # Steps x the run's median step time: robust to other processes stealing the
                    # CPU for a while (the raw cumulative time is in eval_time_s and the plot).
                    hits_time.append(r.eval_steps[hit] * run_s)
            times = [t for r in runs for t in r.step_time_s[WARMUP_STEPS:]] or [
                t for r in runs for t in r.step_time_s
            ]
            ms = statistics.median(times) * 1e3 if times else None
            if name == BASELINE:
                base_ms = ms
            extras = {}
            for key in self.extra_metrics:
                values = [r.metrics[key][-1] for r in ok if key in r.metrics]
                if values:
                    extras[key] = statistics.fmean(values)
            all_reached = ok and len(hits_step) == len(ok)
            info = self.config.get("optimizers", {}).get(name, {})
            rows.append(
                Summary(
                    optimizer=name,
                    lr=runs[0].lr,
                    lr_source=info.get("lr_source", ""),
                    seeds=len(runs),
                    diverged=len(runs) - len(ok),
                    budget_stopped=sum(r.budget_stopped for r in runs),
                    final=_mean(finals),
                    final_std=statistics.stdev(finals) if len(finals) > 1 else None,
                    final_range=(min(finals), max(finals)) if finals else None,
                    best=_mean([min(r.metrics[self.metric]) for r in ok]),
                    steps_to_target=_mean(hits_step) if all_reached else None,
                    time_to_target_s=_mean(hits_time) if all_reached else None,
                    reached=len(hits_step),
                    ms_per_step=ms,
                    ms_ratio=None,
                    state_bytes=max((r.state_bytes for r in runs), default=0),
                    extras=extras,
                    verdict=self._verdict(name),
                )
            )
        for row in rows:
            if base_ms and row.ms_per_step is not None:
                row.ms_ratio = row.ms_per_step / base_ms
        return rows

    def spread_note(self) -> str:
        """One sentence: which differences from AdamW exceed the seed-to-seed spread."""
        rows = [r for r in self.summary() if r.optimizer != BASELINE]
        if not self.finals(BASELINE) or not rows:
            return "No AdamW baseline finished: differences are not assessed."
        beyond = [r.optimizer for r in rows if "beyond" in r.verdict]
        within = [r.optimizer for r in rows if r.verdict == "within seed spread"]
        parts = []
        if beyond:
            parts.append(
                f"Final {self.metric_label} differs from AdamW beyond the seed-to-seed spread "
                f"(no overlap between seeds) for: {', '.join(beyond)}."
            )
        if within:
            parts.append(
                f"For {', '.join(within)} the difference from AdamW does NOT exceed the "
                "seed-to-seed spread: run more steps or seeds before drawing a conclusion."
            )
        if not parts:
            parts.append("Differences from AdamW could not be assessed (one seed or divergence).")
        return " ".join(parts)

    def sweep_notes(self) -> list[str]:
        """One line per swept optimizer whose chosen lr sits at an edge of its grid."""
        return [
            f"WARNING: {name}'s best lr {sw['chosen_lr']:.3g} is at the edge of its sweep grid "
            f"[{sw['grid'][0]:.3g} .. {sw['grid'][-1]:.3g}]: the optimum may lie outside."
            for name, sw in self.sweeps.items()
            if sw.get("at_edge")
        ]

    def sweep_markdown(self) -> list[str]:
        """The sweeps as a Markdown section: each grid lr's mean tuning-seed score."""
        if not self.sweeps:
            return []
        md = [
            "## Learning-rate sweeps",
            "",
            f"Score: mean final {self.metric_label} over the tuning seeds (disjoint from the "
            "reported seeds); inf = diverged. The chosen lr is in bold.",
            "",
        ]
        for name, sw in self.sweeps.items():
            cells = [
                (
                    f"**{lr:.3g}: {score:.4g}**"
                    if lr == sw["chosen_lr"]
                    else f"{lr:.3g}: {score:.4g}"
                )
                for lr, score in zip(sw["grid"], sw["scores"])
            ]
            edge = " (AT GRID EDGE)" if sw.get("at_edge") else ""
            md.append(f"- {name} (tuning seeds {sw['tuning_seeds']}){edge}: " + ", ".join(cells))
        return [*md, ""]

    # ------------------------------------------------------------------ rendering
    def _rows(self) -> tuple[list[str], list[list[str]]]:
        target, source = self.resolved_target()
        extra_headers = [f"final {k}" for k in self.extra_metrics]
        headers = [
            "optimizer",
            "lr",
            f"final {self.metric_label}",
            "best",
            *extra_headers,
            "steps to target" if target is None else f"steps to {_fmt(target)}",
            "time to target",
            "ms/step",
            "vs adamw",
            "state",
            "vs adamw (seeds)",
        ]
        body = []
        for s in self.summary():
            if s.final is None:
                final = f"diverged ({s.diverged}/{s.seeds} seeds)"
            else:
                final = _fmt(s.final) + (f" ± {s.final_std:.2g}" if s.final_std is not None else "")
                if s.diverged:
                    final += f" ({s.diverged}/{s.seeds} diverged)"
            if s.budget_stopped:
                final += f" (budget: {s.budget_stopped}/{s.seeds} stopped early)"
            if s.optimizer == BASELINE and source == f"{BASELINE} mean final":
                # The target is this row's own mean: "reaching" it says nothing.
                to_step = to_time = "- (own mean)"
            elif s.steps_to_target is not None:
                to_step, to_time = f"{s.steps_to_target:.0f}", f"{s.time_to_target_s:.2f} s"
            else:
                to_step = to_time = f"not reached ({s.reached}/{s.seeds - s.diverged})"
            lr_text = _fmt(s.lr, ".3g") + (f" ({s.lr_source})" if s.lr_source else "")
            body.append(
                [
                    s.optimizer,
                    lr_text,
                    final,
                    _fmt(s.best),
                    *[_fmt(s.extras.get(k)) for k in self.extra_metrics],
                    to_step,
                    to_time,
                    _fmt(s.ms_per_step, ".1f"),
                    "n/a" if s.ms_ratio is None else f"{s.ms_ratio:.2f}x",
                    _bytes(s.state_bytes),
                    s.verdict,
                ]
            )
        return headers, body

    def table(self) -> str:
        """A plain-text table for the terminal, followed by the seed-spread note."""
        headers, body = self._rows()
        widths = [max(len(row[i]) for row in [headers, *body]) for i in range(len(headers))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *body]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([*lines, "", self._footer()])

    def _footer(self) -> str:
        target, source = self.resolved_target()
        seeds = self.config.get("seeds", [])
        sched = self.config.get("schedule") or {}
        sched_text = (
            f"schedule {sched.get('kind')} (warmup {sched.get('warmup')}, floor "
            f"{sched.get('min_ratio')}) on every group; "
            if sched
            else ""
        )
        lines = [
            f"task {self.task}, {self.config.get('steps')} steps, seeds {seeds}; {sched_text}"
            f"final = mean ± std over seeds; target {_fmt(target)} ({source}); "
            "ms/step = median training step (evaluation excluded); "
            "time to target = steps to target x the run's median step time.",
            self.spread_note(),
        ]
        lines += self.sweep_notes()
        if not self.complete:
            lines.append("PARTIAL: the comparison did not finish; only the rows above ran.")
        return "\n".join(lines)

    def markdown(self) -> str:
        """``results.md``: the table as Markdown plus configuration and environment."""
        headers, body = self._rows()
        md = [
            f"# orthotorch compare: {self.task}",
            "",
            f"{self.config.get('task_description', '')}".strip(),
            "",
            "| " + " | ".join(headers) + " |",
            "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(row) + " |" for row in body),
            "",
            *self._footer().splitlines(),
            "",
        ]
        md += self.sweep_markdown()
        diverged = [r for r in self.runs if r.diverged]
        if diverged:
            md += ["## Diverged runs", ""]
            md += [
                f"- {r.optimizer} seed {r.seed} at step {r.diverged_at}: {r.error}"
                for r in diverged
            ]
            md.append("")
        md += [
            "![loss vs step](loss_vs_step.png)",
            "",
            "![loss vs time](loss_vs_time.png)",
            "",
            "## Environment",
            "",
            *(f"- {k}: {v}" for k, v in self.environment.items()),
            "",
        ]
        return "\n".join(md)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready: config, environment, target, summary and every curve."""
        target, source = self.resolved_target()
        return {
            "task": self.task,
            "metric": self.metric,
            "metric_label": self.metric_label,
            "complete": self.complete,
            "config": self.config,
            "environment": self.environment,
            "target": target,
            "target_source": source,
            "spread_note": self.spread_note(),
            "summary": [asdict(s) for s in self.summary()],
            "sweeps": self.sweeps,
            "runs": [asdict(r) for r in self.runs],
            "tuning_runs": [asdict(r) for r in self.tuning_runs],
        }

    def save(self, out: str | Path, *, plots: bool = True) -> list[Path]:
        """Write ``results.json``, ``results.md`` and (``plots``) the PNGs into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        path = out / RESULTS_JSON
        # NaN/Inf are not JSON; they only occur in diverged curves, written as null.
        path.write_text(json.dumps(finite_json(self.to_dict()), indent=1) + "\n")
        written.append(path)
        path = out / RESULTS_MD
        path.write_text(self.markdown())
        written.append(path)
        if plots and self.runs:
            from .plots import plot_comparison

            written += plot_comparison(self, out)
        return written


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (NaN/Inf are not JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj
