"""Every orthotorch optimizer declared once; tests/test_optim_common.py runs them all through the
same conformance checks. Adding an optimizer = adding one ``OptimizerInfo``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orthotorch


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: Callable[..., Any]
    # Keyword arguments that make the optimizer train the small test models well.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # (kwargs, regex of the ValueError message) pairs: each must be rejected at construction.
    error_inputs: tuple[tuple[dict[str, Any], str], ...] = ()


OPTIMIZERS: list[OptimizerInfo] = [
    OptimizerInfo(
        "Muon",
        orthotorch.Muon,
        kwargs={"lr": 0.02, "adamw_lr": 3e-3},
        error_inputs=(
            ({"lr": -1.0}, r"lr must be a number in \[0.0, inf\)"),
            ({"weight_decay": -0.1}, r"weight_decay must be a number"),
            ({"momentum": 1.0}, r"momentum must be a number in \[0.0, 1.0\)"),
            ({"nesterov": "yes"}, r"nesterov must be True or False"),
            ({"ns_method": "qr"}, r"unknown orthogonalization method 'qr'; valid methods: muon"),
            ({"ns_steps": 0}, r"steps must be a positive int"),
            ({"adjust_lr": "sqrt"}, r"adjust_lr must be one of 'original', 'match_rms_adamw'"),
            ({"update": "row"}, r"unknown update rule 'row'; valid rules: spectral"),
            ({"betas": (0.9, 1.5)}, r"betas\[1\] must be a number in \[0.0, 1.0\)"),
            ({"eps": 0.0}, r"eps must be a number in \(0.0, inf\)"),
            ({"adamw_lr": -3e-3}, r"adamw_lr must be a number"),
        ),
    ),
]
