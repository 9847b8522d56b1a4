"""Which parameter goes to which update: :func:`param_groups` and :func:`describe`.

Shapes alone cannot tell an embedding or an output head from a hidden matrix (all are 2-D), so
routing uses module types and tied weights:

- hidden 2-D+ weights (linear, convolution, stacked heads) -> the orthogonalized group;
- ``nn.Embedding``/``nn.EmbeddingBag`` weights, the output head (the last ``nn.Linear`` of the
  model, and any weight tied to an embedding), biases, norms and other 1-D parameters ->
  an ``"adamw"`` group.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from torch import Tensor, nn

from .functional import matrix_shape, shape_scale

__all__ = ["describe", "param_groups", "route_parameters"]

Route = Literal["orthogonal", "adamw"]
ROUTES: tuple[str, ...] = ("orthogonal", "adamw")


def route_parameters(
    model: nn.Module, route: Mapping[str, Route] | None = None
) -> list[tuple[str, Tensor, Route, str]]:
    """``(name, parameter, route, reason)`` for every trainable parameter of ``model``.

    ``route`` maps glob patterns over parameter names (``"blocks.*.attn.*"``) to ``"orthogonal"``
    or ``"adamw"``; the first matching pattern wins over the automatic choice.
    """
    route = dict(route or {})
    for pattern, target in route.items():
        if target not in ROUTES:
            raise ValueError(
                f"route[{pattern!r}] must be one of {', '.join(map(repr, ROUTES))}, got {target!r}"
            )
    embedding_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    }
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head_id = id(linears[-1].weight) if linears else None

    routed = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            target, reason = "adamw", f"{p.ndim}-D"
        elif id(p) in embedding_ids:
            target, reason = "adamw", "embedding"
        elif id(p) == head_id:
            target, reason = "adamw", "output head"
        else:
            target, reason = "orthogonal", "hidden matrix"
        for pattern, forced in route.items():
            if fnmatch.fnmatchcase(name, pattern):
                if forced == "orthogonal" and p.ndim < 2:
                    raise ValueError(
                        f"route[{pattern!r}] sends {name!r} (shape {tuple(p.shape)}) to the "
                        "orthogonalized group, which takes only 2-D or larger weights"
                    )
                target, reason = forced, f"route {pattern!r}"
                break
        routed.append((name, p, target, reason))
    return routed


def param_groups(
    model: nn.Module,
    *,
    route: Mapping[str, Route] | None = None,
    adamw: Mapping[str, Any] | None = None,
    **orthogonal: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into an orthogonalized group and an ``"adamw"`` group.

    Args:
        model: the module whose ``named_parameters()`` are routed (frozen ones are skipped).
        route: glob pattern -> ``"orthogonal"``/``"adamw"`` overrides, first match wins.
        adamw: options for the AdamW group (``lr``, ``betas``, ``eps``, ``weight_decay``).
        **orthogonal: options for the orthogonalized group (``lr``, ``ns_method``, ...).

    Returns:
        Group dicts with ``(name, tensor)`` pairs as ``params`` (so optimizer errors can name
        parameters), ready for :class:`orthotorch.Muon` and friends. Empty groups are left out.
        Every ``torch.optim`` optimizer accepts them as well (they ignore ``"algorithm"``).
    """
    routed = route_parameters(model, route)
    ortho = [(n, p) for n, p, r, _ in routed if r == "orthogonal"]
    plain = [(n, p) for n, p, r, _ in routed if r == "adamw"]
    groups = []
    if ortho:
        groups.append({"params": ortho, **orthogonal})
    if plain:
        groups.append({"params": plain, **dict(adamw or {}), "algorithm": "adamw"})
    return groups


def _group_entries(groups: Iterable[Mapping[str, Any]]) -> list[tuple[str, Tensor, Mapping]]:
    entries = []
    for gi, group in enumerate(groups):
        names = group.get("param_names")
        for i, item in enumerate(group["params"]):
            if isinstance(item, tuple):
                name, p = item
            else:
                name, p = (names[i] if names else f"group{gi}.params[{i}]"), item
            entries.append((name, p, group))
    return entries


def describe(groups_or_optimizer: Any) -> str:
    """A readable table of which parameter went where: name, shape, group, matrix shape, scale.

    Accepts the output of :func:`param_groups` or an optimizer (then group defaults such as
    ``adjust_lr`` are the optimizer's own).
    """
    groups = getattr(groups_or_optimizer, "param_groups", groups_or_optimizer)
    default_algorithm = getattr(groups_or_optimizer, "algorithm", "orthogonal")
    rows = [("name", "shape", "group", "as matrix", "lr scale")]
    for name, p, group in _group_entries(groups):
        algorithm = group.get("algorithm", default_algorithm)
        shape = "x".join(map(str, p.shape)) or "scalar"
        if algorithm == "adamw":
            rows.append((name, shape, "adamw", "-", "1"))
        else:
            mshape = matrix_shape(p.shape)
            scale = shape_scale(mshape, group.get("adjust_lr", "original"))
            rows.append((name, shape, algorithm, f"{mshape[0]}x{mshape[1]}", f"{scale:.4g}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
