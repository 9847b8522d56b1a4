"""Learning-rate sweeps: the grid around an optimizer's default and the choice of the best lr.

The protocol ``compare`` follows (a tuning set kept apart from the reported runs):

1. the grid is the default lr times ``factors`` (default ``1/4, 1/2, 1, 2, 4``: a factor of 16
   around the default in octaves, log-spaced as lr sensitivity is);
2. every grid lr trains on the *tuning seeds*, which must be disjoint from the final seeds, for
   the same steps and schedule as the final runs;
3. the score of an lr is the mean over tuning seeds of the task's final validation metric (a
   diverged run scores ``+inf``); the lowest score wins, ties go to the smaller lr;
4. a winner at either end of the grid is flagged (and ``compare`` warns): the optimum may lie
   outside, so widen the grid before trusting that optimizer's row.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["DEFAULT_FACTORS", "SweepResult", "lr_grid", "pick_best"]

DEFAULT_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def lr_grid(centre: float, factors: Sequence[float] = DEFAULT_FACTORS) -> list[float]:
    """``sorted(centre * f for f in factors)``, duplicates removed; ``ValueError`` if bad."""
    if not (isinstance(centre, (int, float)) and math.isfinite(centre) and centre > 0):
        raise ValueError(f"the sweep centre lr must be a positive number, got {centre!r}")
    if not factors or not all(
        isinstance(f, (int, float)) and math.isfinite(f) and f > 0 for f in factors
    ):
        raise ValueError(f"sweep factors must be positive numbers, got {list(factors)!r}")
    return sorted({float(f"{centre * f:.6g}") for f in factors})


def pick_best(scores: Sequence[float]) -> tuple[int, bool]:
    """``(index of the lowest score, whether it is at an end of the grid)``.

    ``scores`` are in grid order (ascending lr); non-finite scores (diverged) never win unless
    every score is non-finite, then the smallest lr is returned. Ties go to the smaller lr.
    """
    if not scores:
        raise ValueError("no scores to pick from")
    finite = [(s, i) for i, s in enumerate(scores) if math.isfinite(s)]
    index = min(finite)[1] if finite else 0
    at_edge = len(scores) > 1 and index in (0, len(scores) - 1)
    return index, at_edge


@dataclass
class SweepResult:
    """One optimizer's sweep: the grid, each lr's score, the choice and the edge flag.

    ``finals[i]`` are the final metric values of ``grid[i]`` on each tuning seed (``None`` for a
    diverged run); ``scores[i]`` is their mean (``inf`` if any diverged).
    """

    optimizer: str
    grid: list[float]
    tuning_seeds: list[int]
    finals: list[list[float | None]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    chosen_lr: float | None = None
    at_edge: bool = False

    def add(self, values: Sequence[float | None]) -> None:
        """Record the tuning-seed finals of the next grid lr."""
        self.finals.append(list(values))
        ok = all(v is not None and math.isfinite(v) for v in values)
        self.scores.append(statistics.fmean(values) if ok and values else math.inf)

    def choose(self) -> float:
        """Pick the best lr of the recorded scores; sets ``chosen_lr`` and ``at_edge``."""
        index, self.at_edge = pick_best(self.scores)
        self.chosen_lr = self.grid[index]
        return self.chosen_lr
