"""THE learning-rate schedule registry of ``orthotorch compare``: warmup, then a decay shape.

A schedule is a multiplier ``m(t)`` of each param group's own base lr (the
``torch.optim.lr_scheduler.LambdaLR`` convention): step ``t = 0, 1, ..., T - 1`` runs at
``lr_g(t) = base_lr_g * m(t)`` for every group ``g``. Every optimizer of a comparison, and every
group inside one (the orthogonalized group and its AdamW group alike), sees the same multiplier,
so the schedule never favours one of them.

With ``W`` warmup steps (``W = round(warmup * T)``) and ``p = (t - W) / (T - W)`` in ``[0, 1)``:

- warmup, every kind: ``m(t) = (t + 1) / W`` for ``t < W`` (linear, never 0);
- ``constant``: ``m(t) = 1``;
- ``cosine``: ``m(t) = r + (1 - r) (1 + cos(pi p)) / 2`` with floor ``r = min_ratio`` (0.1: the
  usual "decay to 10%");
- ``wsd`` (warmup-stable-decay, Hu et al. 2024 "MiniCPM"): ``m(t) = 1`` until the last
  ``decay`` fraction of the run (``D = T - round(decay * T)`` steps, at least ``W``), then
  ``m(t) = r + (1 - r) (1 - (t - D) / (T - D))`` linearly down to the floor ``r = min_ratio``.

Adding a shape is one entry in :data:`SCHEDULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["SCHEDULES", "GroupSchedule", "Schedule", "available_schedules"]

ScheduleKind = Literal["constant", "cosine", "wsd"]


def _constant(progress: float, t: int, total: int, sched: Schedule) -> float:
    del progress, t, total, sched
    return 1.0


def _cosine(progress: float, t: int, total: int, sched: Schedule) -> float:
    del t, total
    r = sched.min_ratio
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _wsd(progress: float, t: int, total: int, sched: Schedule) -> float:
    del progress
    decay_start = max(sched.warmup_steps(total), total - round(sched.decay * total))
    if t < decay_start:
        return 1.0
    r = sched.min_ratio
    return r + (1.0 - r) * (1.0 - (t - decay_start) / max(1, total - decay_start))


# kind -> (progress, t, total, schedule) -> multiplier after warmup.
SCHEDULES: dict[str, Callable[[float, int, int, Schedule], float]] = {
    "constant": _constant,
    "cosine": _cosine,
    "wsd": _wsd,
}


def available_schedules() -> list[str]:
    """Names of the registered schedule shapes."""
    return list(SCHEDULES)


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule: ``kind`` after ``warmup`` (a fraction of the run's steps).

    Attributes:
        kind: ``"constant"``, ``"cosine"`` (default) or ``"wsd"``.
        warmup: fraction of the steps spent in linear warmup, in ``[0, 1)`` (default 0.05).
        min_ratio: the multiplier the decay ends at (cosine, wsd), in ``[0, 1]`` (default 0.1).
        decay: fraction of the steps in wsd's final decay, in ``(0, 1]`` (default 0.2).
    """

    kind: ScheduleKind = "cosine"
    warmup: float = 0.05
    min_ratio: float = 0.1
    decay: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.kind!r}; valid schedules: {', '.join(SCHEDULES)}"
            )
        if not (isinstance(self.warmup, (int, float)) and 0.0 <= self.warmup < 1.0):
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if not (isinstance(self.min_ratio, (int, float)) and 0.0 <= self.min_ratio <= 1.0):
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio!r}")
        if not (isinstance(self.decay, (int, float)) and 0.0 < self.decay <= 1.0):
            raise ValueError(f"decay must be a fraction in (0, 1], got {self.decay!r}")

    def warmup_steps(self, total: int) -> int:
        """``W = round(warmup * total)``, at most ``total - 1``."""
        return min(round(self.warmup * total), max(0, total - 1))

    def multiplier(self, t: int, total: int) -> float:
        """``m(t)``: the factor applied to every group's base lr at step ``t`` (0-based)."""
        warm = self.warmup_steps(total)
        if t < warm:
            return (t + 1) / warm
        progress = (t - warm) / max(1, total - warm)
        return SCHEDULES[self.kind](progress, t, total, self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (recorded with every result)."""
        return asdict(self)


class GroupSchedule:
    """Apply a :class:`Schedule` to every param group of an optimizer, LambdaLR-style.

    The base lr of each group is read once, at construction (``group["lr"]``); before step
    ``t`` call :meth:`set` and every group runs at ``base * m(t)``. Unlike
    ``torch.optim.lr_scheduler.LambdaLR`` it needs only a ``param_groups`` list, so it also
    drives composite optimizers (``torch.optim.Muon`` + ``AdamW`` in one object).
    """

    def __init__(self, optimizer: Any, schedule: Schedule, total: int) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.total = total
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]

    def set(self, t: int) -> float:
        """Set every group's lr for step ``t``; returns the multiplier."""
        factor = self.schedule.multiplier(t, self.total)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return factor

    def state_dict(self) -> dict[str, Any]:
        """The base lrs (the multiplier itself is a function of the step)."""
        return {"base_lrs": list(self.base_lrs), "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the base lrs saved by :meth:`state_dict`."""
        if len(state["base_lrs"]) != len(self.base_lrs) or state["total"] != self.total:
            raise ValueError("schedule state does not match this optimizer and run length")
        self.base_lrs = [float(v) for v in state["base_lrs"]]
