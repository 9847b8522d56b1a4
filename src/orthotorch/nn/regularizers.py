r"""Orthogonality regularizers: differentiable penalties on weight matrices.

Every penalty is a pure function of ``(..., m, n)`` tensors that returns a scalar: the sum of
the per-matrix penalty over the leading (batch) dimensions. A convolution kernel
``(out, in, k, k)`` is regularized as the matrix ``(out, in * k * k)`` (flatten it first, or let
:class:`OrthogonalityPenalty` do it); :mod:`orthotorch.nn.conv` has the penalty that makes the
*convolution operator* itself orthogonal.

All penalties work on the **small side**: for a wide ``W`` (``m <= n``) the Gram ``W W^T`` is
``m x m`` and can equal ``I``; for a tall ``W`` the rank-``n`` Gram ``W W^T`` never can, so
``W^T W`` is used instead. A (semi-)orthogonal ``W`` gives exactly zero.

- :func:`soft_orthogonality`: ``||W W^T - I||_F^2`` (Xie et al., "All You Need is Beyond a Good
  Init", CVPR 2017; Bansal et al. 2018 call it SO).
- :func:`spectral_restricted_isometry`: SRIP, ``sigma_max(W W^T - I)`` by power iteration
  (Bansal, Chen, Wang, "Can We Gain More from Orthogonality Regularizations in Training Deep
  CNNs?", NeurIPS 2018, https://arxiv.org/abs/1810.09102).
- :func:`orthoreg`: soft orthogonality of the fine-tuning update ``dW = W - W0`` (Liu et al.,
  "Understanding and Enforcing Weight Disentanglement in Task Arithmetic", 2026,
  https://arxiv.org/abs/2604.17078).
- :class:`OrthogonalityPenalty`: walks a model's matrix weights and sums one of the above
  (or λ-orthogonality from :mod:`orthotorch.nn.compatible`), batching same-shape weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from ..linalg import check_matrix_input

__all__ = [
    "PENALTY_KINDS",
    "OrthogonalityPenalty",
    "PenaltyKind",
    "orthoreg",
    "soft_orthogonality",
    "spectral_restricted_isometry",
]

PenaltyKind = Literal["soft", "srip", "orthoreg", "lambda"]
PENALTY_KINDS: tuple[str, ...] = ("soft", "srip", "orthoreg", "lambda")


def _small_side(W: Tensor) -> Tensor:
    """``W`` or ``W^T``, whichever has no more rows than columns (its Gram can be ``I``)."""
    X = W.mT if W.shape[-2] > W.shape[-1] else W
    # Half-precision Grams lose the ``- I`` to rounding; penalties are cheap next to the model.
    if X.dtype in (torch.float16, torch.bfloat16):
        X = X.float()
    return X


def _soft_orthogonality(W: Tensor) -> Tensor:
    X = _small_side(W)
    eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
    # Subtracting I before squaring keeps float32 accurate near orthogonality, where the
    # expanded form ||X X^T||^2 - 2 ||X||^2 + k cancels to rounding noise.
    return (X @ X.mT - eye).square().sum().to(W.dtype)


def soft_orthogonality(W: Tensor) -> Tensor:
    r"""Soft orthogonality :math:`\sum_b \|W_b W_b^\top - I\|_F^2` on the small side.

    Invariant under ``W -> U W V`` for orthogonal ``U``, ``V``; zero exactly on
    (semi-)orthogonal matrices. Its gradient is ``4 (W W^T - I) W`` (wide case).

    Args:
        W: ``(..., m, n)`` real floating-point tensor.

    Returns:
        A scalar tensor in ``W``'s dtype (computed in float32 for half-precision input).

    Raises:
        TypeError: ``W`` is not a tensor.
        ValueError: ``W`` has fewer than 2 dimensions, is not real floating point, or holds
            NaN/Inf.
    """
    check_matrix_input(W, "W")
    return _soft_orthogonality(W)


def _check_n_iter(n_iter: object) -> int:
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive int, got {n_iter!r}")
    return n_iter


def _initial_vector(shape: tuple[int, ...], like: Tensor) -> Tensor:
    # A fixed seed keeps the penalty a deterministic function of W without touching the
    # global RNG stream that training code relies on.
    gen = torch.Generator(device=like.device).manual_seed(0)
    v = torch.randn(shape, generator=gen, dtype=like.dtype, device=like.device)
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def _srip(W: Tensor, n_iter: int, u: Tensor | None) -> Tensor:
    X = _small_side(W)

    def apply(v: Tensor, X: Tensor) -> Tensor:
        # (X X^T - I) v without forming the Gram: two mat-vecs, O(m n) per iteration.
        return (X @ (X.mT @ v.unsqueeze(-1))).squeeze(-1) - v

    with torch.no_grad():
        Xd = X.detach()
        v = _initial_vector(X.shape[:-1], Xd) if u is None else u.to(Xd.dtype)
        for _ in range(n_iter):
            Av = apply(v, Xd)
            norm = torch.linalg.vector_norm(Av, dim=-1, keepdim=True)
            # v in the null space of A (e.g. an exactly orthogonal W) keeps the old v, so a
            # warm-start vector never collapses to zero and stays valid once W moves.
            v = torch.where(norm > 0, Av / norm.clamp_min(torch.finfo(Xd.dtype).tiny), v)
        if u is not None:
            u.copy_(v)
    # ||A v|| rather than the Rayleigh quotient v^T A v: when +sigma and -sigma are both
    # eigenvalues, power iteration mixes their eigenvectors and v^T A v can be ~0, while
    # ||A v|| = sigma for every mix. Gradient flows through W only (v is detached), as in
    # torch.nn.utils.spectral_norm.
    return torch.linalg.vector_norm(apply(v, X), dim=-1).sum().to(W.dtype)


def spectral_restricted_isometry(W: Tensor, n_iter: int = 2, u: Tensor | None = None) -> Tensor:
    r"""SRIP: :math:`\sum_b \sigma_{\max}(W_b W_b^\top - I)` on the small side, by power iteration.

    Bansal et al. (NeurIPS 2018) regularize the spectral norm of ``W^T W - I`` (the restricted
    isometry constant of ``W``), estimated with two power iterations from a random vector. Here
    ``n_iter`` iterations of ``v <- A v / ||A v||`` with ``A = W W^T - I`` run without gradient;
    the value is ``||A v||`` for the last iterate ``v``, differentiable in ``W`` (``v`` is held
    fixed). Once ``v`` has converged to the top eigenvector this is the exact gradient of
    ``sigma_max``, ``2 sign(lambda) v v^T W`` (wide case), because moving ``v`` does not change
    ``||A v||`` to first order. ``A`` is symmetric, so power iteration finds the eigenvalue of
    largest magnitude, i.e. the spectral norm, from either end of the spectrum.

    Warm starts: pass ``u`` (shape ``(..., k)``, ``k = min(m, n)``, ``W``'s device) and it is
    used as the starting vector and **overwritten in place** with the final iterate, the way
    :func:`torch.nn.utils.spectral_norm` keeps its ``u`` buffer; one or two iterations per
    training step then track ``sigma_max`` closely. Without ``u`` the start is a fixed
    pseudo-random vector (the global RNG is not used), so the result is deterministic.

    Args:
        W: ``(..., m, n)`` real floating-point tensor.
        n_iter: power iterations (``>= 1``); 2 as in the paper. Use more for an accurate value
            without a warm start.
        u: optional persistent start vector ``(..., k)``, updated in place.

    Returns:
        A scalar tensor in ``W``'s dtype: a lower bound on the exact SRIP that converges to it.

    Raises:
        TypeError: ``W`` or ``u`` is not a tensor.
        ValueError: bad ``W`` (see :func:`soft_orthogonality`), ``n_iter < 1``, or ``u`` of the
            wrong shape or with NaN/Inf.
    """
    check_matrix_input(W, "W")
    n_iter = _check_n_iter(n_iter)
    if u is not None:
        expected = (*W.shape[:-2], min(W.shape[-2], W.shape[-1]))
        if not isinstance(u, Tensor):
            raise TypeError(f"u must be a torch.Tensor or None, got {type(u).__name__}")
        if tuple(u.shape) != expected:
            raise ValueError(
                f"u must have shape {expected} (batch dims, then min(m, n)) for W of shape "
                f"{tuple(W.shape)}, got {tuple(u.shape)}"
            )
        if not u.is_floating_point() or not bool(torch.isfinite(u).all()):
            raise ValueError("u must be a finite floating-point tensor")
    return _srip(W, n_iter, u)


def _orthoreg(W: Tensor, W0: Tensor) -> Tensor:
    return _soft_orthogonality(W - W0.detach())


def orthoreg(W: Tensor, W_pretrained: Tensor) -> Tensor:
    r"""OrthoReg: soft orthogonality of the fine-tuning update, :math:`\sum_b
    \|\Delta W_b^\top \Delta W_b - I\|_F^2` with :math:`\Delta W = W - W_0`.

    Liu et al. (2026) show that task vectors whose updates ``dW`` have an internal orthogonal
    structure compose well under task arithmetic, and add ``lambda * sum_layers ||dW^T dW -
    I||_F^2`` to the fine-tuning loss (``lambda`` is the ``weight`` of
    :class:`OrthogonalityPenalty`). As for the other penalties the Gram is taken on the small
    side of ``dW`` (``dW dW^T`` for a wide update) so the minimum, 0, is attainable; for a tall
    or square update this is exactly the ``dW^T dW`` of the paper. ``W_pretrained`` is a fixed
    reference and receives no gradient.

    Args:
        W: current weights ``(..., m, n)``.
        W_pretrained: the pre-trained weights ``W0``, same shape as ``W``.

    Raises:
        TypeError, ValueError: as :func:`soft_orthogonality`, for either argument, or shapes
            that differ.
    """
    check_matrix_input(W, "W")
    check_matrix_input(W_pretrained, "W_pretrained")
    if W.shape != W_pretrained.shape:
        raise ValueError(
            f"W_pretrained must have W's shape {tuple(W.shape)}, got {tuple(W_pretrained.shape)}"
        )
    return _orthoreg(W, W_pretrained)


def _check_weight(weight: object) -> float:
    ok = isinstance(weight, (int, float)) and not isinstance(weight, bool)
    if not ok or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def _matrix_weights(model: nn.Module, embeddings: bool) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every Linear / Conv (and, opted in, Embedding) weight, once each."""
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)
    if embeddings:
        kinds = (*kinds, nn.Embedding, nn.EmbeddingBag)
    found, seen = [], set()
    for module_name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        W = getattr(module, "weight", None)
        # Tied weights (an LM head sharing the embedding) are penalised once, not twice.
        if not isinstance(W, nn.Parameter) or W.ndim < 2 or id(W) in seen:
            continue
        seen.add(id(W))
        found.append((f"{module_name}.weight" if module_name else "weight", W))
    return found


class OrthogonalityPenalty(nn.Module):
    r"""``weight * sum`` of an orthogonality penalty over a model's matrix weights.

    The weights are chosen once, at construction, and read from their modules at each call
    (so a weight replaced later, e.g. by ``load_state_dict(assign=True)``, is still the one
    penalised): those of ``nn.Linear`` and every convolution (``nn.Conv1d/2d/3d`` and
    transposed ones, as the matrix ``(shape[0], prod(shape[1:]))``), and of
    ``nn.Embedding``/``nn.EmbeddingBag`` when ``embeddings=True``. Biases, norms and other 1-D
    parameters carry no orthogonality and are never included. Weights of the same matrix
    shape, dtype and device are stacked and penalised in one batched call.

    ``kind``:

    - ``"soft"``: :func:`soft_orthogonality`;
    - ``"srip"``: :func:`spectral_restricted_isometry`, with one persistent power-iteration
      vector per weight (buffers, warm-started across calls, saved in ``state_dict``; advanced
      only in training mode, as ``spectral_norm`` does);
    - ``"orthoreg"``: :func:`orthoreg` against copies of the weights taken at construction
      (build the penalty right after loading the pre-trained model);
    - ``"lambda"``: :func:`orthotorch.nn.compatible.lambda_orthogonality` with ``lam``,
      ``alpha``.

    Usage: ``loss = task_loss + penalty()`` each step. ``forward`` raises ``ValueError`` naming
    the parameter if the penalty is not finite (one host sync per call).

    Args:
        model: the model whose weights are regularized (held by reference).
        kind: one of :data:`PENALTY_KINDS`.
        weight: the non-negative multiplier (``lambda`` in the papers).
        include: ``None`` (all found weights), an iterable of parameter names, or a predicate
            ``(name, parameter) -> bool``; names are those of ``model.named_parameters()``.
        embeddings: also regularize embedding tables.
        n_iter: power iterations per call for ``"srip"``.
        lam, alpha: band and sharpness for ``"lambda"``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: unknown ``kind``, ``weight < 0``, an ``include`` name that is not a matrix
            weight found in the model, or no weight to regularize at all.
    """

    def __init__(
        self,
        model: nn.Module,
        kind: PenaltyKind = "soft",
        weight: float = 1e-4,
        include: Iterable[str] | Callable[[str, nn.Parameter], bool] | None = None,
        *,
        embeddings: bool = False,
        n_iter: int = 1,
        lam: float = 12.0,
        alpha: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if kind not in PENALTY_KINDS:
            raise ValueError(
                f"kind must be one of {', '.join(map(repr, PENALTY_KINDS))}, got {kind!r}"
            )
        self.kind = kind
        self.weight = _check_weight(weight)
        self.n_iter = _check_n_iter(n_iter)
        self.lam, self.alpha = lam, alpha
        if kind == "lambda":
            from .compatible import lambda_orthogonality

            # Validate lam/alpha now rather than at the first training step.
            lambda_orthogonality(torch.eye(2), lam, alpha)

        found = _matrix_weights(model, embeddings)
        if include is not None:
            if callable(include):
                found = [(n, p) for n, p in found if include(n, p)]
            else:
                wanted = [include] if isinstance(include, str) else list(include)
                names = {n for n, _ in found}
                missing = [n for n in wanted if n not in names]
                if missing:
                    raise ValueError(
                        f"include names {missing} are not matrix weights of the model; "
                        f"valid names: {sorted(names)}"
                    )
                found = [(n, p) for n, p in found if n in set(wanted)]
        if not found:
            raise ValueError(
                "the model has no matrix weight to regularize (Linear, Conv"
                + (", Embedding" if embeddings else "")
                + " weights, after `include`)"
            )

        owners = dict(model.named_modules())
        groups: dict[tuple, list[tuple[str, nn.Module]]] = {}
        for name, p in found:
            key = (p.shape[0], math.prod(p.shape[1:]), p.dtype, p.device)
            groups.setdefault(key, []).append((name, owners[name.rpartition(".")[0]]))
        # The owning modules, not the Parameter objects: `load_state_dict(assign=True)`,
        # `to_empty()` or FSDP replace a module's Parameter, and a held reference would then
        # penalise a stale tensor that no longer reaches the model. Plain lists, because
        # registering the modules here would make penalty.parameters() see their weights too.
        self._groups: list[list[tuple[str, nn.Module]]] = list(groups.values())
        for i, members in enumerate(self._groups):
            stacked = self._stack(members).detach()
            if kind == "srip":
                rows, cols = stacked.shape[-2:]
                self.register_buffer(
                    f"u_{i}", _initial_vector((len(members), min(rows, cols)), stacked)
                )
            elif kind == "orthoreg":
                self.register_buffer(f"reference_{i}", stacked.clone())

    @staticmethod
    def _stack(members: list[tuple[str, nn.Module]]) -> Tensor:
        return torch.stack([m.weight.reshape(m.weight.shape[0], -1) for _, m in members])

    @property
    def names(self) -> list[str]:
        """Names of the regularized parameters, in evaluation order."""
        return [name for members in self._groups for name, _ in members]

    def _group_penalty(self, i: int, W: Tensor) -> Tensor:
        if self.kind == "soft":
            return _soft_orthogonality(W)
        if self.kind == "srip":
            u = getattr(self, f"u_{i}")
            # As torch.nn.utils.spectral_norm: the saved vector advances in training mode only,
            # so evaluating the penalty for logging (eval mode) leaves the state_dict unchanged.
            return _srip(W, self.n_iter, u if self.training else u.clone())
        if self.kind == "orthoreg":
            return _orthoreg(W, getattr(self, f"reference_{i}"))
        from .compatible import _lambda_orthogonality

        # Unchecked core: forward checks the total once, instead of one sync per group.
        return _lambda_orthogonality(W, self.lam, self.alpha)

    def forward(self) -> Tensor:
        total = None
        for i, members in enumerate(self._groups):
            value = self._group_penalty(i, self._stack(members))
            # Groups of different dtypes sum in the widest one (type promotion).
            total = value if total is None else total + value
        assert total is not None
        if not bool(torch.isfinite(total.detach())):
            bad = [
                n for members in self._groups for n, m in members if not m.weight.isfinite().all()
            ]
            raise ValueError(
                f"orthogonality penalty is not finite; parameters with NaN/Inf: {bad or 'none'}"
            )
        return self.weight * total

    def extra_repr(self) -> str:
        n = sum(len(m) for m in self._groups)
        return f"kind={self.kind!r}, weight={self.weight}, weights={n}, groups={len(self._groups)}"
