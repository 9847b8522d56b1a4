"""spectral_clip against its SVD definition, and the SPECTRA wrapper around torch optimizers."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import orthotorch
from orthotorch.linalg import spectral_clip, spectral_clip_reference
from test_optim_common import batch, small_cnn, train


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def with_spectrum(shape: tuple[int, ...], singular_values: torch.Tensor, seed: int = 0):
    """A random matrix (batch) with the given singular values (in their dtype)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(shape, generator=gen, dtype=singular_values.dtype)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return (U * singular_values.unsqueeze(-2)) @ Vh


# ----------------------------------------------------------------------------- spectral_clip
# Relative Frobenius error against the SVD definition: float32 bounds at s/c = 300 per route
# (measured 1.2e-3, 3.8e-3, 1.1e-5; the Gram routes square the condition number, see
# orthotorch.linalg.spectral), and the float64 bound of every route.
F32_TOL = {"gram": 3e-3, "eigh": 1e-2, "polar": 1e-4}
F64_TOL = 1e-7
ROUTES = ("gram", "eigh", "polar")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,c,top",
    [
        ((48, 160), 1.0, 300.0),  # wide, s/c up to 300
        ((160, 48), 0.1, 300.0),  # tall
        ((3, 32, 40), 10.0, 50.0),  # batched
        ((64, 64), 10.0, 0.5),  # nothing to clip: H_c(X) ~ X
    ],
)
def test_spectral_clip_matches_svd(shape, c, top, dtype, route) -> None:
    k = min(shape[-2:])
    # Log-spaced spectrum from top * c down to c / 100: saturated, transitional and untouched
    # directions all at once (the ones at s << c suffer most from the Gram matrix's rounding).
    s = torch.logspace(math.log10(top * c), math.log10(c / 100), k, dtype=torch.float64)
    X = with_spectrum(shape, s).to(dtype)
    Y = spectral_clip(X, c, dtype=dtype, route=route)
    assert Y.shape == X.shape and Y.dtype == X.dtype
    tol = F32_TOL[route] if dtype == torch.float32 else F64_TOL
    reference = spectral_clip_reference(X.double(), c)
    assert rel_err(Y, reference) < tol
    # The top clipped value s / sqrt(1 + s^2/c^2) < c is exact up to eps * s_max / c relative:
    # the Gram routes' m x m multiplier has eigenvalues from c / s_max to ~1, so its absolute
    # rounding eps is relative eps * s_max / c in the top direction (measured <= 0.7 of that
    # over 8 seeds in float32; at s = 300 c that is 2e-5, more than the 5.6e-6 that separates
    # the exact value from c, so a float32 result may exceed c by that much). The 16 covers
    # inputs with nothing to clip, where "polar" rounds at eps * c, not eps * s_max. In float64
    # the limit is convergence, not rounding: the polish quintic maps 1 + e to 1 + 2.5 e^3, and
    # the method leaves e ~ 1.4e-3 after one polish step, so 2.5 e^3 ~ 7e-9 after two.
    bound = max(2 * torch.finfo(dtype).eps * max(top, 16.0), 2e-8) * c
    top_value = torch.linalg.matrix_norm(Y.double(), ord=2)
    assert (top_value - torch.linalg.matrix_norm(reference, ord=2)).abs().max() < bound
    if dtype == torch.float64:
        assert top_value.max() < c


def test_routes_agree_on_realistic_updates() -> None:
    """An AdamW-like update (entries ~ +-1, s_max/c ~ 4.5): the routes agree to ~1e-5."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4, 128, 96, generator=gen).sign() * torch.rand(4, 128, 96, generator=gen)
    reference = spectral_clip_reference(X, 10.0)
    for route in ("auto", *ROUTES):
        assert rel_err(spectral_clip(X, 10.0, route=route), reference) < 2e-5, route


def test_gram_route_is_newton_schulz_on_x_ci() -> None:
    """Route "gram" is Newton–Schulz on Z = [X, cI] / nu (nu^2 = ||Z Z^T||_F) carried out on
    m x m matrices: compare with the explicit iteration on Z, unpolished, so that the method's
    non-converged band (which the two would hide by converging) must match too."""
    X = with_spectrum((24, 80), torch.logspace(2, -2, 24, dtype=torch.float64))
    c = 1.0
    spec = orthotorch.linalg.get_method("polar_express")
    Z = torch.cat([X, c * torch.eye(24, dtype=torch.float64)], dim=1)
    Y = Z / (Z @ Z.T).norm().sqrt()
    for a, b, cc in spec.schedule(24, 104, 8):
        A = Y @ Y.T
        Y = a * Y + (b * A + cc * A @ A) @ Y
    explicit = c * Y[:, :80]
    gram = spectral_clip(X, c, dtype=torch.float64, steps=8, polish_steps=0, route="gram")
    assert rel_err(gram, explicit) < 1e-9
    assert rel_err(gram, spectral_clip_reference(X, c)) > 1e-3  # the raw band is visible


def test_spectral_clip_is_accurate_with_every_registered_polar_method() -> None:
    X = with_spectrum((32, 96), torch.logspace(2, -1, 32)).float()
    reference = spectral_clip_reference(X, 1.0)
    for method in ("polar_express", "muon", "jiacheng", "root"):
        for route in ("gram", "polar"):
            err = rel_err(spectral_clip(X, 1.0, method=method, route=route), reference)
            assert err < 1e-2, (method, route)
    assert rel_err(spectral_clip(X, 1.0, method="svd", route="polar"), reference) < 1e-4


@pytest.mark.parametrize("route", ROUTES)
def test_spectral_clip_zero_huge_and_bf16(route) -> None:
    zero = spectral_clip(torch.zeros(4, 8, 16), 1.0, route=route)
    assert torch.equal(zero, torch.zeros(4, 8, 16))
    # Entries of 1e25: X X^T would overflow float32 without the max|X| rescaling.
    X = with_spectrum((16, 24), torch.logspace(1, -1, 16, dtype=torch.float64))
    huge = spectral_clip(X.float() * 1e25, 1e24, route=route)
    assert rel_err(huge, spectral_clip_reference(X * 1e25, 1e24)) < F32_TOL[route]
    Y = spectral_clip(X.bfloat16(), 1.0, route=route)
    assert Y.dtype == torch.bfloat16
    assert rel_err(Y, spectral_clip_reference(X.bfloat16().float(), 1.0)) < 2e-2


def test_spectral_clip_bad_input() -> None:
    X = torch.randn(8, 8)
    X[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"X of shape \(8, 8\) contains NaN or Inf"):
        spectral_clip(X, 1.0)
    for bad in (0.0, -1.0, float("inf"), float("nan"), "1", True):
        with pytest.raises(ValueError, match=r"c must be a positive finite number"):
            spectral_clip(torch.randn(4, 4), bad)
    with pytest.raises(ValueError, match=r"at least 2 dimensions"):
        spectral_clip(torch.randn(4), 1.0)
    with pytest.raises(ValueError, match=r"unknown orthogonalization method 'qr'"):
        spectral_clip(torch.randn(4, 4), 1.0, method="qr")
    with pytest.raises(ValueError, match=r"polish_steps must be a non-negative int"):
        spectral_clip(torch.randn(4, 4), 1.0, polish_steps=-1)
    with pytest.raises(ValueError, match=r"route must be one of 'auto', 'gram', 'eigh', 'polar'"):
        spectral_clip(torch.randn(4, 4), 1.0, route="svd")
    with pytest.raises(ValueError, match=r"route 'gram' needs a Newton–Schulz method"):
        spectral_clip(torch.randn(4, 4), 1.0, method="svd", route="gram")
    for option in ({"method": "muon"}, {"steps": 7}, {"polish_steps": 0}):
        name = next(iter(option))
        with pytest.raises(ValueError, match=rf"{name} configure\(s\) the Newton–Schulz.*'eigh'"):
            spectral_clip(torch.randn(4, 4), 1.0, route="eigh", **option)
    with pytest.raises(ValueError, match=r"route 'eigh' computes in float32 or float64"):
        spectral_clip(torch.randn(4, 4), 1.0, dtype=torch.bfloat16, route="eigh")


@pytest.mark.parametrize(
    "option,route",
    [
        ({"method": "muon"}, "gram"),
        ({"steps": 2}, "gram"),
        ({"polish_steps": 0}, "gram"),
        ({"method": "svd"}, "polar"),
    ],
)
def test_newton_schulz_options_act_on_the_default_route(option, route) -> None:
    """Issue 18, item 5: on the CPU the default route was "eigh", which ignored method, steps
    and polish_steps (the result was bitwise the same whatever they were), and method="svd"
    failed with an error about route "gram", which the user had not chosen. Given any of them,
    route="auto" now runs the Newton–Schulz route that uses them."""
    X = with_spectrum((24, 80), torch.logspace(2, -2, 24, dtype=torch.float64)).float()
    auto = spectral_clip(X, 1.0, **option)
    assert torch.equal(auto, spectral_clip(X, 1.0, **option, route=route))
    assert not torch.equal(auto, spectral_clip(X, 1.0, route="eigh"))
    if "method" not in option:  # a weaker schedule is visibly less accurate than the default
        assert rel_err(auto, spectral_clip_reference(X, 1.0)) > 1e-3
    assert torch.equal(spectral_clip(X, 1.0), spectral_clip(X, 1.0, route="eigh"))  # the default


# ----------------------------------------------------------------------------- SPECTRA
def adamw(model: nn.Module, **kw) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), **{"lr": 3e-3, "weight_decay": 0.1, **kw})


@pytest.mark.parametrize(
    "base",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.5, weight_decay=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),  # coupled: lambda = 0
    ],
    ids=["AdamW", "SGD", "Adam-coupled"],
)
def test_step_is_the_clipped_base_update(base) -> None:
    """X_{k+1} = (1 - lambda eta) X_k - alpha eta H_c(U), U recovered from the base step."""
    gen = torch.Generator().manual_seed(0)
    W = nn.Parameter(torch.randn(24, 8, generator=gen))  # tall: alpha = sqrt(3)
    b = nn.Parameter(torch.randn(8, generator=gen))
    W_ref, b_ref = copy.deepcopy(W), copy.deepcopy(b)
    opt = orthotorch.SPECTRA(base([W, b]), clip=0.01)
    plain = base([W_ref, b_ref])
    for step in range(3):
        G = torch.randn(24, 8, generator=gen)
        g = torch.randn(8, generator=gen)
        W.grad, b.grad, W_ref.grad, b_ref.grad = G, g, G.clone(), g.clone()
        X_k = W_ref.detach().clone()
        plain.step()
        group = plain.param_groups[0]
        eta = group["lr"]
        lam = orthotorch.optim.spectra.decoupled_weight_decay(plain, group)
        U = (X_k - W_ref.detach()) / eta - lam * X_k
        with torch.no_grad():
            W_ref.copy_(
                (1 - lam * eta) * X_k - math.sqrt(3) * eta * spectral_clip_reference(U, 0.01)
            )
        opt.step()
        assert rel_err(W, W_ref) < 1e-5, step
        assert torch.equal(b, b_ref)  # 1-D parameters keep the base step


def test_loss_goes_down_and_clip_bounds_update() -> None:
    model = small_cnn()
    opt = orthotorch.SPECTRA(adamw(model, lr=1e-2), clip=10.0)
    losses = train(model, opt, 40)
    assert losses[-1] < 0.5 * losses[0]
    # A tight clip bounds every matrix update's spectral norm by alpha * eta * c.
    opt = orthotorch.SPECTRA(adamw(model, lr=1e-2, weight_decay=0.0), clip=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1)
    for p, x in zip(model.parameters(), before, strict=True):
        if p.ndim >= 2:
            d = (p.detach() - x).reshape(p.shape[0], -1)
            alpha = math.sqrt(max(1.0, d.shape[0] / d.shape[1]))
            assert torch.linalg.matrix_norm(d, ord=2) <= 1.01 * alpha * 1e-2 * 1e-3


def test_wraps_orthotorch_optimizers() -> None:
    model = small_cnn()
    base = orthotorch.Muon(orthotorch.param_groups(model), lr=0.02, adamw_lr=3e-3)
    losses = train(model, orthotorch.SPECTRA(base, clip=10.0), 40)
    # Plain Muon reaches 0.53x of the first loss in these 40 steps (0.52x wrapped).
    assert losses[-1] < 0.6 * losses[0]


def test_pre_clip_clips_the_gradient_in_place() -> None:
    model = nn.Linear(16, 8)
    opt = orthotorch.SPECTRA(adamw(model), clip=None, pre_clip=0.1)
    x = torch.randn(32, 16) * 100
    model(x).square().sum().backward()
    raw = model.weight.grad.clone()
    opt.step()
    assert rel_err(model.weight.grad, spectral_clip_reference(raw, 0.1)) < 1e-3
    assert torch.linalg.matrix_norm(model.weight.grad, ord=2) <= 0.1 * (1 + 1e-5)


def test_group_clip_override_turns_clipping_off() -> None:
    torch.manual_seed(0)
    model, ref = nn.Linear(8, 8), None
    ref = copy.deepcopy(model)
    opt = orthotorch.SPECTRA(
        torch.optim.AdamW([{"params": model.parameters(), "clip": None}], lr=0.1), clip=1e-3
    )
    plain = torch.optim.AdamW(ref.parameters(), lr=0.1)
    for m in (model, ref):
        m(torch.ones(2, 8)).sum().backward()
    opt.step()
    plain.step()
    assert torch.equal(model.weight, ref.weight)


def test_resume_from_checkpoint_is_bitwise_equal() -> None:
    def make(model):
        return orthotorch.SPECTRA(adamw(model), clip=0.5, pre_clip=2.0, route="gram")

    model = small_cnn()
    opt = make(model)
    train(model, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, 3, start=3)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert saved["opt"]["spectra"]["clip"] == 0.5
    resumed = small_cnn()
    resumed.load_state_dict(saved["model"])
    opt2 = orthotorch.SPECTRA(adamw(resumed), clip=7.0)  # settings come from the checkpoint
    opt2.load_state_dict(saved["opt"])
    assert (opt2.clip, opt2.pre_clip, opt2.route) == (0.5, 2.0, "gram")
    assert opt2.state is opt2.optimizer.state
    train(resumed, opt2, 3, start=3)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    # A plain base state dict loads too (and vice versa), and so do the settings of a
    # checkpoint written before ``route`` existed (the current route is kept).
    torch.optim.AdamW(resumed.parameters()).load_state_dict(opt2.state_dict())
    opt2.load_state_dict(adamw(resumed).state_dict())
    old = opt2.state_dict()
    del old["spectra"]["route"]
    opt3 = orthotorch.SPECTRA(adamw(resumed), route="eigh")
    opt3.load_state_dict(old)
    assert (opt3.clip, opt3.route) == (0.5, "eigh")


def test_non_finite_gradient_raises_and_changes_nothing() -> None:
    model = small_cnn()
    opt = orthotorch.SPECTRA(adamw(model), clip=1.0)
    train(model, opt, 2)
    params = copy.deepcopy(list(model.parameters()))
    state = copy.deepcopy(opt.state_dict())
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    model[3].weight.grad[0, 0] = float("nan")
    with pytest.raises(
        FloatingPointError,
        match=r"gradient of parameter params\[2\] \(shape \(32, 216\)\) contains NaN",
    ):
        opt.step()
    for a, b in zip(params, model.parameters(), strict=True):
        assert torch.equal(a, b)
    for key, s in state["state"].items():
        for name, value in s.items():
            assert torch.equal(value, opt.state_dict()["state"][key][name])


def test_scheduler_closure_zero_grad_and_add_param_group() -> None:
    model = small_cnn()
    opt = orthotorch.SPECTRA(adamw(model), clip=10.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    x, y = batch()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(5):
        loss = opt.step(closure)
        sched.step()
    assert torch.isfinite(loss)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.optimizer.param_groups[0]["lr"] == sched.get_last_lr()[0]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "clip": 2.0})
    assert len(opt.optimizer.param_groups) == 2
    with pytest.raises(ValueError, match=r"param group 2: clip must be a positive finite"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "clip": -1.0})
    assert len(opt.optimizer.param_groups) == 2


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"clip": 0.0}, r"clip must be a positive finite number .*got 0\.0"),
        ({"clip": -1.0}, r"clip must be a positive finite number"),
        ({"clip": float("nan")}, r"clip must be a positive finite number"),
        ({"pre_clip": 0}, r"pre_clip must be a positive finite number"),
        ({"clip": None}, r"clip and pre_clip are both None"),
        ({"method": "qr"}, r"unknown orthogonalization method 'qr'"),
        ({"steps": 0}, r"steps must be a positive int"),
        ({"distributed": "ddp"}, r"distributed must be one of 'auto', 'off'"),
        ({"route": "svd"}, r"route must be one of 'auto', 'gram', 'eigh', 'polar'"),
        ({"route": "eigh", "dtype": torch.bfloat16}, r"route 'eigh' computes in float32"),
        ({"route": "gram", "method": "svd"}, r"route 'gram' needs a Newton–Schulz method"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        orthotorch.SPECTRA(adamw(nn.Linear(2, 2)), **kwargs)


def test_wrapped_object_must_be_a_torch_optimizer() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"optimizer must be a torch\.optim\.Optimizer.*list"):
        orthotorch.SPECTRA(list(model.parameters()))
    with pytest.raises(ValueError, match=r"already wrapped in SPECTRA"):
        orthotorch.SPECTRA(orthotorch.SPECTRA(adamw(model)))
    with pytest.raises(ValueError, match=r"param group 0: clip must be a positive finite"):
        orthotorch.SPECTRA(torch.optim.SGD([{"params": model.parameters(), "clip": 0}], lr=0.1))
    # Sparse gradients have no dense update to clip: refused at construction, not at step 1.
    with pytest.raises(ValueError, match=r"SparseAdam, whose sparse gradients"):
        orthotorch.SPECTRA(torch.optim.SparseAdam(nn.Embedding(5, 3, sparse=True).parameters()))


def test_adafactor_weight_decay_is_kept_out_of_the_clip() -> None:
    """Adafactor decays as ``X *= 1 - lr wd`` (decoupled) but had no ``decoupled_weight_decay``
    key, so SPECTRA took it for coupled decay and clipped ``lr wd X`` away with the update."""
    gen = torch.Generator().manual_seed(0)
    # float64 throughout: float32 rounding of (1 - lr wd) X alone is ~5% of lr c here.
    W = nn.Parameter(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    lr, wd, c = 0.1, 0.5, 1e-4
    base = torch.optim.Adafactor([W], lr=lr, weight_decay=wd)
    opt = orthotorch.SPECTRA(base, clip=c, dtype=torch.float64)
    assert orthotorch.optim.spectra.decoupled_weight_decay(opt.optimizer, opt.param_groups[0]) == wd
    X_k = W.detach().clone()
    W.grad = torch.randn(16, 16, generator=gen, dtype=torch.float64)
    opt.step()
    # Square: alpha = 1, and the clipped update has spectral norm below c.
    step = W.detach() - (1 - lr * wd) * X_k
    assert torch.linalg.matrix_norm(step, ord=2) <= lr * c * (1 + 1e-3)


def test_finite_check_syncs_with_the_host_once() -> None:
    """The NaN/Inf pre-check copied every gradient norm to the host separately (one
    device->host sync per parameter on accelerators), not once per step as documented."""
    params = [nn.Parameter(torch.randn(4, 4)) for _ in range(10)]
    opt = orthotorch.SPECTRA(torch.optim.SGD(params, lr=0.1), clip=1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    calls = []
    original = torch.Tensor.cpu

    def counting(self, *args, **kwargs):
        calls.append(self.shape)
        return original(self, *args, **kwargs)

    torch.Tensor.cpu = counting  # type: ignore[method-assign]
    try:
        opt.step()
    finally:
        torch.Tensor.cpu = original  # type: ignore[method-assign]
    assert len(calls) == 1, calls


def test_load_state_dict_validates_settings_before_changing_anything() -> None:
    """A checkpoint with a bad method changed ``clip`` before raising, and one with an invalid
    route/dtype pair loaded silently and raised only at the next ``step()``."""
    model = nn.Linear(4, 4)
    opt = orthotorch.SPECTRA(adamw(model), clip=10.0)
    good = opt.state_dict()
    bad = dict(good, spectra=dict(good["spectra"], clip=0.5, method="nope"))
    with pytest.raises(ValueError, match=r"unknown orthogonalization method 'nope'"):
        opt.load_state_dict(bad)
    assert opt.clip == 10.0
    bad = dict(good, spectra=dict(good["spectra"], dtype=torch.bfloat16, route="eigh"))
    with pytest.raises(ValueError, match=r"route 'eigh' computes in float32 or float64"):
        opt.load_state_dict(bad)
    assert (opt.route, opt.dtype) == ("auto", torch.float32)


def test_a_step_the_base_skipped_stays_skipped() -> None:
    """With ``check_finite=False`` (what the NaN error message suggests) over a base with
    ``skip_nonfinite=True``, the base left the NaN-gradient parameter as it was, but SPECTRA
    still "clipped" the recovered update ``-lambda X_k`` and moved it (grew it, for tall
    weights with alpha > 1)."""
    gen = torch.Generator().manual_seed(0)
    W = nn.Parameter(torch.randn(32, 8, generator=gen))
    V = nn.Parameter(torch.randn(8, 8, generator=gen))
    base = orthotorch.Muon([W, V], lr=0.02, weight_decay=0.1, skip_nonfinite=True)
    opt = orthotorch.SPECTRA(base, clip=10.0, check_finite=False)
    W.grad = torch.full_like(W, float("nan"))
    V.grad = torch.randn(8, 8, generator=gen)
    W_before, V_before = W.detach().clone(), V.detach().clone()
    opt.step()
    assert base.state[W]["nonfinite_skips"] == 1
    assert torch.equal(W, W_before)
    assert torch.isfinite(V).all() and not torch.equal(V, V_before)


def test_spectra_clip_options_act_or_raise() -> None:
    """Regression: SPECTRA passed method/steps/polish_steps to the default CPU route (eigh),
    which runs no Newton–Schulz iteration, so they were accepted and ignored."""
    w = torch.nn.Parameter(torch.randn(8, 8))
    assert orthotorch.SPECTRA(torch.optim.SGD([w], lr=0.1)).route == "auto"
    assert orthotorch.SPECTRA(torch.optim.SGD([w], lr=0.1), steps=9).route == "gram"
    assert orthotorch.SPECTRA(torch.optim.SGD([w], lr=0.1), method="svd").route == "polar"
    with pytest.raises(ValueError, match=r"polish_steps configure\(s\) the Newton–Schulz routes"):
        orthotorch.SPECTRA(torch.optim.SGD([w], lr=0.1), route="eigh", polish_steps=3)


def test_clip_reaches_the_master_copies_of_bf16_parameters() -> None:
    """SPECTRA around a base with master_weights clips the float32 copy (else the base would
    write its unclipped copy back at the next step): a bf16 run tracks the float32 one, and
    every parameter is its master rounded."""
    torch.manual_seed(0)
    full = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    half = copy.deepcopy(full).to(torch.bfloat16)
    runs = []
    for model, kwargs in ((full, {}), (half, {"master_weights": True})):
        base = orthotorch.Muon(orthotorch.param_groups(model), lr=0.05, **kwargs)
        runs.append(orthotorch.SPECTRA(base, clip=0.02))
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        grads = [torch.randn(p.shape, generator=gen) for p in full.parameters()]
        for model, opt in zip((full, half), runs, strict=True):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.to(p.dtype)
            opt.step()
    for p, q in zip(full.parameters(), half.parameters(), strict=True):
        master = runs[1].state[q]["master_weight"]
        assert torch.equal(q, master.to(torch.bfloat16))
        assert (master - p).norm() / p.norm() < 1e-2
