"""orthotorch.nn.regularizers: penalties against explicit/SVD references, gradcheck, the module."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from orthotorch.nn.regularizers import (
    PENALTY_KINDS,
    OrthogonalityPenalty,
    orthoreg,
    soft_orthogonality,
    spectral_restricted_isometry,
)

SHAPES = [(5, 5), (4, 9), (9, 4), (3, 4, 7), (2, 3, 6, 2)]


def semi_orthogonal(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    *lead, m, n = shape
    Q, _ = torch.linalg.qr(
        torch.randn(*lead, max(m, n), min(m, n), generator=gen, dtype=torch.float64)
    )
    return Q if m >= n else Q.mT


def reference_soft(W: torch.Tensor) -> torch.Tensor:
    """Per-matrix loop with the Gram on the small side, spelled out."""
    total = torch.zeros((), dtype=torch.float64)
    for M in W.reshape(-1, *W.shape[-2:]):
        G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
        total = total + torch.linalg.matrix_norm(G - torch.eye(len(G), dtype=G.dtype)) ** 2
    return total


def reference_srip(W: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for M in W.reshape(-1, *W.shape[-2:]):
        G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
        total = total + torch.linalg.matrix_norm(G - torch.eye(len(G), dtype=G.dtype), ord=2)
    return total


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_soft_zero_on_semi_orthogonal_and_matches_reference(shape) -> None:
    Q = semi_orthogonal(*shape)
    assert soft_orthogonality(Q) < 1e-24
    W = torch.randn(*shape, dtype=torch.float64)
    assert torch.allclose(soft_orthogonality(W), reference_soft(W), rtol=1e-12)


def test_soft_invariant_under_rotations() -> None:
    W = torch.randn(6, 10, dtype=torch.float64)
    U = semi_orthogonal(6, 6, seed=1)
    V = semi_orthogonal(10, 10, seed=2)
    base = soft_orthogonality(W)
    for rotated in (U @ W, W @ V, U @ W @ V, (U @ W @ V).T):
        assert torch.allclose(soft_orthogonality(rotated), base, rtol=1e-12)


def test_batched_equals_sum_of_singles() -> None:
    W = torch.randn(4, 5, 8, dtype=torch.float64)
    W0 = torch.randn(4, 5, 8, dtype=torch.float64)
    for fn in (soft_orthogonality, lambda X: spectral_restricted_isometry(X, n_iter=200)):
        assert torch.allclose(fn(W), sum(fn(w) for w in W), rtol=1e-10)
    assert torch.allclose(orthoreg(W, W0), sum(orthoreg(w, w0) for w, w0 in zip(W, W0)))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_srip_matches_svd(shape) -> None:
    W = torch.randn(*shape, dtype=torch.float64) / shape[-1] ** 0.5
    assert torch.allclose(spectral_restricted_isometry(W, n_iter=500), reference_srip(W), rtol=1e-6)
    assert spectral_restricted_isometry(semi_orthogonal(*shape)) < 1e-12


def test_srip_is_a_lower_bound_that_warm_starts_improve() -> None:
    W = torch.randn(20, 30, dtype=torch.float64) / 30**0.5
    exact = reference_srip(W)
    u = torch.randn(20, dtype=torch.float64)
    cold = spectral_restricted_isometry(W, n_iter=1)
    values = [float(spectral_restricted_isometry(W, n_iter=1, u=u)) for _ in range(200)]
    assert cold <= exact + 1e-12 and max(values) <= exact + 1e-12
    assert values[-1] > float(cold) and abs(values[-1] - exact) < 1e-6
    assert torch.allclose(torch.linalg.vector_norm(u), torch.tensor(1.0, dtype=torch.float64))


def test_srip_gradient_is_the_top_eigenvector_term() -> None:
    """At convergence d sigma = v^T dA v with A = W W^T - I, i.e. grad = 2 s v v^T W."""
    W = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    spectral_restricted_isometry(W, n_iter=500).backward()
    A = W.detach() @ W.detach().T - torch.eye(5, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(A)
    i = int(evals.abs().argmax())
    v = evecs[:, i : i + 1]
    expected = 2 * torch.sign(evals[i]) * v @ v.T @ W.detach()
    assert torch.allclose(W.grad, expected, atol=1e-8)


def test_orthoreg_is_soft_orthogonality_of_the_delta() -> None:
    W0 = torch.randn(6, 4, dtype=torch.float64)
    Q = semi_orthogonal(6, 4)
    assert orthoreg(W0 + Q, W0) < 1e-24
    W = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    W0.requires_grad_(True)
    value = orthoreg(W, W0)
    assert torch.allclose(value, soft_orthogonality(W.detach() - W0.detach()))
    value.backward()
    assert W0.grad is None  # the pre-trained reference is a constant


@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (2, 3, 5)], ids=lambda s: "x".join(map(str, s)))
def test_gradcheck(shape) -> None:
    W = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    W0 = torch.randn(*shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(soft_orthogonality, (W,))
    assert torch.autograd.gradcheck(lambda X: orthoreg(X, W0), (W,))
    # Converged power iteration: the detached eigenvector is locally constant to first order.
    assert torch.autograd.gradcheck(
        lambda X: spectral_restricted_isometry(X, n_iter=300), (W,), atol=1e-5
    )


def test_half_precision_is_computed_in_float32() -> None:
    Q = semi_orthogonal(16, 32).to(torch.bfloat16)
    value = soft_orthogonality(Q)
    assert value.dtype == torch.bfloat16
    assert float(value) < 0.05  # bf16 rounding of Q itself, not of the Gram


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: soft_orthogonality(torch.randn(5)), "at least 2 dimensions"),
        (lambda: soft_orthogonality(torch.tensor([[1.0, float("nan")]])), "NaN or Inf"),
        (lambda: soft_orthogonality([[1.0]]), "must be a torch.Tensor"),
        (lambda: soft_orthogonality(torch.ones(2, 2, dtype=torch.int64)), "floating-point"),
        (lambda: spectral_restricted_isometry(torch.randn(3, 4), n_iter=0), "n_iter"),
        (
            lambda: spectral_restricted_isometry(torch.randn(3, 4), u=torch.randn(4)),
            r"shape \(3,\)",
        ),
        (lambda: orthoreg(torch.randn(3, 4), torch.randn(4, 3)), "W_pretrained must have"),
        (lambda: orthoreg(torch.randn(3, 4), torch.randn(4)), "W_pretrained must have at least"),
    ],
)
def test_bad_input(call, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_bad_input_does_not_modify_u() -> None:
    u = torch.ones(3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        spectral_restricted_isometry(torch.tensor([[1.0, 2.0, float("inf")]] * 3), u=u)
    assert torch.equal(u, torch.ones(3))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)


def test_penalty_walks_matrix_weights_and_batches_them() -> None:
    net = Net().double()
    penalty = OrthogonalityPenalty(net, "soft", weight=0.5)
    assert penalty.names == ["conv.weight", "fc1.weight", "fc2.weight", "head.weight"]
    assert len(penalty._groups) == 3  # fc1 and fc2 share a shape and are stacked
    expected = 0.5 * sum(
        soft_orthogonality(p.reshape(p.shape[0], -1))
        for p in (net.conv.weight, net.fc1.weight, net.fc2.weight, net.head.weight)
    )
    value = penalty()
    assert torch.allclose(value.double(), expected.float().double(), rtol=1e-6)
    value.backward()
    assert net.fc1.weight.grad is not None and net.norm.weight.grad is None
    assert list(penalty.parameters()) == []
    with_emb = OrthogonalityPenalty(net, embeddings=True, include=["emb.weight", "fc1.weight"])
    assert with_emb.names == ["emb.weight", "fc1.weight"]
    assert OrthogonalityPenalty(net, include="fc2.weight").names == ["fc2.weight"]
    only_conv = OrthogonalityPenalty(net, include=lambda name, p: p.ndim == 4)
    assert only_conv.names == ["conv.weight"]


def test_tied_weights_are_counted_once() -> None:
    emb = nn.Embedding(6, 4)
    head = nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    assert OrthogonalityPenalty(model, embeddings=True).names == ["0.weight"]


def test_penalty_srip_keeps_warm_vectors_and_converges() -> None:
    net = Net().double()
    penalty = OrthogonalityPenalty(net, "srip", weight=1.0, n_iter=1)
    assert {name for name, _ in penalty.named_buffers()} == {"u_0", "u_1", "u_2"}
    for _ in range(300):
        value = penalty()
    exact = sum(
        reference_srip(p.detach().reshape(p.shape[0], -1))
        for p in (net.conv.weight, net.fc1.weight, net.fc2.weight, net.head.weight)
    )
    # A lower bound; where +-sigma nearly tie, power iteration converges slowly.
    assert float(exact) * (1 - 1e-3) < float(value.detach()) <= float(exact) + 1e-12


def test_penalty_orthoreg_is_zero_at_construction_and_tracks_the_delta() -> None:
    net = Net()
    penalty = OrthogonalityPenalty(net, "orthoreg", weight=1.0)
    # dW = 0 at construction: the penalty is then sum_k ||0 - I||^2 = total small-side width.
    assert float(penalty().detach()) == pytest.approx(4 + 8 + 8 + 3)  # conv is 4 x 18
    with torch.no_grad():
        net.fc1.weight += semi_orthogonal(8, 8).float()
    assert float(penalty().detach()) == pytest.approx(4 + 0 + 8 + 3, abs=1e-4)


@pytest.mark.skipif(
    importlib.util.find_spec("orthotorch.nn.compatible") is None,
    reason="orthotorch.nn.compatible (lambda_orthogonality) is not available yet",
)
def test_penalty_lambda_kind() -> None:
    from orthotorch.nn.compatible import lambda_orthogonality

    net = Net().double()
    penalty = OrthogonalityPenalty(net, "lambda", weight=2.0, lam=0.5, alpha=3.0)
    expected = 2.0 * sum(
        lambda_orthogonality(p.reshape(p.shape[0], -1), 0.5, 3.0)
        for p in (net.conv.weight, net.fc1.weight, net.fc2.weight, net.head.weight)
    )
    assert torch.allclose(penalty().double(), expected.double(), rtol=1e-6)


@pytest.mark.parametrize("kind", PENALTY_KINDS)
def test_penalty_checks_finiteness_once_per_call(kind: str, monkeypatch) -> None:
    """The docstring promises one host sync per call; "lambda" ran the public, validating
    lambda_orthogonality per group, i.e. one extra isfinite sync per weight group per step."""
    net = Net()
    penalty = OrthogonalityPenalty(net, kind)  # type: ignore[arg-type]
    assert len(penalty._groups) > 1
    calls = []
    real = torch.isfinite

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x)

    monkeypatch.setattr(torch, "isfinite", counting)
    penalty()
    assert calls == [()]


@pytest.mark.parametrize("kind", PENALTY_KINDS)
def test_penalty_raises_on_nan_weight_for_every_kind(kind: str) -> None:
    """A NaN weight must never give a finite penalty (the lambda kind's sqrt guard mapped a
    NaN Gram to d = 0, so its NaN could vanish once the per-group check was gone)."""
    net = Net()
    penalty = OrthogonalityPenalty(net, kind)  # type: ignore[arg-type]
    with torch.no_grad():
        net.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not finite.*fc2\.weight"):
        penalty()


def test_penalty_reduces_orthogonality_error_when_minimised() -> None:
    net = Net()
    penalty = OrthogonalityPenalty(net, "soft", weight=1.0)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    start = float(penalty().detach())
    for _ in range(300):
        opt.zero_grad()
        loss = penalty()
        loss.backward()
        opt.step()
    assert float(penalty().detach()) < 1e-3 * start


def test_penalty_bad_input() -> None:
    net = Net()
    with pytest.raises(
        ValueError, match="kind must be one of 'soft', 'srip', 'orthoreg', 'lambda'"
    ):
        OrthogonalityPenalty(net, "frobenius")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        OrthogonalityPenalty(net, weight=-1.0)
    with pytest.raises(ValueError, match="not matrix weights of the model"):
        OrthogonalityPenalty(net, include=["norm.weight"])
    with pytest.raises(ValueError, match="no matrix weight to regularize"):
        OrthogonalityPenalty(nn.Sequential(nn.LayerNorm(4)))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        OrthogonalityPenalty(torch.randn(3, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_iter"):
        OrthogonalityPenalty(net, "srip", n_iter=0)
    with pytest.raises(ValueError, match="lam"):
        OrthogonalityPenalty(net, "lambda", lam=-1.0)
    penalty = OrthogonalityPenalty(net)
    with torch.no_grad():
        net.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not finite.*fc2\.weight"):
        penalty()
    assert set(PENALTY_KINDS) == {"soft", "srip", "orthoreg", "lambda"}


def test_penalty_follows_parameters_replaced_after_construction() -> None:
    """Regression: the penalty held the Parameter objects found at construction, so after
    ``load_state_dict(..., assign=True)`` it penalised the stale tensors and no gradient
    reached the model's new weights."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    penalty = OrthogonalityPenalty(model, kind="soft", weight=1.0)
    new_state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new_state, assign=True)
    value = penalty()
    expected = soft_orthogonality(model[0].weight) + soft_orthogonality(model[2].weight)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert model[0].weight.grad is not None and model[2].weight.grad is not None


def test_srip_vectors_advance_in_training_mode_only() -> None:
    """Regression: the power-iteration buffers also advanced in ``eval()``, so computing the
    penalty for logging changed the saved state (``spectral_norm`` updates only in training)."""
    model = nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 6))
    penalty = OrthogonalityPenalty(model, kind="srip", weight=1.0)
    saved = {k: v.clone() for k, v in penalty.state_dict().items()}
    penalty.eval()
    value = penalty()
    assert value > 0
    for k, v in penalty.state_dict().items():
        assert torch.equal(v, saved[k]), k
    penalty.train()
    penalty()
    assert any(not torch.equal(v, saved[k]) for k, v in penalty.state_dict().items())
