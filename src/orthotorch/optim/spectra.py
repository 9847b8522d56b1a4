"""``orthotorch.SPECTRA``: soft spectral clipping of any optimizer's update (a wrapper)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import distributed
from ..distributed import make_topology
from ..functional import MatrixLayout, apply_updates_, parse_layout
from ..functional.checks import maybe_nonfinite
from ..linalg.spectral import (
    ClipRoute,
    check_clip,
    check_route,
    resolve_route,
    spectral_clip_kernel,
)
from ._base import NonFiniteGradientError, OrthogonalOptimizer

__all__ = ["SPECTRA", "decoupled_weight_decay", "recover_update"]


def recover_update(before: Tensor, after: Tensor, lr: float, weight_decay: float) -> Tensor:
    """The update ``U`` a step ``X_k -> X_{k+1}`` made: ``U = (X_k - X_{k+1}) / lr - wd X_k``.

    Inverts ``X_{k+1} = (1 - lr wd) X_k - lr U`` (decoupled weight decay ``wd``); computed in
    at least float32 so that bf16 parameters lose no more than their own rounding.
    """
    compute = torch.promote_types(before.dtype, torch.float32)
    U = (before.to(compute) - after.to(compute)).div_(lr)
    if weight_decay != 0:
        U.sub_(before.to(compute), alpha=weight_decay)
    return U


def decoupled_weight_decay(optimizer: Optimizer, group: dict[str, Any]) -> float:
    """The decoupled weight decay ``lambda`` of ``group``, or 0 when its decay is coupled.

    Decoupled decay (``X *= 1 - lr wd`` outside the update) is kept out of the clip, as in the
    paper. Coupled (L2) decay goes through the optimizer's normalisation, so it cannot be
    separated from ``U`` and is clipped with it. Known decoupled: orthotorch optimizers, groups
    with ``decoupled_weight_decay=True`` (``AdamW``; ``Adam``/``NAdam``/``RAdam`` with that
    flag), ``Adafactor`` (``X *= 1 - lr wd`` with the group's ``lr``) and ``SGD`` without
    momentum (``X - lr (G + wd X)`` is the same as decoupled decay).
    """
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if isinstance(optimizer, OrthogonalOptimizer):
        return wd
    if "decoupled_weight_decay" in group:
        return wd if group["decoupled_weight_decay"] else 0.0
    if isinstance(optimizer, torch.optim.SGD) and not group.get("momentum", 0.0):
        return wd
    if isinstance(optimizer, getattr(torch.optim, "Adafactor", ())):
        return wd
    return 0.0


class SPECTRA(Optimizer):
    r"""SPECTRA: soft spectral clipping of the update of any optimizer (a wrapper).

    After the wrapped optimizer's step ``X_k -> X_{k+1}``, each matrix parameter's update is
    recovered and replaced by its soft-clipped version:

    .. math::
       \begin{aligned}
       &U_k = (X_k - X_{k+1}) / \eta - \lambda X_k \\
       &X_{k+1} \leftarrow (1 - \lambda\eta)\, X_k - \alpha\,\eta\, H_c(U_k), \qquad
        \alpha = \sqrt{\max(1, m/n)} \\
       &H_c(U) = (I + U U^\top / c^2)^{-1/2}\, U \quad
        (\sigma \mapsto \sigma / \sqrt{1 + \sigma^2/c^2})
       \end{aligned}

    with each group's ``lr`` ``eta`` and decoupled weight decay ``lambda`` (see
    :func:`decoupled_weight_decay`). ``H_c`` is :func:`orthotorch.linalg.spectral_clip` (no SVD;
    on the small side's ``m x m`` Gram matrix, batched over same-shape matrices), run through
    :func:`orthotorch.distributed.map_matrices`, so under DDP/FSDP2 each rank clips a share of
    the matrices (``DTensor`` parameters sharded on dim 0 included). Weights with more than two
    dimensions are clipped as ``(shape[0], prod(shape[1:]))`` matrices; 1-D parameters keep the
    base step.

    Every matrix the base optimizer updates is clipped, the embedding and output head included:
    that is what the paper's code does (``apply_to="2d"``, untied embeddings). They are the
    largest matrices, so a group with ``"clip": None`` for them is the way to save time
    (about a fifth of the clip's cost on the reference set, ``benchmarks/spectra_aro.py``).

    With ``pre_clip``, each matrix gradient is replaced *in place* by ``H_{pre_clip}(G)``
    before the base step (like ``clip_grad_norm_``).

    The wrapper shares ``param_groups``, ``state`` and ``defaults`` with the wrapped optimizer,
    so learning-rate schedulers, ``GradScaler`` and ``add_param_group`` act on both. A group may
    carry its own ``"clip"`` / ``"pre_clip"`` keys (``None`` turns that clip off for the group,
    e.g. for embeddings). ``state_dict()`` is the base optimizer's plus a ``"spectra"`` entry
    with the wrapper's settings; a plain base state dict loads too.

    Reference: Jiang, Semenov, Stich, "Enhancing LLM Training via Spectral Clipping"
    (arXiv:2603.14315; SPECTRA: post-clip ``c = 10``, optional
    gradient pre-clip with small ``c``; reported 780M-model AdamW val loss 2.608 -> 2.582).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (AdamW, SGD, orthotorch optimizers, ...).
        clip: post-clip threshold ``c`` of the update's spectrum (default 10), or ``None``.
        pre_clip: threshold of the gradient pre-clip (default ``None``: off; the paper uses 0.1).
        method: polar routine of a Newton–Schulz route
            (:func:`orthotorch.linalg.available_methods`; ``None``: ``"polar_express"``).
        steps: its iterations (``None``: the method's default plus 3).
        dtype: compute dtype of the clip (default float32).
        polish_steps: convergent Newton–Schulz steps after the method (``None``: 2).
        route: how ``H_c`` is computed (:func:`orthotorch.linalg.spectral_clip`): ``"auto"``
            (``"eigh"`` of the small-side Gram matrix on the CPU, matmul-only ``"gram"``
            Newton–Schulz elsewhere), ``"gram"``, ``"eigh"`` or ``"polar"``. Giving ``method``,
            ``steps`` or ``polish_steps`` with ``"auto"`` selects a Newton–Schulz route so that
            they act on every device (:func:`orthotorch.linalg.resolve_route`); with ``"eigh"``,
            which runs no iteration, they raise.
        check_finite: raise :class:`~orthotorch.optim.NonFiniteGradientError` on NaN/Inf
            gradients before the base step, changing nothing (one host sync per step and
            device).
        distributed: ``"auto"`` or ``"off"``; see :class:`~orthotorch.optim.OrthogonalOptimizer`.
        process_group, device_mesh, overlap: explicit topology and the overlap switch; see
            :class:`~orthotorch.optim.OrthogonalOptimizer`.

    A closure is evaluated once by the wrapper, then the base step runs without it: optimizers
    that re-evaluate the loss inside ``step`` (LBFGS) are not supported.

    Example:
        >>> model = torch.nn.Linear(8, 4)
        >>> opt = SPECTRA(torch.optim.AdamW(model.parameters(), lr=1e-3), clip=10.0)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        clip: float | None = 10.0,
        pre_clip: float | None = None,
        *,
        method: str | None = None,
        steps: int | None = None,
        dtype: torch.dtype | None = torch.float32,
        polish_steps: int | None = None,
        route: ClipRoute = "auto",
        check_finite: bool = True,
        distributed: str = "auto",
        process_group: Any = None,
        device_mesh: Any = None,
        overlap: bool = True,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ValueError(
                "optimizer must be a torch.optim.Optimizer (e.g. torch.optim.AdamW(...)), got "
                f"{type(optimizer).__name__}"
            )
        if isinstance(optimizer, SPECTRA):
            raise ValueError("optimizer is already wrapped in SPECTRA; wrap the base optimizer")
        if isinstance(optimizer, torch.optim.SparseAdam):
            # Its gradients are sparse: there is no dense update matrix to clip, and the
            # failure would otherwise come from deep inside the first step.
            raise ValueError(
                "optimizer is a torch.optim.SparseAdam, whose sparse gradients SPECTRA cannot "
                "clip; use a dense optimizer (e.g. torch.optim.AdamW with sparse=False "
                "embeddings)"
            )
        if clip is None and pre_clip is None:
            raise ValueError("clip and pre_clip are both None; set at least one of them")
        if distributed not in distributed_modes():
            raise ValueError(
                f"distributed must be one of {', '.join(map(repr, distributed_modes()))}, "
                f"got {distributed!r}"
            )
        self.clip = None if clip is None else check_clip(clip, "clip")
        self.pre_clip = None if pre_clip is None else check_clip(pre_clip, "pre_clip")
        # Validate the clip's options now (never at step 1000); building the kernel resolves
        # method, steps and dtype (resolve_compute) and the route. Options that only act on a
        # Newton–Schulz route choose one (or raise with route="eigh"): never ignored silently.
        route = resolve_route(check_route(route), method, steps, polish_steps)
        spectral_clip_kernel(1.0, method, steps, dtype, polish_steps, route)
        self.method, self.steps, self.dtype = method, steps, dtype
        self.polish_steps, self.route = polish_steps, route
        self.check_finite = bool(check_finite)
        self.distributed = make_topology(distributed, process_group, device_mesh, overlap)
        self.optimizer = optimizer
        # Not Optimizer.__init__: the groups, state and defaults are the base optimizer's own
        # objects, so a scheduler writing ``group["lr"]`` here changes the base step too.
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, index)

    # ------------------------------------------------------------------ groups
    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        for key in ("clip", "pre_clip"):
            if key in group and group[key] is not None:
                check_clip(group[key], f"param group {index}: {key}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._validate_group(param_group, len(self.param_groups))
        self.optimizer.add_param_group(param_group)

    def _threshold(self, group: dict[str, Any], key: str) -> float | None:
        return group[key] if key in group else getattr(self, key)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Base step, then replace each matrix update by its soft spectral clip."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.check_finite:
            self._check_finite()
        # (group, params, lr, weight decay, X_k) of every group whose update is post-clipped.
        pending = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.ndim >= 2]
            if not params:
                continue
            pre = self._threshold(group, "pre_clip")
            if pre is not None:
                grads = [p.grad for p in params]
                clipped = self._map(grads, pre, self._layouts(group, params))
                torch._foreach_copy_([distributed.local(g) for g in grads], clipped)
            lr = float(group["lr"])
            # lr = 0 makes no step from which U could be recovered (and none is taken).
            if self._threshold(group, "clip") is not None and lr > 0:
                wd = decoupled_weight_decay(self.optimizer, group)
                before = [w.detach().clone() for w in self._working(params)]
                pending.append((group, params, lr, wd, before))
        skips = [[_skips(self.state, p) for p in params] for _, params, *_ in pending]
        self.optimizer.step()
        for (group, params, lr, wd, before), counts in zip(pending, skips, strict=True):
            # A base with skip_nonfinite left these as they were: no update to clip (host
            # ints, no sync).
            kept = [i for i, p in enumerate(params) if _skips(self.state, p) == counts[i]]
            if len(kept) < len(params):
                params, before = [params[i] for i in kept], [before[i] for i in kept]
                if not params:
                    continue
            work = self._working(params)
            updates = [
                recover_update(x, w.detach(), lr, wd) for x, w in zip(before, work, strict=True)
            ]
            directions = self._map(
                updates, self._threshold(group, "clip"), self._layouts(group, params), scaled=True
            )
            local = [distributed.local(w) for w in work]
            torch._foreach_copy_(local, [distributed.local(x) for x in before])
            apply_updates_(local, directions, lr=lr, weight_decay=wd)
            for p, w in zip(params, work, strict=True):
                if w is not p:  # a float32 master copy: the parameter gets it rounded
                    distributed.local(p).copy_(distributed.local(w))
        return loss

    def _working(self, params: list[Tensor]) -> list[Tensor]:
        """The tensors the base optimizer updates for ``params``: an orthotorch base's float32
        master copies where it keeps them (``master_weights=True``; created from the parameters
        if this is their first step, as the base step would), else the parameters."""
        working = getattr(self.optimizer, "_working_params", None)
        return params if working is None else working(params)

    @staticmethod
    def _layouts(group: dict[str, Any], params: list[Tensor]) -> list[MatrixLayout]:
        """Each parameter's matrix layout (``group["layouts"]`` from param_groups; else
        ``flatten``): an expert stack or a fused projection is clipped per matrix."""
        if group.get("algorithm") == "adamw":
            return [parse_layout(None)] * len(params)
        return OrthogonalOptimizer._layouts_of(group, params)

    def _map(
        self, tensors: list[Tensor], c: float, layouts: list[MatrixLayout], scaled: bool = False
    ) -> list[Tensor]:
        kernel, compute = spectral_clip_kernel(
            c, self.method, self.steps, self.dtype, self.polish_steps, self.route
        )
        # The clipped update keeps the shape scale sqrt(max(1, rows/cols)) of the paper's code.
        scale = (lambda shape: math.sqrt(max(1.0, shape[0] / shape[1]))) if scaled else None
        return distributed.map_matrices(
            tensors, kernel, compute, self.distributed, layouts=layouts, scale=scale
        )

    def _check_finite(self) -> None:
        """Raise before anything changes when any gradient is NaN/Inf (decided on all ranks)."""
        named = [
            (gi, i, p)
            for gi, group in enumerate(self.param_groups)
            for i, p in enumerate(group["params"])
            if p.grad is not None
        ]
        if not named:
            return
        grads = [distributed.local(p.grad) for _, _, p in named]
        params = [p for _, _, p in named]
        suspect = maybe_nonfinite(grads)
        if not bool(distributed.any_rank(suspect.view(1), params, self.distributed)):
            return
        bad = torch.tensor([not bool(torch.isfinite(g).all()) for g in grads])
        bad = distributed.any_rank(bad, params, self.distributed).tolist()
        if True not in bad:
            return
        gi, i, p = named[bad.index(True)]
        names = self.param_groups[gi].get("param_names")
        label = repr(names[i]) if names else f"params[{i}]"
        raise NonFiniteGradientError(
            f"SPECTRA({type(self.optimizer).__name__}) param group {gi}: the gradient of "
            f"parameter {label} (shape {tuple(p.shape)}) contains NaN or Inf; no parameter or "
            "optimizer state was changed. Lower the learning rate or clip gradients, or pass "
            "check_finite=False to let the base optimizer handle it."
        )

    # ------------------------------------------------------------------ delegation
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _settings(self) -> dict[str, Any]:
        return {
            "clip": self.clip,
            "pre_clip": self.pre_clip,
            "method": self.method,
            "steps": self.steps,
            "dtype": self.dtype,
            "polish_steps": self.polish_steps,
            "route": self.route,
        }

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus ``"spectra"``: the wrapper's settings."""
        state = self.optimizer.state_dict()
        state["spectra"] = self._settings()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (or a plain base one, which keeps the current settings)."""
        state_dict = dict(state_dict)
        settings = state_dict.pop("spectra", None)
        if settings is not None:
            clip, pre = settings["clip"], settings["pre_clip"]
            clip = None if clip is None else check_clip(clip, "clip")
            pre = None if pre is None else check_clip(pre, "pre_clip")
            # Checkpoints from before ``route`` existed keep the current route.
            route = check_route(settings.get("route", self.route))
            options = (settings["method"], settings["steps"], settings["dtype"])
            # Validated as a whole before anything is assigned (as in __init__).
            spectral_clip_kernel(1.0, *options, settings["polish_steps"], route)
        self.optimizer.load_state_dict(state_dict)
        if settings is not None:
            self.clip, self.pre_clip, self.route = clip, pre, route
            self.method, self.steps, self.dtype = options
            self.polish_steps = settings["polish_steps"]
        # The base replaces its param_groups list and state on load: share the new ones.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps only defaults/state/param_groups; keep the base too.
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"SPECTRA(clip={self.clip}, pre_clip={self.pre_clip}, route={self.route!r}, "
            f"method={self.method!r},\n"
            f"  {self.optimizer!r})"
        )


def _skips(state: Any, p: Tensor) -> int:
    """The base's ``"nonfinite_skips"`` count of ``p`` (OrthogonalOptimizer's skip_nonfinite)."""
    entry = state.get(p)
    return entry.get("nonfinite_skips", 0) if entry else 0


def distributed_modes() -> tuple[str, ...]:
    return distributed.DISTRIBUTED_MODES
