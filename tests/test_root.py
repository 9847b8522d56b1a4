"""ROOT: the guarded shape-adaptive coefficients, the outlier clip, and the optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import orthotorch
from orthotorch.functional.root import outlier_threshold, root_kernel, soft_clip
from orthotorch.linalg import (
    MUON_COEFFICIENTS,
    ROOT_COEFFICIENTS,
    ROOT_GUARDED_COEFFICIENTS,
    get_method,
    iterate_scalar,
    newton_schulz,
    orthogonalize,
    root_schedule,
)
from orthotorch.linalg.root import quintic_peak, repelling_fixed_point

SQUARE = (2048, 2048)


def with_singular_values(m: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    return (U * s.to(torch.float64)) @ V.mT


def one_dominant(m: int, n: int, x0: float, seed: int = 0) -> torch.Tensor:
    """A matrix whose largest normalised singular value ``sigma_1 / ||G||_F`` is ``x0``."""
    s = torch.full((m,), math.sqrt((1 - x0**2) / (m - 1)), dtype=torch.float64)
    s[0] = x0
    return with_singular_values(m, n, s, seed)


def spectral_norm(X: torch.Tensor) -> float:
    X = X.double()
    if not torch.isfinite(X).all():
        return math.inf
    return torch.linalg.matrix_norm(X, ord=2).item()


# ---------------------------------------------------------------- the failing inputs, then the fix
def test_paper_square_coefficients_amplify() -> None:
    """Regression: the paper's (2048, 2048) quintic is not bounded.

    Its peak on [0, 1] (1.22459 at x = 0.559) lies above its repelling fixed point (1.22355), so
    an input singular value with sigma / ||G||_F in about [0.545, 0.575] is amplified: spectral
    norm 3.3 after 5 steps, inf after 10, in float64 as in bf16. This test finds those inputs.
    """
    raw = ROOT_COEFFICIENTS[SQUARE]
    x_peak, peak = quintic_peak(raw)
    assert peak > repelling_fixed_point(raw)
    failing = []
    for x0 in torch.linspace(0.50, 0.62, 13).tolist():
        G = one_dominant(96, 96, x0)
        if spectral_norm(newton_schulz(G, [raw] * 5)) > 1.5:
            failing.append(x0)
    assert failing, "expected inputs that the published coefficients amplify"
    assert 0.54 <= min(failing) and max(failing) <= 0.58, failing
    worst = newton_schulz(one_dominant(96, 96, x_peak), [raw] * 5)
    assert spectral_norm(worst) > 3.0
    assert spectral_norm(newton_schulz(one_dominant(96, 96, x_peak), [raw] * 10)) == math.inf


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_guarded_square_coefficients_stay_bounded(dtype: torch.dtype, steps: int) -> None:
    guarded = root_schedule(*SQUARE, steps)
    for x0 in torch.linspace(0.50, 0.62, 13).tolist():
        G = one_dominant(96, 96, x0).to(dtype)
        assert spectral_norm(newton_schulz(G, guarded)) <= 1.5, (x0, steps)


def test_guard_changes_only_the_unbounded_entry() -> None:
    for shape, raw in ROOT_COEFFICIENTS.items():
        guarded = ROOT_GUARDED_COEFFICIENTS[shape]
        ratio = repelling_fixed_point(guarded) / quintic_peak(guarded)[1]
        if shape == SQUARE:
            gamma = raw[0] / guarded[0]
            assert 1.0 < gamma < 1.02
            assert all(math.isclose(r / g, gamma) for r, g in zip(raw, guarded, strict=True))
            assert ratio == pytest.approx(1.02, abs=1e-6)
        else:
            assert guarded == raw
            assert ratio > 1.005


@pytest.mark.parametrize("shape", [*ROOT_COEFFICIENTS, (512, 512)], ids=str)
def test_schedule_is_bounded_for_any_step_count_in_exact_arithmetic(shape) -> None:
    x = torch.linspace(0, 1, 100001, dtype=torch.float64)
    for steps in (1, 5, 20, 100):
        y = iterate_scalar(x, root_schedule(*shape, steps))
        assert y.max() <= 1.24, (shape, steps, y.max())


def test_schedule_is_keyed_by_wide_shape_with_muon_fallback() -> None:
    assert root_schedule(2048, 8192, 5) == [ROOT_COEFFICIENTS[(2048, 8192)]] * 5
    assert root_schedule(8192, 2048, 3) == [ROOT_COEFFICIENTS[(2048, 8192)]] * 3
    assert root_schedule(512, 2048, 5) == [MUON_COEFFICIENTS] * 5
    assert root_schedule(2048, 2048, 1) == [ROOT_GUARDED_COEFFICIENTS[SQUARE]]


def hadamard(n: int) -> torch.Tensor:
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(n)


def test_root_method_is_bounded_at_the_real_square_shape() -> None:
    """Through the registry at 2048x2048 (where the square entry is used), in bf16."""
    n = 2048
    x0 = quintic_peak(ROOT_COEFFICIENTS[SQUARE])[0]
    s = torch.full((n,), math.sqrt((1 - x0**2) / (n - 1)))
    s[0] = x0
    gen = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (2, n), generator=gen) * 2 - 1.0
    H = hadamard(n)
    U, V = H * signs[0], H * signs[1]  # orthogonal, cheap to build
    G = (U * s) @ V.T
    out = orthogonalize(G, "root").float()
    raw = newton_schulz(G.bfloat16(), [ROOT_COEFFICIENTS[SQUARE]] * 5).float()
    # Top singular direction: what each quintic did to the dangerous singular value.
    assert (U[:, 0] @ raw @ V[:, 0]).abs() > 2.0
    assert (U[:, 0] @ out @ V[:, 0]).abs() <= 1.3
    # Power iteration on O^T O for the spectral norm (a full SVD of 2048^2 is too slow here).
    v = torch.randn(n, generator=gen)
    for _ in range(50):
        v = out.T @ (out @ v)
        v /= v.norm()
    assert (out @ v).norm() <= 1.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case", ["huge", "tiny", "rank1", "zero_row", "dominant", "gaussian", "constant"]
)
def test_root_method_is_bounded_for_finite_inputs(case: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(48, 80, generator=gen, dtype=torch.float64)
    if case == "huge":
        G = G * 1e30
    elif case == "tiny":
        G = G * 1e-30
    elif case == "rank1":
        G = torch.outer(G[:, 0], G[0])
    elif case == "zero_row":
        G[3] = 0
    elif case == "dominant":
        G = one_dominant(48, 80, 0.56)
    elif case == "constant":
        G = torch.full((48, 80), 3e20, dtype=torch.float64)
    G = G.to(torch.float32 if dtype != torch.float64 else dtype)
    for steps in (5, 12):
        out = orthogonalize(G, "root", steps=steps, dtype=dtype)
        assert torch.isfinite(out).all()
        assert spectral_norm(out) <= 1.5, (case, steps)


def test_safe_normalisation_keeps_scale_invariance() -> None:
    """Without the max-abs pre-scaling, ||G||_F overflows (huge G) or drops below eps (tiny G)."""
    G = torch.randn(32, 64)
    ref = orthogonalize(G, "root", dtype=torch.float32)
    for scale in (1e30, 1e-30):
        out = orthogonalize(G * scale, "root", dtype=torch.float32)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert orthogonalize(G * 1e30, "muon", dtype=torch.float32).abs().max() == 0  # the failure


def test_root_band_is_registered() -> None:
    spec = get_method("root")
    assert spec.schedule is root_schedule and spec.default_steps == 5
    assert spec.band[1] <= 1.5


# ---------------------------------------------------------------- the outlier clip
def test_threshold_is_the_lower_quantile() -> None:
    X = torch.randn(3, 20, 30)
    for q in (0.1, 0.5, 0.9, 1.0):
        expected = torch.stack(
            [torch.quantile(x.abs().flatten(), q, interpolation="lower") for x in X]
        )
        torch.testing.assert_close(outlier_threshold(X, q).flatten(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("samples", [None, 1 << 16])
def test_threshold_beyond_torch_quantile_limit(samples: int | None) -> None:
    """4097^2 > 2^24 entries: torch.quantile refuses them; kthvalue (or a sample) does not."""
    X = torch.randn(1, 4097, 4097, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        torch.quantile(X.abs().flatten(), 0.9)
    eps = outlier_threshold(X, 0.9, samples)
    fraction_below = (X.abs() <= eps).double().mean().item()
    assert abs(fraction_below - 0.9) < (1e-6 if samples is None else 3e-3)


def test_sampled_threshold_sees_outlier_columns() -> None:
    """The sample stride is coprime to the row length, so column structure cannot alias it."""
    X = torch.randn(1, 512, 1024)
    X[..., ::4] *= 100  # a quarter of the columns are large: the 0.9 quantile must be in them
    exact = outlier_threshold(X, 0.9)
    sampled = outlier_threshold(X, 0.9, samples=4096)
    assert (sampled / exact).item() == pytest.approx(1.0, rel=0.05)


def test_soft_clip_bounds_and_leaves_input() -> None:
    X = torch.randn(2, 16, 24)
    X[0, 3, 4] = 1e4
    before = X.clone()
    B = soft_clip(X, 0.9)
    assert torch.equal(X, before)
    eps = outlier_threshold(X, 0.9)
    assert (B.abs() <= eps).all()
    inside = X.abs() <= eps
    assert torch.equal(B[inside], X[inside])


def test_kernel_reads_nothing_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in the ROOT kernel")

    kernel = root_kernel(get_method("root"), None, outlier_quantile=0.9)
    X = torch.randn(4, 32, 64)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = kernel(X, False)
    monkeypatch.undo()
    assert out.shape == X.shape


# ---------------------------------------------------------------- the optimizer
def test_single_step_is_the_documented_update() -> None:
    torch.manual_seed(0)
    conv = nn.Parameter(torch.randn(8, 3, 3, 3))
    tall = nn.Parameter(torch.randn(40, 12))
    p0 = [conv.detach().clone(), tall.detach().clone()]
    grads = [torch.randn_like(conv), torch.randn_like(tall)]
    grads[1][5, 7] = 500.0  # an outlier: clipped away
    lr, wd, mu = 0.05, 0.1, 0.9
    opt = orthotorch.ROOT(
        [conv, tall], lr=lr, weight_decay=wd, momentum=mu, ns_method="svd", ns_dtype=torch.float32
    )
    for p, g in zip((conv, tall), grads, strict=True):
        p.grad = g.clone()
    opt.step()
    for p, before, g in zip((conv, tall), p0, grads, strict=True):
        rows = p.shape[0]
        m = ((1 - mu) * g + mu * (1 - mu) * g).reshape(rows, -1)
        eps = torch.quantile(m.abs().flatten(), 0.9, interpolation="lower")
        bounded = m.clamp(-eps, eps)
        scale = 0.2 * math.sqrt(max(m.shape))
        expected = (1 - lr * wd) * before - lr * scale * orthogonalize(bounded, "svd").reshape(
            p.shape
        )
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_both_mechanisms_off_is_muon() -> None:
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(24, 48)), nn.Parameter(torch.randn(64, 16))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    root = orthotorch.ROOT(a, lr=0.01, outlier_quantile=None, ns_method="muon")
    muon = orthotorch.Muon(b, lr=0.01, ns_method="muon", adjust_lr="match_rms_adamw")
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(a, b, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        root.step()
        muon.step()
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


def test_defaults_follow_the_paper() -> None:
    opt = orthotorch.ROOT([nn.Parameter(torch.randn(4, 4))])
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["momentum"], g["nesterov"]) == (1e-3, 0.1, 0.95, True)
    assert (g["outlier_quantile"], g["ns_method"], g["adjust_lr"]) == (
        0.9,
        "root",
        "match_rms_adamw",
    )


def _outlier_masks(params: list[torch.Tensor], fraction: float, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(p.shape, generator=gen) < fraction for p in params]


def _train_mlp(cls, corrupt: bool, steps: int = 100, **kwargs) -> tuple[float, nn.Module]:
    """Full-batch classification of a fixed random teacher's labels; returns the clean loss."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen)
    y = (x @ torch.randn(32, 10, generator=gen)).argmax(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
    model.append(nn.Linear(128, 10))
    opt = cls(orthotorch.param_groups(model), **kwargs)
    params = list(model.parameters())
    # A fixed random 0.1% of all gradient entries, multiplied by 1000 at every step.
    masks = _outlier_masks(params, 1e-3, seed=123)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if corrupt:
            for p, mask in zip(params, masks, strict=True):
                p.grad[mask] *= 1000.0
        opt.step()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item(), model


def test_root_is_robust_to_gradient_outliers() -> None:
    kwargs = {"lr": 3e-3, "adamw_lr": 3e-3}
    clean, _ = _train_mlp(orthotorch.ROOT, corrupt=False, **kwargs)
    corrupted, model = _train_mlp(orthotorch.ROOT, corrupt=True, **kwargs)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert clean < 0.5  # it learned something
    assert corrupted <= 1.1 * clean, (clean, corrupted)
    # The injection is strong enough to matter: without the clip the same run is >10% worse.
    kwargs["outlier_quantile"] = None
    unclipped_clean, _ = _train_mlp(orthotorch.ROOT, corrupt=False, **kwargs)
    unclipped_corrupted, _ = _train_mlp(orthotorch.ROOT, corrupt=True, **kwargs)
    assert unclipped_corrupted > 1.1 * unclipped_clean
