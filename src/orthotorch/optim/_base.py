"""The step skeleton every orthotorch optimizer shares.

``step()`` gathers each group's gradients, checks them all for NaN/Inf at once (one host sync
per device, before anything is modified), then routes each group by its ``"algorithm"`` key:

- ``"adamw"`` groups: :func:`orthotorch.functional.adamw_step_` (embeddings, head, 1-D).
- the optimizer's own algorithm: momentum -> direction -> scale -> apply, where a subclass
  supplies the pieces that differ (:meth:`_init_state`, :meth:`_momentum`, :meth:`_direction`,
  :meth:`_scale`) and never copies the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import distributed
from ..distributed import make_topology
from ..functional import (
    MatrixLayout,
    adamw_step_,
    apply_updates_,
    check_layout,
    get_update_rule,
    nesterov_momentum_,
    parse_layout,
    resolve_rank,
)
from ..functional.checks import maybe_nonfinite, nonfinite_flags
from ..functional.lowprec import (
    HALF_DTYPES,
    LOW_PRECISION_DTYPES,
    lowprec_momentum_,
    rounding_seed,
)

# Keeps the AdamW first moments' rounding streams apart from the momentum buffers'.
_ADAMW_SEED_OFFSET = 1 << 20
# Accepted ``momentum_dtype``: bf16 state (stochastic rounding) or float32 state for half params.
MOMENTUM_DTYPES = (*LOW_PRECISION_DTYPES, torch.float32)

__all__ = ["NonFiniteGradientError", "OrthogonalOptimizer"]


class NonFiniteGradientError(FloatingPointError, ValueError):
    """A gradient holds NaN or Inf; raised before any parameter or state is modified."""


ADAMW = "adamw"
# The lr of "adamw" groups that set none, when the optimizer is given no adamw_lr: AdamW's own
# default (torch.optim.AdamW), never the orthogonalized groups' lr, which is ~20x larger.
DEFAULT_ADAMW_LR = 1e-3


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_range(
    group_label: str, name: str, value: Any, lo: float, hi: float, *, lo_open=False, hi_open=True
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a number in the given interval."""
    ok = _is_number(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(
            f"{group_label}: {name} must be a number in {left}{lo}, {hi}{right}, got {value!r}"
        )


def _state_tensors(state: Mapping[str, Any]) -> list[Tensor]:
    """Every tensor of a parameter's state, including per-block state (``state["blocks"]``)."""
    out = []
    for value in state.values():
        if isinstance(value, Tensor):
            out.append(distributed.local(value))
        elif isinstance(value, list):
            out += [
                t for block in value if isinstance(block, Mapping) for t in _state_tensors(block)
            ]
    return out


def _restore_dtypes(loaded: dict[str, Any], saved: Mapping[str, Any]) -> None:
    for key, value in saved.items():
        current = loaded.get(key)
        if isinstance(value, Tensor) and isinstance(current, Tensor):
            if value.is_floating_point() and value.dtype != current.dtype:
                loaded[key] = value.to(device=current.device, copy=True)
        elif isinstance(value, list) and isinstance(current, list):
            for mine, theirs in zip(current, value):
                if isinstance(mine, dict) and isinstance(theirs, Mapping):
                    _restore_dtypes(mine, theirs)


def _check_momentum_dtype(group: Mapping[str, Any], what: str, float32: bool = False) -> None:
    """``group["momentum_dtype"]`` must be None, bf16 or (``float32``: for the momentum of
    half-precision parameters) float32; ``ValueError`` starting with ``what`` otherwise."""
    dtype = group.get("momentum_dtype")
    if dtype is None or dtype in (MOMENTUM_DTYPES if float32 else LOW_PRECISION_DTYPES):
        return
    extra = " or torch.float32 (for bf16/fp16 parameters)" if float32 else ""
    raise ValueError(
        f"{what} must be None (the parameter's dtype), torch.bfloat16 (stochastic "
        f"rounding){extra}, got {dtype!r}"
    )


class OrthogonalOptimizer(Optimizer):
    """Base class: shared validation, routing, AdamW groups and the step skeleton.

    Subclasses set :attr:`algorithm` and implement :meth:`_init_state`, :meth:`_momentum`,
    :meth:`_scale` and, where the direction is not a registered update rule,
    :meth:`_direction`.

    Args:
        params: tensors, ``(name, tensor)`` pairs, or group dicts (see
            :func:`orthotorch.param_groups`). A group with ``"algorithm": "adamw"`` is updated
            with AdamW using its own ``lr``, ``betas``, ``eps`` and ``weight_decay``.
        defaults: the subclass's hyperparameters.
        adamw_lr: ``lr`` of the ``"adamw"`` groups that do not set their own (``None``:
            ``1e-3``, ``torch.optim.AdamW``'s default; never the orthogonalized ``lr``). This is
            the one documented way to set the AdamW lr; a group's own ``"lr"`` (e.g. from
            ``param_groups(model, adamw={"lr": ...})``) still wins, as in ``torch.optim``.
        check_finite: check all gradients for NaN/Inf before each step and raise
            :class:`NonFiniteGradientError` (a ``FloatingPointError`` and ``ValueError``) naming
            the parameter, leaving parameters and state untouched. Costs one host sync per step
            and device; disable only when something upstream (e.g. ``GradScaler``) already skips
            non-finite steps.
        skip_nonfinite: instead of raising, skip the update of each parameter whose gradient is
            not finite (its state is left as it was) and count the skips in its state under
            ``"nonfinite_skips"``.
        distributed: ``"auto"``: when a process group of size > 1 is initialised, parameters are
            taken as replicated (DDP) and each rank orthogonalizes a ``1/world_size`` share of the
            matrices, then results are all-gathered; ``DTensor`` parameters (FSDP2, HSDP, tensor
            parallel) are always handled shard-wise. ``"off"``: every rank processes every
            (plain) matrix itself.
        process_group: the group plain (replicated) parameters are shared over, e.g. one
            pipeline stage's data-parallel group (default: the default group).
        device_mesh: a ``DeviceMesh`` that every ``DTensor`` parameter must live on (checked
            here) and that plain parameters are replicated over; for several optimizers on
            separate meshes (expert and dense, pipeline stages). Not with ``process_group``.
        overlap: run the communication of the next bucket while the current one is processed
            (asynchronous collectives); ``False`` runs them one after another.
        master_weights: train bfloat16/float16 parameters through a float32 copy kept in the
            state (``state[p]["master_weight"]``): gradients are cast up, every state tensor of
            such a parameter is float32, the update is applied to the copy, and the parameter
            receives the copy rounded to its dtype. Without it an update smaller than half a
            bf16 ulp of a weight (``2^-9`` relative: at ``lr=1e-4`` most of them) is lost.
            Costs 4 bytes per half-precision parameter; float32 parameters are unaffected.
    """

    algorithm: ClassVar[str] = "orthogonal"
    # Whether groups may choose a registered update rule (``"update"``, e.g. from
    # ``param_groups(policy="symmetry")``); optimizers with their own direction must refuse
    # one rather than silently ignore it.
    accepts_update_rules: ClassVar[bool] = False
    # Whether the optimizer keeps state per matrix (ARO's rotation, a low-rank subspace, Dion's
    # Q) rather than per entry: then each matrix of a non-flatten layout (an expert, a q/k/v
    # block) runs the hooks as a parameter of its own, with its own state.
    block_state: ClassVar[bool] = False
    # Whether the whole-matrix work goes through distributed.map_matrices alone, which serves
    # DTensors on any 1-D/2-D mesh; optimizers with row-sharded state of their own (ARO, the
    # low-rank ones) support only FSDP2's Shard(0) on a 1-D mesh.
    mesh_layouts: ClassVar[bool] = True

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        adamw_lr: float | None = None,
        check_finite: bool = True,
        skip_nonfinite: bool = False,
        distributed: str = "auto",
        process_group: Any = None,
        device_mesh: Any = None,
        overlap: bool = True,
        master_weights: bool = False,
    ) -> None:
        if not isinstance(master_weights, bool):
            raise ValueError(f"master_weights must be True or False, got {master_weights!r}")
        self.master_weights = master_weights
        # Validated (ValueError naming the argument) and kept as one Topology, which every
        # call into orthotorch.distributed takes in place of the mode string.
        self.distributed = make_topology(distributed, process_group, device_mesh, overlap)
        self._ranks_checked = False
        if skip_nonfinite and not check_finite:
            raise ValueError("skip_nonfinite=True needs check_finite=True")
        self.skip_nonfinite = bool(skip_nonfinite)
        if adamw_lr is not None:
            check_range(type(self).__name__, "adamw_lr", adamw_lr, 0.0, math.inf)
        self._adamw_lr = adamw_lr
        self.check_finite = bool(check_finite)
        super().__init__(params, {**defaults, "algorithm": self.algorithm})

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if (
            isinstance(param_group, dict)
            and param_group.get("algorithm") == ADAMW
            and "lr" not in param_group
        ):
            lr = DEFAULT_ADAMW_LR if self._adamw_lr is None else self._adamw_lr
            param_group = {**param_group, "lr": lr}
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            self._validate_group(self.param_groups[index], index)
        except Exception:
            # A rejected group must leave the optimizer exactly as it was.
            self.param_groups.pop()
            raise

    def _group_label(self, group: Mapping[str, Any], index: int) -> str:
        return f"{type(self).__name__} param group {index} (algorithm={group['algorithm']!r})"

    def _param_label(self, group: Mapping[str, Any], i: int) -> str:
        names = group.get("param_names")
        return repr(names[i]) if names else f"params[{i}]"

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        algorithm = group["algorithm"]
        if algorithm not in (self.algorithm, ADAMW):
            raise ValueError(
                f"{type(self).__name__} param group {index}: algorithm must be "
                f"{self.algorithm!r} or {ADAMW!r}, got {algorithm!r}"
            )
        label = self._group_label(group, index)
        check_range(label, "lr", group["lr"], 0.0, math.inf)
        check_range(label, "weight_decay", group["weight_decay"], 0.0, math.inf)
        for i, p in enumerate(group["params"]):
            if p.is_complex() or not p.is_floating_point():
                raise ValueError(
                    f"{label}: parameter {self._param_label(group, i)} has dtype {p.dtype}; "
                    "only real floating-point parameters are supported"
                )
        if algorithm == ADAMW:
            if group.get("layouts") is not None:
                raise ValueError(
                    f"{label}: 'layouts' applies to orthogonalized groups only; AdamW updates "
                    "are element-wise. Drop the key from this group."
                )
            betas = group["betas"]
            if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
                raise ValueError(f"{label}: betas must be a pair (beta1, beta2), got {betas!r}")
            check_range(label, "betas[0]", betas[0], 0.0, 1.0)
            check_range(label, "betas[1]", betas[1], 0.0, 1.0)
            check_range(label, "eps", group["eps"], 0.0, math.inf, lo_open=True)
            _check_momentum_dtype(
                group, f"{label}: momentum_dtype of an AdamW group (the first moment's dtype)"
            )
            return
        for i, p in enumerate(group["params"]):
            if p.ndim < 2:
                raise ValueError(
                    f"{label}: parameter {self._param_label(group, i)} has shape "
                    f"{tuple(p.shape)}, but orthogonalized groups take only 2-D or larger "
                    "weights. Put biases, norms and other 1-D parameters in an 'adamw' group, "
                    "e.g. with orthotorch.param_groups(model)."
                )
            # Checked here, not at the first step: a layout the sharded paths cannot handle
            # would otherwise surface as a hang or a shape error inside a collective.
            reason = distributed.unsupported_layout(p, self.mesh_layouts, self.distributed.mesh)
            if reason is not None:
                raise ValueError(f"{label}: parameter {self._param_label(group, i)}: {reason}")
        self._validate_layouts(group, label)
        if not self.accepts_update_rules and group.get("update") is not None:
            raise ValueError(
                f"{label}: update={group['update']!r}, but {type(self).__name__} computes its "
                "own direction and takes no update rule; use orthotorch.Muon for update rules "
                "(e.g. param_groups(model, policy='symmetry')), or drop the 'update' key"
            )
        self._validate_orthogonal_group(group, label)

    def _validate_layouts(self, group: dict[str, Any], label: str) -> None:
        """Check ``group["layouts"]`` (one matrix layout per parameter; default ``flatten``)
        against the parameters' shapes and store them in canonical form."""
        params = group["params"]
        layouts = group.get("layouts")
        if layouts is None:
            group["layouts"] = ["flatten"] * len(params)
            return
        if isinstance(layouts, str) or len(layouts) != len(params):
            raise ValueError(
                f"{label}: layouts must be a list with one layout per parameter "
                f"({len(params)}), got {layouts!r}"
            )
        canonical = []
        for i, (p, spec) in enumerate(zip(params, layouts, strict=True)):
            name = f"parameter {self._param_label(group, i)}"
            try:
                canonical.append(check_layout(spec, tuple(p.shape), name))
            except ValueError as err:
                raise ValueError(f"{label}: {err}") from None
        if self.block_state:
            for i, (p, c) in enumerate(zip(params, canonical, strict=True)):
                if c != "flatten" and distributed.is_dtensor(p):
                    raise ValueError(
                        f"{label}: parameter {self._param_label(group, i)} is a DTensor with "
                        f"matrix layout {c!r}; {type(self).__name__} keeps per-matrix state and "
                        "supports only 'flatten' for sharded parameters (use Muon/ROOT/NorMuon, "
                        "or param_groups(model, layout={pattern: 'flatten'}))"
                    )
        unsupported = sorted({c for c in canonical if not self._supports_layout(parse_layout(c))})
        if unsupported:
            raise ValueError(
                f"{label}: {type(self).__name__} does not support the matrix layouts "
                f"{', '.join(map(repr, unsupported))} (it keeps per-matrix state of the "
                "flattened weight); use orthotorch.Muon/ROOT/AuON for them, or route these "
                "parameters with param_groups(model, layout={pattern: 'flatten'})"
            )
        group["layouts"] = canonical

    def _supports_layout(self, layout: MatrixLayout) -> bool:
        """Whether this optimizer's direction honours ``layout`` (a subclass that cannot serve
        some layouts narrows this)."""
        return True

    def _check_rank_per_matrix(self, group: dict[str, Any], label: str) -> None:
        """``group["rank"]`` (an int or a fraction) must fit every matrix of every parameter's
        layout: optimizers with low-rank per-matrix state give each expert / q-k-v block its
        own rank-``r`` state. ``ValueError`` names the parameter and the matrix."""
        layouts = self._layouts_of(group, list(group["params"]))
        for i, p in enumerate(group["params"]):
            for shape in dict.fromkeys(layouts[i].block_shapes(tuple(p.shape))):
                try:
                    resolve_rank(group["rank"], shape)
                except ValueError as err:
                    raise ValueError(
                        f"{label}: parameter {self._param_label(group, i)} of shape "
                        f"{tuple(p.shape)} (a {shape[0]}x{shape[1]} matrix): {err}"
                    ) from None

    def _validate_orthogonal_group(self, group: dict[str, Any], label: str) -> None:
        """Subclass hook: check the algorithm's own hyperparameters (raise ``ValueError``)."""

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``, refusing (before anything changes) a checkpoint of
        another optimizer or one whose parameters had other matrix layouts."""
        self._check_loadable(state_dict)
        super().load_state_dict(state_dict)
        self._keep_saved_dtypes(state_dict)

    def _keep_saved_dtypes(self, state_dict: dict[str, Any]) -> None:
        """Put back state tensors that ``Optimizer.load_state_dict`` cast to the parameter's dtype.

        torch casts every floating-point state tensor to its parameter's dtype, which would
        round a float32 master copy or float32 momentum of a bf16 parameter to bf16 (and turn
        bf16 state of a float32 parameter into float32): the state keeps the dtype it was
        saved with, so a resumed run continues bit for bit.
        """
        saved_state = state_dict.get("state", {})
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for p, key in zip(group["params"], saved["params"]):
                if key in saved_state:
                    _restore_dtypes(self.state[p], saved_state[key])

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        name = type(self).__name__
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            return  # torch.optim raises its own error for these
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            saved_algorithm = saved.get("algorithm")
            if saved_algorithm != group["algorithm"]:
                raise ValueError(
                    f"{name}.load_state_dict: param group {index} was saved with algorithm "
                    f"{saved_algorithm!r} (another optimizer's checkpoint), but this {name} "
                    f"group runs {group['algorithm']!r}; load it into the optimizer that saved "
                    "it. Nothing was changed."
                )
            if group["algorithm"] == ADAMW:
                continue
            mine = group.get("layouts") or ["flatten"] * len(group["params"])
            theirs = saved.get("layouts") or ["flatten"] * len(saved.get("params", ()))
            if len(theirs) != len(mine):
                continue  # torch.optim raises its own error for a size mismatch
            for i, (a, b) in enumerate(zip(mine, theirs)):
                if str(parse_layout(b)) != a:
                    raise ValueError(
                        f"{name}.load_state_dict: parameter {self._param_label(group, i)} of "
                        f"param group {index} was saved with matrix layout {b!r}, but this "
                        f"optimizer uses {a!r}; build the optimizer with the checkpoint's "
                        "layout (param_groups(model, layout=...)). Nothing was changed."
                    )

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        all_params = [p for group in self.param_groups for p in group["params"]]
        if not self._ranks_checked:
            self._check_ranks_agree(all_params)
        has_grad = [p.grad is not None for p in all_params]
        # Under DDP/FSDP every rank must process the same parameters, or the collectives of
        # the direction step would be mismatched and hang: a parameter with a gradient on any
        # rank is updated everywhere, with a zero gradient where it had none. (Single process:
        # any_rank returns its input, and no .tolist() breaks a compiled graph.)
        flags = torch.tensor(has_grad)
        on_all_ranks = distributed.any_rank(flags, all_params, self.distributed)
        if on_all_ranks is not flags:
            has_grad = on_all_ranks.tolist()
        gathered = []
        position = 0
        for index, group in enumerate(self.param_groups):
            params, grads = [], []
            for i, p in enumerate(group["params"]):
                position += 1
                if not has_grad[position - 1]:
                    continue
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if grad.is_sparse:
                    raise ValueError(
                        f"{self._group_label(group, index)}: parameter "
                        f"{self._param_label(group, i)} has a sparse gradient, which is not "
                        "supported (use a dense nn.Embedding)"
                    )
                params.append(p)
                grads.append(grad)
            gathered.append((group, params, grads))
        if self.check_finite and torch.compiler.is_compiling():
            self._update_unless_nonfinite(gathered)
            return loss
        if self.check_finite:
            gathered = self._filter_finite(gathered, all_params)
        self._update(gathered)
        return loss

    def _update(self, gathered: list[tuple[dict, list[Tensor], list[Tensor]]]) -> None:
        for group, params, grads in gathered:
            if not params:
                continue
            if group["algorithm"] == ADAMW:
                self._adamw_group(group, params, grads)
            else:
                self._orthogonal_group(group, params, grads)

    def _update_unless_nonfinite(
        self, gathered: list[tuple[dict, list[Tensor], list[Tensor]]]
    ) -> None:
        """The finite check inside ``torch.compile``: decided and applied on the device.

        Raising needs the flag on the host (a graph break and a sync), so a compiled step
        cannot raise :class:`NonFiniteGradientError`. Instead the step runs, and every parameter
        and state tensor is put back where the check failed: the whole step when any gradient
        is non-finite (as the eager raise leaves everything untouched), or, with
        ``skip_nonfinite``, each such parameter. Each skipped update is counted in the
        parameter's ``state["nonfinite_skips"]`` (a device tensor here; :attr:`nonfinite_skipped`
        sums them). State is created before the snapshot, so a first step with a NaN leaves
        fresh state, not NaN state. (The counters live in the state because Dynamo does not
        replay attribute assignments on an optimizer.)
        """
        flat = [(p, g) for _, ps, gs in gathered for p, g in zip(ps, gs)]
        if not flat:
            return
        bad = nonfinite_flags([distributed.local(g) for _, g in flat])
        skip = bad if self.skip_nonfinite else bad.any().expand(len(flat))
        for group, params, _ in gathered:
            if params:
                self._create_state(group, params)
        saved = []
        for i, (p, _) in enumerate(flat):
            for t in [distributed.local(p), *_state_tensors(self.state[p])]:
                saved.append((i, t, t.clone()))
        self._update(gathered)
        for i, t, old in saved:
            t.copy_(torch.where(skip[i], old, t))
        for i, (p, _) in enumerate(flat):
            self.state[p]["nonfinite_skips"].add_(skip[i].to(torch.int64))

    @property
    def nonfinite_skipped(self) -> int:
        """Parameter updates skipped so far for a non-finite gradient (``skip_nonfinite``, or a
        compiled step's on-device check); a host read."""
        return sum(int(s.get("nonfinite_skips", 0)) for s in self.state.values())

    def _create_state(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Create the state of ``params`` that the step would create (idempotent), and the
        skip counters of the compiled step's finite check."""
        for p in params:
            state = self.state[p]
            count = state.get("nonfinite_skips", 0)
            if not isinstance(count, Tensor):
                state["nonfinite_skips"] = torch.tensor(count, dtype=torch.int64, device=p.device)
        work = self._working_params(params)
        if group["algorithm"] == ADAMW:
            self._adamw_state(group, params, work)
            return
        layouts = self._layouts_of(group, params)
        if self.block_state and not all(layout.is_flatten for layout in layouts):
            block_params, block_states, _ = self._blocks(params, work, layouts)
            self._init_state(group, block_params, block_states)
        else:
            self._init_state(group, work, [self.state[p] for p in params])

    def _check_ranks_agree(self, all_params: list[Tensor]) -> None:
        """Once, at the first step: every rank must hold the same parameter list."""
        # Layout and placement too: ranks that shard a weight differently would exchange
        # pieces of different sizes (a hang or garbage), so they fail here, naming it.
        signature = [
            (
                gi,
                self._param_label(group, i),
                group["algorithm"],
                tuple(p.shape),
                str(p.dtype),
                (group.get("layouts") or ["flatten"] * len(group["params"]))[i],
                distributed.placement_of(p),
            )
            for gi, group in enumerate(self.param_groups)
            for i, p in enumerate(group["params"])
        ]
        distributed.all_ranks_agree(
            signature, all_params, self.distributed, f"the parameters of {type(self).__name__}"
        )
        self._ranks_checked = True

    def _filter_finite(
        self, gathered: list[tuple[dict, list[Tensor], list[Tensor]]], all_params: list[Tensor]
    ) -> list[tuple[dict, list[Tensor], list[Tensor]]]:
        """Raise on (or, with ``skip_nonfinite``, drop) parameters whose gradient is not finite.

        Runs before anything is modified, so a raise leaves parameters and state untouched.
        Decisions are combined across ranks (a NaN in one FSDP shard stops every rank).
        """
        grads = [distributed.local(g) for _, _, gs in gathered for g in gs]
        suspect = maybe_nonfinite(grads)
        if not bool(distributed.any_rank(suspect.view(1), all_params, self.distributed)):
            return gathered
        flat = [(index, p, g) for index, (_, ps, gs) in enumerate(gathered) for p, g in zip(ps, gs)]
        bad = torch.tensor(
            [not bool(torch.isfinite(distributed.local(g)).all()) for _, _, g in flat]
        )
        bad = distributed.any_rank(bad, all_params, self.distributed).tolist()
        if not self.skip_nonfinite:
            index, p, _ = flat[bad.index(True)]
            group = gathered[index][0]
            i = next(j for j, q in enumerate(group["params"]) if q is p)
            raise NonFiniteGradientError(
                f"{self._group_label(group, index)}: the gradient of parameter "
                f"{self._param_label(group, i)} (shape {tuple(p.shape)}) contains NaN "
                "or Inf; no parameter or optimizer state was changed. Look for an "
                "overflowing loss, lower the learning rate / clip gradients, or pass "
                "skip_nonfinite=True to skip such updates."
            )
        kept = [(group, [], []) for group, _, _ in gathered]
        for (index, p, g), is_bad in zip(flat, bad, strict=True):
            if is_bad:
                state = self.state[p]
                state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
            else:
                kept[index][1].append(p)
                kept[index][2].append(g)
        return kept

    # ------------------------------------------------------------------ master weights
    def _working_params(self, params: list[Tensor]) -> list[Tensor]:
        """The tensors the update is computed on and applied to: each parameter itself, or,
        with :attr:`master_weights`, the float32 copy of a half-precision one (created from the
        parameter on first use)."""
        if not self.master_weights:
            return params
        work = []
        for p in params:
            if p.dtype not in HALF_DTYPES:
                work.append(p)
                continue
            state = self.state[p]
            if "master_weight" not in state:
                state["master_weight"] = p.detach().to(torch.float32)
            work.append(state["master_weight"])
        return work

    @staticmethod
    def _cast_grads(grads: list[Tensor], work: list[Tensor]) -> list[Tensor]:
        return [
            g if g.dtype == w.dtype else g.to(w.dtype) for g, w in zip(grads, work, strict=True)
        ]

    @staticmethod
    def _write_back(params: list[Tensor], work: list[Tensor]) -> None:
        """Round each float32 master copy into its half-precision parameter."""
        for p, w in zip(params, work, strict=True):
            if w is not p:
                distributed.local(p).copy_(distributed.local(w))

    # ------------------------------------------------------------------ the groups' updates
    def _adamw_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        work = self._working_params(params)
        grads = self._cast_grads(grads, work)
        self._adamw_state(group, params, work)
        states = [self.state[p] for p in params]
        seeds = None
        dtype = group.get("momentum_dtype")
        if dtype is not None:
            # A first moment made before the option was set (or loaded from a checkpoint saved
            # without it) is converted once; the saved step seeds the rounding, so a resumed
            # run rounds identically.
            for s in states:
                s["exp_avg"] = s["exp_avg"].to(dtype)
            seeds = [
                rounding_seed(int(s["step"]), i + _ADAMW_SEED_OFFSET) for i, s in enumerate(states)
            ]
        beta1, beta2 = group["betas"]
        adamw_step_(
            work,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            exp_avg_seeds=seeds,
        )
        self._write_back(params, work)

    def _adamw_state(self, group: dict[str, Any], params: list[Tensor], work: list[Tensor]) -> None:
        for p, w in zip(params, work, strict=True):
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(
                    w, dtype=group.get("momentum_dtype"), memory_format=torch.preserve_format
                )
                state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)

    def _orthogonal_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> None:
        work = self._working_params(params)
        grads = self._cast_grads(grads, work)
        layouts = self._layouts_of(group, params)
        if self.block_state and not all(layout.is_flatten for layout in layouts):
            directions = self._blockwise_directions(group, params, work, grads, layouts)
        else:
            states = [self.state[p] for p in params]
            self._init_state(group, work, states)
            momenta = self._momentum(group, grads, states)
            directions = self._direction(group, momenta, states, layouts)
        apply_updates_(
            [distributed.local(w) for w in work],
            directions,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
        )
        self._write_back(params, work)

    def _blocks(
        self, params: list[Tensor], work: list[Tensor], layouts: list[MatrixLayout]
    ) -> tuple[list[Tensor], list[dict[str, Any]], list[int]]:
        """Each matrix of a non-``flatten`` layout as a parameter of its own: the matrices (views
        of the working tensors), their state dicts (``state[p]["blocks"]``) and, per parameter,
        how many there are (0 for a ``flatten`` parameter, which stays whole)."""
        block_params, block_states, counts = [], [], []
        for p, w, layout in zip(params, work, layouts, strict=True):
            if layout.is_flatten:
                block_params.append(w)
                block_states.append(self.state[p])
                counts.append(0)
                continue
            views = layout.matrices(w.detach())
            block_params += views
            block_states += self.state[p].setdefault("blocks", [{} for _ in views])
            counts.append(len(views))
        return block_params, block_states, counts

    def _blockwise_directions(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        work: list[Tensor],
        grads: list[Tensor],
        layouts: list[MatrixLayout],
    ) -> list[Tensor]:
        """The hooks run on every matrix of a non-``flatten`` layout as a parameter of its own.

        For optimizers whose state is per matrix (:attr:`block_state`: ARO's rotation, a
        low-rank subspace, Dion's ``Q``): each expert / q-k-v block keeps its own state dict in
        ``state[p]["blocks"]``, so it gets its own rotation or subspace; ``flatten`` parameters
        keep their state as before. (Non-flatten layouts of ``DTensor`` parameters are refused
        at construction for these optimizers.)
        """
        block_params, block_states, counts = self._blocks(params, work, layouts)
        block_grads = []
        for g, layout in zip(grads, layouts, strict=True):
            block_grads += (
                [g] if layout.is_flatten else [v.contiguous() for v in layout.matrices(g)]
            )
        self._init_state(group, block_params, block_states)
        momenta = self._momentum(group, block_grads, block_states)
        flat = [parse_layout(None)] * len(block_params)
        block_directions = self._direction(group, momenta, block_states, flat)
        directions, position = [], 0
        for w, layout, count in zip(work, layouts, counts, strict=True):
            if count == 0:
                directions.append(block_directions[position])
                position += 1
                continue
            blocks = block_directions[position : position + count]
            directions.append(layout.assemble(blocks, w.shape, w.device))
            position += count
        return directions

    @staticmethod
    def _layouts_of(group: dict[str, Any], params: list[Tensor]) -> list[MatrixLayout]:
        """The parsed layout of each of ``params`` (a subset of the group's, in order)."""
        specs = group.get("layouts")
        if specs is None:
            return [parse_layout(None)] * len(params)
        position = {id(p): i for i, p in enumerate(group["params"])}
        return [parse_layout(specs[position[id(p)]]) for p in params]

    # ------------------------------------------------------------------ subclass hooks
    # The defaults implement the (Nesterov) momentum that Muon, ROOT and AuON share; an
    # optimizer with other state (ARO's rotation, the low-rank moments) overrides them.
    def _validate_momentum(self, group: dict[str, Any], label: str) -> None:
        """Check the ``momentum``/``nesterov`` options the default momentum hook reads."""
        check_range(label, "momentum", group["momentum"], 0.0, 1.0)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"{label}: nesterov must be True or False, got {group['nesterov']!r}")
        _check_momentum_dtype(group, f"{label}: momentum_dtype", float32=True)

    def _init_state(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        dtype = group.get("momentum_dtype")  # bf16: half the state (functional/lowprec.py)
        for p, state in zip(params, states, strict=True):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p, dtype=dtype, memory_format=torch.preserve_format
                )

    def _momentum(
        self, group: dict[str, Any], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> list[Tensor]:
        bufs = [s["momentum_buffer"] for s in states]
        dtype = group.get("momentum_dtype")
        if dtype is not None:
            # Subclasses that create the buffer in the parameter's dtype (and buffers made
            # before the option was set) are converted once; later steps find it in ``dtype``.
            for s in states:
                s["momentum_buffer"] = s["momentum_buffer"].to(dtype)
            bufs = [s["momentum_buffer"] for s in states]
        if dtype == torch.float32:
            # float32 state for half-precision parameters: the moving average in float32.
            grads = [g.to(dtype) for g in grads]
        elif dtype is not None:
            # The step count in the state seeds the rounding: a resumed run rounds identically.
            seeds = [rounding_seed(s.get("momentum_rounds", 0), i) for i, s in enumerate(states)]
            for s in states:
                s["momentum_rounds"] = s.get("momentum_rounds", 0) + 1
            return lowprec_momentum_(grads, bufs, group["momentum"], group["nesterov"], seeds)
        return nesterov_momentum_(grads, bufs, group["momentum"], group["nesterov"])

    def _direction(
        self,
        group: dict[str, Any],
        momenta: list[Tensor],
        states: list[dict[str, Any]],
        layouts: list[MatrixLayout],
    ) -> list[Tensor]:
        """The scaled update direction of each parameter, shaped like its local tensor.

        Default: the group's registered update rule (``group["update"]``), run on every matrix
        of each parameter's layout by :func:`orthotorch.distributed.map_matrices` (which splits
        the work across ranks under DDP/FSDP2), each matrix scaled by :meth:`_scale`.
        """
        kernel, compute_dtype = get_update_rule(group["update"]).prepare(group)
        return distributed.map_matrices(
            momenta,
            kernel,
            compute_dtype,
            self.distributed,
            layouts=layouts,
            scale=self._scale_fn(group),
        )

    def _scale_fn(self, group: dict[str, Any]) -> Callable[[tuple[int, int]], float]:
        """:meth:`_scale` of this group as a function of a matrix's ``(rows, cols)``."""
        return lambda shape: self._scale(group, shape)

    def _scale(self, group: dict[str, Any], shape: tuple[int, int]) -> float:
        raise NotImplementedError
