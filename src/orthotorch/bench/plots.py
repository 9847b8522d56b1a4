"""PNG plots of a comparison: metric vs step and vs training wall time, a band over seeds."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .report import CompareResult

__all__ = ["plot_comparison"]

PLOTS = ("loss_vs_step.png", "loss_vs_time.png")


def _curves(result: CompareResult, name: str, x_key: str) -> tuple[np.ndarray, np.ndarray, list]:
    """``(x, values[seed, i])`` on the common prefix of the runs, NaN-padded for diverged ones."""
    runs = result.runs_of(name)
    length = max(len(r.eval_steps) for r in runs)
    values = np.full((len(runs), length), np.nan)
    xs = np.full((len(runs), length), np.nan)
    for i, r in enumerate(runs):
        curve = r.metrics[result.metric]
        values[i, : len(curve)] = curve
        xs[i, : len(curve)] = getattr(r, x_key)
    return xs, values, runs


def plot_comparison(result: CompareResult, out: str | Path) -> list[Path]:
    """Write ``loss_vs_step.png`` and ``loss_vs_time.png`` into ``out``; returns the paths.

    Versus step: one line per optimizer (mean over seeds) and a band from the best to the worst
    seed. Versus time: one line per seed, each on its own clock (training time from the end of
    its first step). An ``x`` marks where a run diverged, a ``|`` where the time budget ended it.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = []
    target, _ = result.resolved_target()
    for filename, x_key, xlabel in (
        (PLOTS[0], "eval_steps", "step"),
        (PLOTS[1], "eval_time_s", "training time since the end of step 1 (s), each seed's clock"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for k, name in enumerate(result.optimizers()):
            color = f"C{k}"
            xs, values, runs = _curves(result, name, x_key)
            diverged = sum(r.diverged for r in runs)
            label = name + (f" (diverged {diverged}/{len(runs)})" if diverged else "")
            if x_key == "eval_time_s":
                # One line per seed on its own clock: averaging time axes would let one stalled
                # seed (another process took the CPU) shift the whole curve.
                for i in range(len(runs)):
                    ax.plot(
                        xs[i],
                        values[i],
                        color=color,
                        lw=1.2,
                        alpha=0.8,
                        label=label if i == 0 else None,
                    )
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: diverged
                    # Mean over the seeds still running at each point.
                    x = np.nanmean(xs, axis=0)
                    mean = np.nanmean(values, axis=0)
                    lo, hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
                ax.plot(x, mean, color=color, label=label, lw=1.6)
                if len(runs) > 1:
                    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
            for r in runs:
                if r.diverged and r.eval_steps:
                    at = getattr(r, x_key)[-1]
                    finite = [v for v in r.metrics[result.metric] if np.isfinite(v)]
                    ax.plot([at], [finite[-1] if finite else np.nan], "x", color=color, ms=9, mew=2)
                if r.budget_stopped and r.eval_steps:
                    at = getattr(r, x_key)[-1]
                    ax.plot([at], [r.metrics[result.metric][-1]], "|", color=color, ms=12, mew=2)
        if target is not None:
            ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:.4g}")
        if result.log_y:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(result.metric_label)
        seeds = len(result.config.get("seeds", []))
        how = "one line per seed" if x_key == "eval_time_s" else "mean, band = min..max"
        ax.set_title(f"{result.task}: {seeds} seed(s), {how}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        _zoom(ax, result)
        fig.tight_layout()
        path = out / filename
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _zoom(ax, result: CompareResult) -> None:
    # The first evaluations (untrained model) dwarf the interesting end of the curves; cap the
    # y-axis a little above the worst value reached after the first tenth of training.
    if result.log_y:
        return
    tails = []
    for r in result.runs:
        curve = [v for v in r.metrics[result.metric] if np.isfinite(v)]
        if len(curve) > 3:
            tails += curve[max(1, len(curve) // 10) :]
    if tails:
        lo, hi = min(tails), max(tails)
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
