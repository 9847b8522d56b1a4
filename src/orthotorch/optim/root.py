"""``orthotorch.ROOT``: Muon with shape-adaptive coefficients and outlier-clipped momentum."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import distributed as dist
from ..functional import ADJUST_LR_CHOICES, MatrixLayout, shape_scale
from ..functional.root import DEFAULT_QUANTILE_SAMPLES, root_kernel
from ..linalg import resolve_compute
from ._base import OrthogonalOptimizer, check_range

__all__ = ["ROOT"]


class ROOT(OrthogonalOptimizer):
    r"""ROOT: Robust Orthogonalized Optimizer, with AdamW groups in the same object.

    .. math::
       \begin{aligned}
       &B_t \leftarrow \mu B_{t-1} + (1-\mu) G_t, \quad
        M_t \leftarrow (1-\mu) G_t + \mu B_t \ \text{(Nesterov)} \\
       &\varepsilon_t \leftarrow \mathrm{quantile}_q(|M_t|), \quad
        \bar M_t \leftarrow \mathrm{clip}(M_t, -\varepsilon_t, \varepsilon_t)
        \quad \text{(outliers } M_t - \bar M_t \text{ discarded)} \\
       &O_t \leftarrow \mathrm{NS}^{\text{root}}_{(m, n)}(\bar M_t) \\
       &\theta_t \leftarrow (1 - \eta\lambda)\,\theta_{t-1} - \eta\, 0.2\sqrt{\max(m, n)}\, O_t
       \end{aligned}

    Two robustness mechanisms, each of which can be switched off to ablate it:

    1. *Dimension-robust orthogonalization* (``ns_method="root"``): Newton–Schulz with
       coefficients fitted per matrix shape, guarded so that no input can make them diverge
       (see :mod:`orthotorch.linalg.root`). ``ns_method="muon"`` (or any registered method)
       turns it off.
    2. *Optimization-robust momentum* (``outlier_quantile=0.9``): per matrix, entries of the
       momentum above the ``q``-quantile of ``|M|`` are clipped to it before orthogonalizing, so
       gradient outliers cannot dominate the direction. ``outlier_quantile=None`` turns it off.

    With both off, ROOT is ``orthotorch.Muon(ns_method="muon", adjust_lr="match_rms_adamw")``.
    The momentum is stored in Muon's lerp form, ``(1 - mu)`` times the paper's ``B = mu B + G``;
    quantile, clip and polar factor are positively homogeneous, so the step is the same.
    Weights with more than two dimensions are treated as ``(shape[0], prod(shape[1:]))``
    matrices; same-shape matrices are clipped and orthogonalized in one batched call; no value is
    read back to the host in a step (beyond the optional finite check).

    Reference: He et al., "ROOT: Robust Orthogonalized Optimizer for Neural Network Training"
    (2025), https://arxiv.org/abs/2511.20626.

    Args:
        params: tensors, ``(name, tensor)`` pairs or group dicts (see
            :func:`orthotorch.param_groups`; ``"adamw"`` groups get AdamW).
        lr: learning rate (default ``1e-3``, the paper's; AdamW-like because of the
            ``"match_rms_adamw"`` scale).
        weight_decay: decoupled weight decay (default ``0.1``).
        momentum: ``mu`` (default ``0.95``).
        nesterov: Nesterov form (default ``True``, as the paper).
        outlier_quantile: ``q`` in ``(0, 1]`` of the clip threshold, or ``None`` to disable the
            outlier clipping (default ``0.9``).
        quantile_samples: estimate the quantile of a matrix with more entries than this from a
            deterministic strided sample of about this many (default ``65536``); ``None``:
            always exact (``kthvalue`` over every entry, ~10x slower on large matrices).
        ns_method: orthogonalization method (default ``"root"``; ``"muon"`` disables the
            shape-adaptive coefficients).
        ns_steps: Newton–Schulz steps (``None``: the method's default, 5).
        ns_dtype: compute dtype of clipping and orthogonalization (``None``: bf16).
        adjust_lr: ``"match_rms_adamw"`` (``0.2 sqrt(max(m, n))``, default, the paper's) or
            ``"original"`` (``sqrt(max(1, m/n))``).
        betas, eps: AdamW hyperparameters of ``"adamw"`` groups.
        adamw_lr: ``lr`` of ``"adamw"`` groups that set none (``None``: ``1e-3``, AdamW's default).
        check_finite: raise on NaN/Inf gradients before changing anything.
        skip_nonfinite: skip (and count) updates of parameters with NaN/Inf gradients instead.
        distributed: ``"auto"`` (split the work on whole matrices across ranks under
            DDP/FSDP2) or ``"off"``; see :class:`~orthotorch.optim.OrthogonalOptimizer`.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
        ...                             torch.nn.Linear(32, 2))
        >>> opt = ROOT(orthotorch.param_groups(model), lr=1e-3)
    """

    algorithm = "root"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        outlier_quantile: float | None = 0.9,
        quantile_samples: int | None = DEFAULT_QUANTILE_SAMPLES,
        ns_method: str = "root",
        ns_steps: int | None = None,
        ns_dtype: torch.dtype | None = None,
        adjust_lr: str = "match_rms_adamw",
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
            "outlier_quantile": outlier_quantile,
            "quantile_samples": quantile_samples,
            "ns_method": ns_method,
            "ns_steps": ns_steps,
            "ns_dtype": ns_dtype,
            "adjust_lr": adjust_lr,
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
        q = group["outlier_quantile"]
        if q is not None:
            check_range(label, "outlier_quantile", q, 0.0, 1.0, lo_open=True, hi_open=False)
        samples = group["quantile_samples"]
        if samples is not None and (
            isinstance(samples, bool) or not isinstance(samples, int) or samples < 1
        ):
            raise ValueError(
                f"{label}: quantile_samples must be a positive int or None, got {samples!r}"
            )
        if group["adjust_lr"] not in ADJUST_LR_CHOICES:
            raise ValueError(
                f"{label}: adjust_lr must be one of {', '.join(map(repr, ADJUST_LR_CHOICES))}, "
                f"got {group['adjust_lr']!r}"
            )
        try:
            resolve_compute(group["ns_method"], group["ns_steps"], group["ns_dtype"])
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None

    def _direction(
        self,
        group: dict[str, Any],
        momenta: list[Tensor],
        states: list[dict[str, Any]],
        layouts: list[MatrixLayout],
    ) -> list[Tensor]:
        spec, steps, compute = resolve_compute(
            group["ns_method"], group["ns_steps"], group["ns_dtype"]
        )
        kernel = root_kernel(
            spec,
            steps,
            outlier_quantile=group["outlier_quantile"],
            quantile_samples=group["quantile_samples"],
        )
        # Whole matrices per rank: the clip threshold is a quantile of the entire matrix.
        return dist.map_matrices(
            momenta,
            kernel,
            compute,
            self.distributed,
            layouts=layouts,
            scale=self._scale_fn(group),
        )

    def _scale(self, group: dict[str, Any], shape: tuple[int, int]) -> float:
        return shape_scale(shape, group["adjust_lr"])
