"""``orthotorch.AuON``: linear-time normalised momentum with a cosh-RMS rescale; Hybrid-AuON."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import distributed as dist
from ..functional import MatrixLayout, matrix_shape
from ..functional.auon import auon_directions, auon_kernel, hybrid_auon_kernel
from ..linalg import get_method
from ._base import OrthogonalOptimizer

__all__ = ["AuON"]


class AuON(OrthogonalOptimizer):
    r"""AuON: Alternative Unit-norm momentum updates by Normalized nonlinear scaling.

    .. math::
       \begin{aligned}
       &B_t \leftarrow \mu B_{t-1} + (1-\mu) G_t, \quad
        M_t \leftarrow (1-\mu) G_t + \mu B_t \ \text{(Nesterov)} \\
       &X_t \leftarrow M_t / (\lVert M_t \rVert_F + 10^{-7})
        \quad (\text{Hybrid: } X_t \leftarrow a X_t + (b A_t + c A_t^2) X_t,\ A_t = X_t X_t^\top) \\
       &r_t \leftarrow \sqrt{\operatorname{mean}(\cosh^2 X_t)}, \quad
        U_t \leftarrow X_t / (r_t + 10^{-8}) \\
       &\theta_t \leftarrow (1 - \eta\lambda)\,\theta_{t-1} - \eta\sqrt{\max(1, m/n)}\, U_t
       \end{aligned}

    ``||U||_2 <= ||U||_F <= 1``: a spectral-norm trust region reached with no matrix product, so a
    step of plain AuON costs ``O(mn)`` per matrix (elementwise ``foreach`` kernels; no ``O(n^3)``
    or ``O(m n^2)`` work). ``hybrid=True`` (Hybrid-AuON) adds one Muon Newton–Schulz step
    (``(a, b, c) = (3.4445, -4.7750, 2.0315)``), a fifth of Muon's orthogonalization cost.

    What to expect: the cosh rescale is within ``1.4 / (mn)`` of one for a unit-Frobenius ``X``
    (see :mod:`orthotorch.functional.auon`), so plain AuON behaves as Frobenius-normalised
    Nesterov momentum; its update has Frobenius norm ~1, not Muon's ``sqrt(min(m, n))``, hence its
    larger learning rate. We follow the paper's formula; the public code differs (it divides the
    *unnormalised* momentum by ``r`` and scales ``X`` by 1.5 inside ``cosh``).

    Reference: "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates" (2025),
    https://github.com/ryyzn9/AuON.

    Args:
        params: tensors, ``(name, tensor)`` pairs or group dicts (see
            :func:`orthotorch.param_groups`; ``"adamw"`` groups get AdamW).
        lr: learning rate (default ``0.1``: the update has unit Frobenius norm; the public code
            uses 0.08 to 0.24).
        weight_decay: decoupled weight decay (default ``0.0``, as the public code).
        momentum: ``mu`` (default ``0.95``).
        nesterov: Nesterov form (default ``True``).
        hybrid: Hybrid-AuON, one Newton–Schulz step before the rescale (default ``False``).
        ns_dtype: compute dtype of the hybrid Newton–Schulz step (``None``: bf16). Plain AuON
            computes in the parameters' dtype.
        betas, eps: AdamW hyperparameters of ``"adamw"`` groups.
        adamw_lr: ``lr`` of ``"adamw"`` groups that set none (``None``: ``1e-3``, AdamW's default).
        check_finite: raise on NaN/Inf gradients before changing anything.
        skip_nonfinite: skip (and count) updates of parameters with NaN/Inf gradients instead.
        distributed: ``"auto"`` or ``"off"``; see :class:`~orthotorch.optim.OrthogonalOptimizer`.
            Plain AuON is elementwise, so on replicated (DDP) parameters every rank computes its
            own update, which is cheaper than any communication.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
        ...                             torch.nn.Linear(32, 2))
        >>> opt = AuON(orthotorch.param_groups(model), lr=0.1, adamw_lr=3e-3)
    """

    algorithm = "auon"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        hybrid: bool = False,
        ns_dtype: torch.dtype | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        *,
        adamw_lr: float | None = None,
        check_finite: bool = True,
        skip_nonfinite: bool = False,
        distributed: str = "auto",
        **topology: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "hybrid": hybrid,
            "ns_dtype": ns_dtype,
            "betas": betas,
            "eps": eps,
        }
        super().__init__(
            params,
            defaults,
            adamw_lr=adamw_lr,
            check_finite=check_finite,
            skip_nonfinite=skip_nonfinite,
            distributed=distributed,
            **topology,
        )

    def _validate_orthogonal_group(self, group: dict[str, Any], label: str) -> None:
        self._validate_momentum(group, label)
        if not isinstance(group["hybrid"], bool):
            raise ValueError(f"{label}: hybrid must be True or False, got {group['hybrid']!r}")
        dtype = group["ns_dtype"]
        valid = get_method("muon").dtypes
        if dtype is not None and dtype not in valid:
            names = ", ".join(str(d).removeprefix("torch.") for d in valid)
            raise ValueError(f"{label}: ns_dtype must be None or one of {names}, got {dtype!r}")

    def _direction(
        self,
        group: dict[str, Any],
        momenta: list[Tensor],
        states: list[dict[str, Any]],
        layouts: list[MatrixLayout],
    ) -> list[Tensor]:
        scale = self._scale_fn(group)
        if group["hybrid"]:
            compute = group["ns_dtype"] or get_method("muon").default_dtype
            kernel, dtype = hybrid_auon_kernel, compute
        elif any(dist.is_dtensor(m) for m in momenta) or not all(l.is_flatten for l in layouts):
            # ||M||_F of a sharded matrix needs all of it (and each block of a layout its
            # own): let map_matrices gather whole matrices.
            kernel, dtype = auon_kernel, momenta[0].dtype
        else:
            return [
                d.mul_(scale(matrix_shape(m.shape)))
                for d, m in zip(auon_directions(momenta), momenta, strict=True)
            ]
        return dist.map_matrices(
            momenta, kernel, dtype, self.distributed, layouts=layouts, scale=scale
        )

    def _scale(self, group: dict[str, Any], shape: tuple[int, int]) -> float:
        rows, cols = shape
        return math.sqrt(max(1.0, rows / cols))
