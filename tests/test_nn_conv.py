"""orthotorch.nn.conv: the OCNN penalty against explicit convolution matrices; existence rules."""

from __future__ import annotations

import pytest
import torch

from orthotorch.nn.conv import (
    OrthogonalConvExistence,
    conv_orthogonality,
    explicit_conv_matrix,
    orthogonal_conv_exists,
)


def gram_errors(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||A A^T - I||_F^2, ||A^T A - I||_F^2)`` of an explicit convolution matrix."""
    rows = torch.linalg.matrix_norm(A @ A.T - torch.eye(A.shape[0], dtype=A.dtype)) ** 2
    cols = torch.linalg.matrix_norm(A.T @ A - torch.eye(A.shape[1], dtype=A.dtype)) ** 2
    return rows, cols


def orthonormal(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """An ``m x n`` matrix with orthonormal rows (m <= n) or columns (m > n)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(max(m, n), min(m, n), generator=gen, dtype=torch.float64))
    return Q.T if m <= n else Q


# (M, C, k, S, n): RO and CO cases, odd and even k, S < k, S = k, S > k; n/S >= 2(k-1)//S + 1.
CIRCULAR = [(3, 2, 3, 1, 6), (2, 3, 3, 2, 6), (6, 1, 2, 2, 6), (5, 2, 4, 2, 8), (2, 1, 3, 1, 5)]
CIRCULAR += [(4, 1, 3, 2, 6), (1, 2, 2, 3, 6)]


@pytest.mark.parametrize(("M", "C", "k", "S", "n"), CIRCULAR)
def test_penalty_is_exact_orthogonality_measure_for_circular_padding(M, C, k, S, n) -> None:
    """Achour et al. Thm 2: ||KK^T - I||^2 = (n/S)^2 L_ocnn, ||K^TK - I||^2 = (n/S)^2 L_achour
    (here in the form that holds in both cases: L_achour + max(0, ..) = L_ocnn - (M - C S^2))."""
    K = torch.randn(M, C, k, k, dtype=torch.float64)
    rows, cols = gram_errors(explicit_conv_matrix(K, n, S, "circular"))
    ocnn = conv_orthogonality(K, S, check_exists=False)
    scale = (n / S) ** 2
    assert torch.allclose(rows, scale * ocnn, rtol=1e-10)
    assert torch.allclose(cols, scale * (ocnn - (M - C * S * S)), rtol=1e-10)
    achour = conv_orthogonality(K, S, "achour", check_exists=False)
    on_small_side = rows if M <= C * S * S else cols
    assert torch.allclose(on_small_side, scale * achour, rtol=1e-10)


@pytest.mark.parametrize(("M", "C", "S"), [(3, 1, 2), (4, 1, 2), (2, 2, 1), (9, 2, 2)])
def test_zero_on_non_overlapping_orthogonal_kernels(M, C, S) -> None:
    """k = S: the convolution is block diagonal with the (M, C S^2) kernel matrix as blocks."""
    K = orthonormal(M, C * S * S).reshape(M, C, S, S)
    rows, cols = gram_errors(explicit_conv_matrix(K, 2 * S, S, "circular"))
    if M <= C * S * S:
        assert rows < 1e-20 and conv_orthogonality(K, S) < 1e-24
    if M >= C * S * S:
        assert cols < 1e-20 and conv_orthogonality(K, S, "achour").abs() < 1e-12
    assert conv_orthogonality(1.1 * K, S, "achour") > 0.01


def test_centre_tap_kernel_is_orthogonal_for_every_padding() -> None:
    """A 3 x 3 kernel with only an orthogonal centre tap is a 1 x 1 orthogonal convolution."""
    K = torch.zeros(3, 3, 3, 3, dtype=torch.float64)
    K[:, :, 1, 1] = orthonormal(3, 3)
    assert conv_orthogonality(K) < 1e-24
    for padding in ("circular", "same"):
        rows, cols = gram_errors(explicit_conv_matrix(K, 5, 1, padding))
        assert rows < 1e-20 and cols < 1e-20


def lbfgs_minimise(K: torch.Tensor, loss, max_iter: int) -> torch.Tensor:
    """Minimise ``loss(K)`` over the leaf ``K`` in place; return the final loss."""
    opt = torch.optim.LBFGS(
        [K], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_change=1e-14
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss(K)
        value.backward()
        return value

    opt.step(closure)
    return loss(K).detach()


def small_side_gram_error(K: torch.Tensor, n: int, S: int, padding: str) -> torch.Tensor:
    A = explicit_conv_matrix(K, n, S, padding)
    G = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
    return torch.linalg.matrix_norm(G - torch.eye(len(G), dtype=G.dtype)) ** 2


def test_minimising_the_penalty_gives_an_orthogonal_overlapping_convolution() -> None:
    """S < k (shifted copies overlap): L-BFGS on the penalty alone reaches an orthogonal conv."""
    for M, C, k, S, n in [(2, 3, 3, 1, 5), (3, 1, 3, 2, 6)]:
        gen = torch.Generator().manual_seed(0)
        K = (torch.randn(M, C, k, k, generator=gen, dtype=torch.float64) / k).requires_grad_()
        assert lbfgs_minimise(K, lambda X, S=S: conv_orthogonality(X, S), 300) < 1e-8
        K = K.detach()
        assert K[:, :, 0].abs().max() > 1e-3  # uses more than the centre tap
        rows, _ = gram_errors(explicit_conv_matrix(K, n, S, "circular"))
        assert rows < 1e-6


def minimal_gram_error(C, M, k, S, padding, n, restarts=2) -> float:
    """min over K of the small-side ||Gram - I||^2 of the explicit matrix (L-BFGS, restarts)."""
    best = float("inf")
    for seed in range(restarts):
        gen = torch.Generator().manual_seed(seed)
        K = torch.randn(M, C, k, k, generator=gen, dtype=torch.float64) / (C * k * k) ** 0.5
        K.requires_grad_(True)
        value = lbfgs_minimise(K, lambda X: small_side_gram_error(X, n, S, padding), 200)
        best = min(best, float(value))
        if best < 1e-6:
            break
    return best


# (C, M, k, S, padding, n): each rule on both sides of its condition.
EXISTENCE = [
    (1, 3, 3, 2, "circular", 6),  # RO, M <= C k^2
    (1, 2, 1, 2, "circular", 4),  # RO, M > C k^2: no
    (1, 6, 2, 2, "circular", 4),  # CO, S <= k
    (1, 8, 1, 2, "circular", 4),  # CO, S > k: no
    (1, 2, 3, 1, "valid", 6),  # CO, k != S: no (circular: yes)
    (1, 6, 2, 2, "valid", 6),  # CO, k == S
    (1, 3, 3, 2, "valid", 7),  # RO as circular
    (1, 3, 3, 2, "same", 6),  # RO, M <= C min(S, (k+1)/2)^2
    (1, 5, 3, 3, "same", 9),  # RO, M > C min(S, (k+1)/2)^2 = 4: no (circular: yes)
    (1, 10, 3, 3, "same", 9),  # CO, S > (k+1)/2: no (circular: yes)
]


@pytest.mark.parametrize(("C", "M", "k", "S", "padding", "n"), EXISTENCE)
def test_existence_conditions_match_explicit_minimisation(C, M, k, S, padding, n) -> None:
    verdict = orthogonal_conv_exists(C, M, k, S, padding)
    best = minimal_gram_error(C, M, k, S, padding, n)
    if verdict:
        assert best < 1e-6, (verdict, best)
        assert verdict.kind == ("row" if M <= C * S * S else "column")
    else:
        # The loss is continuous and coercive, so no orthogonal kernel means a positive minimum.
        assert best > 0.5, (verdict, best)
        assert verdict.kind is None


def test_existence_result_object() -> None:
    assert orthogonal_conv_exists(64, 128, 3, 2).kind == "row"  # 128 <= 64 * 2^2
    yes = orthogonal_conv_exists(16, 128, 3, 2)
    assert isinstance(yes, OrthogonalConvExistence) and bool(yes) and yes.kind == "column"
    assert "CO case" in yes.reason and "satisfied" in yes.reason
    no = orthogonal_conv_exists(3, 64, 1, 2)
    assert not no and no.kind is None and "S=2 <= k=1" in no.reason
    assert orthogonal_conv_exists(16, 16, 3, 1).kind == "row"  # square: also column-orthogonal
    # Common ResNet layers are fine with circular padding, not with zero 'same' padding.
    assert orthogonal_conv_exists(64, 64, 3, 1, "circular")
    assert orthogonal_conv_exists(64, 64, 3, 1, "same")  # only as a 1x1 (centre-tap) kernel
    assert orthogonal_conv_exists(64, 64, 3, 1, "valid")  # fewer outputs than inputs: rows
    assert not orthogonal_conv_exists(16, 64, 3, 1, "valid")  # an isometry needs k == S


def test_same_padding_reason_quotes_the_right_bound() -> None:
    """The CO/'same' reason printed min(S, (k+1)/2) as (k+1)/2: "S=1 <= (k+1)/2=1" for k=5."""
    verdict = orthogonal_conv_exists(2, 4, 5, 1, "same")
    assert verdict and "S=1 <= (k+1)/2=3" in verdict.reason


def test_gradcheck() -> None:
    K = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda X: conv_orthogonality(X, 1), (K,))
    assert torch.autograd.gradcheck(lambda X: conv_orthogonality(X, 2, "achour"), (K,))
    E = torch.randn(2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda X: conv_orthogonality(X, 1), (E,))


def test_half_precision_kernel() -> None:
    K = torch.zeros(4, 4, 3, 3)
    K[:, :, 1, 1] = orthonormal(4, 4).float()
    value = conv_orthogonality(K.to(torch.bfloat16))
    assert value.dtype == torch.bfloat16 and float(value) < 0.05


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: conv_orthogonality(torch.randn(4, 4, 3)), "4-D conv2d kernel"),
        (lambda: conv_orthogonality(torch.randn(4, 4, 3, 2)), "square"),
        (lambda: conv_orthogonality(torch.randn(4, 4, 3, 3), stride=0), "stride must be"),
        (lambda: conv_orthogonality(torch.randn(4, 4, 3, 3), stride=1.5), "stride must be"),
        (lambda: conv_orthogonality(torch.randn(4, 4, 3, 3), variant="x"), "variant must be"),
        (lambda: conv_orthogonality(torch.full((2, 2, 3, 3), float("nan"))), "NaN or Inf"),
        (lambda: conv_orthogonality(torch.ones(2, 2, 3, 3, dtype=torch.int32)), "floating"),
        (lambda: conv_orthogonality([[1.0]]), "must be a torch.Tensor"),
        (lambda: conv_orthogonality(torch.randn(8, 1, 1, 1), stride=2), "no orthogonal conv"),
        (lambda: conv_orthogonality(torch.randn(10, 1, 3, 3), stride=1), None),
        (lambda: orthogonal_conv_exists(2, 2, 3, 1, "reflect"), "padding must be one of"),
        (lambda: orthogonal_conv_exists(2, 2, 4, 1, "same"), "odd kernel_size"),
        (lambda: orthogonal_conv_exists(0, 2, 3), "in_channels must be a positive int"),
        (lambda: explicit_conv_matrix(torch.randn(2, 2, 3, 3), 5, 2), "stride | n"),
    ],
)
def test_bad_input(call, match) -> None:
    if match is None:  # a valid call (M > C k^2 but CO with S <= k): must not raise
        assert call() > 0
        return
    with pytest.raises((ValueError, TypeError), match=match):
        call()
