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
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from torch import Tensor, nn

from .functional import available_update_rules, matrix_shape, shape_scale

__all__ = ["describe", "param_groups", "route_parameters"]

Route = Literal["orthogonal", "adamw"]
ROUTES: tuple[str, ...] = ("orthogonal", "adamw")
Policy = Literal["default", "symmetry"]
POLICIES: tuple[str, ...] = ("default", "symmetry")

# Module-name fragments that identify MLP and router roles under policy="symmetry"; attention
# projections and every other hidden matrix keep the two-sided spectral rule.
_ROW_ROLES = ("gate", "up", "fc1", "w1", "w3", "c_fc")
_COL_ROLES = ("down", "fc2", "w2", "c_proj")
_ROUTER_ROLES = ("router", "moe_gate")


def _symmetry_rule(name: str, reason: str) -> str:
    """The update rule policy="symmetry" gives a hidden/embedding/head matrix of this role."""
    leaf = name.rsplit(".", 2)[-2].lower() if "." in name else name.lower()
    if reason == "embedding":
        return "row_norm"
    if reason == "output head":
        return "centered_row_norm"
    if any(role in leaf for role in _ROUTER_ROLES):
        return "centered_row_norm"
    if any(leaf == role or leaf.endswith(role) or leaf.startswith(role) for role in _ROW_ROLES):
        return "row_norm"
    if any(leaf == role or leaf.endswith(role) or leaf.startswith(role) for role in _COL_ROLES):
        return "col_norm"
    return "spectral"


def route_parameters(
    model: nn.Module, route: Mapping[str, str] | None = None, policy: Policy = "default"
) -> list[tuple[str, Tensor, str, str]]:
    """``(name, parameter, target, reason)`` for every trainable parameter of ``model``.

    ``target`` is ``"adamw"``, ``"orthogonal"`` (the optimizer's default update) or, under
    ``policy="symmetry"``, the name of an update rule. ``route`` maps glob patterns over
    parameter names (``"blocks.*.attn.*"``) to any of those; the first matching pattern wins
    over the automatic choice.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
    route = dict(route or {})
    valid = (*ROUTES, *available_update_rules())
    for pattern, target in route.items():
        if target not in valid:
            raise ValueError(
                f"route[{pattern!r}] must be one of {', '.join(map(repr, valid))}, got {target!r}"
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
        if policy == "symmetry" and p.ndim >= 2:
            target = _symmetry_rule(name, reason)
        for pattern, forced in route.items():
            if fnmatch.fnmatchcase(name, pattern):
                if forced != "adamw" and p.ndim < 2:
                    raise ValueError(
                        f"route[{pattern!r}] sends {name!r} (shape {tuple(p.shape)}) to an "
                        "orthogonalized group, which takes only 2-D or larger weights"
                    )
                target, reason = forced, f"route {pattern!r}"
                break
        routed.append((name, p, target, reason))
    return routed


def param_groups(
    model: nn.Module,
    *,
    policy: Policy = "default",
    route: Mapping[str, str] | None = None,
    lr_scale: Mapping[str, float] | None = None,
    adamw: Mapping[str, Any] | None = None,
    **orthogonal: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into orthogonalized group(s) and an ``"adamw"`` group.

    Args:
        model: the module whose ``named_parameters()`` are routed (frozen ones are skipped).
        policy: ``"default"``: hidden 2-D+ weights get the optimizer's update (spectral for
            Muon), embeddings/head/1-D get AdamW. ``"symmetry"``: every 2-D+ weight gets the
            update rule compatible with its symmetry (embedding ``row_norm``, head and routers
            ``centered_row_norm``, MLP gate/up ``row_norm``, down ``col_norm``, attention and
            other matrices ``spectral``); only 1-D parameters get AdamW.
        route: glob pattern -> ``"orthogonal"``/``"adamw"``/update-rule name, first match wins.
        lr_scale: glob pattern -> multiplier of ``lr`` for the orthogonalized parameters it
            matches (first match wins), e.g. ``{"*.up.*": 0.25, "*.down.*": 0.25}``: a role
            (not only a rule) gets its own lr, as the embedding and the MLP up projection share
            ``row_norm`` but not a step size. Needs ``lr``; each scale becomes its own group
            with ``lr = lr * scale`` and an ``"lr_scale"`` key that :func:`describe` shows.
            The AdamW group's lr is ``adamw={"lr": ...}``.
        adamw: options for the AdamW group (``lr``, ``betas``, ``eps``, ``weight_decay``).
        **orthogonal: options for the orthogonalized group(s) (``lr``, ``ns_method``, ...).

    Returns:
        Group dicts with ``(name, tensor)`` pairs as ``params`` (so optimizer errors can name
        parameters), ready for :class:`orthotorch.Muon` and friends: one group per update rule
        (with its ``"update"`` key; none for ``"orthogonal"``) and one ``"adamw"`` group. Empty
        groups are left out. ``torch.optim`` optimizers accept them too (extra keys ignored).
    """
    scales = _check_lr_scale(lr_scale, orthogonal)
    routed = route_parameters(model, route, policy)

    def scale_of(name: str) -> float:
        return next((v for pat, v in scales.items() if fnmatch.fnmatchcase(name, pat)), 1.0)

    _check_lr_scale_used(scales, routed)
    keys = list(dict.fromkeys((t, scale_of(n)) for n, _, t, _ in routed if t != "adamw"))
    groups = []
    for target, scale in keys:
        members = [(n, p) for n, p, t, _ in routed if t == target and scale_of(n) == scale]
        extra: dict[str, Any] = {} if target == "orthogonal" else {"update": target}
        if scales:
            extra.update(lr=orthogonal["lr"] * scale, lr_scale=scale)
        groups.append({"params": members, **orthogonal, **extra})
    plain = [(n, p) for n, p, t, _ in routed if t == "adamw"]
    if plain:
        groups.append({"params": plain, **dict(adamw or {}), "algorithm": "adamw"})
    return groups


def _check_lr_scale_used(scales: Mapping[str, float], routed: list[tuple]) -> None:
    """A pattern that scales nothing is a typo or a parameter routed elsewhere: say so."""
    used = set()
    for name, _, target, _ in routed:
        first = next((pat for pat in scales if fnmatch.fnmatchcase(name, pat)), None)
        if first is not None and target != "adamw":
            used.add(first)
    for pattern in scales:
        if pattern in used:
            continue
        matched = [(n, t) for n, _, t, _ in routed if fnmatch.fnmatchcase(n, pattern)]
        if any(t != "adamw" for _, t in matched):
            raise ValueError(
                f"lr_scale[{pattern!r}]: every orthogonalized parameter it matches is already "
                "scaled by an earlier pattern (the first match wins); put it first or drop it"
            )
        if matched:
            names = [n for n, _ in matched]
            raise ValueError(
                f"lr_scale[{pattern!r}] matches only parameters routed to AdamW "
                f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); set their lr "
                "with adamw={'lr': ...}, or route them with policy=/route="
            )
        raise ValueError(
            f"lr_scale[{pattern!r}] matches no parameter; patterns are globs over "
            "named_parameters() names, e.g. 'blocks.*.mlp.up.weight'"
        )


def _check_lr_scale(
    lr_scale: Mapping[str, float] | None, orthogonal: Mapping[str, Any]
) -> dict[str, float]:
    if not lr_scale:
        return {}
    if not isinstance(lr_scale, Mapping):
        raise TypeError(f"lr_scale must map glob patterns to floats, got {type(lr_scale).__name__}")
    if "lr" not in orthogonal:
        raise ValueError("lr_scale scales the orthogonalized groups' lr: pass lr=... as well")
    for pattern, value in lr_scale.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"lr_scale[{pattern!r}] must be a number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"lr_scale[{pattern!r}] must be a positive finite number, got {value}")
    return {str(k): float(v) for k, v in lr_scale.items()}


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
    """A readable table of which parameter went where: name, shape, group, update rule, matrix
    shape and learning-rate scale (the shape scale times the group's ``lr_scale``).

    Accepts the output of :func:`param_groups` (described as :class:`orthotorch.Muon` would
    run it) or an optimizer (then group defaults such as ``adjust_lr``, and for orthotorch
    optimizers their own scale and direction, e.g. ARO's ``rms_scale``, are used; a
    :class:`~orthotorch.SPECTRA` wrapper is described by its base, without its ``alpha``).
    """
    groups = getattr(groups_or_optimizer, "param_groups", groups_or_optimizer)
    owner = groups_or_optimizer
    wrapped = getattr(owner, "optimizer", None)  # SPECTRA shares its base's groups
    if wrapped is not None and getattr(wrapped, "param_groups", None) is groups:
        owner = wrapped
    default_algorithm = getattr(owner, "algorithm", "orthogonal")
    # An orthotorch optimizer knows its own scale (ARO's rms_scale ignores the shape) and
    # direction; plain group lists are described as Muon would run them.
    own_scale = getattr(owner, "_scale", None)
    rows = [("name", "shape", "group", "update", "as matrix", "lr scale")]
    for name, p, group in _group_entries(groups):
        algorithm = group.get("algorithm", default_algorithm)
        shape = "x".join(map(str, p.shape)) or "scalar"
        if algorithm == "adamw":
            rows.append((name, shape, "adamw", "adam", "-", "1"))
        else:
            mshape = matrix_shape(p.shape)
            if own_scale is not None and algorithm == default_algorithm:
                scale = own_scale(group, mshape)
                update = str(group.get("update", algorithm))
            else:
                scale = shape_scale(mshape, group.get("adjust_lr", "original"))
                update = str(group.get("update", "spectral"))
            scale *= group.get("lr_scale", 1.0)
            rows.append(
                (name, shape, algorithm, update, f"{mshape[0]}x{mshape[1]}", f"{scale:.4g}")
            )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
