r"""Retrieval metrics between a query set and a gallery: CMC top-k (recall@k) and mAP.

Every query is ranked against the whole gallery by similarity (``"cosine"``, or
``"euclidean"``: nearest first). A gallery item is *relevant* to a query when their labels are
equal.

- **CMC top-k**: the fraction of queries with a relevant item among the first ``k``. In the
  metric-learning convention this is also what *recall@k* means (Musgrave et al., "A Metric
  Learning Reality Check", 2020), so one number serves both names.
- **mAP**: the mean over queries of the average precision
  :math:`AP = \frac{1}{|P|}\sum_{j \in P} \mathrm{precision@rank}(j)`.

Tie rule (the same for both metrics): gallery items with *exactly* equal scores form a block
that is retrieved all at once, so the rank of every item in a block is the position of the
block's *last* item (pessimistic). For AP this is exactly scikit-learn's
``average_precision_score`` (one threshold per distinct score); for CMC a query counts as a
hit at ``k`` only if the whole block containing its best relevant item fits in the first
``k``. Results therefore do not depend on the order of the gallery.

Queries with no relevant gallery item are skipped (their AP is undefined); ``num_queries`` in
the result says how many were evaluated. Work is chunked over queries, so memory is
``O(chunk_size * n_gallery)`` however large the query set. Scores are computed in float64.

Compatibility (Shen et al., "Towards Backward-Compatible Representation Learning", CVPR
2020): a new model is compatible with an old one when new queries against the old gallery
do at least as well as old against old, :math:`M(\phi_{new}, \phi_{old}) \ge
M(\phi_{old}, \phi_{old})`; see :func:`compatibility_report`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CompatibilityReport",
    "cmc_top_k",
    "compatibility_report",
    "mean_average_precision",
    "retrieval_metrics",
]

Metric = Literal["cosine", "euclidean"]
_METRICS = ("cosine", "euclidean")
# float64 elements per (chunk x gallery) score matrix; ~8 such arrays live at once (~128 MiB).
_CHUNK_ELEMENTS = 1 << 21


def _from_numpy(x: np.ndarray) -> Tensor:
    # torch.from_numpy refuses negative strides (reversed views), valid numpy input.
    return torch.from_numpy(x.copy() if any(step < 0 for step in x.strides) else x)


def _as_embeddings(name: str, x: Any, device: torch.device | None = None) -> Tensor:
    if isinstance(x, np.ndarray):
        x = _from_numpy(x)
    elif not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, dim) array, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {x.dtype}")
    x = x.detach().to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def _label_array(name: str, y: Any, n: int, what: str) -> np.ndarray:
    if isinstance(y, Tensor):
        y = y.detach().cpu().numpy()
    elif not isinstance(y, np.ndarray):
        y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} labels but {what} has {n} rows")
    if y.dtype.kind not in "biuUSO":
        raise TypeError(f"{name} must hold integer or string labels, got dtype {y.dtype}")
    return y


def _encode_labels(
    query_labels: Any, gallery_labels: Any, n_query: int, n_gallery: int
) -> tuple[Tensor, Tensor]:
    """Both label sets as int64 codes of one shared vocabulary."""
    yq = _label_array("query_labels", query_labels, n_query, "query")
    yg = _label_array("gallery_labels", gallery_labels, n_gallery, "gallery")
    if yq.dtype.kind in "biu" and yg.dtype.kind in "biu":
        return torch.from_numpy(yq.astype(np.int64)), torch.from_numpy(yg.astype(np.int64))
    try:
        _, codes = np.unique(np.concatenate([yq, yg]).astype(str), return_inverse=True)
    except TypeError as err:
        raise TypeError(f"labels could not be compared: {err}") from err
    codes = torch.from_numpy(codes.reshape(-1).astype(np.int64))
    return codes[:n_query], codes[n_query:]


def _check_ks(ks: int | Iterable[int]) -> tuple[int, ...]:
    if isinstance(ks, Iterable) and not isinstance(ks, (str, bytes)):
        ks = tuple(ks)
    else:
        ks = (ks,)
    if not ks:
        raise ValueError("ks must hold at least one k >= 1")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every k in ks must be an int >= 1, got {k!r}")
    return tuple(int(k) for k in ks)


def _prepare(
    query: Any,
    query_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    metric: str,
    exclude_self: bool,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool, got {type(exclude_self).__name__}")
    Q = _as_embeddings("query", query)
    G = _as_embeddings("gallery", gallery, device=Q.device)
    if Q.shape[1] != G.shape[1]:
        raise ValueError(
            f"query and gallery must have the same embedding dim, got {Q.shape[1]} and {G.shape[1]}"
        )
    yq, yg = _encode_labels(query_labels, gallery_labels, Q.shape[0], G.shape[0])
    if exclude_self and Q.shape[0] != G.shape[0]:
        raise ValueError(
            "exclude_self=True means query i is gallery item i, so query and gallery need the "
            f"same number of rows; got {Q.shape[0]} and {G.shape[0]}"
        )
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // G.shape[0])
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if metric == "cosine":
        for name, X in (("query", Q), ("gallery", G)):
            zero = torch.linalg.vector_norm(X, dim=1) == 0
            if bool(zero.any()):
                raise ValueError(
                    f"{name} has {int(zero.sum())} zero rows; cosine similarity is undefined "
                    "for them"
                )
        # No normalisation (it rounds integer codes, and then GEMM order decides their ties):
        # per-row power-of-two rescaling is exact, leaves the cosine ranking alone and keeps
        # the squares in _scores away from overflow and |g|^2 away from underflow.
        Q = torch.ldexp(Q, -torch.frexp(Q.abs().amax(1, keepdim=True)).exponent)
        G = torch.ldexp(G, -torch.frexp(G.abs().amax(1, keepdim=True)).exponent)
    else:
        # One exact power-of-two scale for both sets keeps the squares in _scores finite (the
        # ranking is scale invariant). The expanded distance also cancels catastrophically
        # under an offset much larger than the spread: shifting both sets by the gallery mean
        # rounded to a power-of-two grid at the spread's scale removes it, exactly for
        # integer-valued data (a dyadic grid keeps every difference exact).
        top = torch.maximum(Q.abs().max(), G.abs().max())
        Q = torch.ldexp(Q, -torch.frexp(top).exponent)
        G = torch.ldexp(G, -torch.frexp(top).exponent)
        spread = G.std(0).max() if G.shape[0] > 1 else torch.zeros((), dtype=G.dtype)
        if spread > 0:
            grid = torch.ldexp(torch.ones_like(spread), torch.frexp(spread).exponent - 1)
            center = torch.round(G.mean(0) / grid) * grid
            Q, G = Q - center, G - center
    return Q, yq.to(Q.device), G, yg.to(Q.device), chunk_size


def _scores(Q: Tensor, G: Tensor, G_sq: Tensor, metric: str) -> Tensor:
    """Per query row, a score ranking the gallery like the metric (higher is better): for
    cosine ``sign(c) c^2 / |g|^2`` with ``c = q . g`` (monotone in ``c / (|q| |g|)`` for a fixed
    query), for euclidean minus the squared distance."""
    inner = Q @ G.mT
    # Both forms are exact for integer-valued (or dyadic) inputs, whatever the GEMM order, so
    # exact ties stay ties for any chunk size; one GEMM each.
    if metric == "cosine":
        return inner * inner.abs() / G_sq
    return -(Q.square().sum(1, keepdim=True) + G_sq - 2.0 * inner).clamp_min(0.0)


def _rank_statistics(S: Tensor, relevant: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per query row of ``S`` (excluded items at ``-inf``, never relevant): the 1-based rank of
    the first relevant item (tie blocks resolved pessimistically; ``inf`` if none), the
    average precision (0 if none) and the number of relevant items."""
    n = S.shape[1]
    order = torch.argsort(S, dim=1, descending=True, stable=True)
    s = S.gather(1, order)
    rel = relevant.gather(1, order)
    is_end = torch.ones_like(rel)
    is_end[:, :-1] = s[:, 1:] != s[:, :-1]
    position = torch.arange(n, device=S.device).expand_as(order)
    # Index of the last item of each position's tie block: a suffix minimum over block ends.
    end = torch.where(is_end, position, n).flip(1).cummin(1).values.flip(1)
    hits = rel.to(torch.float64).cumsum(1)
    precision = hits.gather(1, end) / (end + 1).to(torch.float64)
    n_rel = rel.sum(1)
    ap = (precision * rel).sum(1) / n_rel.clamp_min(1)
    first = rel.to(torch.int8).argmax(1, keepdim=True)
    rank = (end.gather(1, first).squeeze(1) + 1).to(torch.float64)
    rank = torch.where(n_rel > 0, rank, torch.full_like(rank, float("inf")))
    return rank, ap, n_rel


def _evaluate(
    query: Any,
    query_labels: Any,
    gallery: Any,
    gallery_labels: Any,
    metric: str,
    exclude_self: bool,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """First-relevant ranks and APs of the queries that have a relevant gallery item."""
    Q, yq, G, yg, chunk = _prepare(
        query, query_labels, gallery, gallery_labels, metric, exclude_self, chunk_size
    )
    G_sq = G.square().sum(1)
    ranks, aps = [], []
    for start in range(0, Q.shape[0], chunk):
        stop = min(start + chunk, Q.shape[0])
        S = _scores(Q[start:stop], G, G_sq, metric)
        relevant = yq[start:stop, None] == yg[None, :]
        if exclude_self:
            rows = torch.arange(stop - start, device=S.device)
            S[rows, rows + start] = float("-inf")
            relevant[rows, rows + start] = False
        rank, ap, n_rel = _rank_statistics(S, relevant)
        keep = n_rel > 0
        ranks.append(rank[keep])
        aps.append(ap[keep])
    rank, ap = torch.cat(ranks), torch.cat(aps)
    if rank.numel() == 0:
        raise ValueError(
            "no query has a relevant gallery item (a gallery item with the same label), so "
            "top-k and mAP are undefined"
        )
    return rank, ap


def retrieval_metrics(
    query: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray | Iterable,
    gallery: Tensor | np.ndarray,
    gallery_labels: Tensor | np.ndarray | Iterable,
    *,
    ks: int | Iterable[int] = (1, 5),
    metric: Metric = "cosine",
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """CMC top-k (= recall@k) for each ``k`` in ``ks`` and mAP, in one pass.

    Args:
        query: ``(n_query, dim)`` embeddings (torch or numpy).
        query_labels: ``(n_query,)`` integer or string labels.
        gallery: ``(n_gallery, dim)`` embeddings.
        gallery_labels: ``(n_gallery,)`` labels.
        ks: cut-offs, each an int >= 1 (``k`` beyond the gallery size counts the whole list).
        metric: ``"cosine"`` (rows L2-normalised; zero rows are an error) or ``"euclidean"``.
        exclude_self: query ``i`` is gallery item ``i`` (leave-one-out on one set); it is
            removed from query ``i``'s ranking.
        chunk_size: queries per chunk; ``None`` bounds each score block at ~2M entries.

    Returns:
        ``{"top1": ..., "top5": ..., "mAP": ..., "num_queries": n}`` with fractions in
        ``[0, 1]``; ``num_queries`` counts the queries evaluated (those with a relevant item).

    Raises:
        ValueError: mismatched dims or label lengths, empty inputs, NaN/Inf, ``k < 1``, zero
            rows under cosine, or no query with a relevant gallery item.
        TypeError: inputs that are not tensors/arrays, or non-integer, non-string labels.
    """
    ks = _check_ks(ks)
    rank, ap = _evaluate(
        query, query_labels, gallery, gallery_labels, metric, exclude_self, chunk_size
    )
    out: dict[str, float] = {f"top{k}": float((rank <= k).to(torch.float64).mean()) for k in ks}
    out["mAP"] = float(ap.mean())
    out["num_queries"] = int(rank.numel())
    return out


def cmc_top_k(
    query: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray | Iterable,
    gallery: Tensor | np.ndarray,
    gallery_labels: Tensor | np.ndarray | Iterable,
    *,
    ks: int | Iterable[int] = (1, 5),
    metric: Metric = "cosine",
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> dict[int, float]:
    """``{k: fraction of queries with a relevant item in the top k}``; see
    :func:`retrieval_metrics` for the arguments and the tie rule."""
    ks = _check_ks(ks)
    rank, _ = _evaluate(
        query, query_labels, gallery, gallery_labels, metric, exclude_self, chunk_size
    )
    return {k: float((rank <= k).to(torch.float64).mean()) for k in ks}


def mean_average_precision(
    query: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray | Iterable,
    gallery: Tensor | np.ndarray,
    gallery_labels: Tensor | np.ndarray | Iterable,
    *,
    metric: Metric = "cosine",
    exclude_self: bool = False,
    chunk_size: int | None = None,
) -> float:
    """Mean over queries of the average precision (ties as in scikit-learn's
    ``average_precision_score``); see :func:`retrieval_metrics` for the arguments."""
    _, ap = _evaluate(
        query, query_labels, gallery, gallery_labels, metric, exclude_self, chunk_size
    )
    return float(ap.mean())


@dataclass(frozen=True)
class CompatibilityReport:
    """Retrieval results of the three standard pairings (query model / gallery model).

    ``old_old``: old queries vs old gallery; ``new_new``: new vs new (the upper bound after a
    full re-index); ``cross``: new queries vs the old gallery (through the transforms given).
    """

    old_old: dict[str, float]
    new_new: dict[str, float]
    cross: dict[str, float]

    def _keys(self) -> list[str]:
        return [k for k in self.old_old if k != "num_queries"]

    @property
    def compatible(self) -> bool:
        """BCT's empirical compatibility: ``cross >= old/old`` on every reported metric."""
        return all(self.cross[k] >= self.old_old[k] for k in self._keys())

    def gain(self, key: str = "mAP") -> float:
        """BCT update gain ``(cross - old/old) / (new/new - old/old)``: 1 = as good as a full
        re-index; ``nan`` when the new model is no better than the old one."""
        if key not in self._keys():
            raise ValueError(f"key must be one of {self._keys()}, got {key!r}")
        span = self.new_new[key] - self.old_old[key]
        return (self.cross[key] - self.old_old[key]) / span if span > 0 else float("nan")

    def rows(self) -> list[tuple[str, dict[str, float]]]:
        return [("old/old", self.old_old), ("new/new", self.new_new), ("new/old", self.cross)]

    def table(self) -> str:
        """The results as an aligned plain-text table (percentages)."""
        keys = self._keys()
        lines = [f"{'query/gallery':<14}" + "".join(f"{k:>9}" for k in keys)]
        for name, row in self.rows():
            lines.append(f"{name:<14}" + "".join(f"{100 * row[k]:>9.2f}" for k in keys))
        return "\n".join(lines)


def compatibility_report(
    old_query: Tensor | np.ndarray,
    old_gallery: Tensor | np.ndarray,
    new_query: Tensor | np.ndarray,
    new_gallery: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray | Iterable,
    gallery_labels: Tensor | np.ndarray | Iterable,
    *,
    query_transform: Callable[[Tensor], Tensor] | None = None,
    gallery_transform: Callable[[Tensor], Tensor] | None = None,
    ks: int | Iterable[int] = (1, 5),
    metric: Metric = "cosine",
    chunk_size: int | None = None,
) -> CompatibilityReport:
    """The standard compatibility table: old/old, new/new and new-query vs old-gallery.

    For the cross pairing, ``query_transform`` (if given) maps the new queries and
    ``gallery_transform`` maps the old gallery, e.g. an old->new
    :class:`orthotorch.nn.compatible.OrthogonalTransform` as ``gallery_transform``, or a
    new->old map (the λ-orthogonality paper's direction) as ``query_transform``. Both run under
    ``torch.no_grad`` on the embeddings as given (numpy arrays through ``torch.from_numpy``), so
    pass them in the dtype the transform expects. ``report.compatible`` is BCT's criterion.
    """
    ks = _check_ks(ks)
    common = {"ks": ks, "metric": metric, "chunk_size": chunk_size}
    old_old = retrieval_metrics(old_query, query_labels, old_gallery, gallery_labels, **common)
    new_new = retrieval_metrics(new_query, query_labels, new_gallery, gallery_labels, **common)
    cross_query, cross_gallery = new_query, old_gallery
    with torch.no_grad():
        if query_transform is not None:
            cross_query = _apply("query_transform", query_transform, new_query)
        if gallery_transform is not None:
            cross_gallery = _apply("gallery_transform", gallery_transform, old_gallery)
    cross = retrieval_metrics(cross_query, query_labels, cross_gallery, gallery_labels, **common)
    return CompatibilityReport(old_old=old_old, new_new=new_new, cross=cross)


def _apply(name: str, fn: Callable[[Tensor], Tensor], x: Any) -> Tensor:
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    if isinstance(x, np.ndarray):
        x = _from_numpy(x)
    out = fn(x)
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must return a torch.Tensor, got {type(out).__name__}")
    return out.detach()
