r"""Merging fine-tuned models of one base: averaging, task arithmetic, orthogonal merging.

All three work on ``state_dict``\ s (or modules, through their ``state_dict()``) and return a new
``state_dict``: new tensors, inputs never modified, entries in the base's key order.

With base weights :math:`W_0` and fine-tuned weights :math:`W_i` (task vectors
:math:`\Delta_i = W_i - W_0`, scaled :math:`\tau_i = \lambda_i \Delta_i`):

- :func:`average` (uniform "model soup", Wortsman et al. 2022, arXiv:2203.05482):
  :math:`\sum_i w_i W_i` with weights normalised to sum to one.
- :func:`task_arithmetic` (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
  arXiv:2212.04089): :math:`W_0 + \sum_i \tau_i`.
- :func:`orthogonal_merge`: per weight matrix, the orthogonal (rotation) parts and the scale
  parts of the task vectors are combined separately (see :func:`orthogonal_delta`), so task
  vectors that point in conflicting directions keep their magnitude instead of cancelling.

The design of :func:`orthogonal_merge` follows the idea of OrthoMerge (Yang, Shi & Liu,
"Orthogonal Model Merging", 2026, arXiv:2602.05943): split each expert into an orthogonal part
(found by solving an orthogonal Procrustes problem), merge the orthogonal parts on the orthogonal
group with a magnitude correction, and merge what is left additively. It is not a
reimplementation of that paper (that is :func:`orthotorch.merge.orthomerge`): OrthoMerge rotates
the *base* (``W_i ~ W_0 R_i + E_i``, ``R_i`` merged through the Cayley map, which needs
``R_i + I`` invertible), while here the polar decomposition is taken of each *task vector*, which
keeps the exact task-arithmetic limit for one model at every scale and needs no matrix inverse.

Defaults: every scale defaults to ``1 / len(finetuned)`` (:func:`default_scale`), and the default
orthogonal merge is rescaled to the norm of the averaged task vector
(:func:`norm_matched_orthogonal_delta`); the old default ``scale=1`` summed every model's drift
and cost a digits model half of its accuracy on one half of the classes.

Entry routing (the same for every method): floating entries with ``ndim >= 2`` are matrices
(conv kernels ``(out, in, *k)`` are used as ``(out, in * prod(k))`` and reshaped back);
1-D and 0-D floating entries (biases, norm scales) follow task arithmetic with the same scales
in :func:`orthogonal_merge`; normalisation statistics (keys ending in ``running_mean`` /
``running_var``, as torch's batch norms save them) take the mean over the fine-tuned models in
:func:`task_arithmetic` and :func:`orthogonal_merge`, because they describe data rather than
learned directions and extrapolating them can make a variance negative (NaN in eval mode);
non-floating entries (``num_batches_tracked`` and other integer buffers) are copied from the base.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._registry import Registry
from ..linalg import orthogonalize

__all__ = [
    "MergeMethod",
    "available_merge_methods",
    "average",
    "default_scale",
    "get_merge_method",
    "merge_state_dicts",
    "norm_matched_orthogonal_delta",
    "orthogonal_delta",
    "orthogonal_merge",
    "polar_decompose",
    "register_merge_method",
    "task_arithmetic",
]

StateDictLike = Mapping[str, Tensor] | nn.Module
KeyFilter = Callable[[str], bool] | Collection[str] | None
MethodName = Literal["average", "task_arithmetic", "orthogonal"]


# ------------------------------------------------------------------------------ functional core


def polar_decompose(X: Tensor) -> tuple[Tensor, Tensor]:
    r"""Right polar decomposition :math:`X = Q P` of a ``(m, n)`` matrix, via one SVD.

    With :math:`X = U S V^T`: :math:`Q = U V^T` (``m x n``, orthonormal on the row space of
    ``X``) and :math:`P = Q^T X = V S V^T = (X^T X)^{1/2}` (``n x n``, symmetric positive
    semidefinite). ``Q`` is the ``"svd"`` method of :func:`orthotorch.linalg.orthogonalize`, so
    it shares that method's rank tolerance: singular directions below
    ``max(m, n) * eps * sigma_max`` (``eps`` of the compute dtype) are zero, and ``Q`` is the
    partial isometry of a rank-deficient ``X`` (``U V^T`` would otherwise fill the null space
    with arbitrary unit directions).

    Args:
        X: a real 2-D floating tensor.

    Returns:
        ``(Q, P)`` in float64 for float64 input, else float32.
    """
    if X.ndim != 2 or not X.is_floating_point():
        raise ValueError(f"X must be a real 2-D floating tensor, got {X.dtype} {tuple(X.shape)}")
    _check_finite(X, "X")
    compute = torch.float64 if X.dtype == torch.float64 else torch.float32
    Xc = X.to(compute)
    Q = orthogonalize(Xc, "svd", dtype=compute)
    P = Q.mT @ Xc
    return Q, (P + P.mT) / 2  # symmetric up to rounding; exactly symmetric after this


def orthogonal_delta(deltas: Sequence[Tensor], *, eps: float | None = None) -> Tensor:
    r"""Merge scaled task vectors of one weight matrix by their orthogonal and scale parts.

    Each (already scaled) task vector has the polar decomposition :math:`\tau_i = Q_i P_i`
    (:func:`polar_decompose`): :math:`Q_i` says *where* the task sends each input direction,
    :math:`P_i = (\tau_i^T \tau_i)^{1/2}` says *how strongly* it reacts to it. The merge is

    .. math::

        Q = \operatorname{polar}\Big(\sum_i Q_i P_i\Big) = \operatorname{polar}\Big(\sum_i
        \tau_i\Big), \qquad P = \sum_i P_i, \qquad \Delta = Q P.

    Why these two rules:

    - :math:`Q` is the :math:`P_i`-weighted Procrustes (chordal) mean of the rotations: among
      orthogonal ``Q`` it maximises :math:`\sum_i \langle Q, Q_i P_i \rangle`, i.e. minimises
      :math:`\sum_i \| (Q - Q_i) P_i^{1/2} \|_F^2`, so each task's rotation counts on the input
      directions it actually uses. The unweighted mean :math:`\operatorname{polar}(\sum_i Q_i)`
      gives every direction weight one, and the near-zero tail of one task's spectrum then rotates
      the principal directions of another.
    - The scale parts are positive semidefinite, so their sum never cancels:
      :math:`\|\Delta\|_* = \sum_i \|\tau_i\|_*` whenever :math:`\sum_i \tau_i` has full rank on
      the tasks' input directions, while task arithmetic only has
      :math:`\|\sum_i \tau_i\|_* \le \sum_i \|\tau_i\|_*` (strict when the tasks rotate the same
      inputs to different outputs). Tasks on mutually orthogonal input and output subspaces give
      exactly task arithmetic; one task gives :math:`\tau_1` (task arithmetic at any scale).

    Directions where the task vectors cancel exactly (:math:`\sum_i \tau_i v = 0`) define no
    rotation and stay zero. The idea of merging orthogonal parts on the orthogonal group and the
    rest additively is from OrthoMerge (arXiv:2602.05943); see the module docstring.

    Args:
        deltas: one or more ``(m, n)`` tensors of equal shape (the scaled task vectors).
        eps: relative rounding level that counts as zero (sets the numerical rank of the sum);
            ``None`` uses the compute dtype's epsilon. The input dtype's epsilon would be wrong
            for bf16 weights: ``max(m, n) * 2**-8`` is about one for a 256-wide layer.

    Returns:
        The merged ``(m, n)`` delta in float64 for float64 inputs, else float32.
    """
    if len(deltas) == 0:
        raise ValueError("deltas must contain at least one matrix")
    shape = tuple(deltas[0].shape)
    if len(shape) != 2 or any(tuple(d.shape) != shape for d in deltas):
        raise ValueError(
            f"deltas must be 2-D tensors of one shape, got {[tuple(d.shape) for d in deltas]}"
        )
    for i, d in enumerate(deltas):
        _check_finite(d, f"deltas[{i}]")
    compute = torch.float64 if all(d.dtype == torch.float64 for d in deltas) else torch.float32
    eps = torch.finfo(compute).eps if eps is None else eps
    factors = []
    sigma_max = 0.0
    for d in deltas:
        _, S, Vh = torch.linalg.svd(d.to(compute), full_matrices=False)
        factors.append((S, Vh))
        sigma_max = max(sigma_max, float(S[0]) if S.numel() else 0.0)
    total = torch.stack([d.to(compute) for d in deltas]).sum(0)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    # Rank relative to the largest task vector, not to the sum: where tasks nearly cancel the
    # sum's singular values are small but real, and only rounding of the inputs is noise.
    keep = (S > max(shape) * eps * sigma_max).to(compute)
    Q = (U * keep) @ Vh
    # Q P = sum_i (Q V_i) S_i V_i^T: never forms the n x n scale matrices (conv kernels used as
    # (out, in * k * k) matrices make n large).
    merged = torch.zeros(shape, dtype=compute, device=total.device)
    for S_i, Vh_i in factors:
        merged += ((Q @ Vh_i.mT) * S_i) @ Vh_i
    return merged


def norm_matched_orthogonal_delta(deltas: Sequence[Tensor], *, eps: float | None = None) -> Tensor:
    r""":func:`orthogonal_delta` rescaled to the Frobenius norm of the plain sum
    :math:`\|\sum_i \tau_i\|_F` (the default rule of :func:`orthogonal_merge`).

    The orthogonal merge keeps every model's singular mass (:math:`\sum_i P_i`) and applies it
    along one compromise rotation, where task arithmetic lets conflicting parts cancel; on models
    far from their base that extra mass lands in directions no model used (digits, 1 + 2 epochs:
    50.7% against 80.6% for the average at the same ``1/N`` scale). Matched to the sum's norm,
    the merge only redistributes task arithmetic's energy over the directions, by the merged
    rotation and the models' spectra: the same size of step away from the base, a different
    direction. Tasks on mutually orthogonal subspaces and a single model give task arithmetic
    exactly (there :func:`orthogonal_delta` already equals the sum).
    """
    merged = orthogonal_delta(deltas, eps=eps)
    target = torch.linalg.matrix_norm(torch.stack([d.to(merged.dtype) for d in deltas]).sum(0))
    norm = torch.linalg.matrix_norm(merged)
    return merged * (target / norm) if float(norm) > 0 else merged


# ---------------------------------------------------------------------------------- validation


def _as_state_dict(obj: Any, what: str) -> Mapping[str, Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"{what} must be a state_dict (Mapping[str, Tensor]) or an nn.Module, "
            f"got {type(obj).__name__}"
        )
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{what}[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if value.is_complex():
            raise ValueError(f"{what}[{key!r}] is complex ({value.dtype}); only real entries merge")
    return obj


def _as_model_list(models: Any, what: str) -> list[Mapping[str, Tensor]]:
    if isinstance(models, (Mapping, nn.Module)) or not isinstance(models, Sequence):
        raise TypeError(
            f"{what} must be a sequence (list or tuple) of state_dicts or modules, got "
            f"{type(models).__name__}; wrap a single model in a list"
        )
    if len(models) == 0:
        raise ValueError(f"{what} must contain at least one model, got an empty sequence")
    return [_as_state_dict(m, f"{what}[{i}]") for i, m in enumerate(models)]


def _check_finite(value: Tensor, what: str) -> None:
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} of shape {tuple(value.shape)} contains NaN or Inf values")


def _check_compatible(
    ref: Mapping[str, Tensor],
    ref_name: str,
    models: list[Mapping[str, Tensor]],
    what: str,
    start: int = 0,
) -> None:
    """Same keys, shapes and floating-ness as ``ref``; raise naming the key and both sides.

    ``start`` is the index of ``models[0]`` in the caller's list (for the error messages)."""
    ref_keys = set(ref)
    for i, sd in enumerate(models, start):
        missing = [k for k in ref if k not in sd]
        if missing:
            raise ValueError(
                f"{what}[{i}] is missing key {missing[0]!r} present in {ref_name}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        extra = [k for k in sd if k not in ref_keys]
        if extra:
            raise ValueError(
                f"{what}[{i}] has key {extra[0]!r} that {ref_name} does not have"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
        for key, value in ref.items():
            other = sd[key]
            if other.shape != value.shape:
                raise ValueError(
                    f"shape mismatch for key {key!r}: {ref_name} has {tuple(value.shape)}, "
                    f"{what}[{i}] has {tuple(other.shape)}"
                )
            if other.is_floating_point() != value.is_floating_point():
                raise ValueError(
                    f"dtype mismatch for key {key!r}: {ref_name} has {value.dtype}, "
                    f"{what}[{i}] has {other.dtype}"
                )


def _selected(keys: KeyFilter, names: Sequence[str]) -> set[str]:
    if keys is None:
        return set(names)
    if callable(keys):
        return {k for k in names if keys(k)}
    if isinstance(keys, str) or not isinstance(keys, Collection):
        raise TypeError(
            "keys must be None, a predicate Callable[[str], bool] or a collection of key names, "
            f"got {type(keys).__name__}"
        )
    known = set(names)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"keys names {unknown[0]!r}, which is not a key of the state_dicts")
    return set(keys)


def _finite_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and tensors as Python numbers/lists (dataset sizes often are)."""
    return value.tolist() if isinstance(value, Tensor) or hasattr(value, "__array__") else value


def _per_model(value: Any, count: int, name: str) -> list[float]:
    value = _plain(value)
    if _finite_number(value):
        return [float(value)] * count
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} models")
        if all(_finite_number(v) for v in value):
            return [float(v) for v in value]
    raise ValueError(f"{name} must be a finite number or a sequence of {count}, got {value!r}")


def _weights(weights: Any, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    weights = _plain(weights)
    if not isinstance(weights, Sequence) or isinstance(weights, str):
        raise ValueError(f"weights must be a sequence of {count} numbers, got {weights!r}")
    w = _per_model(weights, count, "weights")
    if any(v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    total = sum(w)
    return [v / total for v in w]


def _prepare(
    base: StateDictLike, finetuned: Sequence[StateDictLike], keys: KeyFilter
) -> tuple[Mapping[str, Tensor], list[Mapping[str, Tensor]], set[str]]:
    base_sd = _as_state_dict(base, "base")
    models = _as_model_list(finetuned, "finetuned")
    _check_compatible(base_sd, "base", models, "finetuned")
    chosen = _selected(keys, list(base_sd))
    _check_all_finite(base_sd, "base", models, "finetuned", chosen)
    return base_sd, models, chosen


def _check_all_finite(
    ref: Mapping[str, Tensor],
    ref_name: str,
    models: Sequence[Mapping[str, Tensor]],
    models_name: str,
    chosen: set[str],
) -> None:
    # Every input is checked before any output is built: nothing half-merged on error.
    for key, value in ref.items():
        _check_finite(value, f"{ref_name}[{key!r}]")
    for i, sd in enumerate(models):
        for key in chosen:
            _check_finite(sd[key], f"{models_name}[{i}][{key!r}]")


# ---------------------------------------------------------------------------------- the merges


STATISTIC_SUFFIXES: tuple[str, ...] = ("running_mean", "running_var")


def _is_statistic(key: str) -> bool:
    return key.rpartition(".")[2] in STATISTIC_SUFFIXES


def _compute_dtype(values: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if all(v.dtype == torch.float64 for v in values) else torch.float32


@torch.no_grad()
def _merge_with_base(
    base_sd: Mapping[str, Tensor],
    models: list[Mapping[str, Tensor]],
    chosen: set[str],
    scales: list[float],
    matrix_rule: Callable[[list[Tensor]], Tensor] | None,
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, W0 in base_sd.items():
        if key not in chosen or not W0.is_floating_point():
            out[key] = W0.detach().clone()
            continue
        compute = torch.float64 if W0.dtype == torch.float64 else torch.float32
        if _is_statistic(key):
            values = [sd[key].detach().to(W0.device, compute) for sd in models]
            out[key] = torch.stack(values).mean(0).to(W0.dtype)
            continue
        W0c = W0.detach().to(compute)
        taus = [
            lam * (sd[key].detach().to(W0.device, compute) - W0c) for lam, sd in zip(scales, models)
        ]
        if matrix_rule is not None and W0.ndim >= 2:
            flat = [t.reshape(W0.shape[0], -1) for t in taus]
            delta = matrix_rule(flat).reshape(W0.shape)
        else:
            delta = torch.stack(taus).sum(0)
        out[key] = (W0c + delta).to(W0.dtype)
    return out


def default_scale(count: int) -> float:
    r"""The data-free default scale of every merge: :math:`1 / N` for :math:`N` models.

    Task vectors of models fine-tuned on different data each carry the model's drift away from
    the base on the other models' data; their sum (:math:`\lambda = 1`) adds those drifts up,
    :math:`1/N` averages them (for task arithmetic: the mean of the fine-tuned weights). A
    larger scale is a choice to make on held-out data, not a default.
    """
    return 1.0 / count


def task_arithmetic(
    base: StateDictLike,
    finetuned: Sequence[StateDictLike],
    scale: float | Sequence[float] | None = None,
    *,
    keys: KeyFilter = None,
) -> dict[str, Tensor]:
    r"""Task arithmetic: :math:`W_0 + \sum_i \lambda_i (W_i - W_0)` for every floating entry.

    Batch-norm statistics (``running_mean`` / ``running_var``) take the mean of the fine-tuned
    models instead (see the module docstring): extrapolated, a variance can turn negative.

    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv:2212.04089).

    Args:
        base: the shared pre-trained model (state_dict or module).
        finetuned: models fine-tuned from ``base`` (same keys and shapes).
        scale: :math:`\lambda`, one number for all models or one per model; negative values
            negate a task. ``None`` (default): ``1 / len(finetuned)``, i.e. plain averaging of
            the fine-tuned models, which keeps what each model learnt at a fraction of its
            strength and never extrapolates. Summing full task vectors (``scale=1``) adds up
            every model's drift from the base and can destroy a model (:func:`default_scale`).
        keys: which entries to merge (``None``: all; a predicate on the key or a collection of key
            names); the others are copied from ``base``.

    Returns:
        A new state_dict with ``base``'s keys, order, dtypes and device.

    Raises:
        ValueError: mismatched keys or shapes (naming the key and both shapes), NaN/Inf entries
            (naming the model and key), an empty ``finetuned``, or a bad ``scale``.
        TypeError: an input that is not a state_dict or module.
    """
    base_sd, models, chosen = _prepare(base, finetuned, keys)
    scales = _per_model(
        default_scale(len(models)) if scale is None else scale, len(models), "scale"
    )
    return _merge_with_base(base_sd, models, chosen, scales, None)


def orthogonal_merge(
    base: StateDictLike,
    finetuned: Sequence[StateDictLike],
    scale: float | Sequence[float] | None = None,
    *,
    keys: KeyFilter = None,
) -> dict[str, Tensor]:
    r"""Merge by composing the orthogonal parts of the task vectors (:func:`orthogonal_delta`).

    Each weight matrix becomes :math:`W_0 + \operatorname{polar}(\sum_i \tau_i)\sum_i P_i` with
    :math:`\tau_i = \lambda_i (W_i - W_0) = Q_i P_i` (right polar decomposition): the rotations
    are merged by their scale-weighted Procrustes mean, the positive semidefinite scale parts are
    summed, so conflicting task vectors keep their magnitude where task arithmetic would shrink
    them. Order of the models does not matter; with one model the result is task arithmetic at
    the same ``scale``. Conv kernels are merged as ``(out, in * prod(k))`` matrices; 1-D/0-D
    floating entries follow task arithmetic with the same scales; integer buffers come from
    ``base``. Inspired by OrthoMerge (Yang, Shi & Liu 2026, arXiv:2602.05943), which merges
    orthogonal parts on the orthogonal group and residuals additively; see the module docstring
    for how this differs.

    Cost: one float32/float64 SVD per model and one more per matrix entry (a one-off, on the base's
    device).

    Args:
        base: the shared pre-trained model (state_dict or module).
        finetuned: models fine-tuned from ``base`` (same keys and shapes).
        scale: :math:`\lambda`, one number or one per model (the same meaning as in
            :func:`task_arithmetic`). ``None`` (default): ``1 / len(finetuned)``, so the merged
            scale part is the *mean* of the models' scale parts along the merged rotation. At
            ``scale=1`` the scale parts add up: with two models fine-tuned on the two halves of
            digits, that lost half of the base model's accuracy on one half (README).
        keys: which entries to merge (``None``: all); the others are copied from ``base``.

    Returns:
        A new state_dict with ``base``'s keys, order, dtypes and device.

    Raises:
        ValueError / TypeError: as :func:`task_arithmetic`.
    """
    base_sd, models, chosen = _prepare(base, finetuned, keys)
    if scale is None:
        scales = [default_scale(len(models))] * len(models)
        return _merge_with_base(base_sd, models, chosen, scales, norm_matched_orthogonal_delta)
    scales = _per_model(scale, len(models), "scale")
    return _merge_with_base(base_sd, models, chosen, scales, orthogonal_delta)


@torch.no_grad()
def average(
    state_dicts: Sequence[StateDictLike],
    weights: Sequence[float] | None = None,
    *,
    base: StateDictLike | None = None,
    keys: KeyFilter = None,
) -> dict[str, Tensor]:
    r"""Weighted average :math:`\sum_i w_i W_i` of every floating entry (a "model soup").

    Wortsman et al., "Model soups", ICML 2022 (arXiv:2203.05482).

    Args:
        state_dicts: the models to average (state_dicts or modules, same keys and shapes).
        weights: non-negative, normalised to sum to one; ``None`` is uniform.
        base: if given, entries not selected by ``keys`` and non-floating entries are copied from
            it (and its keys, order, dtypes and device are used); else from ``state_dicts[0]``.
        keys: which entries to average (``None``: all).

    Returns:
        A new state_dict.

    Raises:
        ValueError / TypeError: as :func:`task_arithmetic`, and for bad ``weights``.
    """
    models = _as_model_list(state_dicts, "state_dicts")
    if base is None:
        ref, ref_name = models[0], "state_dicts[0]"
        _check_compatible(ref, ref_name, models[1:], "state_dicts", start=1)
    else:
        ref, ref_name = _as_state_dict(base, "base"), "base"
        _check_compatible(ref, ref_name, models, "state_dicts")
    w = _weights(weights, len(models))
    chosen = _selected(keys, list(ref))
    _check_all_finite(ref, ref_name, models, "state_dicts", chosen)
    out: dict[str, Tensor] = {}
    for key, ref_value in ref.items():
        if key not in chosen or not ref_value.is_floating_point():
            out[key] = ref_value.detach().clone()
            continue
        values = [sd[key].detach().to(ref_value.device) for sd in models]
        compute = _compute_dtype([ref_value])
        merged = sum(wi * v.to(compute) for wi, v in zip(w, values))
        out[key] = merged.to(ref_value.dtype)
    return out


# ------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class MergeMethod:
    """One merge rule for :func:`merge_state_dicts`.

    Attributes:
        name: registry key.
        merge: ``(base, finetuned, *, keys, **options) -> state_dict``.
        description: one line for tables.
    """

    name: str
    merge: Callable[..., dict[str, Tensor]]
    description: str


_METHODS: Registry[MergeMethod] = Registry("merge method", "methods")


def register_merge_method(method: MergeMethod, *, overwrite: bool = False) -> None:
    """Add ``method`` under ``method.name``; :func:`merge_state_dicts` picks it up."""
    _METHODS.register(method.name, method, overwrite=overwrite)


def available_merge_methods() -> list[str]:
    """Names of every registered merge method, in registration order."""
    return _METHODS.names()


def get_merge_method(name: str) -> MergeMethod:
    """Look a merge method up, with an error that lists the valid names."""
    return _METHODS.get(name)


def merge_state_dicts(
    base: StateDictLike,
    finetuned: Sequence[StateDictLike],
    method: MethodName | str = "orthogonal",
    *,
    keys: KeyFilter = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Merge ``finetuned`` models of ``base`` with a registered ``method``.

    ``"average"`` takes ``weights=``; ``"task_arithmetic"``, ``"orthogonal"`` and
    ``"orthomerge"`` take ``scale=`` (default ``1 / len(finetuned)``); ``"ties"`` takes
    ``scale=`` (default 1) and ``density=``. Every method's defaults keep a model usable
    (README: two tasks, 5 seeds). Entries not selected by ``keys`` are copied from ``base``.
    See :func:`average`, :func:`task_arithmetic`, :func:`orthogonal_merge`,
    :func:`~orthotorch.merge.orthomerge`, :func:`~orthotorch.merge.ties_merge`.
    """
    return get_merge_method(method).merge(base, finetuned, keys=keys, **options)


def _average_entry(
    base: StateDictLike,
    finetuned: Sequence[StateDictLike],
    *,
    keys: KeyFilter = None,
    weights: Sequence[float] | None = None,
) -> dict[str, Tensor]:
    return average(finetuned, weights, base=base, keys=keys)


register_merge_method(
    MergeMethod("average", _average_entry, "weighted mean of the fine-tuned weights (model soup)")
)
register_merge_method(
    MergeMethod("task_arithmetic", task_arithmetic, "base + scale * sum of task vectors")
)
register_merge_method(
    MergeMethod(
        "orthogonal",
        orthogonal_merge,
        "base + polar(sum of task vectors) @ sum of their polar scale parts",
    )
)
