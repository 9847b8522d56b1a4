"""orthotorch.nn.adapters: SORSA-style OrthonormalAdapter, apply / merge over a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orthotorch.nn.adapters import (
    DEFAULT_GAMMA,
    OrthonormalAdapter,
    apply_orthonormal_adapters,
    merge_orthonormal_adapters,
    orthonormal_adapter_penalty,
    orthonormality_penalty,
)

F64 = torch.float64


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 6)
        self.block = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6, bias=False))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def perturb_(module: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("shape,rank", [((7, 5), 1), ((7, 5), 5), ((4, 9), 3)])
def test_initial_output_unchanged(shape: tuple[int, int], rank: int) -> None:
    n, m = shape
    for dtype, tol in [(F64, 1e-12), (torch.float32, 1e-5)]:
        linear = nn.Linear(n, m).to(dtype)
        before = {k: v.clone() for k, v in linear.state_dict().items()}
        adapter = OrthonormalAdapter(linear, rank)
        x = torch.randn(6, n, dtype=dtype)
        torch.testing.assert_close(adapter(x), linear(x), rtol=tol, atol=tol)
        torch.testing.assert_close(adapter.weight, linear.weight, rtol=tol, atol=tol)
        for k, v in linear.state_dict().items():
            assert torch.equal(v, before[k])


def test_factors_are_top_svd_and_only_they_train() -> None:
    linear = nn.Linear(8, 6).double()
    adapter = OrthonormalAdapter(linear, 3)
    P = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    torch.testing.assert_close(adapter.S.detach(), P.S[:3])
    torch.testing.assert_close(
        (adapter.U * adapter.S) @ adapter.Vh, (P.U[:, :3] * P.S[:3]) @ P.Vh[:3]
    )
    # W_res holds the rest of the spectrum.
    torch.testing.assert_close(torch.linalg.svdvals(adapter.weight_res)[:3], P.S[3:])
    assert [name for name, _ in adapter.named_parameters()] == ["U", "S", "Vh"]
    assert set(adapter.state_dict()) == {"U", "S", "Vh", "weight_res", "bias"}


def test_penalty_zero_at_init_and_matches_formula() -> None:
    adapter = OrthonormalAdapter(nn.Linear(10, 7).double(), 4, gamma=0.5)
    assert float(adapter.orthonormality_penalty().detach()) < 1e-12
    adapter.orthonormality_penalty().backward()
    assert all(torch.isfinite(p.grad).all() for p in (adapter.U, adapter.Vh))
    perturb_(adapter)
    U, Vh = adapter.U.detach(), adapter.Vh.detach()
    eye = torch.eye(4, dtype=F64)
    expected = 0.5 * (torch.norm(U.T @ U - eye) + torch.norm(Vh @ Vh.T - eye))
    torch.testing.assert_close(adapter.orthonormality_penalty().detach(), expected)
    assert OrthonormalAdapter(nn.Linear(3, 3), 2).gamma == DEFAULT_GAMMA
    f32 = OrthonormalAdapter(nn.Linear(64, 48), 16)
    assert float(f32.orthonormality_penalty().detach()) < 1e-5 * DEFAULT_GAMMA * 16


def test_penalty_gradcheck() -> None:
    U = torch.randn(6, 3, dtype=F64, requires_grad=True)
    Vh = torch.randn(3, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda U, Vh: orthonormality_penalty(U, Vh, 0.3), (U, Vh))
    with pytest.raises(ValueError, match="U has 3 columns but Vh has 2 rows"):
        orthonormality_penalty(U, Vh[:2])


def test_penalty_keeps_factors_orthonormal_in_training() -> None:
    """SORSA's point: with the regulariser the trained singular vectors stay orthonormal."""
    torch.manual_seed(3)
    linear = nn.Linear(16, 12)
    x = torch.randn(128, 16)
    y = x @ torch.randn(16, 12)
    errors = {}
    for gamma in (0.0, 1.0):
        adapter = OrthonormalAdapter(linear, 6, gamma=gamma)
        opt = torch.optim.Adam(adapter.parameters(), lr=0.02)
        for _ in range(200):
            opt.zero_grad()
            loss = (adapter(x) - y).square().mean() + adapter.orthonormality_penalty()
            loss.backward()
            opt.step()
        errors[gamma] = float(orthonormality_penalty(adapter.U, adapter.Vh, 1.0).detach())
    assert errors[1.0] < 0.2 * errors[0.0], errors


def test_merge_equals_adapter() -> None:
    linear = nn.Linear(9, 5).double()
    adapter = OrthonormalAdapter(linear, 3)
    perturb_(adapter)
    merged = adapter.merge()
    assert type(merged) is nn.Linear and merged.weight.dtype == F64
    x = torch.randn(4, 9, dtype=F64)
    torch.testing.assert_close(merged(x), adapter(x))
    with torch.no_grad():  # a copy: later training of the adapter does not leak into it
        adapter.S.add_(1.0)
    assert not torch.allclose(merged(x), adapter(x))
    no_bias = OrthonormalAdapter(nn.Linear(4, 4, bias=False), 2).merge()
    assert no_bias.bias is None


def test_state_dict_round_trip() -> None:
    a = apply_orthonormal_adapters(Net(), 2)
    perturb_(a)
    b = apply_orthonormal_adapters(Net(), 2)  # different pretrained weights
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(b(x), a(x))


def test_apply_all_linear_and_merge_back() -> None:
    net = Net()
    x = torch.randn(5, 6)
    before = net(x)
    out = apply_orthonormal_adapters(net, 3)
    assert out is net
    adapted = [n for n, m in net.named_modules() if isinstance(m, OrthonormalAdapter)]
    assert adapted == ["block.0", "block.2", "head"]
    assert isinstance(net.embed, nn.Embedding)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
    perturb_(net.head)
    trained = net(x)
    penalty = orthonormal_adapter_penalty(net)
    torch.testing.assert_close(
        penalty, sum(m.orthonormality_penalty() for m in net.modules() if hasattr(m, "Vh"))
    )
    merge_orthonormal_adapters(net)
    assert not any(isinstance(m, OrthonormalAdapter) for m in net.modules())
    assert isinstance(net.head, nn.Linear) and isinstance(net.block[0], nn.Linear)
    torch.testing.assert_close(net(x), trained, rtol=1e-5, atol=1e-5)


def test_apply_targets() -> None:
    net = apply_orthonormal_adapters(Net(), 2, target="head")
    assert isinstance(net.head, OrthonormalAdapter) and isinstance(net.block[0], nn.Linear)
    net = apply_orthonormal_adapters(Net(), 2, target=["block.0", "2"])
    assert isinstance(net.block[0], OrthonormalAdapter)
    assert isinstance(net.block[2], OrthonormalAdapter)
    assert isinstance(net.head, nn.Linear)
    net = apply_orthonormal_adapters(
        Net(), 2, target=lambda name, m: isinstance(m, nn.Linear) and m.bias is not None
    )
    assert isinstance(net.block[0], OrthonormalAdapter) and isinstance(net.block[2], nn.Linear)
    single = nn.Linear(4, 3)
    wrapped = apply_orthonormal_adapters(single, 2)
    assert isinstance(wrapped, OrthonormalAdapter)
    assert isinstance(merge_orthonormal_adapters(wrapped), nn.Linear)


def test_apply_errors_leave_model_unchanged() -> None:
    net = Net()
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def unchanged() -> None:
        assert not any(isinstance(m, OrthonormalAdapter) for m in net.modules())
        for k, v in net.state_dict().items():
            assert torch.equal(v, state[k])

    with pytest.raises(ValueError, match=r"layer 'block.0': rank must be in \[1, min"):
        apply_orthonormal_adapters(net, 7)  # head (6 x 3) would accept... block.0 fails first
    unchanged()
    with pytest.raises(ValueError, match=r"layer 'head': rank must be in \[1, .*\] = \[1, 3\]"):
        apply_orthonormal_adapters(net, 4, target=["block.0", "head"])
    unchanged()
    with pytest.raises(ValueError, match="rank must be in"):
        apply_orthonormal_adapters(net, 0)
    with pytest.raises(TypeError, match="target 'embed' is a Embedding"):
        apply_orthonormal_adapters(net, 2, target=["head", "embed"])
    unchanged()
    with pytest.raises(ValueError, match="target 'mlp' matched no module"):
        apply_orthonormal_adapters(net, 2, target=["head", "mlp"])
    unchanged()
    with pytest.raises(ValueError, match=r"no nn\.Linear layer of the model matched"):
        apply_orthonormal_adapters(nn.Sequential(nn.ReLU()), 2)
    with pytest.raises(TypeError, match="target must be None, a module name"):
        apply_orthonormal_adapters(net, 2, target=[1])
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        apply_orthonormal_adapters("net", 2)
    with pytest.raises(ValueError, match="model contains no OrthonormalAdapter"):
        orthonormal_adapter_penalty(net)
    unchanged()


def test_adapter_bad_input() -> None:
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear, got Conv1d"):
        OrthonormalAdapter(nn.Conv1d(3, 3, 1), 1)
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(out_features, in_features"):
        OrthonormalAdapter(nn.Linear(4, 6), 5)
    with pytest.raises(ValueError, match="rank must be in"):
        OrthonormalAdapter(nn.Linear(4, 6), 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        OrthonormalAdapter(nn.Linear(4, 6), 2.0)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        OrthonormalAdapter(nn.Linear(4, 6), 2, gamma=-1.0)
    bad = nn.Linear(3, 3)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        OrthonormalAdapter(bad, 2)


def test_shared_linear_stays_tied_through_apply_and_merge() -> None:
    """A Linear used at two places (tied weights) must become ONE adapter at both places.

    Regression: ``named_modules()`` drops duplicates, so only the first place was replaced and
    the second kept the original, fully trainable Linear: the tie was silently broken.
    """
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(3, 4)
    before = net(x)
    apply_orthonormal_adapters(net, 2)
    assert isinstance(net[0], OrthonormalAdapter) and net[2] is net[0]
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
    perturb_(net[0])
    trained = net(x)
    merge_orthonormal_adapters(net)
    assert isinstance(net[0], nn.Linear) and net[2] is net[0]
    torch.testing.assert_close(net(x), trained, rtol=1e-5, atol=1e-5)


def test_infinite_gamma_rejected() -> None:
    """``gamma=inf`` made every penalty inf (or NaN at an orthonormal point); it must raise."""
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        OrthonormalAdapter(nn.Linear(4, 6), 2, gamma=float("inf"))
