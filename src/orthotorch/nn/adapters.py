"""Orthonormal (SORSA-style) adapters for fine-tuning pretrained linear layers.

SORSA (Cao, "SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of
Large Language Models", 2024, arXiv:2409.00055) splits a pretrained weight by its SVD

.. math:: W = W_{res} + U \\operatorname{diag}(S) V^T,\\qquad
          W_{res} = W - U_r \\operatorname{diag}(S_r) V_r^T \\ \\text{(frozen)}

with ``U, S, V`` initialised from the top-``r`` singular triplets and trained, and keeps the
singular vectors near-orthonormal with the regulariser

.. math:: \\gamma \\left( \\|U^T U - I\\|_F + \\|V^T V - I\\|_F \\right),\\qquad \\gamma \\approx 4
          \\cdot 10^{-4}.

The adapter stores ``V^T`` as ``Vh`` (``r x in_features``, as :func:`torch.linalg.svd` returns
it), so the second term is ``||Vh Vh^T - I||_F``. At initialisation the layer computes exactly
what the pretrained one did (up to rounding), and :meth:`OrthonormalAdapter.merge` folds the
trained factors back into a plain :class:`torch.nn.Linear`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "DEFAULT_GAMMA",
    "OrthonormalAdapter",
    "apply_orthonormal_adapters",
    "merge_orthonormal_adapters",
    "orthonormal_adapter_penalty",
    "orthonormality_penalty",
]

DEFAULT_GAMMA = 4e-4
"""SORSA's regularisation weight ``gamma``."""

Target = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


def orthonormality_penalty(U: Tensor, Vh: Tensor, gamma: float = DEFAULT_GAMMA) -> Tensor:
    """``gamma (||U^T U - I||_F + ||Vh Vh^T - I||_F)`` for ``U`` ``(m, r)`` and ``Vh`` ``(r, n)``.

    The norms are not squared (as in SORSA), so the gradient has unit size for any nonzero
    deviation; at an exactly orthonormal point torch's norm backward returns zero, not NaN.
    """
    r = U.shape[-1]
    if Vh.shape[-2] != r:
        raise ValueError(
            f"U has {r} columns but Vh has {Vh.shape[-2]} rows; they must match (the rank)"
        )
    eye = torch.eye(r, dtype=U.dtype, device=U.device)
    return gamma * (
        torch.linalg.matrix_norm(U.mT @ U - eye) + torch.linalg.matrix_norm(Vh @ Vh.mT - eye)
    )


class OrthonormalAdapter(nn.Module):
    """A pretrained :class:`torch.nn.Linear` re-expressed as ``W_res + U diag(S) Vh`` (SORSA).

    ``U`` (``out x r``), ``S`` (``r``) and ``Vh`` (``r x in``) are the trainable parameters,
    initialised from the top-``rank`` SVD of the weight (computed in float64 for float64
    weights, float32 otherwise); ``weight_res`` and ``bias`` are frozen buffers, so
    ``parameters()`` yields exactly the adapter's factors. The wrapped layer is not modified.

    Args:
        linear: the pretrained layer.
        rank: number of singular triplets to train, ``1 <= rank <= min(out, in)``.
        gamma: weight of :meth:`orthonormality_penalty`, ``>= 0``.
    """

    weight_res: Tensor
    bias: Tensor | None

    def __init__(self, linear: nn.Linear, rank: int, gamma: float = DEFAULT_GAMMA) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        small = min(linear.in_features, linear.out_features)
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be an int, got {type(rank).__name__}")
        if not 1 <= rank <= small:
            raise ValueError(
                f"rank must be in [1, min(out_features, in_features)] = [1, {small}], got {rank}"
            )
        ok = isinstance(gamma, (int, float)) and not isinstance(gamma, bool)
        if not ok or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        W = linear.weight.detach()
        if not bool(torch.isfinite(W).all()):
            raise ValueError("linear.weight contains NaN or Inf values")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.rank = rank
        self.gamma = float(gamma)

        compute = torch.float64 if W.dtype == torch.float64 else torch.float32
        P, S, Qh = torch.linalg.svd(W.to(compute), full_matrices=False)
        P, S, Qh = P[:, :rank], S[:rank], Qh[:rank]
        # W_res from the same (rounded) factors the adapter starts with, so that the initial
        # output differs from the pretrained one only by the rounding of the sum.
        principal = (P * S) @ Qh
        self.register_buffer("weight_res", (W.to(compute) - principal).to(W.dtype))
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)
        self.U = nn.Parameter(P.to(W.dtype).contiguous())
        self.S = nn.Parameter(S.to(W.dtype).contiguous())
        self.Vh = nn.Parameter(Qh.to(W.dtype).contiguous())

    def delta(self) -> Tensor:
        """The trainable part ``U diag(S) Vh`` (``out x in``)."""
        return (self.U * self.S) @ self.Vh

    @property
    def weight(self) -> Tensor:
        """The effective weight ``W_res + U diag(S) Vh``."""
        return self.weight_res + self.delta()

    def forward(self, x: Tensor) -> Tensor:
        # Low-rank path: never forms the r-dependent dense delta.
        return F.linear(x, self.weight_res, self.bias) + F.linear(
            F.linear(x, self.Vh) * self.S, self.U
        )

    def orthonormality_penalty(self) -> Tensor:
        """``gamma (||U^T U - I||_F + ||Vh Vh^T - I||_F)``; add it to the training loss."""
        return orthonormality_penalty(self.U, self.Vh, self.gamma)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain :class:`torch.nn.Linear` with weight ``W_res + U diag(S) Vh`` (a copy)."""
        W = self.weight_res
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=W.device,
            dtype=W.dtype,
        )
        linear.weight.copy_(self.weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, gamma={self.gamma}"
        )


def _matcher(target: Target) -> tuple[Callable[[str, nn.Module], bool], list[str] | None]:
    """A predicate on ``(qualified name, module)`` and the explicit names it must find."""
    if target is None:
        return (lambda _name, module: isinstance(module, nn.Linear)), None
    if callable(target):
        return target, None
    names = [target] if isinstance(target, str) else list(target)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise TypeError(
            "target must be None, a module name, a sequence of non-empty module names, or a "
            f"callable (name, module) -> bool; got {target!r}"
        )

    def match(name: str, _module: nn.Module) -> bool:
        # A name matches the full qualified name or its last components ("attn.q" matches
        # "layers.0.attn.q"), as PEFT's target_modules do.
        return any(name == t or name.endswith("." + t) for t in names)

    return match, names


def apply_orthonormal_adapters(
    model: nn.Module, rank: int, target: Target = None, gamma: float = DEFAULT_GAMMA
) -> nn.Module:
    """Replace matching :class:`torch.nn.Linear` layers of ``model`` by :class:`OrthonormalAdapter`.

    Args:
        model: modified in place and returned (a bare ``nn.Linear`` with ``target=None`` is
            not modified; its adapter is returned).
        rank: adapter rank for every matched layer.
        target: ``None`` (every ``nn.Linear``), a module name or sequence of names (matching a
            qualified name or its trailing components), or a predicate ``(name, module) ->
            bool``. A named target that is not an ``nn.Linear`` raises ``TypeError``.
        gamma: regulariser weight of every adapter.

    Raises:
        TypeError: a target is not an ``nn.Linear``.
        ValueError: nothing matched, a name matched nothing, or ``rank`` is invalid for a
            layer. All layers are checked (and adapters built) before any is replaced, so
            ``model`` is unchanged on error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear) and target is None:
        # A bare layer can't be replaced in place inside itself: return its adapter.
        return OrthonormalAdapter(model, rank, gamma)
    match, names = _matcher(target)
    # remove_duplicate=False: a layer shared by several places (tied weights) is found at
    # each of them, and all of them get the same adapter below, so the tie survives.
    found = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if name and not isinstance(module, OrthonormalAdapter) and match(name, module)
    ]
    # Modules inside an existing adapter are buffers only; a Linear can't be nested in one.
    for name, module in found:
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"target {name!r} is a {type(module).__name__}, but only nn.Linear layers can "
                "be adapted"
            )
    if names is not None:
        for t in names:
            if not any(name == t or name.endswith("." + t) for name, _ in found):
                raise ValueError(f"target {t!r} matched no module of the model")
    if not found:
        raise ValueError("no nn.Linear layer of the model matched the target")
    adapters: dict[int, OrthonormalAdapter] = {}
    for name, module in found:
        if id(module) in adapters:
            continue
        try:
            adapters[id(module)] = OrthonormalAdapter(module, rank, gamma)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
    for name, module in found:
        _set_submodule(model, name, adapters[id(module)])
    return model


def merge_orthonormal_adapters(model: nn.Module) -> nn.Module:
    """Replace every :class:`OrthonormalAdapter` in ``model`` by its merged ``nn.Linear``."""
    if isinstance(model, OrthonormalAdapter):
        return model.merge()
    found = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, OrthonormalAdapter)
    ]
    # One merged Linear per adapter, set at every place it is used (keeps shared layers tied).
    merged = {id(module): module.merge() for _, module in found}
    for name, module in found:
        _set_submodule(model, name, merged[id(module)])
    return model


def orthonormal_adapter_penalty(model: nn.Module) -> Tensor:
    """Sum of :meth:`OrthonormalAdapter.orthonormality_penalty` over the adapters in ``model``."""
    adapters = [m for m in model.modules() if isinstance(m, OrthonormalAdapter)]
    terms = [m.orthonormality_penalty() for m in adapters]
    if not terms:
        raise ValueError("model contains no OrthonormalAdapter")
    return torch.stack(terms).sum()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
