"""The DCT-II basis, the FFT-based DCT against the dense product, and column selection."""

from __future__ import annotations

import math

import pytest
import torch

from orthotorch.linalg import (
    column_scores,
    dct,
    dct_basis,
    dct_column_scores,
    select_columns,
)

SIZES = [1, 2, 7, 8, 64, 255, 512]


@pytest.mark.parametrize("n", SIZES)
def test_basis_is_orthonormal(n: int) -> None:
    Q = dct_basis(n)
    assert Q.dtype == torch.float32
    err = (Q.T @ Q - torch.eye(n)).abs().max()
    assert err < 1e-5


def test_basis_matches_formula_and_is_cached() -> None:
    n = 16
    Q = dct_basis(n, torch.float64)
    i, j = 3, 5
    expected = math.sqrt(2 / n) * math.cos(math.pi * j * (2 * i + 1) / (2 * n))
    assert Q[i, j].item() == pytest.approx(expected, abs=1e-15)
    assert torch.allclose(Q[:, 0], torch.full((n,), n**-0.5, dtype=torch.float64))
    assert dct_basis(n, torch.float64) is Q
    assert dct_basis(n, torch.float64, "cpu") is Q
    assert dct_basis(n, torch.float32) is not Q


def test_basis_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="n must be a positive int"):
        dct_basis(0)


@pytest.mark.parametrize("n", SIZES)
def test_fft_dct_equals_dense_product(n: int) -> None:
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(dct(x), x @ dct_basis(n, torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_fft_scores_equal_dense_scores(n: int, norm: str) -> None:
    G = torch.randn(2, 9, n, dtype=torch.float64)
    fast = dct_column_scores(G, norm)
    dense = column_scores(G, dct_basis(n, torch.float64), norm)
    torch.testing.assert_close(fast, dense, rtol=1e-10, atol=1e-10)


def test_fft_scores_float32_and_transposed_input() -> None:
    """The optimizer scores ``X^T`` views (non-contiguous); float32 rounding stays small."""
    G = torch.randn(96, 40)
    fast = dct_column_scores(G.mT)
    dense = column_scores(G.mT.double(), dct_basis(96, torch.float64))
    torch.testing.assert_close(fast.double(), dense, rtol=1e-4, atol=1e-4)
    # bf16 gradients are scored in float32.
    assert dct_column_scores(G.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("fast", [True, False], ids=["fft", "dense"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_selection_recovers_columns_of_an_exactly_low_rank_gradient(fast: bool, norm: str) -> None:
    n, rank = 128, 6
    chosen = torch.tensor([0, 3, 17, 64, 100, 127])
    Q = dct_basis(n)
    G = torch.randn(50, rank) @ Q[:, chosen].T  # every row lies in the span of the chosen columns
    scores, idx = select_columns(G, None if fast else Q, rank, norm=norm)
    assert idx.dtype == torch.int32
    assert idx.tolist() == chosen.tolist()
    assert scores.shape == (n,)
    others = torch.ones(n, dtype=torch.bool)
    others[chosen] = False
    assert scores[others].max() < 1e-4 * scores[chosen].min()


def test_selection_is_batched_and_sorted() -> None:
    G = torch.randn(4, 10, 32)
    scores, idx = select_columns(G, None, 5)
    assert idx.shape == (4, 5)
    assert (idx.diff(dim=-1) > 0).all()
    for b in range(4):
        expected = torch.topk(scores[b], 5).indices.sort().values
        assert idx[b].tolist() == expected.tolist()


@pytest.mark.parametrize("rank", [0, 33, 2.0, True])
def test_selection_rejects_bad_rank(rank) -> None:
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 32\]"):
        select_columns(torch.randn(4, 32), None, rank)


def test_selection_rejects_bad_norm_and_basis() -> None:
    with pytest.raises(ValueError, match="norm must be one of"):
        select_columns(torch.randn(4, 8), None, 2, norm="max")
    with pytest.raises(ValueError, match="basis must be 8x8"):
        select_columns(torch.randn(4, 8), torch.eye(4), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_rows_give_zero_scores(dtype: torch.dtype) -> None:
    """Regression: MKL's FFT raised on a 0-row input, which an FSDP2 row shard can be when a
    tall weight has fewer rows than ranks; the empty shard must simply contribute nothing."""
    G = torch.zeros(0, 12, dtype=dtype)
    assert dct(G).shape == (0, 12)
    scores = dct_column_scores(G)
    assert scores.shape == (12,) and scores.dtype == dtype
    assert torch.equal(scores, torch.zeros(12, dtype=dtype))
