"""Every orthotorch optimizer declared once; tests/test_optim_common.py runs them all through the
same conformance checks. Adding an optimizer = adding one ``OptimizerInfo``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import orthotorch


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: Callable[..., Any]
    # Keyword arguments that make the optimizer train the small test models well.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # (kwargs, regex of the ValueError message) pairs: each must be rejected at construction.
    error_inputs: tuple[tuple[dict[str, Any], str], ...] = ()


# The low-rank optimizers (DCTAdamW, GaLoreAdamW) share their conventions and their errors.
# The test CNN's smallest low-rank matrix is the 6x9 flattened convolution kernel.
_LOWRANK_KWARGS: dict[str, Any] = {"lr": 0.04, "rank": 0.5, "update_every": 20, "adamw_lr": 1e-2}
_LOWRANK_ERRORS: tuple[tuple[dict[str, Any], str], ...] = (
    ({"rank": 0}, r"parameter '0\.weight' of shape \(6, 1, 3, 3\).*must be an int in \[1, 6\]"),
    ({"rank": 7}, r"parameter '0\.weight'.*: rank must be an int in \[1, 6\] \(the smaller side"),
    ({"rank": 1.5}, r"parameter '0\.weight'.*rank as a fraction must be in \(0, 1\], got 1\.5"),
    ({"rank": "half"}, r"rank must be an int in \[1, 6\] or a float in \(0, 1\]"),
    ({"update_every": 0}, r"update_every must be a positive int, got 0"),
    ({"scale": 0.0}, r"scale must be a number in \(0.0, inf\)"),
    ({"rotate_moments": 1}, r"rotate_moments must be True or False"),
    ({"orthogonalize": "yes"}, r"orthogonalize must be True or False"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\] must be a number in \[0.0, 1.0\)"),
    ({"eps": -1e-8}, r"eps must be a number in \(0.0, inf\)"),
    ({"momentum": -0.1}, r"momentum must be a number in \[0.0, 1.0\)"),
    ({"orthogonalize": True, "ns_method": "qr"}, r"unknown orthogonalization method 'qr'"),
    ({"lr": -1.0}, r"lr must be a number in \[0.0, inf\)"),
    ({"weight_decay": -0.1}, r"weight_decay must be a number"),
)

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
    OptimizerInfo(
        "DCTAdamW",
        orthotorch.DCTAdamW,
        kwargs=_LOWRANK_KWARGS,
        error_inputs=(
            *_LOWRANK_ERRORS,
            ({"score_norm": "max"}, r"score_norm must be one of 'l1', 'l2', got 'max'"),
        ),
    ),
    OptimizerInfo(
        "GaLoreAdamW",
        orthotorch.GaLoreAdamW,
        kwargs=_LOWRANK_KWARGS,
        error_inputs=_LOWRANK_ERRORS,
    ),
]

OPTIMIZERS += [
    OptimizerInfo(
        "ROOT",
        orthotorch.ROOT,
        kwargs={"lr": 0.01, "adamw_lr": 3e-3},
        error_inputs=(
            ({"lr": -1.0}, r"lr must be a number in \[0.0, inf\)"),
            ({"weight_decay": -0.1}, r"weight_decay must be a number"),
            ({"momentum": 1.0}, r"momentum must be a number in \[0.0, 1.0\)"),
            ({"nesterov": 1}, r"nesterov must be True or False"),
            ({"outlier_quantile": 0.0}, r"outlier_quantile must be a number in \(0.0, 1.0\]"),
            ({"outlier_quantile": 1.5}, r"outlier_quantile must be a number in \(0.0, 1.0\]"),
            ({"quantile_samples": 0}, r"quantile_samples must be a positive int or None"),
            ({"ns_method": "qr"}, r"unknown orthogonalization method 'qr'; valid methods: muon"),
            ({"ns_steps": 0}, r"steps must be a positive int"),
            ({"ns_dtype": "bf16"}, r"method 'root' computes in one of bfloat16"),
            ({"adjust_lr": "sqrt"}, r"adjust_lr must be one of 'original', 'match_rms_adamw'"),
            ({"betas": (0.9, 1.5)}, r"betas\[1\] must be a number in \[0.0, 1.0\)"),
            ({"eps": 0.0}, r"eps must be a number in \(0.0, inf\)"),
            ({"adamw_lr": -3e-3}, r"adamw_lr must be a number"),
        ),
    ),
    OptimizerInfo(
        "AuON",
        orthotorch.AuON,
        kwargs={"lr": 0.1, "adamw_lr": 3e-3},
        error_inputs=(
            ({"lr": -1.0}, r"lr must be a number in \[0.0, inf\)"),
            ({"weight_decay": -0.1}, r"weight_decay must be a number"),
            ({"momentum": -0.5}, r"momentum must be a number in \[0.0, 1.0\)"),
            ({"nesterov": "no"}, r"nesterov must be True or False"),
            ({"hybrid": "yes"}, r"hybrid must be True or False"),
            ({"ns_dtype": "bf16"}, r"ns_dtype must be None or one of bfloat16"),
            ({"betas": (1.0, 0.95)}, r"betas\[0\] must be a number in \[0.0, 1.0\)"),
            ({"adamw_lr": -3e-3}, r"adamw_lr must be a number"),
        ),
    ),
    OptimizerInfo(
        "HybridAuON",
        orthotorch.AuON,
        kwargs={"lr": 0.05, "adamw_lr": 3e-3, "hybrid": True},
    ),
]

OPTIMIZERS += [
    OptimizerInfo(
        "ARO",
        orthotorch.ARO,
        kwargs={"lr": 0.01, "adamw_lr": 3e-3},
        error_inputs=(
            ({"lr": -1.0}, r"lr must be a number in \[0.0, inf\)"),
            ({"weight_decay": -0.1}, r"weight_decay must be a number"),
            ({"momentum": 1.0}, r"momentum must be a number in \[0.0, 1.0\)"),
            ({"sinkhorn_iters": 0}, r"sinkhorn_iters must be a positive int, got 0"),
            ({"sinkhorn_iters": 2.5}, r"sinkhorn_iters must be a positive int, got 2.5"),
            ({"rms_scale": 0.0}, r"rms_scale must be a number in \(0.0, inf\)"),
            ({"rotation_every": 0}, r"rotation_every must be a positive int"),
            (
                {"matmul_dtype": torch.float16},
                r"matmul_dtype must be None or one of float32, bfloat16",
            ),
            ({"betas": (0.9, 1.5)}, r"betas\[1\] must be a number in \[0.0, 1.0\)"),
            ({"eps": 0.0}, r"eps must be a number in \(0.0, inf\)"),
            ({"adamw_lr": -3e-3}, r"adamw_lr must be a number"),
        ),
    ),
]

OPTIMIZERS += [
    OptimizerInfo(
        "NorMuon",
        orthotorch.NorMuon,
        kwargs={"lr": 0.01, "adamw_lr": 3e-3},
        error_inputs=(
            ({"lr": -1.0}, r"lr must be a number in \[0.0, inf\)"),
            ({"weight_decay": -0.1}, r"weight_decay must be a number"),
            ({"momentum": 1.0}, r"momentum must be a number in \[0.0, 1.0\)"),
            ({"nesterov": "yes"}, r"nesterov must be True or False"),
            ({"beta2": 1.0}, r"beta2 must be a number in \[0.0, 1.0\), got 1.0"),
            ({"beta2": -0.1}, r"beta2 must be a number in \[0.0, 1.0\)"),
            ({"beta2": "0.95"}, r"beta2 must be a number in \[0.0, 1.0\)"),
            ({"eps": 0.0}, r"eps must be a number in \(0.0, inf\)"),
            ({"ns_method": "qr"}, r"unknown orthogonalization method 'qr'; valid methods: muon"),
            ({"ns_steps": 0}, r"steps must be a positive int"),
            ({"adjust_lr": "sqrt"}, r"adjust_lr must be one of 'original', 'match_rms_adamw'"),
            ({"betas": (0.9, 1.5)}, r"betas\[1\] must be a number in \[0.0, 1.0\)"),
            ({"adamw_lr": -3e-3}, r"adamw_lr must be a number"),
        ),
    ),
    OptimizerInfo(
        "Dion",
        orthotorch.Dion,
        kwargs={"lr": 0.02, "rank": 0.5, "adamw_lr": 3e-3},
        error_inputs=(
            ({"lr": -1.0}, r"lr must be a number in \[0.0, inf\)"),
            ({"weight_decay": -0.1}, r"weight_decay must be a number"),
            ({"momentum": 1.0}, r"momentum must be a number in \[0.0, 1.0\)"),
            ({"rank": 0}, r"parameter '0\.weight' of shape \(6, 1, 3, 3\).*an int in \[1, 6\]"),
            ({"rank": 7}, r"parameter '0\.weight'.*: rank must be an int in \[1, 6\] \(the"),
            ({"rank": 1.5}, r"parameter '0\.weight'.*rank as a fraction must be in \(0, 1\]"),
            ({"rank": 0.0}, r"rank as a fraction must be in \(0, 1\], got 0\.0"),
            ({"rank": "full"}, r"rank must be an int in \[1, 6\] or a float in \(0, 1\]"),
            ({"rank": None}, r"rank must be an int in \[1, 6\] or a float in \(0, 1\]"),
            ({"qr_method": "svd"}, r"qr_method must be one of 'auto', 'householder', 'cholesky'"),
            ({"error_feedback": 1}, r"error_feedback must be True or False"),
            ({"adjust_lr": "rms"}, r"adjust_lr must be one of 'spectral_norm', 'original'"),
            ({"eps": 0.0}, r"eps must be a number in \(0.0, inf\)"),
            ({"seed": -1}, r"seed must be a non-negative int"),
            ({"betas": (0.9, 1.5)}, r"betas\[1\] must be a number in \[0.0, 1.0\)"),
            ({"adamw_lr": -3e-3}, r"adamw_lr must be a number"),
        ),
    ),
]
