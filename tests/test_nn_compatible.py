"""orthotorch.nn.compatible: λ-orthogonality, OrthogonalTransform, Procrustes reference."""

from __future__ import annotations

import pytest
import torch

from orthotorch.nn.compatible import (
    OrthogonalTransform,
    fit_orthogonal_transform,
    lambda_orthogonality,
    train_orthogonal_transform,
)


def explicit_lambda_orthogonality(W: torch.Tensor, lam: float, alpha: float) -> torch.Tensor:
    """Loop over the batch with the textbook formula, small side chosen by hand."""
    total = torch.zeros((), dtype=W.dtype)
    for M in W.reshape(-1, *W.shape[-2:]):
        G = M.T @ M if M.shape[0] > M.shape[1] else M @ M.T
        d = torch.linalg.matrix_norm(G - torch.eye(G.shape[0], dtype=W.dtype))
        total = total + torch.sigmoid(torch.tensor(alpha * (float(d) - lam))) * d
    return total


def paired_embeddings(n: int, old_dim: int, new_dim: int, noise: float, seed: int = 0):
    """Old embeddings and new = old mapped by a random isometry (det +1 completion) + noise."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, old_dim, generator=gen, dtype=torch.float64)
    Q0, _ = torch.linalg.qr(torch.randn(new_dim, old_dim, generator=gen, dtype=torch.float64))
    Y = X @ Q0.T + noise * torch.randn(n, new_dim, generator=gen, dtype=torch.float64)
    return X, Y, Q0


def rel_error(A: torch.Tensor, B: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(B))


# ---------------------------------------------------------------- lambda_orthogonality


@pytest.mark.parametrize("shape", [(5, 5), (3, 7), (7, 3), (2, 4, 6)])
@pytest.mark.parametrize(("lam", "alpha"), [(12.0, 1.0), (0.5, 3.0), (0.0, 1.0)])
def test_lambda_orthogonality_matches_formula(shape, lam, alpha) -> None:
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = lambda_orthogonality(W, lam, alpha)
    assert got.shape == ()
    torch.testing.assert_close(got, explicit_lambda_orthogonality(W, lam, alpha))


def test_lambda_orthogonality_band() -> None:
    """Inside the band the penalty is ~sigmoid(-alpha*lam) * d; far outside it is ~d."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    near = Q * 1.05  # d = ||1.1025 I - I||_F = 0.1025 * 4 = 0.41
    d_near = 0.1025 * 4
    assert float(lambda_orthogonality(near, lam=12.0)) < 1e-5 * d_near
    far = Q * 3.0  # d = 8 * 4 = 32 > 12
    torch.testing.assert_close(
        lambda_orthogonality(far, lam=12.0),
        torch.tensor(32.0 * float(torch.sigmoid(torch.tensor(20.0))), dtype=torch.float64),
    )
    assert float(lambda_orthogonality(Q)) < 1e-18


def test_lambda_orthogonality_gradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    W = (0.4 * torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: lambda_orthogonality(w, 1.0, 2.0), (W,))
    assert torch.autograd.gradgradcheck(lambda w: lambda_orthogonality(w, 1.0, 2.0), (W,))
    T = (0.4 * torch.randn(6, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: lambda_orthogonality(w, 0.0, 1.0), (T,))


def test_lambda_orthogonality_gradient_finite_at_exact_orthogonality() -> None:
    """||.||_F has no derivative at 0; a naive norm gives NaN gradients at an orthogonal W."""
    W = torch.eye(4, 6, requires_grad=True)
    (W @ W.T - torch.eye(4)).square().sum().sqrt().backward()
    assert torch.isnan(W.grad).all()  # the trap is real
    for W0 in (torch.eye(4, 6), torch.eye(6, 4), torch.eye(5).expand(3, 5, 5)):
        for dtype in (torch.float32, torch.float64):
            W = W0.to(dtype).clone().requires_grad_()
            loss = lambda_orthogonality(W, lam=0.0)
            loss.backward()
            assert torch.isfinite(W.grad).all()
            assert float(loss.detach()) == 0.0


def test_lambda_orthogonality_errors() -> None:
    W = torch.randn(3, 3)
    with pytest.raises(TypeError, match=r"weight must be a torch\.Tensor"):
        lambda_orthogonality(W.numpy())
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        lambda_orthogonality(torch.randn(3))
    with pytest.raises(ValueError, match="real floating-point"):
        lambda_orthogonality(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        lambda_orthogonality(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        lambda_orthogonality(W, lam=-1.0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        lambda_orthogonality(W, alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        lambda_orthogonality(W, alpha=float("inf"))


# ---------------------------------------------------------------- Procrustes


def test_procrustes_recovers_isometry_and_is_optimal() -> None:
    X, Y, Q0 = paired_embeddings(300, 6, 9, noise=0.0)
    Q = fit_orthogonal_transform(X, Y)
    assert Q.shape == (9, 6) and Q.dtype == torch.float64
    torch.testing.assert_close(Q, Q0)
    # With noise, no other isometry (random perturbations, re-orthogonalised) does better.
    X, Y, _ = paired_embeddings(300, 6, 9, noise=0.5)
    Q = fit_orthogonal_transform(X, Y)
    torch.testing.assert_close(Q.T @ Q, torch.eye(6, dtype=torch.float64))
    best = rel_error(X @ Q.T, Y)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        R, _ = torch.linalg.qr(Q + 0.05 * torch.randn(9, 6, generator=gen, dtype=torch.float64))
        R = R * torch.sign(torch.diagonal(R.T @ Q))  # QR's sign choice away from Q
        assert rel_error(X @ R.T, Y) >= best - 1e-12


def test_procrustes_errors() -> None:
    X = torch.randn(10, 4)
    with pytest.raises(ValueError, match="same number of rows"):
        fit_orthogonal_transform(X, torch.randn(9, 4))
    with pytest.raises(ValueError, match="must be >= old_dim"):
        fit_orthogonal_transform(X, torch.randn(10, 3))
    with pytest.raises(ValueError, match="old_emb contains NaN"):
        fit_orthogonal_transform(torch.full((10, 4), float("nan")), X)
    with pytest.raises(ValueError, match="non-empty"):
        fit_orthogonal_transform(torch.randn(0, 4), torch.randn(0, 4))
    with pytest.raises(TypeError, match=r"new_emb must be a torch\.Tensor"):
        fit_orthogonal_transform(X, X.numpy())


# ---------------------------------------------------------------- OrthogonalTransform


@pytest.mark.parametrize("constraint", ["relaxed", "exact"])
def test_transform_starts_at_canonical_embedding(constraint) -> None:
    T = OrthogonalTransform(3, 5, constraint=constraint, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    y = T(x)
    assert y.shape == (4, 2, 5)
    torch.testing.assert_close(y[..., :3], x)
    assert torch.count_nonzero(y[..., 3:]) == 0
    assert T.orthogonality_error() == 0.0
    assert float(T.penalty().detach()) == 0.0


@pytest.mark.parametrize(("old_dim", "new_dim"), [(5, 5), (4, 7)])
def test_exact_transform_is_orthogonal_for_any_parameter(old_dim, new_dim) -> None:
    T = OrthogonalTransform(old_dim, new_dim, constraint="exact", dtype=torch.float64)
    with torch.no_grad():
        T.skew.copy_(3.0 * torch.randn(new_dim, new_dim, dtype=torch.float64))
    assert T.orthogonality_error() < 1e-12
    x = torch.randn(50, old_dim, dtype=torch.float64)
    torch.testing.assert_close(torch.cdist(T(x), T(x)), torch.cdist(x, x))
    torch.testing.assert_close(T(x) @ T(x).T, x @ x.T)


def test_exact_transform_gradcheck() -> None:
    T = OrthogonalTransform(3, 4, constraint="exact", dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)

    def f(P):
        B = torch.linalg.matrix_exp(P - P.mT)
        return x @ B[:, :3].mT

    P = (0.3 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(f, (P,))
    with torch.no_grad():
        T.skew.copy_(P)
    torch.testing.assert_close(T(x), f(P.detach()))


def test_relaxed_training_approaches_procrustes() -> None:
    """Strong small-band penalty: trained relaxed map ~ the closed-form isometry."""
    X, Y, _ = paired_embeddings(400, 6, 8, noise=0.3, seed=1)
    procrustes = rel_error(X @ fit_orthogonal_transform(X, Y).T, Y)
    T = OrthogonalTransform(6, 8, constraint="relaxed", lam=0.0, dtype=torch.float64)
    history = train_orthogonal_transform(T, X, Y, steps=400, lr=0.05, penalty_weight=10.0)
    assert history[-1] < history[0]
    trained = rel_error(T(X).detach(), Y)
    assert abs(trained - procrustes) < 0.02 * procrustes, (trained, procrustes)
    assert T.orthogonality_error() < 0.05


def test_relaxed_band_lies_between_least_squares_and_procrustes() -> None:
    """With the paper's lam=12 the map adapts: alignment no worse than Procrustes, not better
    than the unconstrained least-squares map, while staying near-orthogonal."""
    gen = torch.Generator().manual_seed(2)
    X, Y, _ = paired_embeddings(400, 6, 8, noise=0.3, seed=2)
    Y = Y @ torch.diag(1.0 + 0.2 * torch.rand(8, generator=gen, dtype=torch.float64))
    procrustes = rel_error(X @ fit_orthogonal_transform(X, Y).T, Y)
    least_squares = rel_error(X @ torch.linalg.lstsq(X, Y).solution, Y)
    T = OrthogonalTransform(6, 8, constraint="relaxed", dtype=torch.float64)
    train_orthogonal_transform(T, X, Y, steps=400, lr=0.05)
    trained = rel_error(T(X).detach(), Y)
    assert least_squares - 1e-6 <= trained <= procrustes, (least_squares, trained, procrustes)
    assert float(T.penalty().detach()) < 1e-3


@pytest.mark.parametrize(("old_dim", "new_dim"), [(6, 6), (6, 9)])
def test_exact_training_reaches_procrustes(old_dim, new_dim) -> None:
    X, Y, Q0 = paired_embeddings(300, old_dim, new_dim, noise=0.3, seed=4)
    if old_dim == new_dim and torch.linalg.det(Q0) < 0:
        Y[:, 0] = -Y[:, 0]  # a rotation target: exp(skew) cannot reach a reflection
    procrustes = rel_error(X @ fit_orthogonal_transform(X, Y).T, Y)
    T = OrthogonalTransform(old_dim, new_dim, constraint="exact", dtype=torch.float64)
    train_orthogonal_transform(T, X, Y, steps=300, lr=0.05)
    trained = rel_error(T(X).detach(), Y)
    assert trained < procrustes * 1.01, (trained, procrustes)
    assert T.orthogonality_error() < 1e-10


def test_transform_bias_and_repr() -> None:
    T = OrthogonalTransform(2, 3, bias=True)
    assert T.bias is not None and T.bias.shape == (3,)
    assert "constraint='relaxed'" in repr(T)
    assert OrthogonalTransform(4).new_dim == 4


def test_transform_errors() -> None:
    with pytest.raises(ValueError, match="old_dim must be a positive int"):
        OrthogonalTransform(0, 3)
    with pytest.raises(ValueError, match="new_dim must be a positive int"):
        OrthogonalTransform(3, 2.5)
    with pytest.raises(ValueError, match=r"new_dim \(2\) must be >= old_dim \(3\)"):
        OrthogonalTransform(3, 2)
    with pytest.raises(ValueError, match="constraint must be one of"):
        OrthogonalTransform(3, 4, constraint="cayley")
    with pytest.raises(ValueError, match="lam must be"):
        OrthogonalTransform(3, 4, lam=float("nan"))
    T = OrthogonalTransform(3, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., old_dim=3\)"):
        T(torch.randn(5, 4))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        T([1.0, 2.0, 3.0])
    X = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"new_emb must have shape \(N >= 1, 4\)"):
        train_orthogonal_transform(T, X, torch.randn(10, 3))
    with pytest.raises(ValueError, match="same number of rows"):
        train_orthogonal_transform(T, X, torch.randn(9, 4))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train_orthogonal_transform(T, X, torch.randn(10, 4), steps=0)
    with pytest.raises(ValueError, match="old_emb contains NaN"):
        train_orthogonal_transform(T, torch.full((10, 3), float("nan")), torch.randn(10, 4))
    with pytest.raises(TypeError, match="transform must be an OrthogonalTransform"):
        train_orthogonal_transform(torch.nn.Linear(3, 4), X, torch.randn(10, 4))
    before = T.weight.detach().clone()
    with pytest.raises(ValueError, match="lr must be"):
        train_orthogonal_transform(T, X, torch.randn(10, 4), lr=-1.0)
    torch.testing.assert_close(T.weight.detach(), before)
