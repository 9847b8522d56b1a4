"""orthotorch.linalg: every registered method against its documented band and the exact polar."""

from __future__ import annotations

import pytest
import torch

from orthotorch import linalg
from orthotorch.linalg import (
    available_methods,
    get_method,
    iterate_scalar,
    orthogonality_error,
    orthogonalize,
    polar,
)

METHODS = available_methods()
SHAPES = [(64, 64), (64, 256), (256, 64), (3, 32, 96)]


def with_singular_values(shape: tuple[int, ...], s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A float64 matrix (batch) with singular values ``s`` and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    *lead, m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*lead, m, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*lead, n, k, generator=gen, dtype=torch.float64))
    return (U * s.to(torch.float64)) @ V.mT


def check_band(G: torch.Tensor, method: str) -> None:
    """Output singular values <= hi; each input direction above band_from maps into [lo, hi]."""
    spec = get_method(method)
    lo, hi = spec.band
    out = orthogonalize(G.float(), method).double()
    assert out.shape == G.shape
    assert torch.linalg.svdvals(out).max() <= hi + 1e-6
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    # Diagonal of U^T O V: what the method did to each input singular direction.
    mapped = torch.diagonal(U.mT @ out @ Vh.mT, dim1=-2, dim2=-1)
    x = S / (torch.linalg.matrix_norm(G).unsqueeze(-1) * spec.norm_scale)
    converged = x >= spec.band_from
    assert converged.any()
    assert mapped[converged].min() >= lo, (method, mapped[converged].min())
    assert mapped[converged].max() <= hi, (method, mapped[converged].max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_method_band_random(method: str, shape: tuple[int, ...]) -> None:
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    check_band(G, method)


@pytest.mark.parametrize("method", METHODS)
def test_method_band_ill_conditioned(method: str) -> None:
    s = torch.logspace(0, -6, 64)  # condition number 1e6
    check_band(with_singular_values((64, 128), s), method)


@pytest.mark.parametrize("method", ["muon", "polar_express", "jiacheng", "root", "aol"])
@pytest.mark.parametrize("spectrum", ["gaussian", "cond1e6"])
def test_method_band_on_the_gram_route(method: str, spectrum: str) -> None:
    """The Gram route (dispatch's ``gram`` variant, wide stacks) keeps each method's band."""
    if spectrum == "gaussian":
        G = torch.randn(3, 48, 192, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    else:
        G = with_singular_values((3, 48, 192), torch.logspace(0, -6, 48))
    with linalg.dispatch.forced("batched", route="gram"):
        check_band(G, method)


@pytest.mark.parametrize("steps", [3, 4, 6])
def test_gram_route_matches_the_direct_route_at_other_step_counts(steps: int) -> None:
    """The restart pattern (gram_restarts) holds beyond the five steps it was measured at: the
    largest output singular value in bf16 stays the direct iteration's."""
    G = with_singular_values((2, 64, 256), torch.logspace(0, -6, 64))
    top = {}
    for route in ("direct", "gram"):
        with linalg.dispatch.forced("batched", route=route):
            out = orthogonalize(G.float(), "polar_express", steps=steps)
        top[route] = torch.linalg.svdvals(out.double()).max().item()
    assert abs(top["gram"] - top["direct"]) < 0.03, top


@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).schedule is not None])
def test_documented_band_holds_in_exact_arithmetic(method: str) -> None:
    """The band is a property of the scalar map; check it without any matrix rounding."""
    spec = get_method(method)
    coefficients = spec.schedule(64, 64, spec.default_steps)
    x = torch.logspace(-8, 0, 20001, dtype=torch.float64) / spec.norm_scale
    y = iterate_scalar(x, coefficients)
    assert y.max() <= spec.band[1]
    inside = y[x >= spec.band_from]
    assert inside.min() >= spec.band[0] and inside.max() <= spec.band[1]


def test_svd_matches_exact_polar() -> None:
    G = torch.randn(48, 80, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    exact = U @ Vh
    assert torch.allclose(orthogonalize(G, "svd", dtype=torch.float64), exact, atol=1e-10)
    assert (orthogonalize(G.float(), "svd").double() - exact).abs().max() < 1e-5
    assert (polar(G.float()).double() - exact).abs().max() < 1e-5
    assert orthogonality_error(polar(G)).item() < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_shape_dtype_and_batch_consistency(method: str) -> None:
    G = torch.randn(3, 40, 24, dtype=torch.float32)
    out = orthogonalize(G, method)
    assert out.shape == G.shape and out.dtype == G.dtype
    one = torch.stack([orthogonalize(g, method) for g in G])
    assert torch.allclose(out, one, atol=1e-6)
    half = orthogonalize(G.bfloat16(), method, dtype=torch.float32)
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("method", METHODS)
def test_zero_matrix_gives_zeros(method: str) -> None:
    out = orthogonalize(torch.zeros(2, 8, 12), method)
    assert torch.equal(out, torch.zeros(2, 8, 12))


def test_rank_deficient_svd_maps_null_space_to_zero() -> None:
    G = torch.randn(16, 3, dtype=torch.float64) @ torch.randn(3, 24, dtype=torch.float64)
    out = polar(G)
    s = torch.linalg.svdvals(out)
    assert torch.allclose(s[:3], torch.ones(3, dtype=torch.float64), atol=1e-8)
    assert s[3:].max() < 1e-8


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_with_shape(bad: float) -> None:
    G = torch.randn(5, 7)
    G[2, 3] = bad
    with pytest.raises(ValueError, match=r"shape \(5, 7\) contains NaN or Inf"):
        orthogonalize(G)


def test_one_dimensional_input_raises() -> None:
    with pytest.raises(ValueError, match=r"at least 2 dimensions .* shape \(7,\)"):
        orthogonalize(torch.randn(7))


def test_bad_arguments_raise() -> None:
    G = torch.randn(4, 4)
    with pytest.raises(
        ValueError, match="unknown orthogonalization method 'nope'; valid methods: "
    ):
        orthogonalize(G, "nope")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        orthogonalize(G, "muon", steps=0)
    with pytest.raises(ValueError, match="not iterative"):
        orthogonalize(G, "svd", steps=3)
    with pytest.raises(ValueError, match="computes in one of float32, float64"):
        orthogonalize(G, "svd", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="real floating-point"):
        orthogonalize(torch.ones(3, 3, dtype=torch.int64))


def test_more_steps_repeat_last_coefficients_and_converge() -> None:
    G = torch.randn(32, 64, dtype=torch.float64)
    errs = [
        orthogonality_error(orthogonalize(G, "polar_express", s, torch.float64)).item()
        for s in (5, 8, 12)
    ]
    assert errs[2] < errs[1] < errs[0]
    assert errs[2] < 0.1


def test_orthogonality_error_is_zero_on_semi_orthogonal() -> None:
    Q, _ = torch.linalg.qr(torch.randn(30, 10, dtype=torch.float64))
    assert orthogonality_error(Q).item() < 1e-12
    assert orthogonality_error(Q.mT).item() < 1e-12
    assert torch.isclose(orthogonality_error(2 * Q), torch.tensor(3.0, dtype=torch.float64))


def test_registry_rejects_duplicates_and_accepts_new_method() -> None:
    with pytest.raises(ValueError, match="already registered"):
        linalg.register_method(get_method("muon"))
    method = linalg.newton_schulz_method(
        "test_cubic",
        linalg.table_schedule([(1.5, -0.5, 0.0)]),
        default_steps=20,
        band=(0.5, 1.0),
        band_from=1e-2,
        description="classic cubic Newton–Schulz",
    )
    linalg.register_method(method)
    try:
        out = orthogonalize(
            torch.randn(8, 16, dtype=torch.float64), "test_cubic", dtype=torch.float64
        )
        assert orthogonality_error(out).item() < 0.5
    finally:
        linalg.registry._METHODS.unregister("test_cubic")
