"""orthotorch.nn.losses: OPL against hand-computed and brute-force values; EBV heads."""

from __future__ import annotations

import math

import pytest
import torch

from orthotorch.nn.losses import (
    EquiangularClassifier,
    OrthogonalProjectionLoss,
    equiangular_basis_vectors,
    orthogonal_projection_loss,
    welch_bound,
)


def reference_opl(features: torch.Tensor, labels: torch.Tensor, gamma: float) -> float:
    """Pair-by-pair loop of Ranasinghe et al. eq. 4."""
    f = [v / v.norm() for v in features.double()]
    same, diff = [], []
    for i in range(len(f)):
        for j in range(len(f)):
            if i == j:
                continue
            (same if labels[i] == labels[j] else diff).append(float(f[i] @ f[j]))
    s = sum(same) / len(same) if same else 0.0
    d = sum(diff) / len(diff) if diff else 0.0
    return (1 - s) + gamma * abs(d)


def test_opl_hand_computed() -> None:
    features = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    # s = cos(f0, f1) = 1/sqrt(2); d = mean(0, 0, 1/sqrt(2), 1/sqrt(2)) = 1/(2 sqrt(2)).
    expected = 1 - 1 / math.sqrt(2) + 0.5 / (2 * math.sqrt(2))
    assert orthogonal_projection_loss(features, labels).item() == pytest.approx(expected, 1e-12)
    assert orthogonal_projection_loss(features, labels, gamma=0.0).item() == pytest.approx(
        1 - 1 / math.sqrt(2), 1e-12
    )


@pytest.mark.parametrize("seed", range(4))
def test_opl_matches_pairwise_reference_and_bounds(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(24, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (24,), generator=gen)
    value = orthogonal_projection_loss(features, labels, gamma=0.7)
    assert value.item() == pytest.approx(reference_opl(features, labels, 0.7), rel=1e-12)
    assert 0.0 <= value.item() <= 2.7
    # Cosines ignore per-sample positive scaling.
    scale = torch.rand(24, 1, generator=gen, dtype=torch.float64) + 0.1
    assert torch.allclose(orthogonal_projection_loss(features * scale, labels, 0.7), value)


def test_opl_zero_for_parallel_classes_on_orthogonal_directions() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    features = torch.eye(5, dtype=torch.float64)[labels] * torch.arange(1.0, 8.0).unsqueeze(1)
    assert orthogonal_projection_loss(features, labels).abs() < 1e-15


def test_opl_degenerate_batches() -> None:
    features = torch.randn(4, 3, dtype=torch.float64)
    distinct = torch.arange(4)
    assert orthogonal_projection_loss(features, distinct).item() == pytest.approx(
        reference_opl(features, distinct, 0.5)
    )  # no same-class pair: s = 0
    one_class = torch.zeros(4, dtype=torch.long)
    assert orthogonal_projection_loss(features, one_class).item() == pytest.approx(
        reference_opl(features, one_class, 0.5)
    )  # no different-class pair: d = 0
    with_zero = torch.cat([features, torch.zeros(1, 3, dtype=torch.float64)])
    value = orthogonal_projection_loss(with_zero, torch.tensor([0, 0, 1, 1, 1]))
    assert torch.isfinite(value)


def test_opl_gradcheck_and_module() -> None:
    features = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 2, 0])
    assert torch.autograd.gradcheck(
        lambda f: orthogonal_projection_loss(f, labels, 0.3), (features,)
    )
    module = OrthogonalProjectionLoss(gamma=0.3)
    assert torch.equal(module(features, labels), orthogonal_projection_loss(features, labels, 0.3))
    assert "gamma=0.3" in repr(module)


def minimise_opl(inter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-class and different-class cosines after minimising OPL alone over free features."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(6)
    features = torch.randn(24, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([features], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = orthogonal_projection_loss(features, labels, inter=inter)
        loss.backward()
        opt.step()
    assert loss.item() < 1e-2
    f = torch.nn.functional.normalize(features.detach())
    cos = f @ f.T
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    return cos[same], cos[~same]


def test_opl_minimum_collapses_classes_and_mean_abs_makes_them_orthogonal() -> None:
    same, _ = minimise_opl("abs_mean")
    assert same.min() > 0.98
    same, different = minimise_opl("mean_abs")
    assert same.min() > 0.98 and different.abs().max() < 0.05


def test_opl_abs_mean_minimum_can_cancel_signed_cosines() -> None:
    """Regression note: with signed features |mean cos| = 0 does not imply orthogonal classes."""
    labels = torch.tensor([0, 1, 2])  # no same-class pair: the s term is the constant 1
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    # Different-class cosines: 0, -1/sqrt2, 1/sqrt2 (each twice): mean 0 but not orthogonal.
    assert orthogonal_projection_loss(features, labels, inter="abs_mean").item() == pytest.approx(
        1.0, abs=1e-12
    )
    assert orthogonal_projection_loss(features, labels, inter="mean_abs").item() == pytest.approx(
        1.0 + 0.5 * (2 / 3) / math.sqrt(2), abs=1e-12
    )


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: orthogonal_projection_loss(torch.randn(4), torch.zeros(4)), r"\(B, D\)"),
        (lambda: orthogonal_projection_loss(torch.randn(4, 2), torch.zeros(3)), "labels must"),
        (lambda: orthogonal_projection_loss(torch.randn(4, 2), torch.zeros(4)), "integer"),
        (lambda: orthogonal_projection_loss(torch.randn(2, 2), torch.zeros(2).long(), -1), "gamma"),
        (
            lambda: orthogonal_projection_loss(torch.full((2, 2), math.inf), torch.zeros(2).long()),
            "NaN or Inf",
        ),
        (lambda: orthogonal_projection_loss([[1.0]], torch.zeros(1)), "torch.Tensors"),
        (lambda: OrthogonalProjectionLoss(gamma=float("nan")), "gamma"),
        (lambda: OrthogonalProjectionLoss(inter="max"), "inter must be one of"),
    ],
)
def test_opl_bad_input(call, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize(("N", "d"), [(10, 10), (5, 32), (1, 3)])
def test_ebv_is_orthonormal_when_classes_fit(N: int, d: int) -> None:
    V = equiangular_basis_vectors(N, d, dtype=torch.float64)
    assert V.shape == (N, d)
    assert torch.allclose(V @ V.T, torch.eye(N, dtype=torch.float64), atol=1e-12)


def test_ebv_meets_threshold_above_welch_bound() -> None:
    N, d = 20, 8
    bound = welch_bound(N, d)
    assert bound == pytest.approx(math.sqrt(12 / (8 * 19)))
    V = equiangular_basis_vectors(N, d, max_cos=0.4)
    assert torch.allclose(V.norm(dim=1), torch.ones(N), atol=1e-6)
    worst = (V @ V.T - torch.eye(N)).abs().max().item()
    assert bound <= worst <= 0.4 + 1e-6
    # Random unit vectors in R^8 are far from that.
    R = torch.nn.functional.normalize(torch.randn(N, d, generator=torch.Generator().manual_seed(0)))
    assert (R @ R.T - torch.eye(N)).abs().max() > 0.6


def test_ebv_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    A = equiangular_basis_vectors(12, 4, steps=50, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(A, equiangular_basis_vectors(12, 4, steps=50, seed=3))
    assert not torch.equal(A, equiangular_basis_vectors(12, 4, steps=50, seed=4))


def test_ebv_impossible_or_unreached_threshold() -> None:
    with pytest.raises(ValueError, match="below the Welch bound"):
        equiangular_basis_vectors(20, 8, max_cos=0.2)
    with pytest.raises(ValueError, match="not reached in 1 steps"):
        equiangular_basis_vectors(20, 8, max_cos=0.29, steps=1)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        equiangular_basis_vectors(0, 8)
    with pytest.raises(ValueError, match="dtype"):
        equiangular_basis_vectors(3, 8, dtype=torch.int64)


def test_equiangular_classifier() -> None:
    head = EquiangularClassifier(8, 20, temperature=0.5, max_cos=0.4)
    assert list(head.parameters()) == [] and "basis" in head.state_dict()
    # Each class vector (at any scale) is classified as its own class.
    logits = head(3.0 * head.basis)
    assert torch.equal(logits.argmax(dim=1), torch.arange(20))
    assert torch.allclose(logits.diagonal(), torch.full((20,), 2.0), atol=1e-5)
    features = torch.randn(5, 8, requires_grad=True)
    out = head(features)
    assert out.shape == (5, 20)
    out.sum().backward()
    assert features.grad is not None
    expected = torch.nn.functional.normalize(features.detach()) @ head.basis.T / 0.5
    assert torch.allclose(out.detach(), expected)
    with pytest.raises(ValueError, match="last dimension 8"):
        head(torch.randn(5, 7))
    with pytest.raises(ValueError, match="temperature"):
        EquiangularClassifier(8, 4, temperature=0.0)
