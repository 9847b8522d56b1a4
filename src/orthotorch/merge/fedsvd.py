r"""Server-side aggregation of LoRA factors: FedSVD re-factorisation and the FedAvg baseline.

Each client ``i`` sends a LoRA pair :math:`(B_i, A_i)` with :math:`B_i \in \mathbb{R}^{m \times
r_i}`, :math:`A_i \in \mathbb{R}^{r_i \times n}` (the adapted weight is :math:`W_0 + B_i A_i`).

- FedAvg of the factors (McMahan et al. 2017, applied to LoRA): :math:`(\sum_i w_i B_i,
  \sum_i w_i A_i)`. Its product :math:`\bar B \bar A` is *not* the mean update
  :math:`\sum_i w_i B_i A_i`: the cross terms :math:`w_i w_j B_i A_j` of unrelated clients enter
  and the own terms are damped by :math:`w_i^2`.
- FedSVD (Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with
  LoRA", NeurIPS 2025, arXiv:2505.12805): form the mean product :math:`M = \sum_i w_i B_i A_i`,
  take its SVD :math:`M = U S V^T` and keep ``rank`` directions: :math:`A = V_r^T` (orthonormal
  rows), :math:`B = U_r S_r`; clients continue from the re-factorised pair. In the paper the
  clients train only ``B`` on a shared ``A``, so :math:`M = (\sum_i w_i B_i) A`; that is the
  special case ``A_i = A`` here. ``B A`` is the best rank-``rank`` approximation of :math:`M`
  (Eckart–Young), exact when ``rank >= rank(M)``, and the orthonormal ``A`` bounds the gradient
  norm of ``B`` (the paper's reason for it under DP-SGD).

Both accept one layer (a list of pairs, one per client) or many (a list of mappings
``name -> (B, A)``, one per client) and return the same structure.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["fedavg_lora", "fedsvd_aggregate", "fedsvd_refactor", "mean_lora_product"]

LoRAPair = tuple[Tensor, Tensor]
ClientLoRAs = Sequence[LoRAPair] | Sequence[Mapping[str, LoRAPair]]


# ------------------------------------------------------------------------------ functional core


def fedsvd_refactor(M: Tensor, rank: int) -> LoRAPair:
    r"""Re-factorise an update ``M`` (``m x n``) as :math:`B A` with :math:`A = V_r^T`,
    :math:`B = U_r S_r` from the SVD :math:`M = U S V^T` (FedSVD, arXiv:2505.12805).

    ``A`` has orthonormal rows (:math:`A A^T = I_r`); :math:`\|M - BA\|_F^2 = \sum_{k > r}
    \sigma_k^2`, the least possible for rank ``r`` (Eckart–Young). Computed in float64 for
    float64 input, else float32; returned in ``M``'s dtype.
    """
    if not isinstance(M, Tensor):
        raise TypeError(f"M must be a torch.Tensor, got {type(M).__name__}")
    if M.ndim != 2 or not M.is_floating_point():
        raise ValueError(f"M must be a real 2-D floating tensor, got {M.dtype} {tuple(M.shape)}")
    if not bool(torch.isfinite(M).all()):
        raise ValueError(f"M of shape {tuple(M.shape)} contains NaN or Inf")
    _check_rank(rank, tuple(M.shape))
    compute = torch.float64 if M.dtype == torch.float64 else torch.float32
    U, S, Vh = torch.linalg.svd(M.to(compute), full_matrices=False)
    return (U[:, :rank] * S[:rank]).to(M.dtype), Vh[:rank].to(M.dtype).contiguous()


def _check_rank(rank: Any, shape: tuple[int, ...]) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if rank > min(shape):
        raise ValueError(
            f"rank={rank} exceeds min(m, n) = {min(shape)} of the {shape[0]}x{shape[1]} update; "
            "A cannot have more orthonormal rows than columns"
        )


# ---------------------------------------------------------------------------------- validation


def _weights(weights: Any, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if isinstance(weights, Tensor) or hasattr(weights, "__array__"):
        weights = weights.tolist()  # numpy arrays / tensors of dataset sizes
    if not isinstance(weights, Sequence) or isinstance(weights, str) or len(weights) != count:
        raise ValueError(f"weights must be a sequence of {count} numbers (one per client)")
    ok = all(
        isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        for w in weights
    )
    if not ok or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _check_pair(pair: Any, what: str) -> LoRAPair:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{what} must be a (B, A) pair of tensors, got {type(pair).__name__}")
    B, A = pair
    for name, X in (("B", B), ("A", A)):
        if not isinstance(X, Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(X).__name__}")
        if X.ndim != 2 or not X.is_floating_point():
            raise ValueError(
                f"{what}: {name} must be a real 2-D floating tensor, got {X.dtype} {tuple(X.shape)}"
            )
        if not bool(torch.isfinite(X).all()):
            raise ValueError(f"{what}: {name} of shape {tuple(X.shape)} contains NaN or Inf")
    if B.shape[1] != A.shape[0]:
        raise ValueError(
            f"{what}: B is {tuple(B.shape)} and A is {tuple(A.shape)}; B must be (m, r) and "
            "A (r, n) with the same r"
        )
    return B, A


def _check_layer(pairs: list[Any], what: Callable[[int], str]) -> list[LoRAPair]:
    """One layer's pairs from every client, with a common product shape ``(m, n)``."""
    checked = [_check_pair(p, what(i)) for i, p in enumerate(pairs)]
    m, n = checked[0][0].shape[0], checked[0][1].shape[1]
    for i, (B, A) in enumerate(checked):
        if (B.shape[0], A.shape[1]) != (m, n):
            raise ValueError(
                f"{what(i)}: B is {tuple(B.shape)} and A is {tuple(A.shape)} (product "
                f"{B.shape[0]}x{A.shape[1]}), but {what(0)} has product {m}x{n}"
            )
    return checked


def _layers(client_loras: Any) -> tuple[dict[str | None, list[LoRAPair]], bool]:
    """``{layer: [pair per client]}`` and whether the input was the per-layer mapping form."""
    if not isinstance(client_loras, Sequence) or isinstance(client_loras, (str, Mapping)):
        raise TypeError(
            "client_loras must be a list with one entry per client, each a (B, A) pair or a "
            f"mapping name -> (B, A); got {type(client_loras).__name__}"
        )
    if len(client_loras) == 0:
        raise ValueError("client_loras must contain at least one client, got an empty list")
    mapped = isinstance(client_loras[0], Mapping)
    for i, c in enumerate(client_loras):
        if isinstance(c, Mapping) != mapped:
            raise TypeError(
                f"client_loras[{i}] is a {type(c).__name__} but client_loras[0] is a "
                f"{type(client_loras[0]).__name__}; use one form for every client"
            )
    if not mapped:
        return {None: _check_layer(list(client_loras), lambda i: f"client_loras[{i}]")}, False
    names = list(client_loras[0])
    for i, c in enumerate(client_loras):
        missing = [k for k in names if k not in c]
        extra = [k for k in c if k not in client_loras[0]]
        if missing or extra:
            key, how = (missing[0], "is missing") if missing else (extra[0], "has extra")
            raise ValueError(f"client_loras[{i}] {how} layer {key!r} (compared to client 0)")
    layers = {
        name: _check_layer(
            [c[name] for c in client_loras], lambda i, name=name: f"client_loras[{i}][{name!r}]"
        )
        for name in names
    }
    return layers, True


def _compute(pairs: list[LoRAPair]) -> torch.dtype:
    every = [X.dtype for pair in pairs for X in pair]
    return torch.float64 if all(d == torch.float64 for d in every) else torch.float32


def _mean_product(pairs: list[LoRAPair], w: list[float]) -> Tensor:
    compute = _compute(pairs)
    device = pairs[0][0].device
    M = None
    for wi, (B, A) in zip(w, pairs):
        term = wi * (B.to(device, compute) @ A.to(device, compute))
        M = term if M is None else M + term
    return M


def _shape_like(result: dict[str | None, Any], mapped: bool) -> Any:
    return dict(result) if mapped else result[None]


# ------------------------------------------------------------------------------------- public


@torch.no_grad()
def mean_lora_product(
    client_loras: ClientLoRAs, weights: Sequence[float] | None = None
) -> Tensor | dict[str, Tensor]:
    r"""The exact aggregated update :math:`M = \sum_i w_i B_i A_i` (per layer), in ``B_0``'s
    dtype; the target both aggregators approximate."""
    layers, mapped = _layers(client_loras)
    w = _weights(weights, len(client_loras))
    return _shape_like(
        {k: _mean_product(p, w).to(p[0][0].dtype) for k, p in layers.items()}, mapped
    )


@torch.no_grad()
def fedsvd_aggregate(
    client_loras: ClientLoRAs, rank: int, weights: Sequence[float] | None = None
) -> LoRAPair | dict[str, LoRAPair]:
    r"""FedSVD server step: SVD re-factorisation of the mean LoRA product (arXiv:2505.12805).

    :math:`M = \sum_i w_i B_i A_i = U S V^T`, returned as :math:`B = U_r S_r` (``m x rank``) and
    :math:`A = V_r^T` (``rank x n``, orthonormal rows). Exact (:math:`BA = M`) when
    ``rank >= rank(M)`` (at most :math:`\sum_i r_i`), otherwise the best rank-``rank``
    approximation, with squared Frobenius error the sum of the dropped :math:`\sigma_k^2`.

    Args:
        client_loras: one entry per client: a ``(B_i, A_i)`` pair, or a mapping
            ``layer name -> (B_i, A_i)`` (then every client must have the same layer names).
            Ranks ``r_i`` may differ between clients; ``B_i A_i`` must have one shape per layer.
        rank: rank of the returned factors, ``1 <= rank <= min(m, n)``.
        weights: client weights (e.g. local dataset sizes), normalised to sum to one;
            ``None`` is uniform.

    Returns:
        ``(B, A)`` in the dtype and device of client 0's ``B`` (a dict of them for the mapping
        form). New tensors; the inputs are not modified.

    Raises:
        ValueError: ``rank`` not a positive int or above ``min(m, n)``, inconsistent shapes
            (naming the client, layer and shapes), NaN/Inf factors, an empty list, bad weights.
        TypeError: entries that are not ``(B, A)`` pairs of tensors, or mixed forms.
    """
    layers, mapped = _layers(client_loras)
    w = _weights(weights, len(client_loras))
    for name, pairs in layers.items():
        shape = (pairs[0][0].shape[0], pairs[0][1].shape[1])
        try:
            _check_rank(rank, shape)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}" if mapped else str(err)) from None
    result = {}
    for name, pairs in layers.items():
        B, A = fedsvd_refactor(_mean_product(pairs, w), rank)
        dtype = pairs[0][0].dtype
        result[name] = (B.to(dtype), A.to(dtype))
    return _shape_like(result, mapped)


@torch.no_grad()
def fedavg_lora(
    client_loras: ClientLoRAs, weights: Sequence[float] | None = None
) -> LoRAPair | dict[str, LoRAPair]:
    r"""FedAvg of LoRA factors: :math:`(\sum_i w_i B_i, \sum_i w_i A_i)`, the usual baseline.

    Its product differs from the mean update :math:`\sum_i w_i B_i A_i` unless the clients share
    ``A`` (or ``B``): :math:`\bar B \bar A = \sum_{i,j} w_i w_j B_i A_j`. Every client must use
    the same rank. Same input forms, weights, outputs and errors as :func:`fedsvd_aggregate`.
    """
    layers, mapped = _layers(client_loras)
    w = _weights(weights, len(client_loras))
    result = {}
    for name, pairs in layers.items():
        ranks = [B.shape[1] for B, _ in pairs]
        if len(set(ranks)) > 1:
            where = f" for layer {name!r}" if mapped else ""
            raise ValueError(
                f"fedavg_lora needs one rank for every client{where}, got ranks {ranks}; "
                "use fedsvd_aggregate for heterogeneous ranks"
            )
        compute = _compute(pairs)
        device, dtype = pairs[0][0].device, pairs[0][0].dtype
        B = sum(wi * B.to(device, compute) for wi, (B, _) in zip(w, pairs))
        A = sum(wi * A.to(device, compute) for wi, (_, A) in zip(w, pairs))
        result[name] = (B.to(dtype), A.to(dtype))
    return _shape_like(result, mapped)
