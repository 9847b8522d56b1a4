"""orthotorch.nn.parametrizations: Householder / Cayley maps, orthogonal(), HouseholderProjector."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from orthotorch.nn.parametrizations import (
    CayleyOrthogonal,
    HouseholderOrthogonal,
    HouseholderProjector,
    cayley_reference,
    cayley_semi_orthogonal,
    householder_matmul,
    householder_reflectors,
    householder_semi_orthogonal,
    householder_semi_orthogonal_reference,
    orthogonal,
    skew_from_tril,
)

SHAPES = [(16, 8), (8, 16), (8, 8)]
METHODS = ["householder", "cayley"]
F64 = torch.float64


def shape_id(s: tuple[int, ...]) -> str:
    return "x".join(map(str, s))


def explicit_householder(U: torch.Tensor) -> torch.Tensor:
    """The full ``p x p`` product ``H_1 ... H_k`` of dense reflection matrices."""
    p = U.shape[0]
    eye = torch.eye(p, dtype=U.dtype)
    H = eye.clone()
    for i in range(U.shape[1]):
        u = U[:, i : i + 1]
        H = H @ (eye - 2 * u @ u.T / (u.T @ u))
    return H


def gram_error(W: torch.Tensor) -> float:
    """``max |G - I|`` with ``G`` the Gram matrix on the small side."""
    W = W.detach()
    G = W.mT @ W if W.shape[-2] >= W.shape[-1] else W @ W.mT
    return float((G - torch.eye(G.shape[-1], dtype=W.dtype)).abs().max())


def qr_factor(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal QR factor of a tall ``Y`` with ``diag(R) > 0``."""
    Q, R = torch.linalg.qr(Y)
    return Q * torch.sign(torch.diagonal(R))


def random_semi_orthogonal(m: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(max(m, n), min(m, n), generator=gen, dtype=F64))[0]
    return Q if m >= n else Q.T


def parametrized_linear(m: int, n: int, method: str, dtype=torch.float32) -> nn.Linear:
    layer = nn.Linear(n, m, bias=False).to(dtype)
    return orthogonal(layer, method=method)


# ---------------------------------------------------------------------------- functional core


@pytest.mark.parametrize("p,q,k", [(16, 8, 8), (8, 8, 8), (16, 8, 3), (16, 8, 20), (5, 5, 9)])
def test_householder_matches_explicit_product(p: int, q: int, k: int) -> None:
    U = torch.randn(p, k, dtype=F64)
    expected = explicit_householder(U)[:, :q]
    torch.testing.assert_close(householder_semi_orthogonal(U, q), expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(
        householder_semi_orthogonal_reference(U, q), expected, rtol=0, atol=1e-13
    )
    X = torch.randn(p, 3, dtype=F64)
    torch.testing.assert_close(
        householder_matmul(U, X), explicit_householder(U) @ X, rtol=0, atol=1e-13
    )


def test_householder_batched_equals_loop() -> None:
    U = torch.randn(3, 12, 5, dtype=F64)
    batched = householder_semi_orthogonal(U, 4)
    for b in range(3):
        torch.testing.assert_close(batched[b], householder_semi_orthogonal(U[b], 4))


def test_householder_scale_invariant_and_zero_reflector_is_identity() -> None:
    U = torch.randn(10, 4, dtype=F64)
    scaled = U * torch.tensor([1e-8, 1.0, 1e6, -3.0], dtype=F64)
    torch.testing.assert_close(
        householder_semi_orthogonal(scaled, 4), householder_semi_orthogonal(U, 4)
    )
    Z = U.clone()
    Z[:, 1] = 0
    Z.requires_grad_(True)
    W = householder_semi_orthogonal(Z, 4)
    without = explicit_householder(U[:, [0, 2, 3]])[:, :4]
    torch.testing.assert_close(W.detach(), without)
    W.sum().backward()
    assert torch.isfinite(Z.grad).all()


def test_householder_float32_orthogonal_for_nearly_parallel_reflectors() -> None:
    v = torch.randn(64, 1)
    U = v + 1e-3 * torch.randn(64, 32)
    assert gram_error(householder_semi_orthogonal(U, 32)) < 1e-5


@pytest.mark.parametrize("p,q", [(12, 5), (6, 6), (7, 1)])
def test_householder_reflectors_round_trip(p: int, q: int) -> None:
    Y = torch.randn(p, q, dtype=F64)
    U, d = householder_reflectors(Y)
    assert U.shape == (p, q) and d.shape == (q,)
    torch.testing.assert_close(householder_semi_orthogonal(U, q) * d, qr_factor(Y))
    Q = qr_factor(Y)  # semi-orthogonal input: reproduced exactly
    U, d = householder_reflectors(Q)
    torch.testing.assert_close(householder_semi_orthogonal(U, q) * d, Q)


def test_householder_reflectors_columns_already_on_axes() -> None:
    """LAPACK returns tau = 0 for a column already on ±e_i; that must still round-trip."""
    for Y in (torch.eye(6, 4, dtype=F64), torch.diag(torch.tensor([1.0, -1, -1, 1], dtype=F64))):
        Y = Y.clone()
        Y[:, 1] *= -1
        U, d = householder_reflectors(Y)
        torch.testing.assert_close(householder_semi_orthogonal(U, Y.shape[1]) * d, Y)
        assert torch.isfinite(U).all() and (torch.linalg.vector_norm(U, dim=0) > 0).all()


@pytest.mark.parametrize("p,q,k", [(10, 4, 7), (5, 5, 8), (5, 5, 7)])
def test_householder_reflectors_more_than_q(p: int, q: int, k: int) -> None:
    Q = random_semi_orthogonal(p, q)
    U, d = householder_reflectors(Q, k)
    assert U.shape == (p, k)
    torch.testing.assert_close(householder_semi_orthogonal(U, q) * d, Q)


def test_householder_reflectors_fewer_than_q_keeps_first_columns() -> None:
    Q = random_semi_orthogonal(10, 6)
    U, d = householder_reflectors(Q, 2)
    W = householder_semi_orthogonal(U, 6) * d
    torch.testing.assert_close(W[:, :2], Q[:, :2])
    assert gram_error(W) < 1e-12


@pytest.mark.parametrize("p,q", [(10, 4), (5, 5), (6, 1)])
def test_cayley_schur_matches_full_solve(p: int, q: int) -> None:
    X = 2 * torch.randn(p, q, dtype=F64)
    A = skew_from_tril(X)
    torch.testing.assert_close(A, -A.T)
    W = cayley_semi_orthogonal(X)
    torch.testing.assert_close(W, cayley_reference(A)[:, :q], rtol=0, atol=1e-12)
    assert gram_error(W) < 1e-12
    torch.testing.assert_close(cayley_semi_orthogonal(torch.zeros(p, q)), torch.eye(p, q))


def test_functional_shape_errors() -> None:
    with pytest.raises(ValueError, match="q must be in"):
        householder_semi_orthogonal(torch.randn(4, 2), 5)
    with pytest.raises(ValueError, match="Y must be tall"):
        householder_reflectors(torch.randn(2, 4))
    with pytest.raises(ValueError, match="X must be tall"):
        cayley_semi_orthogonal(torch.randn(2, 4))
    with pytest.raises(ValueError, match="k must be >= 1"):
        householder_reflectors(torch.randn(4, 2), 0)


def test_functional_gradcheck() -> None:
    U = torch.randn(7, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda U: householder_semi_orthogonal(U, 3), (U,))
    B = torch.randn(7, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(householder_matmul, (U, B))
    X = torch.randn(5, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(cayley_semi_orthogonal, (X,))


# ---------------------------------------------------------------------------- parametrizations


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [*SHAPES, (12, 4), (3, 13)], ids=shape_id)
def test_registration_starts_at_qr_factor(method: str, shape: tuple[int, int]) -> None:
    m, n = shape
    layer = nn.Linear(n, m, bias=False).double()
    W0 = layer.weight.detach().clone()
    orthogonal(layer, method=method)
    W = layer.weight
    assert W.shape == (m, n)
    expected = qr_factor(W0) if m >= n else qr_factor(W0.T).T
    torch.testing.assert_close(W, expected)
    assert gram_error(W) < 1e-12


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(method: str, dtype: torch.dtype) -> None:
    """bf16/fp16 weights failed: geqrf has no half kernel, torch's parametrize swallows the
    NotImplementedError of right_inverse, and registration died with a baffling "reflectors
    must have shape (6, 4), got (4, 6)"; forward's triangular solve had no half kernel either."""
    layer = nn.Linear(6, 4, bias=False).to(dtype)
    W0 = layer.weight.detach().float().clone()
    orthogonal(layer, method=method)
    W = layer.weight
    assert W.dtype == dtype and W.shape == (4, 6)
    torch.testing.assert_close(W.float(), qr_factor(W0.T).T, atol=1e-2, rtol=0)
    assert gram_error(W.float()) < 2e-2
    layer(torch.randn(3, 6, dtype=dtype)).float().square().sum().backward()
    assert layer.parametrizations.weight.original.grad.isfinite().all()


def test_projector_half_precision() -> None:
    """HouseholderProjector in bf16 raised NotImplementedError (no half triangular solve)."""
    lin = nn.Linear(6, 4).bfloat16()
    layer = HouseholderProjector.from_linear(lin)
    x = torch.randn(3, 6).bfloat16()
    torch.testing.assert_close(layer(x).float(), lin(x).float(), atol=5e-2, rtol=0)
    assert layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [*SHAPES, (12, 4), (3, 13)], ids=shape_id)
def test_right_inverse_round_trip(method: str, shape: tuple[int, int]) -> None:
    m, n = shape
    layer = parametrized_linear(m, n, method, F64)
    for seed in range(3):
        Q = random_semi_orthogonal(m, n, seed)
        with torch.no_grad():
            layer.weight = Q
        torch.testing.assert_close(layer.weight, Q)


def test_cayley_reaches_determinant_minus_one() -> None:
    """A reflection has eigenvalue -1: plain Cayley can't represent it, the base can."""
    R = torch.eye(6, dtype=F64)
    R[2, 2] = -1
    layer = parametrized_linear(6, 6, "cayley", F64)
    with torch.no_grad():
        layer.weight = R
    torch.testing.assert_close(layer.weight, R)


def test_cayley_tall_base_is_reflectors() -> None:
    p = CayleyOrthogonal(20, 4)
    assert not p.dense_base and p.base.shape == (20, 4)
    assert CayleyOrthogonal(8, 6).base.shape == (8, 8)
    # Before right_inverse both bases are the identity.
    for m, n in [(20, 4), (8, 6)]:
        X = torch.randn(m, n, dtype=F64)
        torch.testing.assert_close(CayleyOrthogonal(m, n).double()(X), cayley_semi_orthogonal(X))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_orthogonal_after_1000_adam_steps(method: str, shape: tuple[int, int]) -> None:
    m, n = shape
    torch.manual_seed(1)
    layer = parametrized_linear(m, n, method)
    W0 = layer.weight.detach().clone()
    target = torch.randn(m, n)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(1000):
        opt.zero_grad()
        loss = (layer.weight - target).square().sum()
        loss.backward()
        opt.step()
    W = layer.weight.detach()
    assert gram_error(W) < 1e-5, gram_error(W)
    assert (W - W0).norm() > 1.0  # the weight really moved
    # and got much closer to the target's polar factor (the nearest semi-orthogonal matrix)
    P = torch.linalg.svd(target, full_matrices=False)
    polar = P.U @ P.Vh
    assert (W - polar).norm() < 0.5 * (W0 - polar).norm()


@pytest.mark.parametrize("method", METHODS)
def test_survives_adamw_weight_decay(method: str) -> None:
    """Decoupled weight decay shrinks every entry of the original tensor. torch's householder
    map reads column signs from ``int(diagonal)``, so a diagonal shrunk below 1 zeroes columns
    (orthogonality error 1.0 after 20 AdamW steps, torch 2.13); ours has no such entries."""
    layer = parametrized_linear(16, 8, method)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.1)
    target = torch.randn(16, 8)
    for _ in range(20):
        opt.zero_grad()
        (layer.weight - target).square().sum().backward()
        opt.step()
    assert gram_error(layer.weight) < 1e-5


@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (5, 5)], ids=shape_id)
def test_parametrization_gradcheck(shape: tuple[int, int]) -> None:
    m, n = shape
    Q = random_semi_orthogonal(m, n, 3)
    hh = HouseholderOrthogonal(m, n).double()
    U = hh.right_inverse(Q) + 0.1 * torch.randn(max(m, n), min(m, n), dtype=F64)
    assert torch.autograd.gradcheck(hh, (U.requires_grad_(True),))
    hh3 = HouseholderOrthogonal(m, n, k=3).double()
    U3 = torch.randn(max(m, n), 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(hh3, (U3,))
    cay = CayleyOrthogonal(m, n).double()
    cay.right_inverse(Q)
    X = torch.randn(max(m, n), min(m, n), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(cay, (X,))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gradient_reaches_every_parameter(shape: tuple[int, int]) -> None:
    m, n = shape
    p, q = max(m, n), min(m, n)
    G = torch.randn(m, n, dtype=F64)
    hh = parametrized_linear(m, n, "householder", F64)
    (hh.weight * G).sum().backward()
    U, g = hh.parametrizations.weight.original, hh.parametrizations.weight.original.grad
    # The map only sees each reflector's direction, so each column's gradient is orthogonal to
    # that column; otherwise it must be dense.
    torch.testing.assert_close((U * g).sum(0), torch.zeros(q, dtype=F64), rtol=0, atol=1e-12)
    assert ((g.abs() > 0).sum(0) >= p - 1).all()
    cay = parametrized_linear(m, n, "cayley", F64)
    with torch.no_grad():  # move off X = 0, where some blocks' gradients vanish by symmetry
        cay.parametrizations.weight.original.normal_()
    (cay.weight * G).sum().backward()
    g = cay.parametrizations.weight.original.grad
    free = torch.ones(p, q, dtype=torch.bool).tril(-1)  # strict lower triangle and all of B
    assert (g[free].abs() > 0).all()
    assert (g[~free] == 0).all()


def test_state_dict_round_trip() -> None:
    for method in METHODS:
        a = parametrized_linear(12, 5, method)
        with torch.no_grad():
            a.parametrizations.weight.original.add_(0.3 * torch.randn(12, 5))
        b = parametrized_linear(12, 5, method)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(b.weight, a.weight)
        keys = set(a.state_dict())
        assert "parametrizations.weight.0.signs" in keys
        assert (method == "cayley") == ("parametrizations.weight.0.base" in keys)


def test_plain_register_parametrization_and_k() -> None:
    layer = nn.Linear(6, 10)
    parametrize.register_parametrization(layer, "weight", HouseholderOrthogonal(10, 6, k=9))
    assert layer.parametrizations.weight.original.shape == (10, 9)
    assert gram_error(layer.weight.detach()) < 1e-5
    layer2 = orthogonal(nn.Linear(6, 10), k=2)
    assert layer2.parametrizations.weight.original.shape == (10, 2)


def test_parametrization_bad_input() -> None:
    with pytest.raises(ValueError, match="m must be >= 1"):
        HouseholderOrthogonal(0, 3)
    with pytest.raises(TypeError, match="n must be an int"):
        CayleyOrthogonal(3, 2.0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        HouseholderOrthogonal(4, 3, k=0)
    hh = HouseholderOrthogonal(6, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(6, 4\)"):
        hh.right_inverse(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"reflectors must have shape \(6, 4\)"):
        hh(torch.randn(6, 3))
    cay = CayleyOrthogonal(6, 4)
    base, signs = cay.base.clone(), cay.signs.clone()
    bad = torch.randn(6, 4)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        cay.right_inverse(bad)
    assert torch.equal(cay.base, base) and torch.equal(cay.signs, signs)
    with pytest.raises(ValueError, match=r"X must have shape \(6, 4\)"):
        cay(torch.randn(4, 6))


def test_orthogonal_bad_input() -> None:
    with pytest.raises(ValueError, match="has no parameter or buffer 'kernel'"):
        orthogonal(nn.Linear(3, 3), "kernel")
    with pytest.raises(ValueError, match="must be a matrix"):
        orthogonal(nn.Conv2d(2, 2, 3))
    with pytest.raises(ValueError, match="method must be 'householder' or 'cayley'"):
        orthogonal(nn.Linear(3, 3), method="expm")
    with pytest.raises(ValueError, match=r"k .* applies to method='householder' only"):
        orthogonal(nn.Linear(3, 3), method="cayley", k=2)
    with pytest.raises(TypeError, match=r"module must be an nn\.Module"):
        orthogonal(torch.randn(3, 3))
    layer = nn.Linear(3, 3)
    with pytest.raises(ValueError):
        orthogonal(layer, method="nope")
    assert not parametrize.is_parametrized(layer)


# ---------------------------------------------------------------------------- projector


@pytest.mark.parametrize("shape,rank", [((6, 10), None), ((10, 6), 4), ((8, 8), 8), ((8, 8), 1)])
def test_projector_factors_and_singular_values(shape: tuple[int, int], rank: int | None) -> None:
    n, m = shape
    layer = HouseholderProjector(n, m, rank).double()
    with torch.no_grad():
        layer.s.copy_(torch.randn(layer.rank, dtype=F64))
    QU, s, QV = layer.factors()
    assert QU.shape == (m, layer.rank) and QV.shape == (n, layer.rank)
    assert gram_error(QU) < 1e-12 and gram_error(QV) < 1e-12
    W = layer.weight
    sv = torch.linalg.svdvals(W)[: layer.rank]
    torch.testing.assert_close(sv, s.detach().abs().sort(descending=True).values)
    x = torch.randn(5, n, dtype=F64)
    torch.testing.assert_close(layer(x), x @ W.T + layer.bias)


def test_projector_from_linear() -> None:
    linear = nn.Linear(7, 5).double()
    x = torch.randn(4, 7, dtype=F64)
    full = HouseholderProjector.from_linear(linear)
    torch.testing.assert_close(full(x), linear(x))
    low = HouseholderProjector.from_linear(linear, rank=2)
    P = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    torch.testing.assert_close(low.weight, (P.U[:, :2] * P.S[:2]) @ P.Vh[:2])
    no_bias = HouseholderProjector.from_linear(nn.Linear(7, 5, bias=False))
    assert no_bias.bias is None


def test_projector_training_keeps_factors_orthonormal() -> None:
    torch.manual_seed(2)
    layer = HouseholderProjector(8, 16, rank=6)
    x = torch.randn(64, 8)
    y = x @ (3 * torch.randn(16, 6) @ torch.randn(6, 8)).T  # reachable: rank 6
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    first = None
    for _ in range(1000):
        opt.zero_grad()
        loss = (layer(x) - y).square().mean()
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1 * first
    QU, _, QV = layer.factors()
    assert gram_error(QU.detach()) < 1e-5 and gram_error(QV.detach()) < 1e-5


def test_projector_gradients_and_gradcheck() -> None:
    layer = HouseholderProjector(5, 4, rank=3).double()
    x = torch.randn(6, 5, dtype=F64)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and (p.grad.abs() > 0).any(), name

    def f(U, V, s):
        return torch.func.functional_call(layer, {"U": U, "V": V, "s": s}, (x,))

    params = tuple(p.detach().clone().requires_grad_(True) for p in (layer.U, layer.V, layer.s))
    assert torch.autograd.gradcheck(f, params)


def test_projector_bad_input() -> None:
    with pytest.raises(ValueError, match=r"rank must be <= min\(in_features, out_features\) = 4"):
        HouseholderProjector(4, 6, rank=5)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        HouseholderProjector(4, 6, rank=0)
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear"):
        HouseholderProjector.from_linear(nn.Conv1d(2, 2, 1))
    layer = HouseholderProjector(4, 6)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"W must have shape \(6, 4\)"):
        layer.set_weight(torch.randn(4, 6))
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.set_weight(torch.full((6, 4), float("inf")))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])
