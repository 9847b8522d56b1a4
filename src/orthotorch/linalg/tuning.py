"""``orthotorch.tune``: measure the dispatch plans of an optimizer's buckets before training.

Without it, each bucket large enough to matter is measured on its first step
(:mod:`~orthotorch.linalg.dispatch`); ``tune`` moves that cost up front, measures small buckets
too, can add ``torch.compile``-d candidates, and returns the table of choices.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from . import dispatch
from .polar_factor import resolve_compute

__all__ = ["bucket_shapes", "tune"]

Bucket = tuple[str, int | None, torch.dtype | None, torch.device, int, int, int]


def _matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    # The optimizers orthogonalize (shape[0], prod(shape[1:])) matrices (conv kernels flattened).
    return shape[0], math.prod(shape[1:])


def bucket_shapes(optimizer: Any) -> list[Bucket]:
    """``(method, steps, dtype, device, count, rows, cols)`` of every Newton–Schulz stack that
    ``optimizer``'s step builds: per group with an ``ns_method`` (AdamW-routed groups excluded),
    same-shape parameters stacked as the wide ``(min, max)`` matrix."""
    buckets: Counter[Bucket] = Counter()
    for group in optimizer.param_groups:
        if group.get("algorithm") == "adamw" or "ns_method" not in group:
            continue
        per_shape: Counter[tuple[tuple[int, int], torch.device]] = Counter()
        for p in group["params"]:
            if p.ndim >= 2:
                per_shape[(_matrix_shape(p.shape), p.device)] += 1
        for ((rows, cols), device), count in per_shape.items():
            key = (
                group["ns_method"],
                group.get("ns_steps"),
                group.get("ns_dtype"),
                device,
                count,
                min(rows, cols),
                max(rows, cols),
            )
            buckets[key] += 1
    return list(buckets)


def tune(
    target: Any,
    *,
    method: str = "polar_express",
    steps: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    compile: bool = False,
    cache_path: str | os.PathLike[str] | Literal[False] | None = None,
) -> list[dict[str, Any]]:
    """Measure (again) the dispatch plan of every bucket of ``target``; return their table.

    Args:
        target: an optimizer (its groups' ``ns_method``/``ns_steps``/``ns_dtype`` and parameter
            shapes are used; ``method``/``steps``/``dtype``/``device`` are then ignored), or an
            iterable of matrix shapes ``(rows, cols)`` (or ``(rows, *rest)``), where repeated
            shapes form one stack, as in an optimizer group.
        method, steps, dtype, device: the Newton–Schulz method and compute settings for shapes.
        compile: also try ``torch.compile``-d candidates (compile time is reported).
        cache_path: keep the plans in this JSON file as well (see :func:`dispatch.configure`).

    Returns:
        :func:`~orthotorch.linalg.dispatch.plan_table` rows of the tuned buckets.

    Raises:
        ValueError: a shape is not a tuple of at least two positive ints, or a method argument
            is not valid (as for :func:`~orthotorch.linalg.orthogonalize`).
    """
    if hasattr(target, "param_groups"):
        buckets = bucket_shapes(target)
    else:
        buckets = _buckets_from_shapes(target, method, steps, dtype, torch.device(device))
    # Validate everything before measuring anything.
    resolved = [(resolve_compute(m, s, d), dev, c, r, k) for m, s, d, dev, c, r, k in buckets]
    if cache_path is not None:
        dispatch.configure(cache_path=cache_path)
    with dispatch.measuring(compile=compile):
        for (spec, s, compute), dev, count, rows, cols in resolved:
            X = torch.randn(count, rows, cols, device=dev).to(compute)
            spec.iterate(X, s)
    return dispatch.last_measured()


def _buckets_from_shapes(
    shapes: Iterable[Any],
    method: str,
    steps: int | None,
    dtype: torch.dtype | None,
    device: torch.device,
) -> list[Bucket]:
    if isinstance(shapes, (str, bytes, Mapping)) or not isinstance(shapes, Iterable):
        raise ValueError(f"target must be an optimizer or an iterable of shapes, got {shapes!r}")
    counts: Counter[tuple[int, int]] = Counter()
    for shape in shapes:
        if (
            not isinstance(shape, (tuple, list, torch.Size))
            or len(shape) < 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise ValueError(
                f"each shape must be a tuple of at least two positive ints, got {shape!r}"
            )
        counts[_matrix_shape(tuple(shape))] += 1
    return [
        (method, steps, dtype, device, count, min(r, c), max(r, c))
        for (r, c), count in counts.items()
    ]
