"""THE optimizer registry of ``orthotorch compare`` and ``orthotorch bench``.

An entry is a factory ``(model_or_param_groups, lr, adamw_lr) -> Optimizer`` plus default
learning rates per task. ``lr`` is the optimizer's headline learning rate (the orthogonalized
group's, for Muon-like optimizers); ``adamw_lr`` is the learning rate of the parameters every
optimizer here updates with AdamW (embeddings, output head, norms, biases), which a comparison
sets to the AdamW baseline's own lr so that only the hidden-matrix update differs.

Adding an optimizer (ROOT, AuON, ...) is one :func:`register_optimizer` call or one entry in
:data:`OPTIMIZERS`; ``compare``, ``bench`` and the tests pick it up.

Weight decay is 0 for every entry: the runs are short, and a shared zero keeps the comparison
about the update direction rather than about how each optimizer scales its decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..optim import ARO, ROOT, SPECTRA, AuON, DCTAdamW, Dion, GaLoreAdamW, Muon, NorMuon
from ..routing import param_groups, route_parameters

__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "TorchMuonWithAdamW",
    "available_optimizers",
    "get_optimizer",
    "optimizer_state_bytes",
    "register_optimizer",
]

ModelOrGroups = nn.Module | list[dict[str, Any]]
OptimizerFactory = Callable[[ModelOrGroups, float, float], Any]


@dataclass(frozen=True)
class OptimizerSpec:
    """A registry entry.

    Attributes:
        name: registry key (``--optimizers``).
        factory: ``(model_or_param_groups, lr, adamw_lr) -> optimizer``; a model is routed with
            :func:`orthotorch.param_groups`, a list of groups is used as given.
        lr: default ``lr`` per task name; the key ``"*"`` is the fallback for other tasks.
        description: one line for help texts and reports.
        tuned: the tasks whose ``lr`` entry came from a sweep (``compare`` then runs that lr
            as is unless asked to sweep); ``None``: every task key of ``lr`` except ``"*"``.
            Any other lr is only the centre of the sweep grid.
    """

    name: str
    factory: OptimizerFactory
    lr: Mapping[str, float] = field(default_factory=dict)
    description: str = ""
    tuned: tuple[str, ...] | None = None

    def is_tuned(self, task: str) -> bool:
        """Whether the default lr of ``task`` was tuned for it (else ``compare`` sweeps)."""
        tuned = self.tuned if self.tuned is not None else tuple(k for k in self.lr if k != "*")
        return task in tuned

    def default_lr(self, task: str) -> float:
        """The default learning rate of this optimizer on ``task``."""
        if task in self.lr:
            return self.lr[task]
        if "*" in self.lr:
            return self.lr["*"]
        raise ValueError(f"optimizer {self.name!r} has no default lr for task {task!r}; pass one")

    def build(self, model_or_groups: ModelOrGroups, lr: float, adamw_lr: float) -> Any:
        """Construct the optimizer."""
        return self.factory(model_or_groups, lr, adamw_lr)


def _groups(model_or_groups: ModelOrGroups) -> list[dict[str, Any]]:
    if isinstance(model_or_groups, nn.Module):
        return param_groups(model_or_groups)
    return [dict(g) for g in model_or_groups]


def _adamw(model_or_groups: ModelOrGroups, lr: float, adamw_lr: float) -> Optimizer:
    # The baseline: every parameter with torch.optim.AdamW at one lr (``adamw_lr`` is this
    # optimizer's own lr by construction of a comparison, so it is not used separately).
    del adamw_lr
    params = [p for g in _groups(model_or_groups) for p in _tensors(g["params"])]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def _muon(
    model_or_groups: ModelOrGroups, lr: float, adamw_lr: float, ns_method: str = "polar_express"
) -> Optimizer:
    groups = _groups(model_or_groups)
    return Muon(groups, lr=lr, weight_decay=0.0, adamw_lr=adamw_lr, ns_method=ns_method)


def _tensors(params: Iterable[Any]) -> list[Tensor]:
    return [p[1] if isinstance(p, tuple) else p for p in params]


class TorchMuonWithAdamW:
    """``torch.optim.Muon`` on the 2-D hidden matrices + ``torch.optim.AdamW`` on the rest.

    ``torch.optim.Muon`` accepts only 2-D parameters and has no AdamW groups, so this is the
    usual way to use it: hidden matrices from :func:`orthotorch.route_parameters` that are 2-D
    go to Muon; embeddings, the head, norms, biases and *convolution kernels* (which
    ``torch.optim.Muon`` rejects) go to AdamW. It is the outside reference (``torch-muon``) for
    ``orthotorch.Muon`` and mirrors the optimizer API the runner uses (``step``, ``zero_grad``,
    ``state``, ``param_groups``, ``state_dict``).
    """

    def __init__(
        self, muon_params: list[Tensor], adamw_params: list[Tensor], lr: float, adamw_lr: float
    ) -> None:
        self.optimizers: list[Optimizer] = []
        if muon_params:
            self.optimizers.append(torch.optim.Muon(muon_params, lr=lr, weight_decay=0.0))
        if adamw_params:
            self.optimizers.append(
                torch.optim.AdamW(adamw_params, lr=adamw_lr, betas=(0.9, 0.95), weight_decay=0.0)
            )

    @classmethod
    def from_model(cls, model: nn.Module, lr: float, adamw_lr: float) -> TorchMuonWithAdamW:
        """Split ``model`` with :func:`orthotorch.route_parameters` (2-D hidden -> Muon)."""
        muon, rest = [], []
        for _, p, route, _ in route_parameters(model):
            (muon if route == "orthogonal" and p.ndim == 2 else rest).append(p)
        return cls(muon, rest, lr, adamw_lr)

    @classmethod
    def from_groups(
        cls, groups: list[dict[str, Any]], lr: float, adamw_lr: float
    ) -> TorchMuonWithAdamW:
        """Split param groups: 2-D tensors of non-``"adamw"`` groups -> Muon, the rest AdamW."""
        muon, rest = [], []
        for g in groups:
            for p in _tensors(g["params"]):
                (rest if g.get("algorithm") == "adamw" or p.ndim != 2 else muon).append(p)
        return cls(muon, rest, lr, adamw_lr)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict[Tensor, Any]:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(
                f"state_dict has {len(states)} optimizers, this object {len(self.optimizers)}"
            )
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)


def _torch_muon(model_or_groups: ModelOrGroups, lr: float, adamw_lr: float) -> TorchMuonWithAdamW:
    if isinstance(model_or_groups, nn.Module):
        return TorchMuonWithAdamW.from_model(model_or_groups, lr, adamw_lr)
    return TorchMuonWithAdamW.from_groups(list(model_or_groups), lr, adamw_lr)


# Default learning rates: the best of a short sweep per task (2 seeds, default steps, constant
# lr, CPU): bytelm AdamW {6e-4, 1e-3, 2e-3, 3e-3, 1e-2}, Muon {0.01, 0.02, 0.05}; digits AdamW
# {1e-3, 3e-3, 1e-2}, Muon {0.01, 0.02, 0.05}; matrix AdamW {1e-3 .. 3e-2}, Muon {5e-3, 0.02,
# 0.05}. Redo it for your setting with ``--lr name=value``.
OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec, *, overwrite: bool = False) -> None:
    """Add ``spec`` to :data:`OPTIMIZERS` under ``spec.name``."""
    if spec.name in OPTIMIZERS and not overwrite:
        raise ValueError(f"optimizer {spec.name!r} is already registered; pass overwrite=True")
    OPTIMIZERS[spec.name] = spec


register_optimizer(
    OptimizerSpec(
        "adamw",
        _adamw,
        lr={"bytelm": 1e-3, "digits": 3e-3, "matrix": 1e-3, "*": 1e-3},
        description="torch.optim.AdamW on every parameter (the baseline)",
    )
)
register_optimizer(
    OptimizerSpec(
        "muon",
        _muon,
        lr={"bytelm": 0.02, "digits": 0.01, "matrix": 5e-3, "*": 0.02},
        description="orthotorch.Muon (Polar Express, 5 steps, bf16) + AdamW groups",
    )
)
register_optimizer(
    OptimizerSpec(
        "torch-muon",
        _torch_muon,
        lr={"bytelm": 0.02, "digits": 0.01, "matrix": 5e-3, "*": 0.02},
        description="torch.optim.Muon on 2-D hidden matrices + torch.optim.AdamW on the rest",
    )
)
register_optimizer(
    OptimizerSpec(
        "muon-aol",
        partial(_muon, ns_method="aol"),
        # Muon's tuned rates: the method changes the polar factor's accuracy, not its scale.
        lr=dict(OPTIMIZERS["muon"].lr),
        description="orthotorch.Muon with Turbo-Muon's AOL-preconditioned Newton-Schulz (4 steps)",
    )
)


def available_optimizers() -> list[str]:
    """Names of the registered optimizers."""
    return list(OPTIMIZERS)


def get_optimizer(name: str) -> OptimizerSpec:
    """Look an optimizer up, with an error that lists the valid names."""
    try:
        return OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
        ) from None


def optimizer_state_bytes(optimizer: Any) -> int:
    """Sum of ``nbytes`` over every tensor in ``optimizer.state``, nested lists and dicts
    included (the per-block state of expert stacks and split projections)."""

    def size(value: Any) -> int:
        if isinstance(value, Tensor):
            return value.nbytes
        if isinstance(value, Mapping):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0

    return sum(size(state) for state in optimizer.state.values())


# Issue 7: SPECTRA around the AdamW baseline, and ARO. SPECTRA's lr is the wrapped AdamW's (every
# parameter, 1-D ones included); the clip then bounds each matrix step's spectral norm by
# lr * alpha * c (c = 10, alpha = sqrt(max(1, m/n)) as in the paper's code), so it tolerates a
# larger lr than AdamW. bytelm sweep (seeds 10, 11, default steps, 1 thread): lr 1e-3 3.561,
# 2e-3 3.265, 4e-3 3.224, 8e-3 3.265 bits/byte (AdamW on the same seeds: 1e-3 3.393, 2e-3 3.598,
# 4e-3 3.839). Other tasks reuse AdamW's lr (not swept). ARO reuses AdamW's learning rates (its
# update is RMS-matched to AdamW's); not swept yet.
def _spectra_adamw(model_or_groups: ModelOrGroups, lr: float, adamw_lr: float) -> Optimizer:
    return SPECTRA(_adamw(model_or_groups, lr, adamw_lr), clip=10.0)


def _symmetry_mlp_names(model: nn.Module) -> list[str]:
    """Hidden matrices that policy="symmetry" gives a row/column rule (MLP gate/up/down)."""
    # By the rule, not by the routing's reason text: every matrix that is neither the
    # embedding nor the head and got a row/column rule.
    return [
        name
        for name, _, target, reason in route_parameters(model, policy="symmetry")
        if target in ("row_norm", "col_norm") and reason not in ("embedding", "head")
    ]


# Row/column-normalised MLP updates of a low-rank momentum have up to sqrt(min(m, n)) times the
# polar factor's spectral norm at the same Frobenius norm, so at the attention matrices' lr they
# overshoot. bytelm sweep (seeds 10, 11; 150 steps; lr 0.02), MLP lr x 1: 3.327, x 0.25: 3.072,
# x 0.125: 3.038, x 0.0625: 3.041, x 0.03: 3.043 bits/byte (default policy: 3.037). Not swept
# on other tasks (the digits CNN and the matrix task have no MLP roles).
SYMMETRY_MLP_LR_SCALE = 0.125


def _muon_symmetry(model_or_groups: ModelOrGroups, lr: float, adamw_lr: float) -> Optimizer:
    # A model is routed with policy="symmetry" (every matrix, embedding and head included, gets
    # its symmetry-compatible rule; only 1-D parameters get AdamW), the MLP rules at a scaled
    # lr. Groups are used as given: they carry their rules already, and a list of tensors has no
    # module roles to route by.
    if isinstance(model_or_groups, nn.Module):
        scale = dict.fromkeys(_symmetry_mlp_names(model_or_groups), SYMMETRY_MLP_LR_SCALE)
        groups = param_groups(model_or_groups, policy="symmetry", lr=lr, lr_scale=scale)
    else:
        groups = _groups(model_or_groups)
    return Muon(groups, lr=lr, weight_decay=0.0, adamw_lr=adamw_lr)


def _muon_symmetry_embed(model_or_groups: ModelOrGroups, lr: float, adamw_lr: float) -> Optimizer:
    # policy="symmetry" for the embedding and the head only: the MLP keeps the spectral rule.
    if isinstance(model_or_groups, nn.Module):
        route = dict.fromkeys(_symmetry_mlp_names(model_or_groups), "orthogonal")
        groups = param_groups(model_or_groups, policy="symmetry", route=route)
    else:
        groups = _groups(model_or_groups)
    return Muon(groups, lr=lr, weight_decay=0.0, adamw_lr=adamw_lr)


def _aro(model_or_groups: ModelOrGroups, lr: float, adamw_lr: float) -> Optimizer:
    return ARO(_groups(model_or_groups), lr=lr, weight_decay=0.0, adamw_lr=adamw_lr)


register_optimizer(
    OptimizerSpec(
        "spectra-adamw",
        _spectra_adamw,
        lr={"bytelm": 4e-3, "digits": 3e-3, "matrix": 1e-3, "*": 1e-3},
        description="SPECTRA(torch.optim.AdamW): AdamW's update soft-clipped at spectral norm 10",
        tuned=("bytelm",),
    )
)
register_optimizer(
    OptimizerSpec(
        "muon-symmetry",
        _muon_symmetry,
        # Every rule's update has the polar factor's Frobenius norm, so lr is Muon's; the MLP
        # row/col rules get SYMMETRY_MLP_LR_SCALE x lr (before that scale: lr 0.01 was the best
        # compromise, 3.321 bits/byte on seeds 10, 11).
        lr={"bytelm": 0.02, "digits": 0.01, "matrix": 5e-3, "*": 0.02},
        description="orthotorch.Muon over param_groups(policy='symmetry'): row_norm embedding, "
        "centered_row_norm head, row/col_norm MLP (lr x 0.125), spectral attention",
        tuned=(),
    )
)
register_optimizer(
    OptimizerSpec(
        "muon-symmetry-embed",
        _muon_symmetry_embed,
        lr={"bytelm": 0.02, "digits": 0.01, "matrix": 5e-3, "*": 0.02},
        description="orthotorch.Muon, symmetry rules on the embedding (row_norm) and head "
        "(centered_row_norm) only; spectral hidden matrices incl. the MLP",
        tuned=(),
    )
)
register_optimizer(
    OptimizerSpec(
        "aro",
        _aro,
        lr={"bytelm": 1e-3, "digits": 3e-3, "matrix": 3e-3, "*": 1e-3},
        description="orthotorch.ARO (rotated SinkGD, RMS-matched to AdamW) + AdamW groups",
        tuned=(),
    )
)


def _aro_bf16(model_or_groups: ModelOrGroups, lr: float, adamw_lr: float) -> Optimizer:
    return ARO(
        _groups(model_or_groups),
        lr=lr,
        weight_decay=0.0,
        adamw_lr=adamw_lr,
        matmul_dtype=torch.bfloat16,
    )


register_optimizer(
    OptimizerSpec(
        "aro-bf16",
        _aro_bf16,
        lr={"bytelm": 1e-3, "digits": 3e-3, "matrix": 3e-3, "*": 1e-3},
        description="orthotorch.ARO with matmul_dtype=bf16 (QR, scalings, state float32)",
        tuned=(),
    )
)


def _orthotorch(cls: type, **options: Any) -> OptimizerFactory:
    """Factory for an orthotorch optimizer over :func:`orthotorch.param_groups` groups."""

    def factory(model_or_groups: ModelOrGroups, lr: float, adamw_lr: float) -> Optimizer:
        return cls(_groups(model_or_groups), lr=lr, weight_decay=0.0, adamw_lr=adamw_lr, **options)

    return factory


# Issues 4 and 6. Learning rates from the authors' recommendations and the short checks in
# their benchmarks (ROOT: AdamW's, as its scale is AdamW-matched; AuON: unit-Frobenius update;
# low-rank: lr 1e-2, rank n/4, subspace refresh every 200 steps); not swept per task yet.
for _name, _factory, _lr, _text in (
    ("root", _orthotorch(ROOT), None, "orthotorch.ROOT (shape-adaptive NS + outlier clipping)"),
    ("auon", _orthotorch(AuON), 0.1, "orthotorch.AuON (linear-time, no matrix products)"),
    ("hybrid-auon", _orthotorch(AuON, hybrid=True), 0.1, "orthotorch.AuON(hybrid=True)"),
    (
        "dct-adamw",
        _orthotorch(DCTAdamW, rank=0.25, update_every=200),
        1e-2,
        "orthotorch.DCTAdamW (rank n/4 on a DCT basis, int32 indices)",
    ),
    (
        "galore-adamw",
        _orthotorch(GaLoreAdamW, rank=0.25, update_every=200),
        1e-2,
        "orthotorch.GaLoreAdamW (rank n/4, SVD projector; baseline)",
    ),
):
    # ROOT's default scale (0.2 sqrt(max(m, n))) matches AdamW's update RMS: reuse AdamW's lrs.
    lrs = OPTIMIZERS["adamw"].lr if _lr is None else {"*": _lr}
    register_optimizer(OptimizerSpec(_name, _factory, lr=lrs, description=_text, tuned=()))


# Issue 19. NorMuon's default scale is RMS-matched (0.2 sqrt(mn) / ||Ô||_F); Dion's is the
# paper's sqrt(m / n). bytelm lrs swept on tuning seed 1000 over 0.5x..4x of 8e-3 / 0.02
# (final val bits/byte: normuon 3.499, 3.390, 3.252, 3.137, 3.230 at 2e-3 .. 3.2e-2; dion
# 3.405, 3.293, 3.205, 3.338 at 0.01 .. 0.08; dion-r4 3.523, 3.466, 3.431, 3.524; dion-r8
# 3.618, 3.618, 3.600, 3.708). dion-r2 was not swept (it uses dion's lr).
for _name, _factory, _lr, _text in (
    ("normuon", _orthotorch(NorMuon), 0.016, "orthotorch.NorMuon (per-neuron second moment)"),
    ("dion", _orthotorch(Dion, rank=1.0), 0.04, "orthotorch.Dion, full rank"),
    ("dion-r2", _orthotorch(Dion, rank=0.5), 0.04, "orthotorch.Dion, rank 1/2 of the small side"),
    ("dion-r4", _orthotorch(Dion, rank=0.25), 0.04, "orthotorch.Dion, rank 1/4 of the small side"),
    ("dion-r8", _orthotorch(Dion, rank=0.125), 0.04, "orthotorch.Dion, rank 1/8 of the small side"),
):
    tuned = () if _name == "dion-r2" else ("bytelm",)
    register_optimizer(
        OptimizerSpec(_name, _factory, lr={"bytelm": _lr, "*": _lr}, description=_text, tuned=tuned)
    )
