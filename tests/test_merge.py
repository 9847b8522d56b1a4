"""orthotorch.merge: merges against explicit formulas, the orthogonal merge's properties, FedSVD
against the mean product and Eckart–Young, and every bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orthotorch.linalg import orthogonalize
from orthotorch.merge import (
    MergeMethod,
    available_merge_methods,
    average,
    default_scale,
    fedavg_lora,
    fedsvd_aggregate,
    fedsvd_refactor,
    get_merge_method,
    mean_lora_product,
    merge_state_dicts,
    norm_matched_orthogonal_delta,
    orthogonal_delta,
    orthogonal_merge,
    orthomerge,
    polar_decompose,
    recompute_batchnorm_statistics,
    register_merge_method,
    task_arithmetic,
    ties_delta,
    ties_merge,
)
from orthotorch.merge import merging as merging_module
from orthotorch.merge.orthomerge import (
    cayley,
    inverse_cayley,
    merge_rotations,
    procrustes_rotation,
)

# ------------------------------------------------------------------------------------ helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def model_sd(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A state_dict with a matrix, a conv kernel, 1-D entries and an integer buffer."""
    g = gen(seed)
    return {
        "fc.weight": torch.randn(12, 8, generator=g, dtype=dtype),
        "fc.bias": torch.randn(12, generator=g, dtype=dtype),
        "conv.weight": torch.randn(6, 3, 3, 3, generator=g, dtype=dtype),
        "bn.running_mean": torch.randn(6, generator=g, dtype=dtype),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.long),
        "head.weight": torch.randn(4, 12, generator=g, dtype=dtype),
    }


def finetune(base: dict[str, torch.Tensor], seed: int, size: float = 0.3) -> dict:
    g = gen(100 + seed)
    out = {}
    for k, v in base.items():
        out[k] = (
            v + size * torch.randn(v.shape, generator=g, dtype=v.dtype)
            if v.is_floating_point()
            else v + seed
        )
    return out


def clone_sd(sd: dict) -> dict:
    return {k: v.clone() for k, v in sd.items()}


def assert_sd_close(a: dict, b: dict, atol: float = 1e-10) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=torch.float64))
    return Q


@pytest.fixture
def models() -> tuple[dict, list[dict]]:
    base = model_sd(0)
    return base, [finetune(base, 1), finetune(base, 2), finetune(base, 3)]


# -------------------------------------------------------------------------- baselines: formulas


def test_task_arithmetic_matches_formula(models) -> None:
    base, ft = models
    out = task_arithmetic(base, ft, scale=[0.5, -0.25, 1.0])
    for k, W0 in base.items():
        if k == "bn.running_mean":  # normalisation statistics: the fine-tuned models' mean
            assert torch.allclose(out[k], torch.stack([sd[k] for sd in ft]).mean(0)), k
        elif W0.is_floating_point():
            expected = W0 + 0.5 * (ft[0][k] - W0) - 0.25 * (ft[1][k] - W0) + (ft[2][k] - W0)
            assert torch.allclose(out[k], expected, atol=1e-12), k
        else:
            assert torch.equal(out[k], W0)


@pytest.mark.parametrize("merge", [task_arithmetic, orthogonal_merge])
def test_batch_norm_statistics_are_averaged_not_extrapolated(merge) -> None:
    """Regression: running statistics were merged like weights, so two models whose variances
    fell below the base's gave ``base + sum(var_i - base) < 0`` and the merged model's batch
    norm returned NaN in eval mode."""
    base = nn.BatchNorm1d(4)
    base.running_var.fill_(1.0)
    tuned = [nn.BatchNorm1d(4), nn.BatchNorm1d(4)]
    for m, v in zip(tuned, (0.3, 0.4)):
        m.running_var.fill_(v)
        m.running_mean.fill_(v)
    out = merge(base, tuned, 1.0)
    torch.testing.assert_close(out["running_var"], torch.full((4,), 0.35))
    torch.testing.assert_close(out["running_mean"], torch.full((4,), 0.35))
    merged = nn.BatchNorm1d(4)
    merged.load_state_dict(out)
    assert merged.eval()(torch.randn(8, 4)).isfinite().all()


def test_average_matches_formula_and_task_arithmetic(models) -> None:
    base, ft = models
    out = average(ft, weights=[2, 1, 1])
    for k, v in out.items():
        if v.is_floating_point():
            expected = (2 * ft[0][k] + ft[1][k] + ft[2][k]) / 4
            assert torch.allclose(v, expected, atol=1e-12), k
        else:
            assert torch.equal(v, ft[0][k])  # integer buffers from the first, without a base
    # Uniform averaging is task arithmetic with scale 1/K on floating entries.
    ta = task_arithmetic(base, ft, scale=1 / 3)
    avg = average(ft, base=base)
    assert_sd_close(avg, ta, atol=1e-12)


def test_float32_dtype_kept_and_close_to_float64(models) -> None:
    base, ft = models
    base32 = {k: v.float() if v.is_floating_point() else v for k, v in base.items()}
    ft32 = [{k: v.float() if v.is_floating_point() else v for k, v in sd.items()} for sd in ft]
    for fn in (task_arithmetic, orthogonal_merge):
        out32, out64 = fn(base32, ft32, 0.5), fn(base, ft, 0.5)
        for k in out32:
            assert out32[k].dtype == base32[k].dtype
            assert torch.allclose(
                out32[k].double(), out64[k].to(out32[k].dtype).double(), atol=1e-4
            )


def test_bfloat16_models_merge_like_their_float32_copies() -> None:
    """Regression: a rank tolerance from bf16's epsilon (x max(m, n)) dropped most of a delta."""
    base = {"w": torch.randn(64, 256, generator=gen(20)).bfloat16()}
    ft = [
        {"w": base["w"] + 0.05 * torch.randn(64, 256, generator=gen(s)).bfloat16()}
        for s in (21, 22)
    ]
    as32 = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731
    out = orthogonal_merge(base, ft, 0.5)["w"]
    ref = orthogonal_merge(as32(base), [as32(sd) for sd in ft], 0.5)["w"]
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 2e-2
    assert (out.float() - base["w"].float()).abs().max() > 0.05


# --------------------------------------------------------------------- orthogonal merge: math


def test_polar_decompose_is_the_polar_decomposition() -> None:
    X = torch.randn(9, 5, generator=gen(0), dtype=torch.float64)
    Q, P = polar_decompose(X)
    assert torch.allclose(Q @ P, X, atol=1e-12)
    assert torch.allclose(Q.mT @ Q, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(P, P.mT, atol=1e-12)
    assert torch.linalg.eigvalsh(P).min() > -1e-12
    assert torch.allclose(P @ P, X.mT @ X, atol=1e-10)


def test_polar_decompose_partial_isometry_on_rank_deficient_float32_input() -> None:
    """The null space of a low-rank delta must not get unit directions in Q (it would pollute
    the mean of the rotations with arbitrary vectors)."""
    g = gen(1)
    X = (torch.randn(10, 2, generator=g) @ torch.randn(2, 7, generator=g)).float()
    Q, P = polar_decompose(X)
    assert torch.linalg.matrix_rank(Q.double(), atol=1e-3) == 2
    assert torch.allclose(torch.linalg.svdvals(Q)[:2], torch.ones(2), atol=1e-5)
    assert torch.allclose(Q @ P, X, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.3, -0.7])
def test_orthogonal_merge_of_one_model_is_task_arithmetic(models, scale: float) -> None:
    base, ft = models
    assert_sd_close(orthogonal_merge(base, ft[:1], scale), task_arithmetic(base, ft[:1], scale))


def test_orthogonal_merge_of_one_low_rank_float32_model_is_task_arithmetic() -> None:
    base = {"w": torch.randn(16, 24, generator=gen(2))}
    g = gen(3)
    ft = [
        {"w": base["w"] + 0.1 * torch.randn(16, 3, generator=g) @ torch.randn(3, 24, generator=g)}
    ]
    out, ref = orthogonal_merge(base, ft, 0.8)["w"], task_arithmetic(base, ft, 0.8)["w"]
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 1e-5


def test_orthogonal_merge_is_invariant_to_model_order(models) -> None:
    base, ft = models
    scales = [0.4, 0.9, 0.6]
    forward = orthogonal_merge(base, ft, scales)
    backward = orthogonal_merge(base, ft[::-1], scales[::-1])
    assert_sd_close(forward, backward, atol=1e-10)


def test_orthogonal_delta_on_orthogonal_subspaces_is_task_arithmetic() -> None:
    """Tasks on mutually orthogonal input and output subspaces do not interact."""
    U = random_orthogonal(12, 4)
    V = random_orthogonal(10, 5)
    g = gen(6)
    t1 = U[:, :3] @ torch.randn(3, 4, generator=g, dtype=torch.float64) @ V[:, :4].mT
    t2 = U[:, 3:7] @ torch.randn(4, 3, generator=g, dtype=torch.float64) @ V[:, 4:7].mT
    assert torch.allclose(orthogonal_delta([t1, t2]), t1 + t2, atol=1e-12)


def test_orthogonal_delta_keeps_the_singular_mass_that_task_arithmetic_cancels() -> None:
    """Same scale part, different rotations: the sum shrinks, the orthogonal merge does not."""
    P = torch.diag(torch.linspace(1.0, 2.0, 8, dtype=torch.float64))
    taus = [random_orthogonal(8, s) @ P for s in (7, 8, 9)]
    nuclear = [float(torch.linalg.matrix_norm(t, "nuc")) for t in taus]
    merged = orthogonal_delta(taus)
    assert float(torch.linalg.matrix_norm(merged, "nuc")) == pytest.approx(sum(nuclear), rel=1e-10)
    assert float(torch.linalg.matrix_norm(sum(taus), "nuc")) < 0.8 * sum(nuclear)
    # Its orthogonal part is the polar factor of the task-arithmetic delta.
    Q, _ = polar_decompose(merged)
    assert torch.allclose(Q, polar_decompose(sum(taus))[0], atol=1e-10)


def test_orthogonal_delta_rotation_is_the_weighted_procrustes_mean() -> None:
    """polar(sum tau_i) minimises sum_i ||(Q - Q_i) P_i^(1/2)||_F^2 over orthogonal Q."""
    taus = [torch.randn(6, 6, generator=gen(s), dtype=torch.float64) for s in (10, 11)]
    parts = [polar_decompose(t) for t in taus]

    def cost(Q: torch.Tensor) -> float:
        total = 0.0
        for Qi, Pi in parts:
            L, Vecs = torch.linalg.eigh(Pi)
            root = (Vecs * L.clamp_min(0).sqrt()) @ Vecs.mT
            total += float(torch.linalg.matrix_norm((Q - Qi) @ root) ** 2)
        return total

    Q_star = polar_decompose(orthogonal_delta(taus))[0]
    best = cost(Q_star)
    for s in range(20):
        skew = torch.randn(6, 6, generator=gen(50 + s), dtype=torch.float64) * 0.05
        nudged = Q_star @ torch.linalg.matrix_exp(skew - skew.mT)
        assert cost(nudged) >= best - 1e-12
        assert cost(random_orthogonal(6, 80 + s)) >= best


def test_exactly_cancelling_tasks_merge_to_the_base() -> None:
    base = {"w": torch.randn(5, 4, generator=gen(12), dtype=torch.float64)}
    d = torch.randn(5, 4, generator=gen(13), dtype=torch.float64)
    out = orthogonal_merge(base, [{"w": base["w"] + d}, {"w": base["w"] - d}])
    assert torch.allclose(out["w"], base["w"], atol=1e-12)


def test_orthogonal_merge_routes_entries(models) -> None:
    base, ft = models
    scales = [0.5, 0.5, 0.5]
    out = orthogonal_merge(base, ft, scales)
    ta = task_arithmetic(base, ft, scales)
    # 1-D entries (and statistics): the task-arithmetic rule; integer buffers from base.
    for k in ("fc.bias", "bn.running_mean", "bn.num_batches_tracked"):
        assert torch.equal(out[k], ta[k]), k
    assert torch.equal(out["bn.num_batches_tracked"], base["bn.num_batches_tracked"])
    # Conv kernels: merged as (out, in * k * k) matrices and reshaped back.
    taus = [0.5 * (sd["conv.weight"] - base["conv.weight"]).reshape(6, -1) for sd in ft]
    expected = base["conv.weight"] + orthogonal_delta(taus).reshape(6, 3, 3, 3)
    assert torch.allclose(out["conv.weight"], expected, atol=1e-12)
    assert not torch.allclose(out["fc.weight"], ta["fc.weight"], atol=1e-3)


# ------------------------------------------------------------------------ common behaviour


def test_inputs_not_modified_and_outputs_are_new_tensors(models) -> None:
    base, ft = models
    before = [clone_sd(base)] + [clone_sd(sd) for sd in ft]
    pointers = {v.data_ptr() for sd in [base, *ft] for v in sd.values()}
    for method in available_merge_methods():
        out = merge_state_dicts(base, ft, method)
        assert not pointers & {v.data_ptr() for v in out.values()}, method
    for a, b in zip([base, *ft], before):
        assert_sd_close(a, b, atol=0)


def test_modules_are_accepted() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    ft = [nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)) for _ in range(2)]
    out = orthogonal_merge(base, ft, 0.5)
    ref = orthogonal_merge(base.state_dict(), [m.state_dict() for m in ft], 0.5)
    assert_sd_close(out, ref, atol=0)
    base.load_state_dict(out)  # the result loads into the architecture


def test_keys_filter(models) -> None:
    base, ft = models
    for keys in (["fc.weight", "fc.bias"], lambda k: k.startswith("fc.")):
        out = orthogonal_merge(base, ft, 0.5, keys=keys)
        full = orthogonal_merge(base, ft, 0.5)
        for k in base:
            source = full if k.startswith("fc.") else base
            assert torch.equal(out[k], source[k]), k
    out = average(ft, keys={"head.weight"}, base=base)
    assert torch.equal(out["fc.weight"], base["fc.weight"])
    with pytest.raises(ValueError, match="'nope', which is not a key"):
        task_arithmetic(base, ft, keys=["fc.weight", "nope"])
    with pytest.raises(TypeError, match="keys must be None, a predicate"):
        task_arithmetic(base, ft, keys="fc.weight")


def test_dispatcher_and_registry(models) -> None:
    base, ft = models
    assert available_merge_methods()[:3] == ["average", "task_arithmetic", "orthogonal"]
    assert_sd_close(
        merge_state_dicts(base, ft, "orthogonal", scale=0.4), orthogonal_merge(base, ft, 0.4)
    )
    assert_sd_close(merge_state_dicts(base, ft, "task_arithmetic"), task_arithmetic(base, ft))
    assert_sd_close(
        merge_state_dicts(base, ft, "average", weights=[1, 2, 3]),
        average(ft, [1, 2, 3], base=base),
    )
    with pytest.raises(ValueError, match="unknown merge method 'soup'; valid methods: average"):
        merge_state_dicts(base, ft, "soup")
    with pytest.raises(ValueError, match="already registered"):
        register_merge_method(get_merge_method("average"))

    def first(base, finetuned, *, keys=None):
        return {k: v.clone() for k, v in finetuned[0].items()}

    register_merge_method(MergeMethod("first", first, "the first model"))
    try:
        assert_sd_close(merge_state_dicts(base, ft, "first"), ft[0], atol=0)
    finally:
        merging_module._METHODS.unregister("first")


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [task_arithmetic, orthogonal_merge])
def test_bad_state_dicts(models, fn) -> None:
    base, ft = models
    missing = clone_sd(ft[1])
    del missing["fc.bias"]
    with pytest.raises(ValueError, match=r"finetuned\[1\] is missing key 'fc.bias'"):
        fn(base, [ft[0], missing])
    extra = {**clone_sd(ft[0]), "new.weight": torch.zeros(2, 2, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"finetuned\[0\] has key 'new.weight'"):
        fn(base, [extra])
    wrong = {**clone_sd(ft[0]), "fc.weight": torch.zeros(12, 9, dtype=torch.float64)}
    with pytest.raises(
        ValueError,
        match=r"key 'fc.weight': base has \(12, 8\), finetuned\[1\] has \(12, 9\)",
    ):
        fn(base, [ft[1], wrong])
    nan = clone_sd(ft[2])
    nan["head.weight"][1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"finetuned\[1\]\['head.weight'\] .* NaN or Inf"):
        fn(base, [ft[0], nan])
    inf_base = {**clone_sd(base), "fc.bias": torch.full((12,), float("inf"), dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"base\['fc.bias'\] .* NaN or Inf"):
        fn(inf_base, ft)
    with pytest.raises(ValueError, match="at least one model, got an empty sequence"):
        fn(base, [])
    with pytest.raises(TypeError, match="wrap a single model in a list"):
        fn(base, ft[0])
    with pytest.raises(TypeError, match=r"finetuned\[1\] must be a state_dict"):
        fn(base, [ft[0], 3])
    with pytest.raises(TypeError, match=r"base\['x'\] must be a torch.Tensor"):
        fn({"x": [1.0]}, ft)
    with pytest.raises(ValueError, match="scale has 2 entries for 3 models"):
        fn(base, ft, scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fn(base, ft, scale=float("nan"))
    # Nothing was modified by any of the failed calls.
    assert not torch.isnan(ft[2]["head.weight"]).any()


def test_functional_core_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one matrix"):
        orthogonal_delta([])
    with pytest.raises(ValueError, match="2-D tensors of one shape"):
        orthogonal_delta([torch.zeros(3, 4), torch.zeros(4, 3)])
    with pytest.raises(ValueError, match=r"deltas\[1\] of shape \(3, 4\) contains NaN"):
        orthogonal_delta([torch.zeros(3, 4), torch.full((3, 4), float("nan"))])
    with pytest.raises(ValueError, match="real 2-D floating tensor"):
        polar_decompose(torch.zeros(3))
    with pytest.raises(ValueError, match="X of shape"):
        polar_decompose(torch.full((2, 2), float("inf")))


def test_average_bad_input(models) -> None:
    _, ft = models
    with pytest.raises(ValueError, match="weights has 2 entries for 3 models"):
        average(ft, [1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        average(ft, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="weights must be a sequence"):
        average(ft, 0.5)
    wrong = {**clone_sd(ft[1]), "head.weight": torch.zeros(4, 11, dtype=torch.float64)}
    with pytest.raises(
        ValueError,
        match=r"'head.weight': state_dicts\[0\] has \(4, 12\), state_dicts\[1\] has \(4, 11\)",
    ):
        average([ft[0], wrong])
    with pytest.raises(ValueError, match="empty sequence"):
        average([])


# ------------------------------------------------------------------------------------- FedSVD


def clients(ranks=(3, 2, 4), m: int = 20, n: int = 15, seed: int = 0, dtype=torch.float64):
    g = gen(seed)
    return [
        (torch.randn(m, r, generator=g, dtype=dtype), torch.randn(r, n, generator=g, dtype=dtype))
        for r in ranks
    ]


def test_fedsvd_is_exact_when_rank_covers_the_mean_product() -> None:
    loras = clients()
    M = sum(B @ A for B, A in loras) / 3
    B, A = fedsvd_aggregate(loras, rank=9)  # rank(M) <= 3 + 2 + 4
    assert B.shape == (20, 9) and A.shape == (9, 15)
    assert torch.allclose(B @ A, M, atol=1e-10)
    assert torch.allclose(A @ A.mT, torch.eye(9, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(mean_lora_product(loras), M, atol=1e-12)


def test_fedsvd_float32_exact_to_1e5() -> None:
    loras = clients(dtype=torch.float32)
    M = sum(B.double() @ A.double() for B, A in loras) / 3
    B, A = fedsvd_aggregate(loras, rank=12)
    assert B.dtype == torch.float32
    assert ((B @ A).double() - M).abs().max() < 1e-5 * M.abs().max()
    assert (A @ A.mT - torch.eye(12)).abs().max() < 1e-5


def test_fedsvd_truncation_is_eckart_young() -> None:
    loras = clients()
    w = [1.0, 2.0, 5.0]
    M = sum(wi * B @ A for wi, (B, A) in zip(w, loras)) / 8
    S = torch.linalg.svdvals(M)
    for r in (1, 4, 8):
        B, A = fedsvd_aggregate(loras, rank=r, weights=w)
        error = torch.linalg.matrix_norm(B @ A - M)
        assert float(error) == pytest.approx(float(S[r:].square().sum().sqrt()), rel=1e-10)
        assert torch.allclose(A @ A.mT, torch.eye(r, dtype=torch.float64), atol=1e-12)


def test_fedavg_product_is_biased_unless_clients_share_a() -> None:
    loras = clients(ranks=(4, 4, 4))
    B, A = fedavg_lora(loras)
    M = mean_lora_product(loras)
    assert torch.allclose(B, sum(b for b, _ in loras) / 3) and torch.allclose(
        A, sum(a for _, a in loras) / 3
    )
    relative = torch.linalg.matrix_norm(B @ A - M) / torch.linalg.matrix_norm(M)
    assert relative > 0.5  # cross terms B_i A_j of unrelated clients
    # Shared A (the FedSVD paper's clients train only B): FedAvg's product is exact, and FedSVD
    # re-factorises the same update.
    A0 = loras[0][1]
    shared = [(b, A0) for b, _ in loras]
    B, A = fedavg_lora(shared)
    assert torch.allclose(B @ A, mean_lora_product(shared), atol=1e-12)
    Bs, As = fedsvd_aggregate(shared, rank=4)
    assert torch.allclose(Bs @ As, B @ A, atol=1e-10)


def test_fedsvd_refactor_and_order_invariance() -> None:
    loras = clients()
    B1, A1 = fedsvd_aggregate(loras, rank=5)
    B2, A2 = fedsvd_aggregate(loras[::-1], rank=5)
    assert torch.allclose(B1 @ A1, B2 @ A2, atol=1e-10)
    M = torch.randn(7, 4, generator=gen(3), dtype=torch.float64)
    B, A = fedsvd_refactor(M, 4)
    assert torch.allclose(B @ A, M, atol=1e-12)


def test_fedsvd_and_fedavg_mapping_form_and_weights() -> None:
    layer_a, layer_b = clients(ranks=(2, 2), seed=1), clients(ranks=(2, 2), m=6, n=9, seed=2)
    per_client = [{"a": layer_a[i], "b": layer_b[i]} for i in range(2)]
    out = fedsvd_aggregate(per_client, rank=4, weights=[3, 1])
    assert set(out) == {"a", "b"}
    B, A = out["b"]
    assert torch.allclose(
        B @ A, (3 * layer_b[0][0] @ layer_b[0][1] + layer_b[1][0] @ layer_b[1][1]) / 4, atol=1e-10
    )
    # Weight 3 on a client is that client sent three times.
    doubled = fedsvd_aggregate([layer_a[0]] * 3 + [layer_a[1]], rank=4)
    assert torch.allclose(doubled[0] @ doubled[1], out["a"][0] @ out["a"][1], atol=1e-10)
    avg = fedavg_lora(per_client)
    assert torch.allclose(avg["a"][0], (layer_a[0][0] + layer_a[1][0]) / 2)


def test_fedsvd_inputs_not_modified() -> None:
    loras = clients()
    before = [(B.clone(), A.clone()) for B, A in loras]
    for out in (fedsvd_aggregate(loras, rank=3), fedavg_lora(clients(ranks=(2, 2)))):
        assert all(t.data_ptr() not in {x.data_ptr() for p in loras for x in p} for t in out)
    for (B, A), (B0, A0) in zip(loras, before):
        assert torch.equal(B, B0) and torch.equal(A, A0)


def test_fedsvd_bad_input() -> None:
    loras = clients()
    for rank in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="rank must be a positive int"):
            fedsvd_aggregate(loras, rank=rank)
    with pytest.raises(ValueError, match=r"rank=16 exceeds min\(m, n\) = 15"):
        fedsvd_aggregate(loras, rank=16)
    bad_inner = [
        *loras[:2],
        (torch.randn(20, 3, dtype=torch.float64), torch.randn(4, 15, dtype=torch.float64)),
    ]
    with pytest.raises(ValueError, match=r"client_loras\[2\]: B is \(20, 3\) and A is \(4, 15\)"):
        fedsvd_aggregate(bad_inner, rank=2)
    other_shape = [
        *loras[:1],
        (torch.randn(20, 2, dtype=torch.float64), torch.randn(2, 14, dtype=torch.float64)),
    ]
    with pytest.raises(
        ValueError,
        match=r"client_loras\[1\]: .*product 20x14\), but client_loras\[0\] has product 20x15",
    ):
        fedsvd_aggregate(other_shape, rank=2)
    nan_B = loras[1][0].clone()
    nan_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"client_loras\[1\]: B of shape \(20, 2\) contains NaN"):
        fedsvd_aggregate([loras[0], (nan_B, loras[1][1])], rank=2)
    with pytest.raises(ValueError, match="at least one client"):
        fedsvd_aggregate([], rank=2)
    with pytest.raises(TypeError, match=r"client_loras\[0\] must be a \(B, A\) pair"):
        fedsvd_aggregate([loras[0][0]], rank=2)
    with pytest.raises(ValueError, match="weights must be a sequence of 3"):
        fedsvd_aggregate(loras, rank=2, weights=[1.0])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        fedsvd_aggregate(loras, rank=2, weights=[0, 0, 0])
    with pytest.raises(ValueError, match=r"client_loras\[1\] is missing layer 'b'"):
        fedsvd_aggregate([{"a": loras[0], "b": loras[1]}, {"a": loras[2]}], rank=2)
    with pytest.raises(ValueError, match=r"client_loras\[1\]\['a'\]: B is"):
        fedsvd_aggregate([{"a": loras[0]}, {"a": bad_inner[2]}], rank=2)
    with pytest.raises(ValueError, match=r"layer 'a': rank=16 exceeds"):
        fedsvd_aggregate([{"a": loras[0]}], rank=16)
    with pytest.raises(TypeError, match="use one form for every client"):
        fedsvd_aggregate([{"a": loras[0]}, loras[1]], rank=2)
    with pytest.raises(ValueError, match=r"one rank for every client, got ranks \[3, 2, 4\]"):
        fedavg_lora(loras)
    assert not torch.isnan(loras[1][0]).any()


def test_fedsvd_refactor_validates_the_update() -> None:
    """``fedsvd_refactor`` is public but never checked ``M``: a batched 3-D update came back
    silently sliced along the wrong axis, a 1-D one died with an IndexError in the rank check and
    NaN reached ``torch.linalg.svd`` (a LinAlgError, not a ValueError naming ``M``)."""
    with pytest.raises(ValueError, match=r"2-D floating tensor, got .* \(2, 3, 3\)"):
        fedsvd_refactor(torch.randn(2, 3, 3), 2)
    with pytest.raises(ValueError, match=r"M must be a real 2-D floating tensor"):
        fedsvd_refactor(torch.randn(3), 4)
    with pytest.raises(ValueError, match=r"M must be a real 2-D floating tensor"):
        fedsvd_refactor(torch.ones(3, 3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="M of shape \\(3, 3\\) contains NaN or Inf"):
        fedsvd_refactor(torch.full((3, 3), float("nan")), 2)


def test_numpy_and_tensor_weights_and_scales_are_numbers() -> None:
    """Client weights are typically dataset sizes from numpy (``np.bincount``, ``np.array``):
    numpy scalars, numpy arrays and tensors were rejected as "must be a sequence of numbers"
    (FedSVD ``weights``, merge ``weights`` and ``scale``)."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(5, 2, generator=g), torch.randn(2, 4, generator=g)) for _ in range(3)]
    ref = mean_lora_product(pairs, [1.0, 2.0, 3.0])
    for w in (np.array([1, 2, 3]), [np.int64(1), np.float32(2), 3], torch.tensor([1.0, 2, 3])):
        assert torch.allclose(mean_lora_product(pairs, w), ref)
        B, A = fedsvd_aggregate(pairs, 4, weights=w)
        assert torch.allclose(B @ A, ref, atol=1e-5)
    base = {"w": torch.randn(3, 3, generator=g)}
    fts = [{"w": base["w"] + torch.randn(3, 3, generator=g)} for _ in range(2)]
    ref_avg = average(fts, [1.0, 3.0])["w"]
    assert torch.allclose(average(fts, np.array([1, 3]))["w"], ref_avg)
    assert torch.allclose(average(fts, torch.tensor([1.0, 3.0]))["w"], ref_avg)
    ref_ta = task_arithmetic(base, fts, 0.5)["w"]
    assert torch.allclose(task_arithmetic(base, fts, np.float32(0.5))["w"], ref_ta)
    assert torch.allclose(task_arithmetic(base, fts, torch.tensor(0.5))["w"], ref_ta)
    assert torch.allclose(
        orthogonal_merge(base, fts, np.array([0.5, 0.5]))["w"],
        orthogonal_merge(base, fts, 0.5)["w"],
    )
    with pytest.raises(ValueError, match="weights must be non-negative"):
        fedsvd_aggregate(pairs, 2, weights=np.array([1, -1, 1]))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        task_arithmetic(base, fts, np.float64("nan"))


# ------------------------------------------------------------- defaults that keep a model (#18)


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    Xtr, Xte = (torch.tensor(a, dtype=torch.float32) / 16.0 for a in (Xtr, Xte))
    return Xtr, Xte, torch.tensor(ytr), torch.tensor(yte)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 16, 10),
    )  # fmt: skip


def _train(model: nn.Module, x, t, epochs: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@pytest.fixture
def one_thread():
    """Training tests on one intra-op thread: on 2 shared cores, 2 threads made the two-task
    test 30x slower (55 s against 1.6 s) through oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TASKS = {  # model, "first half" of the labels
    "mlp, digits 0-4 / 5-9": (_mlp, lambda t: t < 5),
    "cnn with batch norm, even / odd digits": (_cnn, lambda t: t % 2 == 0),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_default_merges_keep_each_half_near_base_and_average(task, one_thread) -> None:
    """Issue 18: with its old default scale=1, ``orthogonal_merge(base, [ft_a, ft_b])`` of two
    models fine-tuned on the two halves of a task lost half of the base model's accuracy on one
    half. Every registered merge called with its defaults must keep each half within 5 points of
    the better of the base and the plain average (two tasks, two model families). On the digits
    MLP, scale=1 is checked to miss that by far, so the test can see the defect (the batch-norm
    CNN on even/odd digits is more forgiving: 4.8 points at scale=1)."""
    import copy

    make, first = TASKS[task]
    Xtr, Xte, ytr, yte = _digits()
    torch.manual_seed(0)
    base = make()
    _train(base, Xtr, ytr, epochs=2, seed=0)
    experts = []
    for i, mask in enumerate((first(ytr), ~first(ytr))):
        expert = copy.deepcopy(base)
        _train(expert, Xtr[mask], ytr[mask], epochs=5, seed=i + 1)
        experts.append(expert.state_dict())
    halves = (first(yte), ~first(yte))
    merged = make().eval()

    @torch.no_grad()
    def accuracy(sd) -> list[float]:
        merged.load_state_dict(sd)
        hit = (merged(Xte).argmax(1) == yte).float()
        return [100 * float(hit[h].mean()) for h in halves]

    reference = [
        max(b, a)
        for b, a in zip(accuracy(base.state_dict()), accuracy(average(experts, base=base)))
    ]
    for method in available_merge_methods():
        got = accuracy(merge_state_dicts(base, experts, method))
        assert all(g >= r - 5 for g, r in zip(got, reference)), (method, got, reference)
    if task.startswith("mlp"):
        old_default = accuracy(orthogonal_merge(base, experts, scale=1.0))
        assert min(g - r for g, r in zip(old_default, reference)) < -10


def test_default_scale_is_one_over_the_number_of_models(models) -> None:
    base, ft = models
    assert default_scale(3) == pytest.approx(1 / 3)
    assert_sd_close(task_arithmetic(base, ft), task_arithmetic(base, ft, 1 / 3))
    assert_sd_close(task_arithmetic(base, ft), average(ft, base=base))


def test_orthogonal_merge_default_is_norm_matched_to_the_average(models) -> None:
    base, ft = models
    out = orthogonal_merge(base, ft)
    for key in ("fc.weight", "head.weight", "conv.weight"):
        taus = [(sd[key] - base[key]).reshape(base[key].shape[0], -1) / 3 for sd in ft]
        expected = norm_matched_orthogonal_delta(taus).reshape(base[key].shape)
        torch.testing.assert_close(out[key], base[key] + expected)
        assert torch.linalg.norm(out[key] - base[key]) == pytest.approx(
            float(torch.linalg.norm(sum(taus))), rel=1e-12
        )
        # Same rotation as the unmatched rule: only the size of the step changes.
        merged, raw = (polar_decompose(m)[0] for m in (expected.flatten(1), orthogonal_delta(taus)))
        torch.testing.assert_close(merged, raw)
    torch.testing.assert_close(out["fc.bias"], average(ft, base=base)["fc.bias"])
    one = orthogonal_merge(base, ft[:1])
    assert_sd_close(one, task_arithmetic(base, ft[:1], 1.0))


def test_polar_decompose_shares_the_svd_methods_rank_tolerance() -> None:
    """One rank tolerance for the library: polar_decompose's Q is linalg's "svd" method."""
    U, _ = torch.linalg.qr(torch.randn(9, 9, generator=gen(3)))
    V, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen(4)))
    S = torch.tensor([3.0, 1.0, 0.5, 1e-3, 1e-7, 0.0])  # 1e-7 < 9 * eps32 * 3: numerically 0
    X = (U[:, :6] * S) @ V.T
    Q, P = polar_decompose(X)
    assert torch.equal(Q, orthogonalize(X, "svd", dtype=torch.float32))
    assert torch.linalg.matrix_rank(Q).item() == 4
    torch.testing.assert_close(Q @ P, X, atol=1e-6, rtol=0)


# -------------------------------------------------------------------- OrthoMerge (published)


def test_cayley_maps_are_inverse_and_land_on_the_rotation_group() -> None:
    M = torch.randn(7, 7, generator=gen(5), dtype=torch.float64)
    A = (M - M.T) / 4
    R = cayley(A)
    torch.testing.assert_close(R.T @ R, torch.eye(7, dtype=torch.float64))
    assert torch.linalg.det(R).item() == pytest.approx(1.0)
    torch.testing.assert_close(inverse_cayley(R), A)


def test_procrustes_rotation_is_the_nearest_rotation_also_when_polar_reflects() -> None:
    W0 = torch.randn(12, 5, generator=gen(6), dtype=torch.float64)
    R_true = cayley(torch.tensor([[0, 0.3], [-0.3, 0]], dtype=torch.float64))
    R5 = torch.eye(5, dtype=torch.float64)
    R5[:2, :2] = R_true
    torch.testing.assert_close(procrustes_rotation(W0, W0 @ R5), R5)
    # A reflected target: the O(n) answer would be the reflection itself (det -1); the rotation
    # group's answer flips the least significant direction and beats every other rotation tried.
    F = torch.diag(torch.tensor([1.0, 1, 1, 1, -1], dtype=torch.float64))
    W = W0 @ F
    R = procrustes_rotation(W0, W)
    assert torch.linalg.det(R).item() == pytest.approx(1.0)
    best = (W0 @ R - W).norm()
    for seed in range(20):
        M = torch.randn(5, 5, generator=gen(seed), dtype=torch.float64)
        assert best <= (W0 @ cayley(0.1 * (M - M.T)) - W).norm() + 1e-12


def test_merge_rotations_direction_of_the_sum_with_the_mean_norm() -> None:
    M = torch.randn(4, 4, generator=gen(7), dtype=torch.float64)
    A, B = (M - M.T), 3 * (M.T - M)
    assert torch.equal(merge_rotations([A, -A]), torch.zeros(4, 4, dtype=torch.float64))
    merged = merge_rotations([A, 2 * A])
    torch.testing.assert_close(merged, 1.5 * A)  # same direction, mean norm (not the sum's)
    merged = merge_rotations([A, B])
    assert torch.linalg.norm(merged) == pytest.approx(2 * float(torch.linalg.norm(A)))
    torch.testing.assert_close(
        merged / torch.linalg.norm(merged), (A + B) / torch.linalg.norm(A + B)
    )


def test_orthomerge_matches_the_published_formula(models) -> None:
    base, ft = models
    out = orthomerge(base, ft, scale=0.3)
    W0 = base["fc.weight"]  # 12 x 8: tall, rotation on the right (8 x 8)
    Ws = [sd["fc.weight"] for sd in ft]
    Rs = [procrustes_rotation(W0, W) for W in Ws]
    R = cayley(merge_rotations([inverse_cayley(R_i) for R_i in Rs]))
    expected = W0 @ R + 0.3 * sum(W - W0 @ R_i for W, R_i in zip(Ws, Rs))
    torch.testing.assert_close(out["fc.weight"], expected)
    # Wide (4 x 12): the rotation acts on the left, i.e. the same merge of the transposes.
    Wt = {k: v.T.contiguous() for k, v in (("w", base["head.weight"]),)}
    ft_t = [{"w": sd["head.weight"].T.contiguous()} for sd in ft]
    torch.testing.assert_close(out["head.weight"], orthomerge(Wt, ft_t, scale=0.3)["w"].T)
    torch.testing.assert_close(
        out["fc.bias"], task_arithmetic(base, ft, 0.3)["fc.bias"]
    )  # no rotation for vectors
    assert torch.equal(out["bn.num_batches_tracked"], base["bn.num_batches_tracked"])
    # One model at scale 1 is that model; the default scale is 1/N; the order does not matter.
    assert_sd_close(
        {k: v for k, v in orthomerge(base, ft[:1], 1.0).items() if v.is_floating_point()},
        {k: v for k, v in ft[0].items() if v.is_floating_point()},
        atol=1e-9,
    )
    assert_sd_close(orthomerge(base, ft), orthomerge(base, ft, 1 / 3))
    assert_sd_close(orthomerge(base, ft), orthomerge(base, ft[::-1]), atol=1e-9)


def test_orthomerge_refuses_a_rotation_outside_the_cayley_domain() -> None:
    base = {"w": torch.eye(4, dtype=torch.float64)}
    half_turn = torch.diag(torch.tensor([-1.0, -1, 1, 1], dtype=torch.float64))  # a pi rotation
    with pytest.raises(ValueError, match=r"finetuned\[0\]\['w'\].*eigenvalue\s+near -1"):
        orthomerge(base, [{"w": half_turn}])


# ------------------------------------------------------------------------------------- TIES


def test_ties_trim_elect_disjoint_mean_by_hand() -> None:
    d1 = torch.tensor([4.0, -1.0, 3.0, 0.5, -2.0])
    d2 = torch.tensor([-1.0, -3.0, 2.0, 0.2, 5.0])
    # density 0.6 keeps 3 of 5 by magnitude: d1 -> [4, 0, 3, 0, -2], d2 -> [0, -3, 2, 0, 5];
    # elected signs of the sums [4, -3, 5, 0, 3]: +, -, +, 0, +; disjoint means:
    expected = torch.tensor([4.0, -3.0, 2.5, 0.0, 5.0])
    torch.testing.assert_close(ties_delta([d1, d2], density=0.6), expected)
    base = {"w": torch.zeros(5), "bn.running_var": torch.ones(5)}
    tuned = [
        {"w": d1, "bn.running_var": torch.full((5,), 0.5)},
        {"w": d2, "bn.running_var": torch.full((5,), 0.7)},
    ]
    out = ties_merge(base, tuned, scale=0.5, density=0.6)
    torch.testing.assert_close(out["w"], 0.5 * expected)
    torch.testing.assert_close(out["bn.running_var"], torch.full((5,), 0.6))
    assert torch.equal(ties_merge(base, tuned, density=1.0)["w"], ties_delta([d1, d2], 1.0))
    for bad in (0.0, 1.5, True, "0.2"):
        with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
            ties_merge(base, tuned, density=bad)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ties_merge(base, tuned, scale=float("nan"))


# ------------------------------------------------------------------------ batch-norm reset


def test_recompute_batchnorm_statistics_is_the_exact_batch_average() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, momentum=0.3), nn.Dropout(0.5))
    model[1].running_mean.fill_(7.0)
    batches = [torch.randn(16, 6, generator=gen(i)) for i in range(4)]
    model.train()
    recompute_batchnorm_statistics(model, batches)
    with torch.no_grad():
        h = [model[0](b) for b in batches]
    torch.testing.assert_close(model[1].running_mean, torch.stack([a.mean(0) for a in h]).mean(0))
    torch.testing.assert_close(
        model[1].running_var, torch.stack([a.var(0, unbiased=True) for a in h]).mean(0)
    )
    assert model[1].num_batches_tracked.item() == 4
    assert model.training and model[1].momentum == 0.3  # modes and momentum restored
    with pytest.raises(ValueError, match="no batch-norm module"):
        recompute_batchnorm_statistics(nn.Linear(2, 2), batches)
    before = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="batches is empty"):
        recompute_batchnorm_statistics(model, [])
    assert torch.equal(model[1].running_mean, before)


def test_batchnorm_reset_repairs_a_merged_conv_net(one_thread) -> None:
    """The REPAIR-style option on the even/odd digits CNN: after merging, statistics measured on
    8 training batches bring the merged model back at least to the carried-over statistics."""
    import copy

    Xtr, Xte, ytr, yte = _digits()
    torch.manual_seed(1)
    base = _cnn()
    _train(base, Xtr, ytr, epochs=1, seed=0)
    experts = []
    for i, mask in enumerate((ytr % 2 == 0, ytr % 2 == 1)):
        expert = copy.deepcopy(base)
        _train(expert, Xtr[mask], ytr[mask], epochs=3, seed=i + 1)
        experts.append(expert.state_dict())
    merged = _cnn().eval()
    merged.load_state_dict(orthogonal_merge(base, experts))

    def accuracy() -> float:
        with torch.no_grad():
            return float((merged(Xte).argmax(1) == yte).float().mean())

    carried = accuracy()
    g = torch.Generator().manual_seed(0)
    recompute_batchnorm_statistics(
        merged, [Xtr[torch.randint(len(Xtr), (64,), generator=g)] for _ in range(8)]
    )
    assert accuracy() >= carried - 0.01
