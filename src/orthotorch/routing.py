"""Which parameter goes to which update, as which matrices: :func:`param_groups`,
:func:`plan_parameters` and :func:`describe`.

Shapes alone cannot tell an embedding or an output head from a hidden matrix (all are 2-D), nor
an expert stack from a convolution kernel (both 3-D+), so routing uses module types, module
structure and tied weights (see :func:`param_groups`), and gives every orthogonalized parameter
a matrix layout (:mod:`orthotorch.functional.layout`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .functional import (
    available_update_rules,
    check_layout,
    matrix_shape,
    parse_layout,
    shape_scale,
)
from .functional.lowprec import HALF_DTYPES

__all__ = ["ParameterPlan", "describe", "param_groups", "plan_parameters", "route_parameters"]

Route = Literal["orthogonal", "adamw"]
ROUTES: tuple[str, ...] = ("orthogonal", "adamw")
Policy = Literal["default", "symmetry"]
POLICIES: tuple[str, ...] = ("default", "symmetry")
# Roles whose AdamW parameters get no weight decay by default (as transformers' Trainer does for
# biases and norms; embeddings too, as most LLM recipes do).
NO_DECAY_ROLES: tuple[str, ...] = ("bias", "norm", "embedding")
DECAY_ROLES: tuple[str, ...] = ("bias", "norm", "embedding", "head", "router", "vector", "hidden")

# Leaf module names of MLP input (row-normalised under policy="symmetry") and output projections.
_MLP_IN = ("gate", "up", "fc1", "w1", "w3", "c_fc", "gate_up", "w13")
_MLP_OUT = ("down", "fc2", "w2", "c_proj")
_ROUTER_NAMES = ("router", "moe_gate", "gating")
# Fused projections: leaf names whose rows stack q, k, v (or gate, up) blocks.
_FUSED_QKV = ("qkv", "qkv_proj", "wqkv", "c_attn", "in_proj", "w_pack", "query_key_value_fused")
_FUSED_GATE_UP = ("gate_up_proj", "gate_up", "w13", "w1_w3")
# Raw parameters named like these are embeddings (ViT's cls_token, position_embeddings, ...).
_EMBEDDING_WORDS = ("embed", "token", "pos_emb", "position", "register")
_ATTENTION_WORDS = ("attn", "attention")


@dataclass(frozen=True)
class ParameterPlan:
    """Where one parameter goes, and why (one row of :func:`describe`).

    Attributes:
        name: its ``named_parameters()`` name.
        param: the tensor.
        target: ``"adamw"``, ``"orthogonal"`` or an update rule (``policy="symmetry"``).
        reason: what decided the target (a role, or the ``route``/``layout`` pattern).
        role: ``"hidden"``, ``"attention"``, ``"mlp_in"``, ``"mlp_out"``, ``"expert"``,
            ``"embedding"``, ``"head"``, ``"router"``, ``"norm"``, ``"bias"`` or ``"vector"``.
        layout: the matrix layout of an orthogonalized parameter (``None`` for AdamW).
        decay: whether an AdamW parameter gets weight decay (see ``no_decay``).
    """

    name: str
    param: Tensor
    target: str
    reason: str
    role: str
    layout: str | None
    decay: bool


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower()


def _matches(leaf: str, words: tuple[str, ...]) -> bool:
    return any(leaf == w or leaf.startswith(w + "_") or leaf.endswith("_" + w) for w in words)


def _attr(modules: list[nn.Module], *names: str) -> int | None:
    """The first integer attribute (or ``config`` attribute) among ``names`` on ``modules``."""
    for module in modules:
        for source in (module, getattr(module, "config", None)):
            for name in names:
                value = getattr(source, name, None) if source is not None else None
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


def _is_conv1d(module: nn.Module, p: Tensor) -> bool:
    """GPT-2-style ``Conv1D``: ``y = x W + b`` with ``W`` stored ``(in, out)`` (duck typed)."""
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    return isinstance(nf, int) and isinstance(nx, int) and tuple(p.shape) == (nx, nf)


def _is_experts(module_name: str, module: nn.Module) -> bool:
    leaf = _leaf(module_name)
    return (
        leaf == "experts" or leaf.endswith("_experts") or type(module).__name__.endswith("Experts")
    )


def _is_router(module_name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    leaf = _leaf(module_name)
    if "router" in type(module).__name__.lower() or _matches(leaf, _ROUTER_NAMES):
        return True
    # A module called "gate" beside an expert stack is the MoE router (not an MLP gate).
    siblings = dict(parent.named_children()) if parent is not None else {}
    return leaf == "gate" and any(_is_experts(n, m) for n, m in siblings.items())


def _qkv_blocks(rows: int, context: list[nn.Module]) -> tuple[tuple[int, ...], str] | None:
    """Row blocks ``(q, k, v)`` of a fused attention projection with ``rows`` rows."""
    heads = _attr(context, "num_heads", "num_attention_heads", "n_head", "n_heads")
    kv_heads = _attr(context, "num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads")
    head_dim = _attr(context, "head_dim", "head_size")
    if heads is not None and head_dim is None:
        embed = _attr(context, "embed_dim", "hidden_size", "split_size", "d_model", "n_embd")
        head_dim = embed // heads if embed is not None and embed % heads == 0 else None
    if heads is not None and head_dim is not None:
        q, kv = heads * head_dim, (kv_heads or heads) * head_dim
        if q + 2 * kv == rows:
            return (q, kv, kv), f"q/k/v from the module ({heads} heads, {kv_heads or heads} kv)"
    if rows % 3 == 0:
        third = rows // 3
        return (third, third, third), "q/k/v as equal thirds (no head counts on the module)"
    return None


def _auto_layout(
    name: str, p: Tensor, module_name: str, module: nn.Module, parents: list[nn.Module]
) -> tuple[str, str]:
    """``(layout, why)`` of an orthogonalized parameter, from its module."""
    leaf_module, leaf_param = _leaf(module_name), _leaf(name)
    transposed = _is_conv1d(module, p)
    if p.ndim >= 3 and _is_experts(module_name, module):
        count = _attr([module], "num_experts", "num_local_experts")
        inner = _attr([module], "intermediate_dim", "intermediate_size", "moe_intermediate_size")
        rows, cols = p.shape[-2], p.shape[-1]
        parts, why = ["batch"], f"{math.prod(p.shape[:-2])} experts"
        if count is not None and count != math.prod(p.shape[:-2]):
            parts, why = ["batch"], f"{math.prod(p.shape[:-2])} matrices"
        if _matches(leaf_param, _FUSED_GATE_UP):
            if inner is not None and cols == 2 * inner and rows != 2 * inner:
                parts.append("transposed")
                rows, cols = cols, rows
            if rows % 2 == 0:
                parts.append(f"split(rows={rows // 2},{rows // 2})")
                why += ", gate/up blocks"
        elif inner is not None and rows == inner and cols != inner:
            parts.append("transposed")  # a down projection stored (in, out)
        return "+".join(parts), why
    parts = ["transposed"] if transposed else []
    why = "Conv1D (in, out) storage" if transposed else ""
    out_rows = p.shape[1] if transposed else p.shape[0]
    is_mha_in_proj = isinstance(module, nn.MultiheadAttention) and leaf_param == "in_proj_weight"
    if is_mha_in_proj or (p.ndim == 2 and _matches(leaf_module, _FUSED_QKV)):
        found = _qkv_blocks(out_rows, [module, *parents])
        if found is not None:
            blocks, source = found
            parts.append(f"split(rows={','.join(map(str, blocks))})")
            why = ", ".join(filter(None, [why, f"fused {source}"]))
    elif p.ndim == 2 and _matches(leaf_module, _FUSED_GATE_UP) and out_rows % 2 == 0:
        parts.append(f"split(rows={out_rows // 2},{out_rows // 2})")
        why = ", ".join(filter(None, [why, "fused gate/up"]))
    return "+".join(parts) or "flatten", why


def _role(
    name: str, p: Tensor, module_name: str, module: nn.Module, parents: list[nn.Module], ids: dict
) -> str:
    leaf = _leaf(module_name)
    if id(p) in ids["embedding"]:
        return "embedding"
    if id(p) == ids["head"]:
        return "head"
    if p.ndim < 2:
        return "bias" if _leaf(name) == "bias" or _leaf(name).endswith("_bias") else "norm"
    known = isinstance(module, (nn.Linear, nn.MultiheadAttention, nn.modules.conv._ConvNd))
    known = known or _is_conv1d(module, p) or _is_experts(module_name, module)
    if not known and _matches(_leaf(name), _EMBEDDING_WORDS):
        return "embedding"  # raw parameters: cls tokens, position embeddings, ...
    if min(matrix_shape(p.shape)) == 1:
        return "vector"
    if _is_router(module_name, module, parents[0] if parents else None):
        return "router"
    if _is_experts(module_name, module):
        return "mlp_in" if _matches(_leaf(name), _MLP_IN) else "mlp_out"
    path = module_name.lower().split(".")
    if any(w in part for part in path[:-1] for w in _ATTENTION_WORDS) or (
        isinstance(module, nn.MultiheadAttention)
    ):
        return "attention"  # an attention c_proj is not the MLP's c_proj
    if _matches(leaf, _MLP_IN) or leaf.startswith(("gate", "up")):
        return "mlp_in"
    if _matches(leaf, _MLP_OUT) or leaf.startswith("down"):
        return "mlp_out"
    return "hidden"


# The update rule policy="symmetry" gives each role (Tang et al.: the rule must commute with
# the role's symmetry group).
_SYMMETRY_RULES = {
    "embedding": "row_norm",
    "head": "centered_row_norm",
    "router": "centered_row_norm",
    "mlp_in": "row_norm",
    "mlp_out": "col_norm",
}
# Roles that go to AdamW under policy="default" (everything 2-D+ else is orthogonalized).
_ADAMW_ROLES = ("embedding", "head", "router", "vector", "bias", "norm")


def plan_parameters(
    model: nn.Module,
    *,
    policy: Policy = "default",
    route: Mapping[str, str] | None = None,
    layout: Mapping[str, str] | None = None,
    no_decay: Iterable[str] = NO_DECAY_ROLES,
) -> list[ParameterPlan]:
    """A :class:`ParameterPlan` for every trainable parameter of ``model`` (see
    :func:`param_groups` for the arguments)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
    route = dict(route or {})
    valid = (*ROUTES, *available_update_rules())
    for pattern, target in route.items():
        if target not in valid:
            raise ValueError(
                f"route[{pattern!r}] must be one of {', '.join(map(repr, valid))}, got {target!r}"
            )
    overrides = dict(layout or {})
    for pattern, spec in overrides.items():
        try:
            parse_layout(spec)
        except ValueError as err:
            raise ValueError(f"layout[{pattern!r}]: {err}") from None
    no_decay = tuple(no_decay)
    for role in no_decay:
        if role not in DECAY_ROLES:
            raise ValueError(
                f"no_decay entries must be roles among {', '.join(map(repr, DECAY_ROLES))}, "
                f"got {role!r}"
            )
    modules = dict(model.named_modules())
    ids = {
        "embedding": {
            id(m.weight) for m in modules.values() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        },
        "head": _head_id(model, modules),
    }
    used: set[str] = set()
    plans = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        module = modules.get(module_name, model)
        parents = [
            modules[".".join(module_name.split(".")[:k])]
            for k in range(module_name.count(".") + (1 if module_name else 0), -1, -1)
            if ".".join(module_name.split(".")[:k]) in modules
        ][1:]
        role = _role(name, p, module_name, module, parents, ids)
        if policy == "symmetry" and p.ndim >= 2 and role != "vector":
            target, reason = _SYMMETRY_RULES.get(role, "spectral"), role
        elif role in _ADAMW_ROLES:
            target, reason = "adamw", role
        else:
            target, reason = "orthogonal", role
        for pattern, forced in route.items():
            if fnmatch.fnmatchcase(name, pattern):
                if forced != "adamw" and p.ndim < 2:
                    raise ValueError(
                        f"route[{pattern!r}] sends {name!r} (shape {tuple(p.shape)}) to an "
                        "orthogonalized group, which takes only 2-D or larger weights"
                    )
                target, reason = forced, f"route {pattern!r}"
                break
        spec = None
        if target != "adamw":
            spec, why = _auto_layout(name, p, module_name, module, parents)
            pattern = next((pat for pat in overrides if fnmatch.fnmatchcase(name, pat)), None)
            if pattern is not None:
                used.add(pattern)
                spec, why = overrides[pattern], f"layout {pattern!r}"
            spec = check_layout(spec, tuple(p.shape), f"parameter {name!r}")
            if why:
                reason = f"{reason}: {why}"
        plans.append(ParameterPlan(name, p, target, reason, role, spec, role not in no_decay))
    unused = [pat for pat in overrides if pat not in used]
    if unused:
        raise ValueError(
            f"layout[{unused[0]!r}] matches no orthogonalized parameter; patterns are globs over "
            "named_parameters() names (e.g. 'model.layers.*.mlp.experts.*'), and AdamW-routed "
            "parameters have no layout"
        )
    return plans


def _head_id(model: nn.Module, modules: Mapping[str, nn.Module]) -> int | None:
    """The output head: a model's ``get_output_embeddings()`` (transformers' convention, duck
    typed), else its last ``nn.Linear``."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError, TypeError):
            head = None
        if isinstance(getattr(head, "weight", None), Tensor):
            return id(head.weight)
    linears = [m for m in modules.values() if isinstance(m, nn.Linear)]
    return id(linears[-1].weight) if linears else None


def route_parameters(
    model: nn.Module, route: Mapping[str, str] | None = None, policy: Policy = "default"
) -> list[tuple[str, Tensor, str, str]]:
    """``(name, parameter, target, reason)`` for every trainable parameter of ``model``.

    ``target`` is ``"adamw"``, ``"orthogonal"`` (the optimizer's default update) or, under
    ``policy="symmetry"``, the name of an update rule. ``route`` maps glob patterns over
    parameter names (``"blocks.*.attn.*"``) to any of those; the first matching pattern wins
    over the automatic choice. :func:`plan_parameters` gives the layouts and roles too.
    """
    return [
        (r.name, r.param, r.target, r.reason)
        for r in plan_parameters(model, policy=policy, route=route)
    ]


def param_groups(
    model: nn.Module,
    *,
    policy: Policy = "default",
    route: Mapping[str, str] | None = None,
    layout: Mapping[str, str] | None = None,
    lr_scale: Mapping[str, float] | None = None,
    adamw: Mapping[str, Any] | None = None,
    no_decay: Iterable[str] = NO_DECAY_ROLES,
    **orthogonal: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into orthogonalized group(s) and AdamW groups.

    Routing uses module types and structure, never a framework import:

    - hidden weights (``nn.Linear``, convolutions, GPT-2 ``Conv1D``, 3-D expert stacks under an
      ``experts`` module, other raw 2-D+ weights) -> the orthogonalized group, each with a
      matrix layout: ``batch`` for expert stacks (one matrix per expert), ``split(rows=q,k,v)``
      for fused attention projections (``nn.MultiheadAttention.in_proj_weight``, modules named
      ``qkv``/``c_attn``/``in_proj``/... with sizes from ``num_heads``/``num_key_value_heads``/
      ``head_dim`` on the module or its parents), ``split(rows=g,u)`` for fused ``gate_up``,
      ``transposed`` for ``(in, out)`` storage (GPT-2's ``Conv1D``), else ``flatten``;
    - embeddings (``nn.Embedding``, raw cls/position/register tokens), the output head
      (``get_output_embeddings()`` or the last ``nn.Linear``, and weights tied to an embedding),
      MoE routers (a ``*Router`` module, or a ``gate`` beside an ``experts`` module), biases,
      norms and vector-shaped weights -> AdamW.

    The first layer (a patch embedding convolution, say) stays orthogonalized; route it to AdamW
    with ``route={"patch_embed.*": "adamw"}`` if your recipe does.

    Args:
        model: the module whose ``named_parameters()`` are routed (frozen ones are skipped).
        policy: ``"default"`` (above) or ``"symmetry"``: every 2-D+ weight gets the update rule
            compatible with its role's symmetry (embedding ``row_norm``, head and routers
            ``centered_row_norm``, MLP input (gate/up/fc1) ``row_norm``, MLP output
            (down/fc2, an MLP's ``c_proj``) ``col_norm``, attention (decided by the module
            path, so an attention ``c_proj`` stays spectral) and other matrices ``spectral``);
            only 1-D parameters get AdamW.
        route: glob pattern -> ``"orthogonal"``/``"adamw"``/update-rule name, first match wins.
        layout: glob pattern -> matrix layout (:mod:`orthotorch.functional.layout`), first match
            wins over the detected one, e.g. ``{"*.attn.qkv.weight": "split(rows=512,128,128)"}``
            or ``{"*.q_proj.weight": "per_head(8)"}``. A pattern that matches no orthogonalized
            parameter raises.
        lr_scale: glob pattern -> multiplier of ``lr`` for the orthogonalized parameters it
            matches (first match wins). Needs ``lr``; each scale becomes its own group with
            ``lr = lr * scale`` and an ``"lr_scale"`` key that :func:`describe` shows.
        adamw: per-group options for the AdamW groups (``lr``, ``betas``, ``eps``,
            ``weight_decay``); unset options come from the optimizer (its ``adamw_lr``, ...).
        no_decay: roles whose AdamW parameters get ``weight_decay=0`` (default biases, norms and
            embeddings, as transformers does for the first two); ``()`` decays them all.
        **orthogonal: options for the orthogonalized group(s) (``lr``, ``ns_method``, ...).

    Returns:
        Group dicts with ``(name, tensor)`` pairs as ``params`` and, for orthogonalized groups,
        a ``"layouts"`` list (one per parameter): one group per update rule and lr scale, then
        an ``"adamw"`` group and an ``"adamw"`` group with ``weight_decay=0`` (the roles in
        ``no_decay``). Empty groups are left out. ``torch.optim`` optimizers accept them too
        (extra keys ignored).
    """
    scales = _check_lr_scale(lr_scale, orthogonal)
    plans = plan_parameters(model, policy=policy, route=route, layout=layout, no_decay=no_decay)
    routed = [(r.name, r.param, r.target, r.reason) for r in plans]

    def scale_of(name: str) -> float:
        return next((v for pat, v in scales.items() if fnmatch.fnmatchcase(name, pat)), 1.0)

    _check_lr_scale_used(scales, routed)
    keys = list(dict.fromkeys((r.target, scale_of(r.name)) for r in plans if r.target != "adamw"))
    groups = []
    for target, scale in keys:
        members = [r for r in plans if r.target == target and scale_of(r.name) == scale]
        extra: dict[str, Any] = {} if target == "orthogonal" else {"update": target}
        if scales:
            extra.update(lr=orthogonal["lr"] * scale, lr_scale=scale)
        groups.append(
            {
                "params": [(r.name, r.param) for r in members],
                **orthogonal,
                **extra,
                "layouts": [r.layout for r in members],
            }
        )
    for decay in (True, False):
        plain = [(r.name, r.param) for r in plans if r.target == "adamw" and r.decay == decay]
        if plain:
            options = dict(adamw or {})
            if not decay:
                options["weight_decay"] = 0.0
            groups.append({"params": plain, **options, "algorithm": "adamw"})
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
    """A readable table of what happens to every parameter.

    Columns: name, shape, group (the algorithm), update (rule), layout, the matrices it is
    orthogonalized as (``4*32x16`` = 4 matrices of 32x16; ``a+b`` = split blocks), lr,
    weight decay, and the lr scale of each matrix (shape scale times the group's ``lr_scale``).

    Accepts the output of :func:`param_groups` (described as :class:`orthotorch.Muon` would
    run it), an orthotorch optimizer (its own scale and direction, e.g. ARO's ``rms_scale``),
    a :class:`~orthotorch.SPECTRA` wrapper (its base, plus which parameters are clipped at what
    ``c``), or any other ``torch.optim.Optimizer`` (its own update for every parameter: a plain
    AdamW orthogonalizes nothing).
    """
    groups = getattr(groups_or_optimizer, "param_groups", groups_or_optimizer)
    owner = groups_or_optimizer
    clip = None
    wrapped = getattr(owner, "optimizer", None)  # SPECTRA shares its base's groups
    if wrapped is not None and getattr(wrapped, "param_groups", None) is groups:
        clip = owner
        owner = wrapped
    is_optimizer = hasattr(owner, "param_groups")
    ours = not is_optimizer or hasattr(owner, "_scale")
    default_algorithm = getattr(owner, "algorithm", "orthogonal")
    own_scale = getattr(owner, "_scale", None) if is_optimizer else None
    header = ["name", "shape", "group", "update", "layout", "matrices", "lr", "wd", "lr scale"]
    if clip is not None:
        header.append("clip")
    # A "state" column only where an option changes it (bf16 / float32 moments, master copies).
    masters = bool(getattr(owner, "master_weights", False))
    show_state = masters or any(g.get("momentum_dtype") is not None for g in groups)
    if show_state:
        header.append("state")
    rows = [tuple(header)]
    for name, p, group in _group_entries(groups):
        shape = "x".join(map(str, p.shape)) or "scalar"
        lr, wd = _fmt(group.get("lr")), _fmt(group.get("weight_decay"))
        algorithm = group.get("algorithm", default_algorithm)
        if not ours:
            row = [name, shape, type(owner).__name__, type(owner).__name__, "-", "-", lr, wd, "1"]
        elif algorithm == "adamw":
            row = [name, shape, "adamw", "adam", "-", "-", lr, wd, "1"]
        else:
            spec = _layout_of(group, p)
            layout = parse_layout(spec)
            blocks = layout.block_shapes(tuple(p.shape))
            if own_scale is not None and algorithm == default_algorithm:
                scale_of = lambda b, g=group: own_scale(g, b)  # noqa: E731
                update = str(group.get("update", algorithm))
            else:
                scale_of = lambda b, g=group: shape_scale(b, g.get("adjust_lr", "original"))  # noqa: E731
                update = str(group.get("update", "spectral"))
            factor = group.get("lr_scale", 1.0)
            scales = dict.fromkeys(f"{scale_of(b) * factor:.4g}" for b in blocks)
            row = [name, shape, algorithm, update, str(layout), _fmt_blocks(layout, p.shape)]
            row += [lr, wd, "/".join(scales)]
        if clip is not None:
            threshold = clip._threshold(group, "clip")
            row.append("-" if threshold is None or p.ndim < 2 else f"{threshold:g}")
        if show_state:
            row.append(_state_note(group, p, masters, algorithm == "adamw"))
        rows.append(tuple(row))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _state_note(group: Mapping[str, Any], p: Tensor, masters: bool, adamw: bool) -> str:
    """``bf16 momentum (SR)``, ``fp32 master``, ...: what ``momentum_dtype`` and
    ``master_weights`` do to this parameter's state."""
    notes = []
    dtype = group.get("momentum_dtype")
    if dtype is not None:
        what = "first moment" if adamw else "momentum"
        rounding = " (SR)" if dtype == torch.bfloat16 else ""
        notes.append(f"{str(dtype).removeprefix('torch.')} {what}{rounding}")
    if masters and p.dtype in HALF_DTYPES:
        notes.append("fp32 master")
    return ", ".join(notes) or "-"


def _fmt(value: Any) -> str:
    return "default" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _layout_of(group: Mapping[str, Any], p: Tensor) -> str | None:
    layouts = group.get("layouts")
    if not layouts:
        return None
    for i, item in enumerate(group["params"]):
        q = item[1] if isinstance(item, tuple) else item
        if q is p:
            return layouts[i]
    return None


def _fmt_blocks(layout: Any, shape: Any) -> str:
    """``64x16``; ``4*32x16`` (4 matrices); ``32x32+16x32+16x32`` (split blocks)."""
    count = layout.matrix_shape(tuple(shape))[0]
    every = layout.block_shapes(tuple(shape))
    blocks = every[: len(every) // max(count, 1)]
    text = "+".join(f"{r}x{c}" for r, c in blocks)
    if count == 1:
        return text
    return f"{count}*{text}" if len(blocks) == 1 else f"{count}*({text})"
