"""torch.compile: a compiled model stepped by our optimizer, and a compiled ``optimizer.step``.

Graph breaks and recompiles are decided by Dynamo whatever the backend, so these tests trace
with ``backend="eager"`` (seconds, where inductor takes a minute per optimizer on this CPU);
timings of the inductor-compiled step live in ``benchmarks/compiled_step.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from torch import nn

import orthotorch

# Optimizers whose whole default step is meant to trace as one graph.
COMPILED = {
    "Muon": (orthotorch.Muon, {"lr": 0.02}),
    "ROOT": (orthotorch.ROOT, {"lr": 0.02}),
    "AuON": (orthotorch.AuON, {"lr": 0.02}),
    "HybridAuON": (orthotorch.AuON, {"lr": 0.02, "hybrid": True}),
    "ARO": (orthotorch.ARO, {"lr": 0.02}),
    "NorMuon": (orthotorch.NorMuon, {"lr": 0.02}),
    "Dion": (orthotorch.Dion, {"lr": 0.02, "rank": 0.5}),
    "MuonMaster": (orthotorch.Muon, {"lr": 0.02, "master_weights": True}),
}
# Steps that trace: the first (empty state), the second (the state it created); ARO's host
# step counter is specialised once more (0, 1, then dynamic) before it settles.
SETTLED_FROM = {"ARO": 3}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dynamo.reset()
    yield
    dynamo.reset()
    torch.set_num_threads(threads)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(32, 16), nn.Flatten(), nn.Linear(64, 32), nn.LayerNorm(32), nn.GELU(),
        nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 10),
    )  # fmt: skip


X = torch.randint(0, 32, (16, 4), generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))


def _backward(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    loss = F.cross_entropy(model(X), Y)
    optimizer.zero_grad()
    loss.backward()
    return loss.detach()


def test_compiled_model_trains_with_muon_like_the_eager_model():
    eager, compiled = _model(), _model()
    opt_eager = orthotorch.Muon(orthotorch.param_groups(eager), lr=0.02)
    opt_compiled = orthotorch.Muon(orthotorch.param_groups(compiled), lr=0.02)
    forward = torch.compile(compiled, backend="aot_eager")
    losses = []
    for _ in range(20):
        _backward(eager, opt_eager)
        opt_eager.step()
        loss = F.cross_entropy(forward(X), Y)
        opt_compiled.zero_grad()
        loss.backward()
        opt_compiled.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _graph_breaks(name: str) -> int:
    cls, kwargs = COMPILED[name]
    model = _model()
    optimizer = cls(orthotorch.param_groups(model), **kwargs)
    _backward(model, optimizer)
    return dynamo.explain(optimizer.step)().graph_break_count


# Muon stands for the optimizers that go through map_matrices (ROOT, HybridAuON make the
# same calls); benchmarks/compiled_step.py reports every optimizer.
@pytest.mark.parametrize("name", ["Muon", "ROOT", "AuON", "ARO", "NorMuon"])
def test_compiled_step_has_no_graph_breaks(name):
    assert _graph_breaks(name) == 0


def _graphs_per_step(name: str, steps: int = 5) -> list[int]:
    cls, kwargs = COMPILED[name]
    model = _model()
    optimizer = cls(orthotorch.param_groups(model), **kwargs)
    step = torch.compile(optimizer.step, backend="eager")
    counts = []
    for _ in range(steps):
        _backward(model, optimizer)
        before = dynamo.utils.counters["stats"]["unique_graphs"]
        step()
        counts.append(dynamo.utils.counters["stats"]["unique_graphs"] - before)
    return counts


@pytest.mark.parametrize("name", ["Muon", "ROOT", "AuON", "ARO", "NorMuon", "Dion", "MuonMaster"])
def test_compiled_step_does_not_recompile_after_the_state_exists(name):
    """Step 1 traces with empty state, step 2 once more with the state it created (as for
    torch.optim); after that no step compiles anything. (Dion's first step breaks the graph
    where it draws its starting factors; later steps do not.)"""
    counts = _graphs_per_step(name, steps=6)
    settled = SETTLED_FROM.get(name, 2)
    assert counts[settled:] == [0] * (len(counts) - settled), counts


def test_compiled_step_matches_the_eager_step():
    """AuON (whose step traces whole today) compiled vs eager, AdamW groups included."""
    eager, compiled = _model(), _model()
    opt_eager = orthotorch.AuON(orthotorch.param_groups(eager), lr=0.02)
    opt_compiled = orthotorch.AuON(orthotorch.param_groups(compiled), lr=0.02)
    step = torch.compile(opt_compiled.step, backend="eager")
    for _ in range(4):
        _backward(eager, opt_eager)
        opt_eager.step()
        _backward(compiled, opt_compiled)
        step()
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_compiled_step_skips_a_nonfinite_step_on_the_device(skip_nonfinite):
    """A compiled step cannot raise without a host sync: with a NaN gradient it leaves every
    parameter and state tensor as it was (skip_nonfinite: only that parameter's) and counts the
    skipped updates in ``nonfinite_skipped``. The eager step still raises (test_optim_common)."""
    model = _model()
    optimizer = orthotorch.AuON(
        orthotorch.param_groups(model), lr=0.02, skip_nonfinite=skip_nonfinite
    )
    step = torch.compile(optimizer.step, backend="eager")
    _backward(model, optimizer)
    step()  # state exists from here on
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(optimizer.state_dict()["state"])
    _backward(model, optimizer)
    bad = model[2].weight
    bad.grad[0, 0] = float("nan")
    step()
    for name, p in model.named_parameters():
        unchanged = torch.equal(p.detach(), params[name])
        assert unchanged if (p is bad or not skip_nonfinite) else not unchanged, name
    after = optimizer.state_dict()["state"]
    for key, saved in state.items():
        for field, value in saved.items():
            if field != "nonfinite_skips" and not skip_nonfinite:
                assert torch.equal(after[key][field], value), (key, field)
    count = len(list(model.parameters()))
    assert optimizer.nonfinite_skipped == (1 if skip_nonfinite else count)
    assert all(torch.isfinite(p).all() for p in model.parameters())
