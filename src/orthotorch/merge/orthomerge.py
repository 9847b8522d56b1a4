r"""OrthoMerge as published: rotations of the base merged on the orthogonal group, residuals added.

Yang, Shi & Liu, "Orthogonal Model Merging" (ICML 2026, arXiv:2602.05943), the
Orthogonal-Residual Decoupling merge of models fine-tuned without OFT, Cayley variant
("OrthoMerge-C" with task-arithmetic residuals in the authors' code). For each weight matrix with
base :math:`W_0` and fine-tuned :math:`W_i`:

1. **Orthogonal part** (orthogonal Procrustes on the rotation group, :func:`procrustes_rotation`):
   :math:`R_i = \arg\min_{R \in SO(n)} \|W_0 R - W_i\|_F`, i.e. :math:`\operatorname{polar}
   (W_0^T W_i)` with its least significant direction flipped when that is a reflection.
2. **To the Lie algebra** (inverse Cayley map): :math:`A_i = (R_i + I)^{-1}(R_i - I)`,
   skew-symmetric.
3. **Magnitude-corrected merge**: the direction of the sum and the mean of the norms,

   .. math:: A = \bar\theta\, \frac{\sum_i A_i}{\|\sum_i A_i\|_F}, \qquad
             \bar\theta = \frac1N \sum_i \|A_i\|_F ,

   so rotations that disagree do not shrink the merged rotation (a plain mean would).
4. **Back to the group** (Cayley map): :math:`R = (I - A)^{-1}(I + A)`.
5. **Residuals**, merged additively: :math:`E_i = W_i - W_0 R_i`, and

   .. math:: W = W_0 R + \lambda \sum_i E_i .

Entries that are not matrices (biases, norm gains) have no rotation: they follow task arithmetic
with the same :math:`\lambda`; batch-norm statistics take the models' mean, integer buffers the
base's (as in :mod:`.merging`). Conv kernels are used as ``(out, in * prod(k))`` matrices.

Two choices of ours, where the paper's setting (square-ish LLM layers) does not decide:

- The rotation acts on the smaller side of the matrix: on the right (``in x in``, as published)
  when ``out >= in``, on the left (:math:`W_i \approx R_i W_0`, ``out x out``) otherwise. On the
  larger side :math:`W_0^T W_i` is rank-deficient, the Procrustes rotation is arbitrary on
  :math:`W_0`'s null space, and that arbitrary part would enter the Lie-algebra mean.
- :math:`\lambda` defaults to :math:`1/N` (the mean residual; the authors' script uses a fixed
  0.2 for five models). Their code also restricts the Procrustes target of each model to the rows
  whose delta disagrees in sign with the mean delta; that heuristic is not in the paper's method
  description and is not reproduced here.

The Cayley map needs :math:`R_i + I` invertible (no rotation by :math:`\pi`); a fine-tuned model
is close to its base, so :math:`R_i` is close to :math:`I`. A rotation with an eigenvalue near
:math:`-1` raises a ``ValueError`` naming the entry.

:func:`orthotorch.merge.orthogonal_merge` is a different rule in the same spirit (polar parts of
the *task vectors*, Procrustes-mean rotation, summed scale parts); see :mod:`.merging`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .merging import (
    KeyFilter,
    MergeMethod,
    StateDictLike,
    _is_statistic,
    _per_model,
    _prepare,
    default_scale,
    register_merge_method,
)

__all__ = ["cayley", "inverse_cayley", "merge_rotations", "orthomerge", "procrustes_rotation"]


def procrustes_rotation(W0: Tensor, W: Tensor) -> Tensor:
    r""":math:`\arg\min_{R \in SO(n)} \|W_0 R - W\|_F` (Kabsch): with :math:`W_0^T W = U S V^T`,
    :math:`R = U \operatorname{diag}(1, \dots, 1, d) V^T`, :math:`d = \det(U V^T)`.

    Over all orthogonal matrices the answer is :math:`U V^T`, which is a *reflection*
    (:math:`\det = -1`) whenever :math:`W_0^T W` has a negative determinant, e.g. when a nearly
    singular direction of the base changes sign; a reflection has the eigenvalue :math:`-1`,
    where the Cayley map is undefined, and is no point of the Lie group OrthoMerge averages on.
    Flipping the least significant singular direction gives the nearest rotation (measured: the
    128 x 128 layer of a digits MLP came out as a reflection in one seed of five, and with it the
    merged model scored 0% on one half of the digits). Returned as a full ``n x n`` matrix in
    ``W0``'s dtype.
    """
    U, _, Vh = torch.linalg.svd(W0.mT @ W)
    d = torch.sign(torch.linalg.det(U @ Vh))
    U = torch.cat([U[:, :-1], U[:, -1:] * d], dim=1)
    return U @ Vh


def inverse_cayley(R: Tensor) -> Tensor:
    r"""The skew-symmetric :math:`A = (R + I)^{-1}(R - I)` with :math:`\operatorname{cayley}(A)
    = R` (exactly skew-symmetrised against rounding)."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    A = torch.linalg.solve(R + eye, R - eye)
    return (A - A.mT) / 2


def cayley(A: Tensor) -> Tensor:
    r"""The rotation :math:`(I - A)^{-1}(I + A)` of a skew-symmetric ``A`` (always defined:
    :math:`I - A` has eigenvalues :math:`1 - i\omega`)."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(eye - A, eye + A)


def merge_rotations(generators: Sequence[Tensor]) -> Tensor:
    r"""OrthoMerge's magnitude-corrected mean of skew-symmetric generators :math:`A_i`:
    :math:`\bar\theta \sum_i A_i / \|\sum_i A_i\|_F` with :math:`\bar\theta` the mean of
    :math:`\|A_i\|_F`; zero when the sum is zero."""
    total = torch.stack(list(generators)).sum(0)
    norm = torch.linalg.matrix_norm(total)
    theta = torch.stack([torch.linalg.matrix_norm(A) for A in generators]).mean()
    if float(norm) <= torch.finfo(total.dtype).tiny:
        return torch.zeros_like(total)
    return total * (theta / norm)


def _orthomerge_matrix(key: str, W0: Tensor, Ws: list[Tensor], scales: list[float]) -> Tensor:
    # Rotate on the smaller side (module docstring): transpose wide matrices, merge, transpose back.
    wide = W0.shape[0] < W0.shape[1]
    if wide:
        W0, Ws = W0.mT, [W.mT for W in Ws]
    rotations = [procrustes_rotation(W0, W) for W in Ws]
    generators = []
    for i, R in enumerate(rotations):
        eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
        # R + I is singular exactly when R rotates some plane by pi.
        distance = float(torch.linalg.svdvals(R + eye).min())
        A = inverse_cayley(R) if distance >= 1e-4 else None
        if A is None or not bool(torch.isfinite(A).all()):
            raise ValueError(
                f"finetuned[{i}][{key!r}]: its Procrustes rotation of the base has an eigenvalue "
                "near -1, where the Cayley map is undefined (the model is far from its base)"
            )
        generators.append(A)
    merged = W0 @ cayley(merge_rotations(generators))
    for lam, W, R in zip(scales, Ws, rotations):
        merged = merged + lam * (W - W0 @ R)
    return merged.mT if wide else merged


@torch.no_grad()
def orthomerge(
    base: StateDictLike,
    finetuned: Sequence[StateDictLike],
    scale: float | Sequence[float] | None = None,
    *,
    keys: KeyFilter = None,
) -> dict[str, Tensor]:
    r"""OrthoMerge (Yang, Shi & Liu 2026): :math:`W_0 R + \lambda \sum_i (W_i - W_0 R_i)` per
    weight matrix, :math:`R` the Cayley-map merge of the models' Procrustes rotations of the base
    (module docstring for the steps).

    With one model and ``scale=1`` it returns the model exactly (:math:`W_0 R_1 + W_1 - W_0 R_1`).

    Cost: per matrix entry, one SVD and two ``n x n`` solves per model (``n`` the smaller side).

    Args:
        base: the shared pre-trained model (state_dict or module).
        finetuned: models fine-tuned from ``base`` (same keys and shapes).
        scale: :math:`\lambda` of the residuals (and of the task vectors of non-matrix entries),
            one number or one per model; ``None`` (default): ``1 / len(finetuned)``.
        keys: which entries to merge (``None``: all); the others are copied from ``base``.

    Returns:
        A new state_dict with ``base``'s keys, order, dtypes and device.

    Raises:
        ValueError / TypeError: as :func:`~orthotorch.merge.task_arithmetic`, and for a rotation
            outside the Cayley map's domain (naming the model and key).
    """
    base_sd, models, chosen = _prepare(base, finetuned, keys)
    count = len(models)
    scales = _per_model(default_scale(count) if scale is None else scale, count, "scale")
    out: dict[str, Tensor] = {}
    for key, W0 in base_sd.items():
        if key not in chosen or not W0.is_floating_point():
            out[key] = W0.detach().clone()
            continue
        compute = torch.float64 if W0.dtype == torch.float64 else torch.float32
        values = [sd[key].detach().to(W0.device, compute) for sd in models]
        if _is_statistic(key):
            out[key] = torch.stack(values).mean(0).to(W0.dtype)
            continue
        W0c = W0.detach().to(compute)
        if W0.ndim >= 2:
            flat = [v.reshape(W0.shape[0], -1) for v in values]
            merged = _orthomerge_matrix(key, W0c.reshape(W0.shape[0], -1), flat, scales)
            out[key] = merged.reshape(W0.shape).to(W0.dtype)
        else:
            delta = sum(lam * (v - W0c) for lam, v in zip(scales, values))
            out[key] = (W0c + delta).to(W0.dtype)
    return out


register_merge_method(
    MergeMethod(
        "orthomerge",
        orthomerge,
        "OrthoMerge (published): Cayley-mean of Procrustes rotations of the base + residuals",
    )
)
