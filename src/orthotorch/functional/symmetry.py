"""Symmetry-compatible update rules: the update should transform like the weight block does.

A weight block whose loss is invariant under a group of transformations (token permutations of
an embedding's rows, a shift of every logit row, rotations of a hidden basis) should get an
update rule that is *equivariant* under the same group: transforming the momentum transforms the
update identically. Each rule below is a kernel ``(X, transposed) -> Y`` on a wide ``(k, m, n)``
stack (``transposed``: the stack holds the parameters' transposes), registered in THE update-rule
registry so that any group can choose it with ``update=...``.

=====================  ===========================================  ========================
rule                   update (parameter orientation, M: rows x cols)  equivariant under
=====================  ===========================================  ========================
``row_norm``           ``M_i / ||M_i||`` per row                      row permutations,
                                                                      column rotations
``col_norm``           ``M^j / ||M^j||`` per column                   column permutations,
                                                                      row rotations
``centered_row_norm``  row_norm of ``M - 1 mean_rows(M)``             row permutations and a
                                                                      common shift of rows
``left_spectral``      ``(M M^T + delta I)^(-1/2) M`` (small side)     left and right rotations
=====================  ===========================================  ========================

The registered row (column) rules rescale the unit rows (columns) by ``sqrt(min(1, cols/rows))``
(``sqrt(min(1, rows/cols))``), so every rule's update has the polar factor's Frobenius norm
``sqrt(min(rows, cols))`` and the optimizer's shape scale and headline lr mean the same step RMS
for every rule. Unit rows of a tall matrix would have ``sqrt(rows)``: an update
``sqrt(rows/cols)`` times the spectral rule's RMS (2x on a 4x-wide MLP's up and down projections,
which made them diverge from the lr tuned for the attention matrices). A constant factor keeps
every equivariance property.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from .rules import Kernel, UpdateRule, register_update_rule

NORM_EPS = 1e-8
# delta of left_spectral, relative to the largest eigenvalue of M M^T: directions below it are
# numerically absent and must not be blown up by the inverse square root.
GRAM_RIDGE = 1e-6


def normalize_rows(M: Tensor, eps: float = NORM_EPS) -> Tensor:
    """``M_i / (||M_i|| + eps)`` for every row ``i`` of every matrix in a ``(..., m, n)`` batch."""
    return M / (torch.linalg.vector_norm(M, dim=-1, keepdim=True) + eps)


def normalize_cols(M: Tensor, eps: float = NORM_EPS) -> Tensor:
    """``M^j / (||M^j|| + eps)`` for every column ``j``."""
    return M / (torch.linalg.vector_norm(M, dim=-2, keepdim=True) + eps)


def centered_normalize_rows(M: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Row normalisation after removing the mean row: a common shift of all rows (to which a
    softmax over the rows' outputs is blind) never reaches the update."""
    return normalize_rows(M - M.mean(dim=-2, keepdim=True), eps)


def left_inverse_sqrt(M: Tensor, ridge: float = GRAM_RIDGE) -> Tensor:
    """``(M M^T + delta I)^(-1/2) M`` with ``delta = ridge * lambda_max(M M^T)`` (float32 eigh).

    Equals the polar factor ``U V^T`` on the directions well above ``delta``, computed from the
    ``rows x rows`` Gram matrix only (one-sided), so it is cheap when rows << cols.
    """
    work = M.float() if M.dtype in (torch.bfloat16, torch.float16) else M
    gram = work @ work.mT
    evals, evecs = torch.linalg.eigh(gram)
    delta = ridge * evals[..., -1:].clamp_min(torch.finfo(work.dtype).tiny)
    inv_sqrt = (evecs * (evals.clamp_min(0) + delta).rsqrt().unsqueeze(-2)) @ evecs.mT
    return (inv_sqrt @ work).to(M.dtype)


def _polar_frobenius(
    fn: Callable[[Tensor], Tensor], axis: Literal["rows", "cols"]
) -> Callable[[Tensor], Tensor]:
    """``fn`` (unit rows or columns) rescaled to the polar factor's Frobenius norm."""

    def scaled(M: Tensor) -> Tensor:
        rows, cols = M.shape[-2:]
        return fn(M) * math.sqrt(min(rows, cols) / (rows if axis == "rows" else cols))

    return scaled


def _in_param_orientation(fn):
    """Apply ``fn`` to the parameters' own orientation of a (possibly transposed) stack."""

    def kernel(X: Tensor, transposed: bool) -> Tensor:
        if transposed:
            return fn(X.mT).mT.contiguous()
        return fn(X)

    return kernel


def _prepare(fn, *, orientation_free: bool = False) -> Any:
    def prepare(group: Mapping[str, Any]) -> tuple[Kernel, torch.dtype]:
        del group
        # Normalisations are cheap and precision-sensitive near zero: compute in float32.
        if orientation_free:
            return (lambda X, transposed: fn(X)), torch.float32
        return _in_param_orientation(fn), torch.float32

    return prepare


for _name, _fn, _axis, _text in (
    (
        "row_norm",
        normalize_rows,
        "rows",
        "each row normalised (embeddings, LM head, gate/up projections)",
    ),
    ("col_norm", normalize_cols, "cols", "each column normalised (down projections)"),
    (
        "centered_row_norm",
        centered_normalize_rows,
        "rows",
        "mean row removed, then rows normalised (LM head, MoE routers: softmax shift-invariant)",
    ),
):
    register_update_rule(UpdateRule(_name, _prepare(_polar_frobenius(_fn, _axis)), _text))
# The stacks are wide, so the Gram matrix is taken on the small side: full rank, cheap, and the
# result (the polar factor on the well-conditioned directions) does not depend on orientation.
register_update_rule(
    UpdateRule(
        "left_spectral",
        _prepare(left_inverse_sqrt, orientation_free=True),
        "one-sided (M M^T)^(-1/2) M from the small-side Gram matrix (eigh, no Newton-Schulz)",
    )
)
