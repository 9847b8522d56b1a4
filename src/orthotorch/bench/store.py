"""Per-run result files and checkpoints under ``--out``: comparisons that survive a stop.

Layout (``out/`` is the comparison's folder)::

    out/runs/<phase>/<optimizer>/seed<seed>-lr<lr>-<key>.json   one finished run (a RunRecord)
    out/checkpoints/<key>.pt                                    an unfinished run's last state

``<key>`` is a hash of everything that determines a run's result (task, optimizer label and
description, lr, AdamW-group lr, steps, schedule, evaluation interval, budget, seed, phase), so
a rerun with the same command finds its finished runs and skips them, and a changed setting
never reuses a stale one. A user factory is identified by its label and qualified name only:
change its code and rename it (or use a fresh ``--out``) to rerun.

A checkpoint holds the model, the optimizer, the schedule's base lrs, the global torch RNG
state, the curves so far and the clocks. The batch stream is not saved: a resumed run rebuilds
its task from the seed and skips the batches already consumed, which reproduces the stream
whenever it depends on the seed only (true of every built-in task). Files are written to a
temporary name and renamed, so a stop while writing never leaves a half file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .report import RunRecord, finite_json

__all__ = ["RunStore", "run_key"]


def run_key(fields: dict[str, Any]) -> str:
    """A 12-hex-digit hash of ``fields`` (JSON, sorted keys)."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name) or "_"


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


class RunStore:
    """Finished runs and checkpoints of one comparison folder (``out=None``: keeps nothing)."""

    def __init__(self, out: str | Path | None) -> None:
        self.out = Path(out) if out is not None else None

    def result_path(self, phase: str, optimizer: str, seed: int, lr: float | None, key: str):
        """Where the finished run with this key lives (``None`` without a folder)."""
        if self.out is None:
            return None
        lr_text = "none" if lr is None else f"{lr:.6g}"
        return self.out / "runs" / phase / _safe(optimizer) / f"seed{seed}-lr{lr_text}-{key}.json"

    def load_finished(self, path: Path | None) -> RunRecord | None:
        """The finished run stored at ``path``, or ``None`` if there is none."""
        if path is None or not path.is_file():
            return None
        return RunRecord.from_dict(json.loads(path.read_text()))

    def save_finished(self, record: RunRecord, path: Path | None) -> None:
        """Write one finished run (atomically)."""
        if path is None:
            return
        text = json.dumps(finite_json(record.to_dict()), indent=1) + "\n"
        _atomic_write(path, lambda tmp: tmp.write_text(text))

    def _checkpoint_path(self, key: str) -> Path | None:
        return None if self.out is None else self.out / "checkpoints" / f"{key}.pt"

    def save_checkpoint(self, key: str, payload: dict[str, Any]) -> bool:
        """Write an unfinished run's state; ``False`` without a folder."""
        path = self._checkpoint_path(key)
        if path is None:
            return False
        _atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return True

    def load_checkpoint(self, key: str) -> dict[str, Any] | None:
        """The last checkpoint of the run with this key, or ``None``."""
        path = self._checkpoint_path(key)
        if path is None or not path.is_file():
            return None
        # Our own file (it holds RNG states and plain Python objects, not only tensors).
        return torch.load(path, map_location="cpu", weights_only=False)

    def drop_checkpoint(self, key: str) -> None:
        """Remove the checkpoint of a run that finished."""
        path = self._checkpoint_path(key)
        if path is not None and path.exists():
            path.unlink()
