"""functional.lowprec: stochastic rounding to bf16 and the bf16-momentum update."""

from __future__ import annotations

import pytest
import torch

from orthotorch.functional.lowprec import lowprec_momentum_, rounding_seed, stochastic_round_


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours() -> None:
    x = torch.full((200_000,), 1.0 + 2**-9, dtype=torch.float32)  # a quarter of a bf16 ulp at 1
    x[100_000:] *= -3
    out = stochastic_round_(
        torch.empty_like(x, dtype=torch.bfloat16), x, torch.Generator().manual_seed(0)
    )
    pos, neg = out[:100_000].float(), out[100_000:].float()
    assert set(pos.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(pos.mean().item() - x[0].item()) < 2e-4
    assert abs(neg.mean().item() - x[-1].item()) < 6e-4
    # Nearest rounding would lose the quarter ulp entirely.
    assert x[:1].bfloat16().item() == 1.0


def test_exact_and_special_values_are_kept() -> None:
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), float("-inf"), float("nan")])
    out = stochastic_round_(
        torch.empty(8, dtype=torch.bfloat16), x, torch.Generator().manual_seed(1)
    )
    assert torch.equal(out[:4].float(), x[:4])
    assert out[5] == float("inf") and out[6] == float("-inf") and out[7].isnan()


def test_small_momentum_updates_survive_in_bf16() -> None:
    """The failure stochastic rounding prevents: with nearest rounding a bf16 buffer at 1.0 fed
    1.001 never moves ((1 - mu) * 0.001 is below half an ulp); with SR its mean tracks float32."""
    g = torch.full((4096,), 1.001)
    buf_sr = torch.ones(4096, dtype=torch.bfloat16)
    buf_rn = torch.ones(4096, dtype=torch.bfloat16)
    ref = torch.ones(4096)
    for step in range(300):
        lowprec_momentum_([g], [buf_sr], 0.95, False, [rounding_seed(step, 0)])
        buf_rn.copy_(buf_rn.float().lerp(g, 0.05))
        ref.lerp_(g, 0.05)
    assert torch.equal(buf_rn, torch.ones(4096, dtype=torch.bfloat16))
    assert abs(buf_sr.float().mean().item() - ref.mean().item()) < 1e-4


def test_momentum_matches_float32_step_and_is_reproducible() -> None:
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(16, 8, generator=gen), torch.randn(5, generator=gen)]
    bufs = [torch.randn(16, 8, generator=gen).bfloat16(), torch.randn(5, generator=gen).bfloat16()]
    copies = [b.clone() for b in bufs]
    grads_before = [g.clone() for g in grads]
    steps = lowprec_momentum_(grads, bufs, 0.9, True, [11, 12])
    for g, b0, s in zip(grads_before, copies, steps):
        m32 = b0.float().lerp(g, 0.1)
        assert torch.allclose(s, g.lerp(m32, 0.9), atol=1e-6)
    assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads_before))
    again = [b.clone() for b in copies]
    lowprec_momentum_(grads, again, 0.9, True, [11, 12])
    assert all(torch.equal(a, b) for a, b in zip(again, bufs))


def test_bad_input_raises() -> None:
    gen = torch.Generator()
    with pytest.raises(ValueError, match="x must be float32"):
        stochastic_round_(
            torch.empty(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64), gen
        )
    with pytest.raises(ValueError, match="out must be bfloat16"):
        stochastic_round_(torch.empty(2), torch.ones(2), gen)
    with pytest.raises(ValueError, match="out shape"):
        stochastic_round_(torch.empty(3, dtype=torch.bfloat16), torch.ones(2), gen)
    with pytest.raises(ValueError, match="equal lengths"):
        lowprec_momentum_([torch.ones(2)], [], 0.9, True, [])


def _model_and_optimizer(momentum_dtype):
    import orthotorch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48))
    groups = [
        {"params": [model[0].weight, model[2].weight], "momentum_dtype": momentum_dtype},
        {"params": [model[0].bias, model[2].bias], "algorithm": "adamw"},
    ]
    return model, orthotorch.Muon(groups, lr=0.02)


def _steps(model, opt, seeds):
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _assert_resumes_bitwise(make) -> tuple:
    """Steps 0-5 straight, and 3-5 again from a state_dict saved after step 2: equal bits.
    Returns the uninterrupted ``(model, optimizer)``."""
    import copy

    model, opt = make()
    _steps(model, opt, range(3))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _steps(model, opt, range(3, 6))
    resumed, opt2 = make()
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    _steps(resumed, opt2, range(3, 6))
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    return model, opt


def test_muon_bf16_momentum_resumes_bitwise_and_halves_the_state() -> None:
    model, opt = _assert_resumes_bitwise(lambda: _model_and_optimizer(torch.bfloat16))

    weight = model[0].weight
    buf = opt.state[weight]["momentum_buffer"]
    assert buf.dtype == torch.bfloat16 and opt.state[weight]["momentum_rounds"] == 6
    full, full_opt = _model_and_optimizer(None)
    _steps(full, full_opt, range(1))
    assert full_opt.state[full[0].weight]["momentum_buffer"].dtype == torch.float32
    # Orthogonalized weights: 2 bytes of state per entry, against AdamW's 8 (two float32 moments).
    assert buf.element_size() * buf.numel() * 4 == 8 * weight.numel()


def test_bf16_momentum_trains_like_float32() -> None:
    """Same seeds, same gradients: bf16 momentum with stochastic rounding stays within bf16
    rounding of the float32-momentum run after a few steps."""
    runs = {}
    for dtype in (None, torch.bfloat16):
        model, opt = _model_and_optimizer(dtype)
        _steps(model, opt, range(5))
        runs[dtype] = model[0].weight.detach().clone()
    diff = (runs[None] - runs[torch.bfloat16]).norm() / runs[None].norm()
    assert diff < 1e-2


def test_bad_momentum_dtype_raises_at_construction() -> None:
    with pytest.raises(
        ValueError, match=r"momentum_dtype must be None .*torch.bfloat16 .* or torch.float32"
    ):
        _model_and_optimizer(torch.float16)


def _adamw_model_and_optimizer(momentum_dtype):
    import orthotorch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 32), torch.nn.Linear(32, 50))
    groups = orthotorch.param_groups(
        model, adamw={"momentum_dtype": momentum_dtype} if momentum_dtype else None
    )
    return model, orthotorch.Muon(groups, lr=0.02, adamw_lr=1e-2)


def test_adamw_group_bf16_first_moment_resumes_bitwise_and_trains_like_float32() -> None:
    model, opt = _assert_resumes_bitwise(lambda: _adamw_model_and_optimizer(torch.bfloat16))

    embedding = model[0].weight
    state = opt.state[embedding]
    assert state["exp_avg"].dtype == torch.bfloat16
    assert state["exp_avg_sq"].dtype == torch.float32  # the second moment stays float32

    full, full_opt = _adamw_model_and_optimizer(None)
    _steps(full, full_opt, range(6))
    diff = (full[0].weight - embedding).norm() / full[0].weight.norm()
    assert diff < 1e-2


def test_adamw_group_momentum_dtype_is_checked() -> None:
    with pytest.raises(ValueError, match=r"momentum_dtype of an AdamW group .* got torch.float16"):
        _adamw_model_and_optimizer(torch.float16)


def test_float32_momentum_for_bf16_parameters() -> None:
    """``momentum_dtype=torch.float32`` keeps the momentum of bf16 weights in float32 (resumed
    as float32: ``Optimizer.load_state_dict`` would round it to bf16)."""
    import orthotorch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 48)).bfloat16()
    opt = orthotorch.Muon(orthotorch.param_groups(model, momentum_dtype=torch.float32))
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    buf = opt.state[model[0].weight]["momentum_buffer"]
    assert buf.dtype == torch.float32
    opt.load_state_dict(opt.state_dict())
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"], buf)
