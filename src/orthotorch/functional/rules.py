"""THE registry of update rules: how a group's momentum becomes its update direction.

A rule is prepared once per step from the group's options into a *kernel*
``(X, transposed) -> Y`` on a wide ``(k, m, n)`` stack of same-shape matrices, plus the dtype
the stack is built in. The optimizer skeleton hands the kernel to
:func:`orthotorch.distributed.map_matrices`, which runs it on whole matrices on whichever rank
owns them, so every rule is distributed the same way. ``transposed`` says that the stack holds
the parameters' transposes (tall parameters), for rules that act on rows or columns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._registry import Registry
from ..linalg import resolve_compute

Kernel = Callable[[Tensor, bool], Tensor]


@dataclass(frozen=True)
class UpdateRule:
    """A named update rule.

    Attributes:
        name: registry key (the value of a group's ``update`` option).
        prepare: ``group -> (kernel, compute_dtype)``; raises ``ValueError`` on bad options.
        description: one line for tables.
    """

    name: str
    prepare: Callable[[Mapping[str, Any]], tuple[Kernel, torch.dtype]]
    description: str


_RULES: Registry[UpdateRule] = Registry("update rule", "rules")


def register_update_rule(rule: UpdateRule, *, overwrite: bool = False) -> None:
    """Add ``rule`` under ``rule.name``."""
    _RULES.register(rule.name, rule, overwrite=overwrite)


def available_update_rules() -> list[str]:
    """Names of every registered update rule."""
    return _RULES.names()


def get_update_rule(name: str) -> UpdateRule:
    """Look a rule up, with an error that lists the valid names."""
    return _RULES.get(name)


def _prepare_spectral(group: Mapping[str, Any]) -> tuple[Kernel, torch.dtype]:
    spec, steps, compute = resolve_compute(
        group["ns_method"], group["ns_steps"], group.get("ns_dtype")
    )

    def kernel(X: Tensor, transposed: bool) -> Tensor:
        del transposed  # polar(M^T) = polar(M)^T: orientation does not matter
        return spec.iterate(X, steps)

    return kernel, compute


register_update_rule(
    UpdateRule(
        "spectral",
        _prepare_spectral,
        "two-sided orthogonalization polar(M) (Muon); equivariant under M -> P M Q",
    )
)
