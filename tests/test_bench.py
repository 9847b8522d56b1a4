"""The ``orthotorch.bench`` Python API: tasks, optimizer registry, compare(), micro-benchmarks."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from orthotorch import bench
from orthotorch.bench.micro import newton_schulz_flops, parse_shape
from orthotorch.bench.report import CompareResult, RunRecord

DEVICE = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------- registries
@pytest.mark.parametrize("task", bench.available_tasks())
@pytest.mark.parametrize("name", bench.available_optimizers())
def test_every_optimizer_steps_every_task(task, name):
    """Each registry optimizer builds from a task's model and lowers nothing to NaN in 2 steps."""
    spec = bench.get_optimizer(name)
    setup = bench.get_task(task).setup(0, DEVICE)
    opt = spec.build(setup.model, spec.default_lr(task), 1e-3)
    before = [p.detach().clone() for p in setup.model.parameters()]
    for _ in range(2):
        loss = setup.loss(setup.model, next(setup.batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = list(setup.model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert bench.optimizer_state_bytes(opt) > 0


def test_torch_muon_sends_conv_kernels_to_adamw():
    """torch.optim.Muon rejects 4-D weights: the combined optimizer gives them to AdamW."""
    setup = bench.get_task("digits").setup(0, DEVICE)
    opt = bench.TorchMuonWithAdamW.from_model(setup.model, 0.02, 1e-3)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert any(p.ndim == 4 for g in adamw.param_groups for p in g["params"])


def test_orthotorch_muon_orthogonalizes_conv_kernels():
    """The digits task exercises 4-D kernels in orthotorch.Muon's orthogonalized group."""
    setup = bench.get_task("digits").setup(0, DEVICE)
    opt = bench.get_optimizer("muon").build(setup.model, 0.02, 1e-3)
    ortho = [p for g in opt.param_groups if g["algorithm"] != "adamw" for p in g["params"]]
    assert any(p.ndim == 4 for p in ortho)


def test_unknown_names_list_choices():
    with pytest.raises(ValueError, match="valid tasks: bytelm, digits, matrix"):
        bench.get_task("nope")
    with pytest.raises(ValueError, match="valid optimizers: adamw, muon"):
        bench.get_optimizer("nope")
    with pytest.raises(ValueError, match="not being compared"):
        bench.compare(
            "matrix", optimizers=["adamw"], steps=1, seeds=1, lr={"muon": 0.1}, progress=False
        )


def test_register_optimizer_is_one_entry(monkeypatch):
    monkeypatch.setitem(bench.OPTIMIZERS, "sgd", None)  # restored after the test
    spec = bench.OptimizerSpec(
        "sgd", lambda m, lr, _: torch.optim.SGD(m.parameters(), lr=lr), lr={"*": 0.1}
    )
    bench.register_optimizer(spec, overwrite=True)
    result = bench.compare(
        "matrix", optimizers=["adamw", "sgd"], steps=3, seeds=1, progress=False, sweep=False
    )
    assert result.optimizers() == ["adamw", "sgd"]


# ----------------------------------------------------------------------------------- data
def test_stdlib_corpus_is_split_by_file_and_deterministic():
    train, val, n_files = bench.stdlib_corpus()
    assert n_files > 50 and len(train) > 10 * len(val) > 0
    assert train.dtype == torch.long and int(train.max()) < 256
    # NUL separates files and never occurs inside Python source.
    assert (train == 0).sum() + (val == 0).sum() == n_files
    bench.stdlib_corpus.cache_clear()
    again, _, _ = bench.stdlib_corpus()
    assert torch.equal(train, again)


def test_matrix_task_optimum_is_known():
    setup = bench.get_task("matrix").setup(0, DEVICE)
    assert setup.evaluate(setup.model)["distance"] == pytest.approx(1.0, abs=0.01)
    target = setup.batches.__next__()
    x, y = target
    # The exact optimum W = M* has zero loss and zero distance.
    with torch.no_grad():
        M = torch.linalg.lstsq(x, y).solution.T
        setup.model.left.copy_(M)
        setup.model.right.copy_(torch.eye(M.shape[1]))
    assert setup.evaluate(setup.model)["distance"] < 1e-4


# ----------------------------------------------------------------------------------- compare
def _curves(result: CompareResult) -> list:
    return [(r.optimizer, r.seed, r.train_loss, r.metrics) for r in result.runs]


@pytest.mark.parametrize("task", ["bytelm", "digits"])
def test_same_seed_gives_identical_curves(task):
    kwargs = dict(steps=3, seeds=[3], eval_every=3, progress=False)
    first = bench.compare(task, optimizers=["adamw", "muon"], **kwargs)
    second = bench.compare(task, optimizers=["adamw", "muon"], **kwargs)
    assert _curves(first) == _curves(second)
    # Runs are paired by seed: the same initial model, so the same step-0 evaluation.
    zero = {r.optimizer: r.metrics[first.metric][0] for r in first.runs}
    assert zero["adamw"] == zero["muon"]


def test_custom_task_and_factories(tmp_path):
    """The public API: own model factory, batches, loss and optimizer factories."""

    def regression(seed, device):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        w = torch.randn(4, 1, generator=torch.Generator().manual_seed(99))

        def batches():
            gen = torch.Generator().manual_seed(seed)
            while True:
                x = torch.randn(32, 4, generator=gen)
                yield x, x @ w

        return bench.TaskSetup(model, batches(), lambda m, b: (m(b[0]) - b[1]).square().mean())

    result = bench.compare(
        regression,
        optimizers={"adamw": "adamw", "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05)},
        steps=6,
        seeds=2,
        eval_every=3,
        out=tmp_path,
        progress=False,
        sweep=False,
    )
    assert result.task == "regression" and result.complete
    assert [s.optimizer for s in result.summary()] == ["adamw", "sgd"]
    assert (tmp_path / "loss_vs_step.png").read_bytes().startswith(PNG_MAGIC)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["runs"]) == 4 and data["runs"][0]["eval_steps"] == [3, 6]


class _NaNAfter(torch.optim.SGD):
    """Turns the parameters into NaN on its second step (a diverging optimizer)."""

    def step(self, closure=None):
        super().step(closure)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            with torch.no_grad():
                for g in self.param_groups:
                    for p in g["params"]:
                        p.fill_(math.nan)


def test_nan_loss_marks_diverged_and_continues(tmp_path):
    result = bench.compare(
        "matrix",
        optimizers={"bad": lambda m: _NaNAfter(m.parameters(), lr=0.01), "adamw": "adamw"},
        steps=6,
        seeds=2,
        eval_every=2,
        out=tmp_path,
        progress=False,
    )
    bad, good = result.summary()
    assert bad.diverged == 2 and bad.final is None and bad.verdict == "diverged"
    assert good.diverged == 0 and good.final is not None
    assert "diverged" in result.table()
    assert all(r.diverged_at == 2 for r in result.runs_of("bad"))
    data = json.loads((tmp_path / "results.json").read_text())  # NaN written as null
    assert data["runs"][0]["diverged"] is True


def test_nan_gradient_valueerror_marks_diverged():
    """orthotorch optimizers raise ValueError on NaN gradients; compare catches it."""

    def nan_grad(seed, device):
        torch.manual_seed(seed)
        model = nn.Module()
        model.weight = nn.Parameter(torch.randn(4, 4))

        def loss(m, _):
            # sqrt'(0) = inf: a finite loss whose gradient is NaN (0 * inf).
            return torch.sqrt((m.weight * 0).abs().sum())

        return bench.TaskSetup(model, itertools.repeat(None), loss)

    result = bench.compare(
        nan_grad, optimizers=["muon"], steps=3, seeds=1, progress=False, sweep=False
    )
    (run,) = result.runs
    assert run.diverged and run.diverged_at == 1 and "NaN" in run.error


def test_partial_results_survive_an_interrupt(tmp_path):
    class Interrupt(torch.optim.SGD):
        def step(self, closure=None):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bench.compare(
            "matrix",
            optimizers={"adamw": "adamw", "stop": lambda m: Interrupt(m.parameters(), lr=0.1)},
            steps=3,
            seeds=1,
            out=tmp_path,
            progress=False,
        )
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["complete"] is False
    assert [r["optimizer"] for r in data["runs"]] == ["adamw"]
    assert "PARTIAL" in (tmp_path / "results.md").read_text()


def _record(name, seed, finals, steps=(0, 10, 20)):
    return RunRecord(
        optimizer=name,
        seed=seed,
        lr=0.1,
        eval_steps=list(steps),
        eval_time_s=[0.0, 1.0, 2.0],
        metrics={"loss": finals},
        train_loss=[1.0] * 20,
        step_time_s=[0.01] * 20,
    )


def test_summary_verdicts_and_target():
    result = CompareResult("t", "loss", "loss", config={"seeds": [0, 1]}, environment={})
    result.runs = [
        _record("adamw", 0, [3.0, 2.0, 1.0]),
        _record("adamw", 1, [3.0, 2.2, 1.2]),
        _record("muon", 0, [3.0, 1.0, 0.5]),
        _record("muon", 1, [3.0, 1.1, 0.6]),
        _record("close", 0, [3.0, 1.5, 1.1]),
        _record("close", 1, [3.0, 1.5, 1.3]),
    ]
    rows = {s.optimizer: s for s in result.summary()}
    assert result.resolved_target()[0] == pytest.approx(1.1)
    assert rows["muon"].verdict == "better, beyond seed spread"
    assert rows["muon"].steps_to_target == 10 and rows["muon"].time_to_target_s == pytest.approx(
        0.1
    )
    assert rows["close"].verdict == "within seed spread"
    assert rows["close"].steps_to_target is None and rows["close"].reached == 1
    assert "does NOT exceed the seed-to-seed spread" in result.spread_note()


# ----------------------------------------------------------------------------------- micro
def test_newton_schulz_flops_and_shapes():
    assert newton_schulz_flops(2, 3, 1) == 4 * 4 * 3 + 2 * 8 + 3 * 6
    assert newton_schulz_flops(3, 2, 5) == newton_schulz_flops(2, 3, 5)
    assert parse_shape("512x2048") == (512, 2048)
    with pytest.raises(ValueError, match="512x2048"):
        parse_shape("512")


def test_bench_quick_measures_every_method_and_optimizer():
    result = bench.bench(quick=True, shapes=[(32, 64)], repeats=2)
    assert [k.method for k in result.kernels] == list(bench.micro.available_methods())
    for k in result.kernels:
        assert k.ms > 0 and k.matmul_gflops > 0 and k.orthogonality_error >= 0
        assert (k.gflops is None) == (k.method == "svd")
    svd = next(k for k in result.kernels if k.method == "svd")
    assert svd.orthogonality_error < 1e-4
    steps = {s.optimizer: s for s in result.steps}
    assert set(steps) == set(bench.available_optimizers())
    assert steps["torch-muon"].vs_torch_muon == 1.0 and steps["adamw"].vs_adamw == 1.0
    assert json.dumps(result.to_dict())
    assert "vs torch.optim.Muon" in result.table()
