"""orthotorch.metrics: CMC top-k and mAP against brute force and scikit-learn; compatibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from orthotorch.metrics import (
    CompatibilityReport,
    cmc_top_k,
    compatibility_report,
    mean_average_precision,
    retrieval_metrics,
)
from orthotorch.nn.compatible import fit_orthogonal_transform


def brute_force(Q, yq, G, yg, ks, metric, exclude_self=False):
    """Pair-by-pair scores, no sorting: rank = #items scoring >= the best relevant score;
    precision of a relevant item = #relevant scoring >= it / #items scoring >= it."""
    Q, G = np.asarray(Q, dtype=np.float64), np.asarray(G, dtype=np.float64)
    tops, aps = {k: [] for k in ks}, []
    for i, q in enumerate(Q):
        scores, rel = [], []
        for j, g in enumerate(G):
            if exclude_self and i == j:
                continue
            if metric == "cosine":
                scores.append(float(q @ g) / (np.linalg.norm(q) * np.linalg.norm(g)))
            else:
                scores.append(-float(((q - g) ** 2).sum()))
            rel.append(yq[i] == yg[j])
        scores, rel = np.array(scores), np.array(rel)
        if not rel.any():
            continue
        rank = (scores >= scores[rel].max()).sum()
        for k in ks:
            tops[k].append(rank <= k)
        precisions = [(rel & (scores >= s)).sum() / (scores >= s).sum() for s in scores[rel]]
        aps.append(np.mean(precisions))
    return {f"top{k}": float(np.mean(v)) for k, v in tops.items()}, float(np.mean(aps))


def sklearn_map(Q, yq, G, yg, metric, exclude_self=False):
    Q, G = np.asarray(Q, dtype=np.float64), np.asarray(G, dtype=np.float64)
    if metric == "cosine":
        S = (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ (
            G / np.linalg.norm(G, axis=1, keepdims=True)
        ).T
    else:
        S = -((Q[:, None, :] - G[None, :, :]) ** 2).sum(-1)
    aps = []
    for i in range(len(Q)):
        keep = np.ones(len(G), dtype=bool)
        if exclude_self:
            keep[i] = False
        rel = np.asarray(yg)[keep] == yq[i]
        if rel.any():
            aps.append(average_precision_score(rel, S[i, keep]))
    return float(np.mean(aps))


def random_problem(n_query, n_gallery, dim, n_classes, seed, integer=False):
    rng = np.random.default_rng(seed)
    if integer:  # small integers: exact float64 arithmetic, hence many exact ties
        Q = rng.integers(-2, 3, size=(n_query, dim)).astype(np.float64)
        G = rng.integers(-2, 3, size=(n_gallery, dim)).astype(np.float64)
    else:
        Q = rng.standard_normal((n_query, dim))
        G = rng.standard_normal((n_gallery, dim))
    return Q, rng.integers(0, n_classes, n_query), G, rng.integers(0, n_classes, n_gallery)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("integer", [False, True], ids=["continuous", "ties"])
def test_against_brute_force_and_sklearn(metric, integer) -> None:
    Q, yq, G, yg = random_problem(40, 70, 3, 4, seed=7, integer=integer)
    if metric == "cosine" and integer:
        # Cosines of integer vectors round differently per formula, so exact ties come from
        # the 24 vertices of the 24-cell (+-e_i and (+-1/2)^4) times powers of two: every
        # normalisation and dot product is exact, and many cosines tie.
        rng = np.random.default_rng(8)
        signs = np.array(np.meshgrid(*[[-0.5, 0.5]] * 4)).reshape(4, -1).T
        cell = np.concatenate([np.eye(4), -np.eye(4), signs])
        scale = lambda n: 2.0 ** rng.integers(-2, 3, size=(n, 1))  # noqa: E731
        Q = cell[rng.integers(0, 24, 40)] * scale(40)
        G = cell[rng.integers(0, 24, 70)] * scale(70)
    if integer:  # the tie rule is really exercised: most queries see tied relevant items
        unit = lambda X: X / np.linalg.norm(X, axis=1, keepdims=True)  # noqa: E731
        S = unit(Q) @ unit(G).T if metric == "cosine" else -((Q[:, None] - G[None]) ** 2).sum(-1)
        tied = [len(np.unique(row[yg == c])) < len(row[yg == c]) for row, c in zip(S, yq)]
        assert np.mean(tied) > 0.5
    ks = (1, 3, 10)
    got = retrieval_metrics(Q, yq, G, yg, ks=ks, metric=metric, chunk_size=9)
    tops, ref_map = brute_force(Q, yq, G, yg, ks, metric)
    for k in ks:
        assert got[f"top{k}"] == pytest.approx(tops[f"top{k}"], abs=1e-12)
    assert got["mAP"] == pytest.approx(ref_map, abs=1e-12)
    assert got["mAP"] == pytest.approx(sklearn_map(Q, yq, G, yg, metric), abs=1e-12)
    assert got["num_queries"] == 40


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exclude_self_against_references(metric) -> None:
    X, y, _, _ = random_problem(50, 1, 4, 5, seed=3, integer=(metric == "euclidean"))
    got = retrieval_metrics(X, y, X, y, ks=(1, 5), metric=metric, exclude_self=True)
    tops, ref_map = brute_force(X, y, X, y, (1, 5), metric, exclude_self=True)
    assert got["top1"] == pytest.approx(tops["top1"], abs=1e-12)
    assert got["top5"] == pytest.approx(tops["top5"], abs=1e-12)
    assert got["mAP"] == pytest.approx(ref_map, abs=1e-12)
    assert got["mAP"] == pytest.approx(sklearn_map(X, y, X, y, metric, True), abs=1e-12)


def test_tie_block_is_retrieved_as_a_whole() -> None:
    """Distances 1 (relevant), 1 (not), 4 (relevant): the top block holds both ties."""
    q, G = [[0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]
    got = retrieval_metrics(np.array(q), [0], np.array(G), [0, 1, 0], ks=(1, 2), metric="euclidean")
    assert got["top1"] == 0.0 and got["top2"] == 1.0
    assert got["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # Gallery order must not matter, ties included.
    perm = [1, 2, 0]
    swapped = retrieval_metrics(
        np.array(q),
        [0],
        np.array(G)[perm],
        np.array([0, 1, 0])[perm],
        ks=(1, 2),
        metric="euclidean",
    )
    assert swapped == got


def test_known_average_precision() -> None:
    """Relevance pattern 1 0 1 0 0 down the ranking: AP = (1/1 + 2/3) / 2."""
    q = torch.tensor([[1.0, 0.0]])
    angles = torch.tensor([0.0, 0.3, 0.6, 0.9, 1.2])
    G = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([5, 1, 5, 2, 3])
    assert mean_average_precision(q, [5], G, labels) == pytest.approx(5 / 6)
    assert cmc_top_k(q, [1], G, labels, ks=(1, 2, 3)) == {1: 0.0, 2: 1.0, 3: 1.0}
    assert cmc_top_k(q, [3], G, labels, ks=5) == {5: 1.0}
    assert cmc_top_k(q, [3], G, labels, ks=(4, 100)) == {4: 0.0, 100: 1.0}


def test_leave_one_out_tiny() -> None:
    X = np.array([[0.0], [1.0], [10.0], [11.0]])
    y = np.array([0, 1, 0, 1])
    got = retrieval_metrics(X, y, X, y, ks=(1, 2, 3), metric="euclidean", exclude_self=True)
    assert got == pytest.approx(
        {"top1": 0.0, "top2": 0.5, "top3": 1.0, "mAP": 5 / 12, "num_queries": 4}
    )
    # Without exclusion every query finds itself first.
    assert retrieval_metrics(X, y, X, y, ks=1, metric="euclidean")["top1"] == 1.0


def test_queries_without_a_relevant_item_are_skipped() -> None:
    Q = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    G = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    yg = torch.tensor([0, 0, 1, 1, 2, 2])
    got = retrieval_metrics(Q, torch.tensor([0, 7, 2]), G, yg)
    ref = retrieval_metrics(Q[[0, 2]], torch.tensor([0, 2]), G, yg)
    assert got == ref and got["num_queries"] == 2


def test_string_labels_numpy_torch_and_chunking_agree() -> None:
    Q, yq, G, yg = random_problem(33, 50, 5, 3, seed=11)
    base = retrieval_metrics(Q, yq, G, yg, ks=(1, 5))
    names = np.array(["cat", "dog", "owl"])
    assert retrieval_metrics(Q, names[yq], G, list(names[yg]), ks=(1, 5)) == base
    assert retrieval_metrics(torch.from_numpy(Q).float(), torch.from_numpy(yq), G, yg) == (
        pytest.approx(base, abs=1e-6)
    )
    for chunk in (1, 7, 1000):
        assert retrieval_metrics(Q, yq, G, yg, ks=(1, 5), chunk_size=chunk) == base
    # Cosine ignores row scale.
    assert retrieval_metrics(3.0 * Q, yq, 0.1 * G, yg, ks=(1, 5)) == pytest.approx(base)


def test_errors_name_the_argument() -> None:
    Q, yq, G, yg = random_problem(4, 6, 3, 2, seed=0)
    with pytest.raises(ValueError, match="same embedding dim, got 3 and 2"):
        retrieval_metrics(Q, yq, G[:, :2], yg)
    with pytest.raises(ValueError, match="query must be non-empty"):
        retrieval_metrics(Q[:0], yq[:0], G, yg)
    with pytest.raises(ValueError, match="gallery must be non-empty"):
        retrieval_metrics(Q, yq, G[:, :0], yg)
    with pytest.raises(ValueError, match="gallery_labels has 5 labels but gallery has 6 rows"):
        retrieval_metrics(Q, yq, G, yg[:5])
    with pytest.raises(ValueError, match="query_labels must be 1-D"):
        retrieval_metrics(Q, yq[:, None], G, yg)
    with pytest.raises(ValueError, match="every k in ks must be an int >= 1, got 0"):
        retrieval_metrics(Q, yq, G, yg, ks=(1, 0))
    with pytest.raises(ValueError, match="every k in ks"):
        cmc_top_k(Q, yq, G, yg, ks=1.5)
    with pytest.raises(ValueError, match="ks must hold at least one"):
        cmc_top_k(Q, yq, G, yg, ks=())
    bad = Q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="query contains NaN or Inf"):
        retrieval_metrics(bad, yq, G, yg)
    with pytest.raises(ValueError, match="gallery contains NaN or Inf"):
        mean_average_precision(Q, yq, np.full_like(G, np.inf), yg)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(Q[0], yq, G, yg)
    with pytest.raises(ValueError, match="metric must be one of"):
        retrieval_metrics(Q, yq, G, yg, metric="manhattan")
    with pytest.raises(ValueError, match="same number of rows"):
        retrieval_metrics(Q, yq, G, yg, exclude_self=True)
    with pytest.raises(ValueError, match="gallery has 1 zero rows"):
        retrieval_metrics(Q, yq, np.vstack([G[:5], np.zeros(3)]), yg)
    with pytest.raises(ValueError, match="no query has a relevant gallery item"):
        retrieval_metrics(Q, np.full(4, 9), G, yg)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        retrieval_metrics(Q, yq, G, yg, chunk_size=0)
    with pytest.raises(TypeError, match="integer or string labels"):
        retrieval_metrics(Q, yq.astype(float), G, yg)
    with pytest.raises(TypeError, match=r"query must be a torch\.Tensor or numpy array"):
        retrieval_metrics(Q.tolist(), yq, G, yg)
    with pytest.raises(TypeError, match="exclude_self must be a bool"):
        retrieval_metrics(Q, yq, G, yg, exclude_self=1)
    # Inputs are left untouched on error and on success.
    Q0 = Q.copy()
    retrieval_metrics(Q, yq, G, yg, metric="cosine")
    np.testing.assert_array_equal(Q, Q0)


# ---------------------------------------------------------------- compatibility


def test_compatibility_report_rotated_space() -> None:
    """A new space that is a rotation of the old one: useless across models without a map,
    as good as a full re-index with the Procrustes map."""
    gen = torch.Generator().manual_seed(0)
    centers = 4.0 * torch.randn(5, 8, generator=gen, dtype=torch.float64)
    labels = torch.arange(5).repeat_interleave(40)
    old = centers[labels] + torch.randn(200, 8, generator=gen, dtype=torch.float64)
    R, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    new = old @ R.T
    q, g = slice(0, 200, 4), [i for i in range(200) if i % 4]
    report = compatibility_report(old[q], old[g], new[q], new[g], labels[q], labels[g], ks=(1, 5))
    assert isinstance(report, CompatibilityReport)
    assert report.new_new == pytest.approx(report.old_old)
    assert report.cross["mAP"] < report.old_old["mAP"] - 0.2
    assert not report.compatible
    Q = fit_orthogonal_transform(old, new)
    mapped = compatibility_report(
        old[q], old[g], new[q], new[g], labels[q], labels[g], gallery_transform=lambda x: x @ Q.T
    )
    assert mapped.cross == pytest.approx(mapped.old_old)
    assert mapped.compatible
    # The paper's direction: map new queries back into the old space instead.
    back = compatibility_report(
        old[q], old[g], new[q], new[g], labels[q], labels[g], query_transform=lambda x: x @ Q
    )
    assert back.cross == pytest.approx(back.old_old)


def test_compatibility_report_gain_and_table() -> None:
    report = CompatibilityReport(
        old_old={"top1": 0.5, "mAP": 0.4, "num_queries": 10},
        new_new={"top1": 0.9, "mAP": 0.8, "num_queries": 10},
        cross={"top1": 0.7, "mAP": 0.5, "num_queries": 10},
    )
    assert report.compatible
    assert report.gain("top1") == pytest.approx(0.5)
    assert report.gain() == pytest.approx(0.25)
    table = report.table().splitlines()
    assert table[0].split() == ["query/gallery", "top1", "mAP"]
    assert table[3].split() == ["new/old", "70.00", "50.00"]
    with pytest.raises(ValueError, match="key must be one of"):
        report.gain("num_queries")
    with pytest.raises(ValueError, match="same embedding dim"):
        compatibility_report(
            np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 4)), np.ones((2, 4)), [0, 1], [0, 1]
        )
    with pytest.raises(TypeError, match="gallery_transform must be callable"):
        compatibility_report(
            np.eye(2), np.eye(2), np.eye(2), np.eye(2), [0, 1], [0, 1], gallery_transform=3
        )


def test_cosine_ties_of_integer_codes_are_exact_and_chunk_independent() -> None:
    """Binary/ternary codes (hashing, quantised embeddings) have many mathematically equal
    cosines ``c / sqrt(|q|^2 |g|^2)``. Normalising the rows first made those ties depend on the
    rounding of the GEMM, whose order changes with the number of query rows: mAP changed with
    ``chunk_size`` (and with the size of the last chunk). The reference ranks each query's
    gallery exactly by the rational ``sign(c) c^2 / |g|^2`` (monotone in the cosine)."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    for values, dim in (((0.0, 1.0), 16), ((-1.0, 0.0, 1.0), 12)):
        Q = rng.choice(values, size=(40, dim))
        G = rng.choice(values, size=(300, dim))
        Q[(Q == 0).all(1), 0] = 1.0
        G[(G == 0).all(1), 0] = 1.0
        yq, yg = rng.integers(0, 4, 40), rng.integers(0, 4, 300)
        aps, tops = [], []
        for q, c in zip(Q.astype(int), yq):
            Gi = G.astype(int)
            keys = [Fraction(int(x) * abs(int(x)), int(g @ g)) for x, g in zip(Gi @ q, Gi)]
            dense = {v: i for i, v in enumerate(sorted(set(keys)))}
            S = np.array([dense[v] for v in keys], dtype=np.float64)
            rel = yg == c
            if rel.any():
                aps.append(average_precision_score(rel, S))
                tops.append((S >= S[rel].max()).sum() <= 5)
        results = [
            retrieval_metrics(Q, yq, G, yg, ks=(5,), chunk_size=cs) for cs in (1, 3, 7, None)
        ]
        for got in results:
            assert got["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)
            assert got["top5"] == pytest.approx(np.mean(tops), abs=1e-12)


def test_cosine_of_rows_with_extreme_norms_is_finite() -> None:
    """Rows of norm 1e-150 and 1e150 in one gallery: their cosine ranking must not underflow
    or overflow into NaN scores (scaling invariance of the cosine)."""
    G = np.array([[1e-150, 0.0], [0.0, 1e150], [1.0, 1.0]])
    Q = np.array([[1e150, 1e-150], [1e-150, 3e-150]])
    got = retrieval_metrics(Q, [0, 1], G, [0, 1, 1], ks=(1,))
    assert got == {"top1": 1.0, "mAP": 1.0, "num_queries": 2}


def test_negative_stride_numpy_embeddings_are_accepted() -> None:
    """Reversed numpy views (``X[::-1]``) are ordinary arrays but ``torch.from_numpy`` refuses
    negative strides: the metrics raised a torch error instead of evaluating them."""
    Q, yq, G, yg = random_problem(12, 20, 3, 3, seed=1)
    ref = retrieval_metrics(Q[::-1].copy(), yq[::-1], G[:, ::-1].copy(), yg, metric="euclidean")
    assert retrieval_metrics(Q[::-1], yq[::-1], G[:, ::-1], yg, metric="euclidean") == ref
    report = compatibility_report(Q[::-1], G, Q[::-1], G, yq[::-1], yg, query_transform=lambda x: x)
    assert report.cross == report.old_old


def test_euclidean_ranking_survives_a_large_common_offset() -> None:
    """The expanded ``|q|^2 + |g|^2 - 2 q.g`` cancels catastrophically when the embeddings share
    an offset much larger than their spread (un-centred features): at offset 1e5 and spread
    1e-3 the float64 scores were rounding noise and mAP was 0.33 instead of 0.375."""
    Q, yq, G, yg = random_problem(50, 80, 8, 3, seed=3)
    Q, G = Q * 1e-3 + 1e5, G * 1e-3 + 1e5
    got = retrieval_metrics(Q, yq, G, yg, metric="euclidean", ks=(1, 5))
    tops, ref_map = brute_force(Q, yq, G, yg, (1, 5), "euclidean")
    assert got["mAP"] == pytest.approx(ref_map, abs=1e-12)
    assert got["top1"] == pytest.approx(tops["top1"], abs=1e-12)
    assert got["top5"] == pytest.approx(tops["top5"], abs=1e-12)
    assert got["mAP"] == pytest.approx(sklearn_map(Q, yq, G, yg, "euclidean"), abs=1e-12)
    for scale in (1e-200, 1e200):  # squares of the raw values would underflow / overflow
        Qs, Gs = Q * scale, G * scale
        got = retrieval_metrics(Qs, yq, Gs, yg, metric="euclidean", ks=(1, 5))
        assert got["mAP"] == pytest.approx(ref_map, abs=1e-12)
