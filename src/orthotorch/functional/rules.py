"""THE registry of update rules: how a group's momentum becomes its update direction.

A rule maps the group's per-parameter momenta to :class:`~orthotorch.functional.muon.Bucket`
stacks of directions (same-shape matrices batched). ``"spectral"`` (two-sided
orthogonalization, Muon's rule) is the default; later rules (row/column normalisation,
one-sided spectral) register here, and every optimizer that takes ``update=`` picks them up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ..linalg import resolve_compute
from .muon import Bucket, bucket_by_shape, orthogonalize_buckets

UpdateRule = Callable[[list[Tensor], Mapping[str, Any]], list[Bucket]]

_RULES: dict[str, UpdateRule] = {}


def register_update_rule(name: str, rule: UpdateRule, *, overwrite: bool = False) -> None:
    """Add ``rule`` under ``name``."""
    if name in _RULES and not overwrite:
        raise ValueError(f"update rule {name!r} is already registered; pass overwrite=True")
    _RULES[name] = rule


def available_update_rules() -> list[str]:
    """Names of every registered update rule."""
    return list(_RULES)


def get_update_rule(name: str) -> UpdateRule:
    """Look a rule up, with an error that lists the valid names."""
    try:
        return _RULES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown update rule {name!r}; valid rules: {', '.join(_RULES)}"
        ) from None


def spectral_rule(updates: list[Tensor], group: Mapping[str, Any]) -> list[Bucket]:
    """Two-sided orthogonalization ``polar(M)`` (uses ``ns_method``, ``ns_steps``, ``ns_dtype``).

    Equivariant under ``M -> P M Q`` for orthogonal ``P``, ``Q``: ``polar(P M Q) = P polar(M) Q``.
    """
    spec, steps, compute = resolve_compute(
        group["ns_method"], group["ns_steps"], group.get("ns_dtype")
    )
    return orthogonalize_buckets(bucket_by_shape(updates, compute), spec, steps)


register_update_rule("spectral", spectral_rule)
