"""linalg.dispatch: every plan computes the same iteration; plans are measured, cached, reported.

The plans also force the device-dependent branches on the CPU: ``batched`` is what accelerators
run by default (one ``bmm`` per product), ``looped`` what the CPU runs; each is compared with
the float64 iteration on the exact spectrum, so a sign error in either fails here.
"""

from __future__ import annotations

import importlib
import json
import warnings

import pytest
import torch

from orthotorch.linalg import dispatch, get_method, iterate_scalar, orthogonalize
from orthotorch.linalg.tuning import bucket_shapes, tune

# The module, not the function of the same name that orthotorch.linalg re-exports.
ns = importlib.import_module("orthotorch.linalg.newton_schulz")

PLANS = [
    ("batched", 1, "input"),
    ("looped", 1, "input"),
    ("chunked", 2, "input"),
    ("chunked", 3, "input"),
    ("batched", 1, "float32"),
    ("looped", 1, "float32"),
]


@pytest.fixture(autouse=True)
def _isolated_plans():
    """Each test starts without plans or disk cache and leaves none behind."""
    saved = dict(dispatch._PLANS)
    config = (dispatch._CONFIG.measure, dispatch._CONFIG.compile, dispatch._CONFIG.cache_path)
    dispatch.clear_plans()
    dispatch.configure(cache_path=False)
    yield
    dispatch.clear_plans()
    dispatch._PLANS.update(saved)
    dispatch._CONFIG.measure, dispatch._CONFIG.compile, dispatch._CONFIG.cache_path = config


def exact_iteration(G: torch.Tensor, method: str) -> torch.Tensor:
    """``U p(S / (s ||G||_F)) V^T`` in float64: the method's iteration without rounding."""
    spec = get_method(method)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    x = S / (torch.linalg.matrix_norm(G).unsqueeze(-1) * spec.norm_scale)
    y = iterate_scalar(x, spec.schedule(G.shape[-2], G.shape[-1], spec.default_steps))
    return (U * y.unsqueeze(-2)) @ Vh


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p[0]}{p[1]}-{p[2]}")
@pytest.mark.parametrize("method", ["muon", "polar_express", "jiacheng", "root"])
def test_every_plan_matches_the_exact_iteration(plan: tuple, method: str) -> None:
    G = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_iteration(G, method)
    with dispatch.forced(*plan):
        out = orthogonalize(G.bfloat16(), method).double()
        out32 = orthogonalize(G.float(), method, dtype=torch.float32).double()
    # bf16 rounding of X and of each product: ~1% of the unit singular values.
    assert (out - exact).abs().max() < 0.05, (out - exact).abs().max()
    assert (out32 - exact).abs().max() < 1e-4


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p[0]}{p[1]}-{p[2]}")
def test_every_plan_runs_the_aol_iteration(plan: tuple) -> None:
    G = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(0))
    reference = torch.stack([orthogonalize(g.double(), "aol", dtype=torch.float64) for g in G])
    with dispatch.forced(*plan):
        out = orthogonalize(G, "aol", dtype=torch.float32).double()
    assert (out - reference).abs().max() < 1e-4


def test_float32_plan_is_more_accurate_than_bf16() -> None:
    G = torch.randn(4, 64, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = exact_iteration(G, "polar_express")
    errors = {}
    for compute in ("input", "float32"):
        with dispatch.forced("batched", compute=compute):
            out = orthogonalize(G.bfloat16(), "polar_express")
        assert out.dtype == torch.bfloat16
        errors[compute] = (out.double() - exact).norm().item()
    assert errors["float32"] < errors["input"]


def test_default_plan_by_device() -> None:
    assert dispatch.default_plan("cpu", 8).strategy == "looped"
    assert dispatch.default_plan("cuda", 8) == dispatch.Plan("batched", 8)


def test_measured_plan_is_recorded_and_reused() -> None:
    X = torch.randn(4, 16, 32)
    out = ns.newton_schulz(X, ns.POLAR_EXPRESS_COEFFICIENTS)
    assert dispatch.plan_table() == []  # below MEASURE_FROM_FLOPS: default plan, unrecorded
    with dispatch.measuring():
        measured = ns.newton_schulz(X, ns.POLAR_EXPRESS_COEFFICIENTS)
    (row,) = dispatch.last_measured()
    assert row["kernel"] == "ns5" and (row["rows"], row["cols"], row["count"]) == (16, 32, 4)
    assert row["source"] == "measured" and row["ms"] > 0
    assert torch.allclose(measured, out, atol=1e-5)  # float32 input: only plans of float32
    key = dispatch.bucket_key("ns5", X)
    plan = dispatch.plan_for(key)
    assert plan is not None
    with dispatch.forced(plan.strategy, plan.chunk, plan.compute):
        expected = ns.newton_schulz(X, ns.POLAR_EXPRESS_COEFFICIENTS)
    assert torch.equal(ns.newton_schulz(X, ns.POLAR_EXPRESS_COEFFICIENTS), expected)


def test_measure_false_uses_the_default_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "MEASURE_FROM_FLOPS", 0.0)
    dispatch.configure(measure=False)
    ns.newton_schulz(torch.randn(3, 8, 8), ns.POLAR_EXPRESS_COEFFICIENTS)
    assert dispatch.plan_table() == []
    dispatch.configure(measure=True)
    ns.newton_schulz(torch.randn(3, 8, 8), ns.POLAR_EXPRESS_COEFFICIENTS)
    assert len(dispatch.plan_table()) == 1


def test_disk_cache_round_trip_and_foreign_stamp(tmp_path) -> None:
    path = tmp_path / "plans.json"
    dispatch.configure(cache_path=path)
    with dispatch.measuring():
        ns.newton_schulz(torch.randn(3, 8, 16), [ns.MUON_COEFFICIENTS])
    assert path.exists()
    dispatch.clear_plans()
    (row,) = dispatch.plan_table()
    assert row["source"] == "cache" and row["kernel"] == "ns1"

    data = json.loads(path.read_text())
    data["stamp"]["threads"] += 1  # written with another thread count: not trusted
    path.write_text(json.dumps(data))
    dispatch.clear_plans()
    assert dispatch.plan_table() == []
    data["stamp"] = dispatch.machine_stamp()
    data["stamp"]["torch"] = "0.0"
    path.write_text(json.dumps(data))
    dispatch.clear_plans()
    assert dispatch.plan_table() == []


@pytest.mark.parametrize(
    "text", ["{not json", '{"stamp": {}}', '{"plans": {"a|b": {}}, "stamp": 1}']
)
def test_corrupt_cache_warns_and_is_rebuilt(tmp_path, text: str) -> None:
    path = tmp_path / "plans.json"
    path.write_text(text)
    dispatch.configure(cache_path=path)
    with pytest.warns(UserWarning, match=r"dispatch cache .*plans\.json is corrupt"):
        assert dispatch.plan_table() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dispatch.measuring():
            ns.newton_schulz(torch.randn(2, 8, 8), ns.POLAR_EXPRESS_COEFFICIENTS)
    assert json.loads(path.read_text())["stamp"] == dispatch.machine_stamp()
    dispatch.clear_plans()
    assert len(dispatch.plan_table()) == 1


def test_corrupt_plan_entry_warns(tmp_path) -> None:
    path = tmp_path / "plans.json"
    key = "ns5|8|8|2|float32|cpu|1"
    bad = {"strategy": "sideways", "chunk": 1}
    path.write_text(json.dumps({"stamp": dispatch.machine_stamp(), "plans": {key: bad}}))
    dispatch.configure(cache_path=path)
    with pytest.warns(UserWarning, match="corrupt"):
        dispatch.plan_table()


def test_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setitem(ns._COMPILED, "quintic", broken)
    monkeypatch.setattr(dispatch, "_COMPILE_FAILED", set())
    X = torch.randn(2, 8, 16)
    with pytest.warns(UserWarning, match="torch.compile unavailable"):
        with dispatch.measuring(compile=True):
            out = ns.newton_schulz(X, ns.POLAR_EXPRESS_COEFFICIENTS)
    (row,) = dispatch.last_measured()
    assert "compiled" not in row["plan"]
    with dispatch.forced("looped"):
        assert torch.allclose(out, ns.newton_schulz(X, ns.POLAR_EXPRESS_COEFFICIENTS), atol=1e-5)


def test_tune_shapes_and_optimizer() -> None:
    rows = tune([(8, 16), (16, 8), (8, 16)], method="muon", dtype=torch.float32)
    assert {(r["rows"], r["cols"], r["count"]) for r in rows} == {(8, 16, 2), (8, 16, 1)}
    assert all(r["dtype"] == "float32" and r["source"] == "measured" for r in rows)

    import orthotorch

    params = [torch.nn.Parameter(torch.randn(8, 4, 3)) for _ in range(3)]
    head = torch.nn.Parameter(torch.randn(5, 7))
    opt = orthotorch.Muon(
        [{"params": params}, {"params": [head], "algorithm": "adamw"}],
        lr=0.02,
        ns_dtype=torch.float32,
    )
    assert [b[4:] for b in bucket_shapes(opt)] == [(3, 8, 12)]
    (row,) = tune(opt)
    assert (row["rows"], row["cols"], row["count"], row["dtype"]) == (8, 12, 3, "float32")


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="strategy must be one of batched, looped, chunked"):
        with dispatch.forced("sideways"):
            pass
    with pytest.raises(ValueError, match="compute must be 'input' or 'float32'"):
        with dispatch.forced("batched", compute="float64"):
            pass
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        with dispatch.forced("chunked", chunk=0):
            pass
    with pytest.raises(ValueError, match="measure must be a bool"):
        dispatch.configure(measure="yes")
    with pytest.raises(ValueError, match="each shape must be a tuple of at least two positive"):
        tune([(8,)])
    with pytest.raises(ValueError, match="an optimizer or an iterable of shapes"):
        tune("8x8")
    with pytest.raises(ValueError, match="unknown orthogonalization method"):
        tune([(8, 8)], method="nope")
    with pytest.raises(ValueError, match=r"run_stack expects a \(count, m, n\) stack"):
        dispatch.run_stack("ns5", torch.randn(4, 4), lambda X: X)


def test_dct_cache_key_of_bare_cuda_is_the_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other device-dependent branch of linalg: "cuda" and "cuda:<current>" share one DCT
    basis (forced on the CPU by faking the current device)."""
    dct = importlib.import_module("orthotorch.linalg.dct")  # the module, not the function
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dct._device_key("cuda") == torch.device("cuda", 3)
    assert dct._device_key("cuda:1") == torch.device("cuda", 1)
    assert dct._device_key(None) == torch.device("cpu")


def test_float32_plan_never_downcasts_float64() -> None:
    G = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with dispatch.forced("batched", compute="float32"):
        out = orthogonalize(G, "polar_express", dtype=torch.float64)
    with dispatch.forced("batched"):
        expected = orthogonalize(G, "polar_express", dtype=torch.float64)
    assert torch.equal(out, expected)
