r"""Compatible representations: orthogonal maps between the embedding spaces of two models.

When a retrieval model is replaced, the gallery was indexed with the old model. Re-indexing
(backfilling) is expensive, so one learns a map ``T`` between the two embedding spaces and
compares across models. Keeping ``T`` orthogonal (an isometry) preserves the geometry of the
space it maps: distances and angles between old embeddings survive, so nothing the old
space encoded is lost.

- **λ-orthogonality** (Ricci, Biondi, Pernici, Patras, Del Bimbo, "λ-Orthogonality
  Regularization for Compatible Representation Learning", NeurIPS 2025,
  https://arxiv.org/abs/2509.16664): a free (affine) map trained with the penalty
  :func:`lambda_orthogonality`, which is nearly off inside a band ``lam`` around
  orthogonality and grows linearly outside it. The map can adapt to the data distribution
  while staying close to an isometry. The paper's best band is ``lam ~ 12``.
- **Basis transformation** (Zhou et al., "BT^2: Backward-compatible Training with Basis
  Transformation", ICCV 2023, https://arxiv.org/abs/2211.03989): an exactly orthogonal map
  ``B = exp(P - P^T)`` that may also add dimensions: embed ``R^old`` into ``R^new`` by
  zero-padding, then rotate. Extra dimensions hold what the new model knows and the old one
  does not.
- **Orthogonal Procrustes** (:func:`fit_orthogonal_transform`): the closed-form best
  isometry for paired embeddings, the exact reference for both trained maps.

Training recipe (for :class:`OrthogonalTransform` ``T``): embed the same training inputs
with both models, ``E_old = old_model(x)`` and ``E_new = new_model(x)`` (L2-normalise the
rows when retrieval uses cosine similarity: an isometry cannot rescale), then minimise
``mean ||T(E_old) - E_new||^2 + penalty_weight * T.penalty()`` over ``T``'s parameters
(:func:`train_orthogonal_transform` does this full-batch with Adam). Alternatively add the
alignment term and ``T.penalty()`` to the new model's own loss and train both jointly. At
retrieval time compare ``new_model(query)`` with ``T(old_gallery)``: the old gallery is
mapped once, cheaply, without running any model on the gallery images again.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..linalg import check_matrix_input, orthogonality_error

__all__ = [
    "OrthogonalTransform",
    "fit_orthogonal_transform",
    "lambda_orthogonality",
    "train_orthogonal_transform",
]

Constraint = Literal["relaxed", "exact"]
_CONSTRAINTS = ("relaxed", "exact")


def _check_number(name: str, value: object, *, lo: float, lo_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > lo if lo_open else value >= lo
    if not ok:
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_dim(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _safe_frobenius(E: Tensor) -> Tensor:
    """``||E||_F`` over the last two dims, with gradient 0 (not NaN) where ``E == 0``.

    ``sqrt`` has an infinite derivative at 0, so a plain ``E.square().sum().sqrt()`` backprops
    ``0 * inf = NaN`` at an exactly orthogonal ``W``. Zero is a valid subgradient there (the
    minimum of the cone), and the double ``where`` keeps the unused ``sqrt`` branch away from 0
    so no NaN is created.
    """
    sq = E.square().sum(dim=(-2, -1))
    # `!= 0`, not `> 0`: a NaN must reach the output, not be replaced by the zero branch.
    positive = sq != 0
    safe = torch.where(positive, sq, torch.ones_like(sq))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(sq))


def lambda_orthogonality(weight: Tensor, lam: float = 12.0, alpha: float = 1.0) -> Tensor:
    r"""λ-orthogonality penalty, summed over leading (batch) dimensions.

    .. math::

        d = \|W W^\top - I\|_F, \qquad
        L(W) = \sigma\big(\alpha (d - \lambda)\big)\, d

    on the small side of ``W`` (``W^T W`` for a tall ``W``), with ``σ`` the logistic sigmoid.
    Inside the band ``d < λ`` the gate ``σ`` is close to 0 and ``W`` is free to adapt; outside,
    ``L ≈ d`` pulls ``W`` back towards orthogonality. ``alpha`` sets how sharp the band edge
    is. ``lam = 0`` gives ``≈ d / 2`` near orthogonality: a plain penalty with no band.

    Args:
        weight: ``(..., m, n)`` real floating-point tensor.
        lam: band width ``λ >= 0`` (paper's best: 12).
        alpha: gate sharpness ``α > 0``.

    Returns:
        A scalar tensor (``weight``'s dtype), differentiable; its gradient is finite
        everywhere, including at an exactly orthogonal ``W`` where it is 0 from the norm term.

    Raises:
        TypeError: ``weight`` is not a tensor.
        ValueError: ``weight`` has fewer than 2 dims, is not real floating point, holds
            NaN/Inf, or ``lam``/``alpha`` is out of range.
    """
    check_matrix_input(weight, "weight")
    lam = _check_number("lam", lam, lo=0.0, lo_open=False)
    alpha = _check_number("alpha", alpha, lo=0.0, lo_open=True)
    return _lambda_orthogonality(weight, lam, alpha)


def _lambda_orthogonality(weight: Tensor, lam: float, alpha: float) -> Tensor:
    """:func:`lambda_orthogonality` without validation (no host sync), for trusted callers."""
    W = weight.mT if weight.shape[-2] > weight.shape[-1] else weight
    k = W.shape[-2]
    eye = torch.eye(k, dtype=W.dtype, device=W.device)
    d = _safe_frobenius(W @ W.mT - eye)
    return (torch.sigmoid(alpha * (d - lam)) * d).sum()


def fit_orthogonal_transform(old_emb: Tensor, new_emb: Tensor) -> Tensor:
    r"""Closed-form orthogonal Procrustes map from old to new embeddings.

    Solves :math:`\min_Q \|E_{old} Q^\top - E_{new}\|_F` subject to :math:`Q^\top Q = I`
    (``Q`` of shape ``(new_dim, old_dim)``, ``new_dim >= old_dim``): with the thin SVD
    :math:`E_{new}^\top E_{old} = U S V^\top`, the solution is :math:`Q = U V^\top`
    (Schönemann, 1966). ``Q`` may be a reflection (``det Q = -1`` when square), which the
    ``"exact"`` :class:`OrthogonalTransform` cannot represent when ``new_dim == old_dim``.

    Args:
        old_emb: ``(N, old_dim)`` embeddings of N inputs by the old model.
        new_emb: ``(N, new_dim)`` embeddings of the same inputs by the new model.

    Returns:
        ``Q`` with ``Q^T Q = I``, in float64 for float64 input, else float32; map with
        ``old_emb @ Q.T``.
    """
    for name, E in (("old_emb", old_emb), ("new_emb", new_emb)):
        if not isinstance(E, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(E).__name__}")
        if E.ndim != 2 or E.shape[0] == 0 or E.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty (N, dim) matrix, got {tuple(E.shape)}")
        if E.is_complex() or not E.is_floating_point():
            raise ValueError(f"{name} must be real floating point, got dtype {E.dtype}")
        if not bool(torch.isfinite(E).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
    if old_emb.shape[0] != new_emb.shape[0]:
        raise ValueError(
            "old_emb and new_emb must embed the same inputs (same number of rows), got "
            f"{old_emb.shape[0]} and {new_emb.shape[0]}"
        )
    if new_emb.shape[1] < old_emb.shape[1]:
        raise ValueError(
            f"new_dim ({new_emb.shape[1]}) must be >= old_dim ({old_emb.shape[1]}): an isometry "
            "cannot map into fewer dimensions"
        )
    compute = torch.float64 if torch.float64 in (old_emb.dtype, new_emb.dtype) else torch.float32
    M = new_emb.to(compute).mT @ old_emb.to(compute)
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ Vh


class OrthogonalTransform(nn.Module):
    r"""Map old embeddings ``(..., old_dim)`` into a new space ``(..., new_dim)``.

    ``new_dim == old_dim`` gives an orthogonal map, ``new_dim > old_dim`` an isometric
    embedding (semi-orthogonal ``Q``, ``Q^T Q = I``), so the old space's geometry is preserved
    exactly (``"exact"``) or up to a band (``"relaxed"``).

    - ``constraint="relaxed"``: ``y = x W^T (+ b)`` with a free ``W`` of shape
      ``(new_dim, old_dim)``; train with ``penalty_weight * self.penalty()``
      (:func:`lambda_orthogonality` with ``lam``, ``alpha``) added to the loss (OCA).
    - ``constraint="exact"``: ``B = exp(P - P^T)`` (``torch.linalg.matrix_exp``) of size
      ``new_dim``; ``y = [x, 0] B^T (+ b)``, i.e. ``Q = B[:, :old_dim]`` (BT^2). Orthogonal to
      rounding for any ``P``; :meth:`penalty` is 0. Note ``exp`` of a skew matrix is a
      rotation (``det B = +1``): with ``new_dim == old_dim`` a reflection is out of reach (use
      ``"relaxed"`` or one extra dimension); with ``new_dim > old_dim`` every ``Q`` is.

    Both start at the canonical embedding ``Q = I[:, :old_dim]``. See the module docstring
    for the training recipe. A ``bias`` preserves Euclidean but not cosine geometry, so it
    is off by default.
    """

    def __init__(
        self,
        old_dim: int,
        new_dim: int | None = None,
        *,
        constraint: Constraint = "relaxed",
        bias: bool = False,
        lam: float = 12.0,
        alpha: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        old_dim = _check_dim("old_dim", old_dim)
        new_dim = old_dim if new_dim is None else _check_dim("new_dim", new_dim)
        if new_dim < old_dim:
            raise ValueError(
                f"new_dim ({new_dim}) must be >= old_dim ({old_dim}): an isometry cannot map "
                "into fewer dimensions"
            )
        if constraint not in _CONSTRAINTS:
            raise ValueError(f"constraint must be one of {_CONSTRAINTS}, got {constraint!r}")
        self.lam = _check_number("lam", lam, lo=0.0, lo_open=False)
        self.alpha = _check_number("alpha", alpha, lo=0.0, lo_open=True)
        self.old_dim, self.new_dim, self.constraint = old_dim, new_dim, constraint
        kw = {"device": device, "dtype": dtype}
        if constraint == "relaxed":
            self.weight = nn.Parameter(torch.eye(new_dim, old_dim, **kw))
        else:
            # P = 0 gives B = I; only the skew part of P matters, so P carries no constraint.
            self.skew = nn.Parameter(torch.zeros(new_dim, new_dim, **kw))
        self.bias = nn.Parameter(torch.zeros(new_dim, **kw)) if bias else None

    def matrix(self) -> Tensor:
        """The effective ``(new_dim, old_dim)`` matrix ``Q`` (differentiable)."""
        if self.constraint == "relaxed":
            return self.weight
        B = torch.linalg.matrix_exp(self.skew - self.skew.mT)
        return B[:, : self.old_dim]

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.old_dim:
            raise ValueError(
                f"x must have shape (..., old_dim={self.old_dim}), got {tuple(x.shape)}"
            )
        y = x @ self.matrix().mT
        return y if self.bias is None else y + self.bias

    def penalty(self) -> Tensor:
        """λ-orthogonality of ``W`` (``"relaxed"``); a zero scalar for ``"exact"``."""
        if self.constraint == "relaxed":
            return lambda_orthogonality(self.weight, self.lam, self.alpha)
        return self.skew.new_zeros(())

    @torch.no_grad()
    def orthogonality_error(self) -> float:
        """``||Q^T Q - I||_F / sqrt(old_dim)`` of the effective matrix (0 for an isometry)."""
        return float(orthogonality_error(self.matrix()))

    def extra_repr(self) -> str:
        return (
            f"old_dim={self.old_dim}, new_dim={self.new_dim}, constraint={self.constraint!r}, "
            f"bias={self.bias is not None}, lam={self.lam}, alpha={self.alpha}"
        )


def train_orthogonal_transform(
    transform: OrthogonalTransform,
    old_emb: Tensor,
    new_emb: Tensor,
    *,
    steps: int = 500,
    lr: float = 1e-2,
    penalty_weight: float = 1.0,
) -> list[float]:
    r"""Fit ``transform`` full-batch with Adam so that ``transform(old_emb) ≈ new_emb``.

    Minimises ``mean_i ||T(e_old_i) - e_new_i||^2 + penalty_weight * T.penalty()``. The
    transform is modified in place. Returns the alignment term (without the penalty) at
    each step (before its update), for monitoring. For cosine retrieval, pass L2-normalised rows.
    """
    if not isinstance(transform, OrthogonalTransform):
        raise TypeError(f"transform must be an OrthogonalTransform, got {type(transform).__name__}")
    for name, E, dim in (
        ("old_emb", old_emb, transform.old_dim),
        ("new_emb", new_emb, transform.new_dim),
    ):
        if not isinstance(E, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(E).__name__}")
        if E.ndim != 2 or E.shape[0] == 0 or E.shape[1] != dim:
            raise ValueError(f"{name} must have shape (N >= 1, {dim}), got {tuple(E.shape)}")
        if not bool(torch.isfinite(E).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
    if old_emb.shape[0] != new_emb.shape[0]:
        raise ValueError(
            f"old_emb and new_emb must have the same number of rows, got {old_emb.shape[0]} "
            f"and {new_emb.shape[0]}"
        )
    steps = _check_dim("steps", steps)
    lr = _check_number("lr", lr, lo=0.0, lo_open=True)
    penalty_weight = _check_number("penalty_weight", penalty_weight, lo=0.0, lo_open=False)
    param = next(transform.parameters())
    old_emb = old_emb.detach().to(param.dtype)
    new_emb = new_emb.detach().to(param.dtype)
    opt = torch.optim.Adam(transform.parameters(), lr=lr)
    history: list[float] = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        align = (transform(old_emb) - new_emb).square().sum(dim=-1).mean()
        loss = align + penalty_weight * transform.penalty() if penalty_weight else align
        loss.backward()
        opt.step()
        history.append(float(align.detach()))
    return history
