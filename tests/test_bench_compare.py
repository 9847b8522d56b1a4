"""compare v2: sweeps on tuning seeds, schedules on every group, resume, budgets, failures."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import orthotorch
from orthotorch import bench
from orthotorch.bench.runner import RunFailedError
from orthotorch.bench.schedules import Schedule
from orthotorch.bench.sweep import lr_grid, pick_best

CURVATURE = 2.0  # the quadratic's Hessian is CURVATURE * I: GD's best lr is 1 / CURVATURE


# ----------------------------------------------------------------------------------- sweeps
def _quadratic(seen: list[int]):
    """f(w) = CURVATURE/2 |w|^2 in float64; records every seed it is set up with."""

    def setup(seed, device):
        seen.append(seed)
        gen = torch.Generator().manual_seed(seed)
        model = nn.Module()
        model.w = nn.Parameter(torch.randn(8, generator=gen, dtype=torch.float64))

        def loss(m, _):
            return 0.5 * CURVATURE * m.w.square().sum()

        return bench.TaskSetup(model, itertools.repeat(None), loss, lambda m: {"loss": loss(m, 0)})

    return bench.Task("quadratic", setup, metric="loss", eval_every=5)


def _sgd(centre: float) -> bench.OptimizerSpec:
    return bench.OptimizerSpec(
        "sgd", lambda m, lr, _: torch.optim.SGD(m.parameters(), lr=lr), lr={"*": centre}
    )


def _gd_final(lr: float, seed: int, steps: int) -> float:
    # Gradient descent on CURVATURE/2 |w|^2: w_T = (1 - lr*CURVATURE)^T w_0.
    w0 = torch.randn(8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 0.5 * CURVATURE * (1 - lr * CURVATURE) ** (2 * steps) * float(w0.square().sum())


def test_sweep_picks_the_computed_best_and_never_uses_final_seeds():
    seen: list[int] = []
    steps, tuning, final = 10, [7, 8], [0, 1]
    result = bench.compare(
        _quadratic(seen),
        optimizers={"sgd": _sgd(0.3)},
        steps=steps,
        seeds=final,
        tuning_seeds=tuning,
        schedule=Schedule("constant", warmup=0.0),
        progress=False,
    )
    grid = lr_grid(0.3)
    assert grid == [0.075, 0.15, 0.3, 0.6, 1.2]
    # The best grid lr minimises the contraction |1 - lr * CURVATURE| (here 0.6, not an edge).
    best = min(grid, key=lambda lr: abs(1 - lr * CURVATURE))
    sweep = result.sweeps["sgd"]
    assert sweep["chosen_lr"] == best == 0.6 and not sweep["at_edge"]
    for lr, score in zip(grid, sweep["scores"]):
        expected = sum(_gd_final(lr, s, steps) for s in tuning) / len(tuning)
        assert score == pytest.approx(expected, rel=1e-9)
    # Tuning runs saw only the tuning seeds, and all of them ran before any final seed.
    assert seen[: len(grid) * len(tuning)] == [7, 8] * len(grid)
    assert seen[len(grid) * len(tuning) :] == final
    assert {r.seed for r in result.tuning_runs} == set(tuning)
    assert all(r.lr == 0.6 and r.phase == "final" for r in result.runs)
    assert result.summary()[0].lr_source == "swept"


def test_sweep_warns_at_the_grid_edge():
    with pytest.warns(UserWarning, match="edge of the sweep grid"):
        result = bench.compare(
            _quadratic([]),
            optimizers={"sgd": _sgd(0.05)},  # grid 0.0125 .. 0.2, optimum 0.5 above it
            steps=5,
            seeds=1,
            schedule="constant",
            progress=False,
        )
    assert result.sweeps["sgd"]["chosen_lr"] == 0.2 and result.sweeps["sgd"]["at_edge"]
    assert "AT GRID EDGE" in result.table() and "WARNING" in result.table()


def test_pick_best_ignores_diverged_and_breaks_ties_low():
    assert pick_best([3.0, math.inf, 1.0, 1.0, 2.0]) == (2, False)
    assert pick_best([math.inf, math.inf]) == (0, True)
    assert pick_best([1.0]) == (0, False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(seeds=[0, 1], tuning_seeds=[1, 2]), "never see the seeds"),
        (dict(seeds=[0, 0]), "more than once"),
        (dict(sweep_factors=[0.5, -1]), "positive"),
        (dict(sweep=["nope"]), "not being compared"),
        (dict(budget_s=0), "budget_s"),
    ],
)
def test_bad_sweep_and_seed_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.compare(_quadratic([]), optimizers={"sgd": _sgd(0.3)}, steps=1, **kwargs)


def test_what_is_swept_by_default():
    """Tuned registry defaults run as is; untuned ones and user tasks are swept."""
    default = bench.runner.resolve_optimizers("bytelm", ["adamw", "muon", "root"])
    assert [c.lr_source for c in default] == ["tuned default"] * 2 + ["default, not tuned"]
    assert bench.runner._sweep_set(None, default) == {"root"}
    small = bench.runner.resolve_optimizers(bench.bytelm_task("gpt-small"), ["adamw", "muon"])
    assert [c.lr_source for c in small] == ["default, not tuned"] * 2
    assert [c.lr for c in small] == [1e-3, 0.02]  # bytelm's lrs are the sweep centres


# ----------------------------------------------------------------------------------- schedules
def _reference_multiplier(kind: str, t: int, total: int, warmup: float) -> float:
    W = round(warmup * total)
    if t < W:
        return (t + 1) / W
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        p = (t - W) / (total - W)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))
    D = max(W, total - round(0.2 * total))
    return 1.0 if t < D else 0.1 + 0.9 * (1 - (t - D) / (total - D))


class _Recorder:
    """Wraps an optimizer's step to record every group's lr at every step."""

    def __init__(self, build):
        self.build, self.lrs, self.bases = build, [], []

    def __call__(self, model, lr, adamw_lr):
        opt = self.build(model, lr, adamw_lr)
        self.bases = [g["lr"] for g in opt.param_groups]  # as constructed, before any schedule
        step = opt.step

        def recording_step(*args, **kwargs):
            self.lrs.append([g["lr"] for g in opt.param_groups])
            return step(*args, **kwargs)

        opt.step = recording_step
        return opt


def _mlp_task(seed, device):
    # Hidden matrices (orthogonalized) and a head + biases (AdamW): two kinds of group.
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    )
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(seed))
    return bench.TaskSetup(model, itertools.repeat(x), lambda m, b: m(b).square().mean())


@pytest.mark.parametrize("kind", ["constant", "cosine", "wsd"])
def test_every_group_sees_the_schedule_formula_at_every_step(kind):
    steps, warmup = 20, 0.1
    recorders = {
        name: _Recorder(bench.get_optimizer(name).build)
        for name in ("adamw", "muon", "torch-muon", "spectra-adamw")
    }
    optimizers = {
        name: bench.OptimizerSpec(name, rec, lr={"*": bench.get_optimizer(name).default_lr("*")})
        for name, rec in recorders.items()
    }
    bench.compare(
        _mlp_task,
        optimizers=optimizers,
        steps=steps,
        seeds=1,
        lr={"adamw": 2e-3, "muon": 0.03, "torch-muon": 0.03, "spectra-adamw": 4e-3},
        sweep=False,
        schedule=Schedule(kind, warmup=warmup),
        eval_every=steps,
        progress=False,
    )
    bases = {"adamw": {2e-3}, "muon": {0.03, 2e-3}, "torch-muon": {0.03, 2e-3}}
    bases["spectra-adamw"] = {4e-3}
    for name, rec in recorders.items():
        # Muon and torch-muon hold orthogonalized groups and AdamW groups (the AdamW lr).
        assert set(rec.bases) == bases[name], name
        assert len(rec.lrs) == steps
        for t, lrs in enumerate(rec.lrs):
            m = _reference_multiplier(kind, t, steps, warmup)
            assert lrs == pytest.approx([b * m for b in rec.bases], rel=1e-12), (name, t)


def test_schedule_validation():
    with pytest.raises(ValueError, match="valid schedules: constant, cosine, wsd"):
        Schedule("linear")
    with pytest.raises(ValueError, match="warmup"):
        Schedule("cosine", warmup=1.0)


# ----------------------------------------------------------------------------------- resume
class _Interrupting:
    """Muon whose step raises KeyboardInterrupt at step ``at`` while ``armed`` (a kill)."""

    armed = False

    def __init__(self, at: int):
        self.at = at

    def __call__(self, model, lr, adamw_lr):
        opt = bench.get_optimizer("muon").build(model, lr, adamw_lr)
        step, calls = opt.step, itertools.count(1)

        def step_or_die(*args, **kwargs):
            if next(calls) == self.at and _Interrupting.armed:
                raise KeyboardInterrupt
            return step(*args, **kwargs)

        opt.step = step_or_die
        return opt


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    calls: list[int] = []
    matrix = bench.get_task("matrix")

    def counting_setup(seed, device):
        calls.append(seed)
        return matrix.setup(seed, device)

    task = bench.Task("matrix", counting_setup, metric="distance", eval_every=3)
    muon = bench.OptimizerSpec("muon", _Interrupting(at=8), lr={"*": 5e-3}, tuned=("matrix",))
    kwargs = dict(
        optimizers={"adamw": "adamw", "muon": muon},
        steps=12,
        seeds=[0, 1],
        checkpoint_s=0.0,
        progress=False,
        plots=False,
    )
    _Interrupting.armed = True
    with pytest.raises(KeyboardInterrupt):
        bench.compare(task, out=tmp_path / "killed", **kwargs)
    assert calls == [0, 1, 0]  # adamw finished both seeds, muon died in seed 0
    assert len(list((tmp_path / "killed" / "checkpoints").glob("*.pt"))) == 1
    _Interrupting.armed = False
    calls.clear()
    resumed = bench.compare(task, out=tmp_path / "killed", **kwargs)
    assert calls == [0, 1]  # adamw skipped; muon seed 0 resumed, seed 1 run
    assert [r.resumed_from for r in resumed.runs] == [None, None, 6, None]
    assert not list((tmp_path / "killed" / "checkpoints").glob("*.pt"))
    fresh = bench.compare(task, out=tmp_path / "fresh", **kwargs)
    for a, b in zip(resumed.runs, fresh.runs):
        assert (a.optimizer, a.seed, a.eval_steps) == (b.optimizer, b.seed, b.eval_steps)
        assert a.metrics == b.metrics and a.train_loss == b.train_loss
    # A third call with the same out does nothing but read the files.
    calls.clear()
    again = bench.compare(task, out=tmp_path / "killed", **kwargs)
    assert calls == [] and [r.metrics for r in again.runs] == [r.metrics for r in fresh.runs]


def test_budget_ends_runs_early_and_marks_them(tmp_path):
    result = bench.compare(
        "matrix",
        optimizers=["adamw"],
        steps=50,
        seeds=2,
        budget_s=1e-9,
        progress=False,
        plots=False,
        out=tmp_path,
    )
    for run in result.runs:
        assert run.budget_stopped and run.stopped_at == 1 and run.eval_steps[-1] == 1
    assert result.summary()[0].budget_stopped == 2
    assert "budget: 2/2 stopped early" in result.table()


# ----------------------------------------------------------------------------------- failures
class _Boom(torch.optim.SGD):
    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            raise RuntimeError("boom in the update")
        return super().step(closure)


def test_a_non_divergence_error_stops_compare_naming_the_optimizer(tmp_path):
    with pytest.raises(RunFailedError, match=r"'exploder'.*step 2.*RuntimeError: boom"):
        bench.compare(
            "matrix",
            optimizers={"adamw": "adamw", "exploder": lambda m: _Boom(m.parameters(), lr=0.1)},
            steps=4,
            seeds=1,
            progress=False,
            plots=False,
            out=tmp_path,
        )
    assert len(list((tmp_path / "runs" / "final" / "adamw").glob("*.json"))) == 1


def test_baseline_row_is_not_judged_against_its_own_mean():
    result = bench.compare(
        "matrix", optimizers=["adamw", "muon"], steps=6, seeds=2, progress=False, plots=False
    )
    row = result.table().splitlines()[2]
    assert row.startswith("adamw") and "- (own mean)" in row and "not reached" not in row


# ----------------------------------------------------------------------------------- factories
def test_factory_form_on_your_own_model_and_data():
    X = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    y = X @ torch.randn(8, 1, generator=torch.Generator().manual_seed(1))

    def batches(seed):
        gen = torch.Generator().manual_seed(seed)
        return (X[torch.randperm(256, generator=gen)[:32]] for _ in range(8))  # one-shot

    def val_loss(model):
        return float((model(X) - y).square().mean())

    result = orthotorch.bench.compare(
        lambda: nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)),
        batches,
        lambda model, xb: (model(xb) - xb @ torch.linalg.lstsq(X, y).solution).square().mean(),
        evaluate=val_loss,
        optimizers=["adamw", "muon"],
        steps=20,  # longer than one pass of the 8-batch iterator: it is re-made
        seeds=2,
        sweep=False,
        progress=False,
    )
    assert result.task == "custom" and [s.optimizer for s in result.summary()] == ["adamw", "muon"]
    assert all(len(r.train_loss) == 20 and r.eval_steps[-1] == 20 for r in result.runs)
    with pytest.raises(TypeError, match="pass optimizers by keyword"):
        bench.compare("matrix", ["adamw"])
