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
    ("batched", 1, "input", False, "gram"),
    ("looped", 1, "input", False, "gram"),
    ("batched", 1, "float32", False, "gram"),
]


def plan_id(plan: tuple) -> str:
    return f"{plan[0]}{plan[1]}-{plan[2]}" + (f"-{plan[4]}" if len(plan) > 4 else "")


# Each test starts without plans or disk cache and leaves none behind (conftest.py).
pytestmark = pytest.mark.usefixtures("isolated_plans")


def exact_iteration(G: torch.Tensor, method: str) -> torch.Tensor:
    """``U p(S / (s ||G||_F)) V^T`` in float64: the method's iteration without rounding."""
    spec = get_method(method)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    x = S / (torch.linalg.matrix_norm(G).unsqueeze(-1) * spec.norm_scale)
    y = iterate_scalar(x, spec.schedule(G.shape[-2], G.shape[-1], spec.default_steps))
    return (U * y.unsqueeze(-2)) @ Vh


@pytest.mark.parametrize("plan", PLANS, ids=plan_id)
@pytest.mark.parametrize("method", ["muon", "polar_express", "jiacheng", "root"])
def test_every_plan_matches_the_exact_iteration(plan: tuple, method: str) -> None:
    G = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_iteration(G, method)
    with dispatch.forced(*plan):
        out = orthogonalize(G.bfloat16(), method).double()
        out32 = orthogonalize(G.float(), method, dtype=torch.float32).double()
    # bf16 rounding of X and of each product: ~1% of the unit singular values. The Gram route
    # rounds Q and R on top (polar_express: 0.055 vs 0.027 entry-wise directly).
    tolerance = 0.08 if plan[-1] == "gram" else 0.05
    assert (out - exact).abs().max() < tolerance, (out - exact).abs().max()
    assert (out32 - exact).abs().max() < 1e-4


@pytest.mark.parametrize("plan", PLANS, ids=plan_id)
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
    with dispatch.forced(plan.strategy, plan.chunk, plan.compute, route=plan.route):
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
    with pytest.raises(ValueError, match="route must be one of direct, gram, got 'fast'"):
        with dispatch.forced("batched", route="fast"):
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


def test_gram_route_is_offered_where_it_saves_products() -> None:
    table = ns.POLAR_EXPRESS_COEFFICIENTS
    assert ns.gram_restarts(5) == (1, 3) and ns.gram_restarts(4) == (1, 3)
    assert ns.gram_restarts(6) == (1, 3, 5) and ns.gram_restarts(1) == ()
    # Five steps, two restarts: 6 m^2 n + 11 m^3 against 10 m^2 n + 5 m^3.
    assert ns.gram_products(512, 2048, 5, (1, 3)) == 6 * 512**2 * 2048 + 11 * 512**3
    assert ns.gram_products(512, 2048, 5, (1, 3)) / (5 * (2 * 512**2 * 2048 + 512**3)) == 35 / 45
    assert ns.gram_products(64, 256, 5, ()) == 2 * 64**2 * 256 + 17 * 64**3
    assert set(ns._gram_variant(torch.empty(2, 64, 256), table)) == {"gram"}
    assert ns._gram_variant(torch.empty(2, 64, 64), table) == {}  # square: more products
    assert ns._gram_variant(torch.empty(2, 64, 90), table) == {}  # below 1.5x wide
    assert ns._gram_variant(torch.empty(2, 64, 256), [ns.MUON_COEFFICIENTS]) == {}  # one step
    # AOL: the last two of four steps on the Gram matrix, 6 m^2 n + 7 m^3 (0.86x at n = 4m).
    assert ns.gram_products(512, 2048, 4, ns.AOL_GRAM_RESTARTS) == 6 * 512**2 * 2048 + 7 * 512**3
    key = dispatch.bucket_key("ns5", torch.empty(4, 64, 256, dtype=torch.bfloat16))
    routes = [p.route for p in dispatch._candidates(key, False, ["gram"])]
    assert routes.count("gram") == 4  # batched and looped, in bf16 and float32


def test_gram_restart_keeps_the_bf16_band() -> None:
    """Without its restart the Gram iteration diverges in bf16 on ill-conditioned input; with it
    the output matches the direct iteration's band."""
    gen = torch.Generator().manual_seed(0)
    m, n = 64, 256
    U, _ = torch.linalg.qr(torch.randn(4, m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(4, n, m, generator=gen, dtype=torch.float64))
    G = (U * torch.logspace(0, -6, m, dtype=torch.float64)) @ V.mT
    X = G / (torch.linalg.matrix_norm(G, keepdim=True) * 1.02 + 1e-6)
    X = X.bfloat16()
    table = ns.POLAR_EXPRESS_COEFFICIENTS
    top = {
        name: torch.linalg.svdvals(out.double()).max().item()
        for name, out in {
            "direct": ns.iterate_quintic(X, table),
            "gram": ns.iterate_gram_quintic(X, table, ns.gram_restarts(5)),
            "no restart": ns.iterate_gram_quintic(X, table, ()),
        }.items()
    }
    assert top["direct"] < 1.2 and abs(top["gram"] - top["direct"]) < 0.03, top
    assert top["no restart"] > 2, top


def test_measurement_can_choose_the_gram_route(monkeypatch: pytest.MonkeyPatch) -> None:
    real_time = dispatch._time

    def gram_fastest(plan, *args):
        seconds, out = real_time(plan, *args)
        return (seconds if plan.route == "direct" else 0.0), out

    monkeypatch.setattr(dispatch, "_time", gram_fastest)
    X = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(2))
    with dispatch.measuring():
        out = ns.newton_schulz(X, ns.POLAR_EXPRESS_COEFFICIENTS)
    (row,) = dispatch.last_measured()
    assert row["plan"].endswith("+gram")
    with dispatch.forced("batched"):
        direct = ns.newton_schulz(X, ns.POLAR_EXPRESS_COEFFICIENTS)
    assert (out - direct).abs().max() < 1e-4  # float32: the same iteration up to rounding
    assert torch.equal(ns.newton_schulz(X, ns.POLAR_EXPRESS_COEFFICIENTS), out)  # plan reused
    dispatch.configure(variants=False)  # restored by the isolated_plans fixture
    with dispatch.measuring():
        ns.newton_schulz(X, ns.POLAR_EXPRESS_COEFFICIENTS)
    (row,) = dispatch.last_measured()
    assert "gram" not in row["plan"]
    with pytest.raises(ValueError, match="variants must be a bool"):
        dispatch.configure(variants="no")


def test_disk_cache_keeps_the_route_and_rejects_unknown_ones(tmp_path) -> None:
    path = tmp_path / "plans.json"
    key = "ns5|16|64|3|float32|cpu|" + str(torch.get_num_threads())
    plan = {"strategy": "batched", "chunk": 3, "route": "gram"}
    path.write_text(json.dumps({"stamp": dispatch.machine_stamp(), "plans": {key: plan}}))
    dispatch.configure(cache_path=path)
    (row,) = dispatch.plan_table()
    assert row["plan"] == "batched+gram" and row["source"] == "cache"
    dispatch.clear_plans()
    plan["route"] = "teleport"
    path.write_text(json.dumps({"stamp": dispatch.machine_stamp(), "plans": {key: plan}}))
    with pytest.warns(UserWarning, match="corrupt"):
        assert dispatch.plan_table() == []
