"""Conformance checks every optimizer in optim_db.OPTIMIZERS must pass."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import orthotorch
from optim_db import OPTIMIZERS, OptimizerInfo

ids = [info.name for info in OPTIMIZERS]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 32),
        nn.LayerNorm(32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    return x, y


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> list[float]:
    losses = []
    for t in range(start, start + steps):
        x, y = batch(t % 4)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def make(info: OptimizerInfo, model: nn.Module, **overrides):
    return info.cls(orthotorch.param_groups(model), **{**info.kwargs, **overrides})


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_loss_goes_down(info: OptimizerInfo) -> None:
    model = small_cnn()
    losses = train(model, make(info, model), 60)
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_resume_from_checkpoint_is_bitwise_equal(info: OptimizerInfo) -> None:
    model = small_cnn()
    opt = make(info, model)
    train(model, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, 5, start=5)
    reference = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = small_cnn()
    resumed.load_state_dict(saved["model"])
    opt2 = make(info, resumed)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, 5, start=5)
    for a, b in zip(reference, resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_dtype_is_kept(info: OptimizerInfo) -> None:
    model = small_cnn().to(torch.bfloat16)
    opt = make(info, model)
    x, y = batch()
    nn.functional.cross_entropy(model(x.bfloat16()), y).backward()
    opt.step()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for state in opt.state.values():
        for value in state.values():
            # Integer state (DCTAdamW's int32 column indices) is not a floating dtype to keep.
            if torch.is_tensor(value) and value.ndim > 0 and value.is_floating_point():
                assert value.dtype == torch.bfloat16


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
@pytest.mark.parametrize("where", [0, -1], ids=["hidden", "adamw"])
def test_non_finite_gradient_raises_and_changes_nothing(info: OptimizerInfo, where: int) -> None:
    model = small_cnn()
    opt = make(info, model)
    train(model, opt, 2)
    params_before = copy.deepcopy(list(model.parameters()))
    state_before = copy.deepcopy(opt.state_dict())
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    target = list(model.parameters())[where]
    target.grad.view(-1)[0] = float("nan")
    with pytest.raises(
        FloatingPointError, match=r"gradient of parameter '.*' \(shape .*\) contains NaN"
    ):
        opt.step()
    for a, b in zip(params_before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    after = opt.state_dict()
    for key, state in state_before["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][key][name]))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_one_dimensional_parameter_in_orthogonal_group_is_named(info: OptimizerInfo) -> None:
    model = small_cnn()
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match=r"parameter '0\.bias' has shape \(6,\).*param_groups"):
        info.cls(named, **info.kwargs)
    with pytest.raises(ValueError, match=r"parameter params\[1\] has shape \(6,\)"):
        info.cls([p for _, p in named], **info.kwargs)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_update_rules_are_used_or_refused(info: OptimizerInfo) -> None:
    """Regression: optimizers with their own direction (ARO, ROOT, AuON, the low-rank ones)
    accepted ``param_groups(policy="symmetry")`` groups and silently ignored their rules."""
    model = small_cnn()
    groups = orthotorch.param_groups(model, policy="symmetry", lr=1e-3)
    assert any(g.get("update") not in (None, "spectral") for g in groups)
    if info.cls.accepts_update_rules:
        train(model, info.cls(groups, **info.kwargs), steps=1)
    else:
        with pytest.raises(ValueError, match=r"update='.*takes no update rule"):
            info.cls(groups, **info.kwargs)


@pytest.mark.parametrize(
    "info,kwargs,message",
    [(info, kw, msg) for info in OPTIMIZERS for kw, msg in info.error_inputs],
    ids=[f"{info.name}-{next(iter(kw))}" for info in OPTIMIZERS for kw, _ in info.error_inputs],
)
def test_bad_hyperparameters_raise(info: OptimizerInfo, kwargs: dict, message: str) -> None:
    model = small_cnn()
    with pytest.raises(ValueError, match=message):
        make(info, model, **kwargs)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_rejected_param_group_leaves_optimizer_unchanged(info: OptimizerInfo) -> None:
    model = small_cnn()
    opt = make(info, model)
    n = len(opt.param_groups)
    extra = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="algorithm must be"):
        opt.add_param_group({"params": [("extra", extra)], "algorithm": "sgd"})
    with pytest.raises(ValueError, match=r"parameter 'bias' has shape \(3,\)"):
        opt.add_param_group({"params": [("bias", nn.Parameter(torch.randn(3)))]})
    assert len(opt.param_groups) == n
    opt.add_param_group({"params": [("extra", extra)]})
    assert len(opt.param_groups) == n + 1


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_works_with_lr_scheduler_and_closure(info: OptimizerInfo) -> None:
    model = small_cnn()
    opt = make(info, model)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=10
    )
    x, y = batch()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(10):
        loss = opt.step(closure)
        sched.step()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_parameters_without_grad_are_skipped(info: OptimizerInfo) -> None:
    model = small_cnn()
    opt = make(info, model)
    frozen = model[6].weight
    before = frozen.detach().clone()
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before)
    assert frozen not in opt.state


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_skip_nonfinite_skips_only_that_parameter_and_counts(info: OptimizerInfo) -> None:
    model = small_cnn()
    opt = make(info, model, skip_nonfinite=True)
    train(model, opt, 2)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    x, y = batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    params[2].grad[0, 0] = float("inf")  # the first Linear weight
    opt.step()
    assert torch.equal(params[2], before[2])
    assert opt.state[params[2]]["nonfinite_skips"] == 1
    assert not torch.equal(params[0], before[0])
    assert all(torch.isfinite(p).all() for p in params)


# ----------------------------------------------------------------- values, not only "no raise"
def _orthogonal_params(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups if g["algorithm"] != "adamw" for p in g["params"]]


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_each_group_steps_with_its_own_lr(info: OptimizerInfo) -> None:
    """Regression: replacing ``group["lr"]`` by the optimizer's default lr in the orthogonalized
    update passed every test. A group at lr = 0 must not move (weight decay is lr-scaled too),
    while the optimizer's default lr is not 0; and the step of a group at 2x lr is 2x as large
    (from the same state, the first step of these optimizers is linear in lr)."""
    torch.manual_seed(0)
    model = small_cnn()
    twin = copy.deepcopy(model)
    frozen_group = make(info, model)
    for group in frozen_group.param_groups:
        if group["algorithm"] != "adamw":
            group["lr"] = 0.0
    before = [p.detach().clone() for p in _orthogonal_params(frozen_group)]
    train(model, frozen_group, steps=2)
    for p, b in zip(_orthogonal_params(frozen_group), before, strict=True):
        assert torch.equal(p.detach(), b)
    # Twice the lr, no weight decay: twice the step.
    base = info.kwargs.get("lr", frozen_group.defaults["lr"])
    deltas = []
    for scale in (1.0, 2.0):
        m = copy.deepcopy(twin)
        opt = make(info, m, weight_decay=0.0)
        for group in opt.param_groups:
            if group["algorithm"] != "adamw":
                group["lr"] = base * scale
        start = [p.detach().clone() for p in _orthogonal_params(opt)]
        train(m, opt, steps=1)
        deltas.append([p.detach() - s for p, s in zip(_orthogonal_params(opt), start, strict=True)])
    for d1, d2 in zip(*deltas, strict=True):
        torch.testing.assert_close(d2, 2 * d1, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_scheduler_lr_reaches_the_update(info: OptimizerInfo) -> None:
    """A LambdaLR that sets the lr to 0 from the second step on must stop every group."""
    model = small_cnn()
    opt = make(info, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step == 0 else 0.0)
    train(model, opt, steps=1)
    sched.step()
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, steps=2, start=1)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)


def test_update_rules_are_really_used() -> None:
    """Regression: forcing every group to the spectral rule passed the rule conformance test.
    One step from zero state is p0 - lr * rule(M_1) exactly, for every registered rule."""
    from orthotorch import distributed
    from orthotorch.functional import available_update_rules, get_update_rule

    torch.manual_seed(0)
    grad = torch.randn(24, 40)
    results = {}
    for rule in available_update_rules():
        p = nn.Parameter(torch.zeros(24, 40))
        opt = orthotorch.Muon([{"params": [p], "update": rule}], lr=1.0, weight_decay=0.0)
        p.grad = grad.clone()
        opt.step()
        momentum = opt.state[p]["momentum_buffer"]
        mu = opt.param_groups[0]["momentum"]
        kernel, dtype = get_update_rule(rule).prepare(opt.param_groups[0])
        (expected,) = distributed.map_matrices(
            [torch.lerp(grad, momentum, mu)],
            kernel,
            dtype,
            "off",
            scale=lambda shape, opt=opt: opt._scale(opt.param_groups[0], shape),
        )
        torch.testing.assert_close(p.detach(), -expected.float(), rtol=1e-5, atol=1e-6)
        results[rule] = p.detach()
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(results[a], results[b], atol=1e-3), (a, b)


@pytest.mark.parametrize("saver", OPTIMIZERS, ids=ids)
def test_another_optimizers_checkpoint_is_refused_on_load(saver: OptimizerInfo) -> None:
    """Regression: Muon's state loaded into ROOT/ARO/AuON was accepted, then every step raised a
    bare KeyError and the optimizer stayed broken. Every pair is refused at load, naming both
    algorithms, and the loading optimizer is left as it was."""
    model = small_cnn()
    train(model, make(saver, model), steps=1)
    saved = make(saver, model)
    train(model, saved, steps=1)
    checkpoint = saved.state_dict()
    for loader in OPTIMIZERS:
        target = make(loader, model)
        if target.algorithm == saved.algorithm:
            continue
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(ValueError, match=rf"saved with algorithm '{saved.algorithm}'"):
            target.load_state_dict(checkpoint)
        assert target.state_dict() == before
        train(model, target, steps=1)  # and it still works


def _bf16_twins(info: OptimizerInfo, **overrides):
    """A bf16 model with master weights and a float32 copy of it, with their optimizers."""
    torch.manual_seed(0)
    half = small_cnn().to(torch.bfloat16)
    full = copy.deepcopy(half).float()
    return (
        half,
        make(info, half, master_weights=True, **overrides),
        full,
        make(info, full, **overrides),
    )


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_master_weights_train_like_float32(info: OptimizerInfo) -> None:
    """With ``master_weights`` a bf16 model's float32 copies take exactly the float32 run's
    steps (given the same gradients), and each parameter is its copy rounded to bf16."""
    half, opt_half, full, opt_full = _bf16_twins(info)
    for t in range(3):
        x, y = batch(t)
        opt_half.zero_grad()
        nn.functional.cross_entropy(half(x.bfloat16()), y).backward()
        for p, q in zip(half.parameters(), full.parameters(), strict=True):
            q.grad = p.grad.float()
        opt_half.step()
        opt_full.step()
    for p, q in zip(half.parameters(), full.parameters(), strict=True):
        assert p.dtype == torch.bfloat16
        master = opt_half.state[p]["master_weight"]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master, q, rtol=0, atol=0)
        assert torch.equal(p, master.to(torch.bfloat16))
    for state in opt_half.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0 and value.is_floating_point():
                assert value.dtype == torch.float32, key


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_master_weights_keep_updates_below_bf16_resolution(info: OptimizerInfo) -> None:
    """At a small lr most bf16 entries do not move in one step; the float32 copy does."""
    moved = {}
    for master_weights in (False, True):
        torch.manual_seed(0)
        half = small_cnn().to(torch.bfloat16)
        opt = make(info, half, lr=1e-5, master_weights=master_weights)
        weight = next(half.parameters())  # the convolution kernel: an orthogonalized matrix
        before = weight.detach().float().clone()
        x, y = batch()
        nn.functional.cross_entropy(half(x.bfloat16()), y).backward()
        opt.step()
        after = opt.state[weight]["master_weight"] if master_weights else weight.float()
        moved[master_weights] = (after != before).float().mean().item()
    assert moved[True] > 0.75 > 0.25 > moved[False]


@pytest.mark.parametrize("info", OPTIMIZERS, ids=ids)
def test_master_weights_resume_bitwise(info: OptimizerInfo) -> None:
    """The float32 copies and float32 state come back from a checkpoint as float32
    (``Optimizer.load_state_dict`` alone would round them to the bf16 parameters' dtype)."""
    half, opt, _, _ = _bf16_twins(info)

    def steps(model, optimizer, start):
        for t in range(start, start + 3):
            x, y = batch(t % 4)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x.bfloat16()), y).backward()
            optimizer.step()

    steps(half, opt, 0)
    buffer = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt.state_dict()}, buffer)
    steps(half, opt, 3)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = small_cnn().to(torch.bfloat16)
    resumed.load_state_dict(saved["model"])
    opt2 = make(info, resumed, master_weights=True)
    opt2.load_state_dict(saved["opt"])
    for p in resumed.parameters():
        assert opt2.state[p]["master_weight"].dtype == torch.float32
    steps(resumed, opt2, 3)
    for a, b in zip(half.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["master_weight"], opt2.state[b]["master_weight"])


def test_master_weights_must_be_a_bool() -> None:
    model = small_cnn()
    with pytest.raises(ValueError, match=r"master_weights must be True or False, got 1"):
        orthotorch.Muon(orthotorch.param_groups(model), master_weights=1)
