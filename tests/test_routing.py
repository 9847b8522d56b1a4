"""param_groups / describe: which parameter goes where."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthotorch


class TinyLM(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.Sequential(
            nn.LayerNorm(16), nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)
        )
        self.head = nn.Linear(16, 50, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)))


def routes(groups: list[dict]) -> dict[str, str]:
    return {name: g.get("algorithm", "ortho") for g in groups for name, _ in g["params"]}


@pytest.mark.parametrize("tied", [False, True])
def test_embeddings_head_and_1d_go_to_adamw(tied: bool) -> None:
    got = routes(orthotorch.param_groups(TinyLM(tied)))
    expected = {
        "embed.weight": "adamw",
        "block.0.weight": "adamw",
        "block.0.bias": "adamw",
        "block.1.weight": "ortho",
        "block.1.bias": "adamw",
        "block.3.weight": "ortho",
        "block.3.bias": "adamw",
    }
    if not tied:
        expected["head.weight"] = "adamw"
    assert got == expected


def test_conv_kernels_are_orthogonalized_and_frozen_skipped() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 10))
    model[2].weight.requires_grad_(False)
    assert routes(orthotorch.param_groups(model)) == {
        "0.weight": "ortho",
        "0.bias": "adamw",
        "2.bias": "adamw",
    }


def test_route_overrides_and_group_options() -> None:
    groups = orthotorch.param_groups(
        TinyLM(False),
        route={"block.3.*": "adamw", "head.*": "orthogonal"},
        adamw={"lr": 1e-3},
        lr=0.02,
        ns_method="muon",
    )
    got = routes(groups)
    assert got["block.3.weight"] == "adamw" and got["head.weight"] == "ortho"
    assert groups[0]["lr"] == 0.02 and groups[0]["ns_method"] == "muon"
    assert groups[1]["lr"] == 1e-3 and groups[1]["algorithm"] == "adamw"


def test_bad_routes_raise() -> None:
    with pytest.raises(
        ValueError, match=r"route\['x'\] must be one of 'orthogonal', 'adamw', 'spectral'"
    ):
        orthotorch.param_groups(TinyLM(False), route={"x": "sgd"})
    with pytest.raises(
        ValueError, match=r"sends 'block.0.bias' \(shape \(16,\)\) to an orthogonalized"
    ):
        orthotorch.param_groups(TinyLM(False), route={"*.bias": "orthogonal"})


def test_groups_work_with_torch_optimizers_and_describe() -> None:
    model = TinyLM(False)
    groups = orthotorch.param_groups(model)
    torch.optim.AdamW(orthotorch.param_groups(model))  # extra keys are ignored by torch
    table = orthotorch.describe(groups)
    lines = table.splitlines()
    assert lines[0].split() == [
        *("name", "shape", "group", "update", "layout", "matrices", "lr", "wd", "lr", "scale")
    ]
    row = next(line for line in lines if line.startswith("block.1.weight"))
    assert row.split() == [
        *("block.1.weight", "64x16", "orthogonal", "spectral", "flatten", "64x16"),
        *("default", "default", "2"),
    ]
    opt = orthotorch.Muon(groups, adjust_lr="match_rms_adamw")
    row = next(
        line for line in orthotorch.describe(opt).splitlines() if line.startswith("block.1.weight")
    )
    assert row.split() == [
        *("block.1.weight", "64x16", "muon", "spectral", "flatten", "64x16", "0.02", "0.1", "1.6")
    ]


def test_lr_scale_gives_roles_their_own_lr_and_describe_shows_it() -> None:
    model = TinyLM(False)
    groups = orthotorch.param_groups(
        model, policy="symmetry", lr=0.02, lr_scale={"block.1.*": 0.25, "embed.*": 0.5}
    )
    lr_of = {n: g["lr"] for g in groups if g.get("algorithm") != "adamw" for n, _ in g["params"]}
    assert lr_of["block.1.weight"] == 0.02 * 0.25 and lr_of["embed.weight"] == 0.02 * 0.5
    assert lr_of["head.weight"] == 0.02
    # Same rule, different scale: separate groups, each keeping its update rule.
    scaled = next(g for g in groups if any(n == "block.1.weight" for n, _ in g["params"]))
    assert scaled["lr_scale"] == 0.25 and [n for n, _ in scaled["params"]] == ["block.1.weight"]
    row = next(
        line for line in orthotorch.describe(groups).splitlines() if line.startswith("block.1.w")
    )
    assert row.split()[-1] == "0.5"  # shape scale 2 (64x16) times lr_scale 0.25
    opt = orthotorch.Muon(groups, lr=1.0)  # the groups' own lr wins over the default
    assert sorted({g["lr"] for g in opt.param_groups if g.get("algorithm") != "adamw"}) == [
        0.005,
        0.01,
        0.02,
    ]
    assert orthotorch.param_groups(model, lr=0.02, lr_scale={}) == orthotorch.param_groups(
        model, lr=0.02
    )


def test_bad_lr_scale_raises() -> None:
    model = TinyLM(False)
    with pytest.raises(ValueError, match="lr_scale scales the orthogonalized groups' lr"):
        orthotorch.param_groups(model, lr_scale={"*": 0.5})
    with pytest.raises(ValueError, match=r"lr_scale\['\*'\] must be a positive finite number"):
        orthotorch.param_groups(model, lr=0.02, lr_scale={"*": 0.0})
    with pytest.raises(TypeError, match=r"lr_scale\['\*'\] must be a number, got '1'"):
        orthotorch.param_groups(model, lr=0.02, lr_scale={"*": "1"})


def test_describe_an_optimizer_shows_its_own_scale_and_direction() -> None:
    """describe(optimizer) applied Muon's shape scale and called the update "spectral" for
    every orthogonal algorithm: for ARO (which scales by rms_scale and ignores the shape) a
    64x16 weight with lr_scale 0.5 read "spectral ... 1" instead of "aro ... 0.1"."""
    model = TinyLM(False)
    groups = orthotorch.param_groups(model, lr=1e-3, lr_scale={"block.1.*": 0.5})
    row = next(
        line.split()
        for line in orthotorch.describe(orthotorch.ARO(groups)).splitlines()
        if line.startswith("block.1.weight")
    )
    assert row[:6] + row[-1:] == [
        "block.1.weight",
        "64x16",
        "aro",
        "aro",
        "flatten",
        "64x16",
        "0.1",
    ]
    wrapped = orthotorch.SPECTRA(orthotorch.ARO(groups))  # the base's scale (without alpha)
    rows = [line.split() for line in orthotorch.describe(wrapped).splitlines()]
    assert [*row, "10"] in rows  # and the clip threshold c
    # Muon's own scale is the shape scale, as before.
    muon = orthotorch.Muon(orthotorch.param_groups(model, lr=0.02, lr_scale={"block.1.*": 0.5}))
    row = next(
        line.split() for line in orthotorch.describe(muon).splitlines() if "block.1.w" in line
    )
    assert row[:6] + row[-1:] == [
        *("block.1.weight", "64x16", "muon", "spectral", "flatten", "64x16", "1")
    ]


def test_lr_scale_pattern_that_scales_nothing_raises() -> None:
    """Regression: a pattern matching only AdamW-routed parameters (``embed.*`` under the default
    policy) or nothing at all (a typo) was silently ignored, so the intended lr never applied."""
    model = TinyLM(False)
    with pytest.raises(ValueError, match=r"lr_scale\['embed\.\*'\] matches only parameters routed"):
        orthotorch.param_groups(model, lr=0.02, lr_scale={"embed.*": 0.5})
    with pytest.raises(ValueError, match=r"lr_scale\['blok\.\*'\] matches no parameter"):
        orthotorch.param_groups(model, lr=0.02, lr_scale={"blok.*": 0.5})
    with pytest.raises(ValueError, match=r"lr_scale\['block\.1\.\*'\]: every .* earlier pattern"):
        orthotorch.param_groups(model, lr=0.02, lr_scale={"block.*": 0.5, "block.1.*": 0.25})


# ----------------------------------------------------------------- layouts and roles (issue 14)
class Conv1D(nn.Module):
    """GPT-2's Conv1D: y = x W + b, W stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))


class GPT2Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.split_size = d, heads, d
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)


class GPT2MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)


class TopKRouter(nn.Module):
    def __init__(self, experts: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d))


class Experts(nn.Module):
    def __init__(self, experts: int, d: int, inner: int) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = experts, d, inner
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, d))
        self.down_proj = nn.Parameter(torch.randn(experts, d, inner))


class MoE(nn.Module):
    def __init__(self, d: int, router: str) -> None:
        super().__init__()
        self.gate = TopKRouter(4, d) if router == "class" else nn.Linear(d, 4, bias=False)
        self.experts = Experts(4, d, 12)


class GQAAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = 4, 2, d // 4
        self.qkv_proj = nn.Linear(d, d + 2 * (d // 2), bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = GPT2Attention(d, 4)
        self.mlp = GPT2MLP(d)
        self.mha = nn.MultiheadAttention(d, 4)
        self.gqa = GQAAttention(d)
        self.moe = MoE(d, "class")
        self.moe_linear_gate = MoE(d, "linear")


class Model(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 9, d))
        self.block = Block(d)
        self.lm_head = nn.Linear(d, 50, bias=False)
        self.lm_head.weight = self.wte.weight


def plans(**kwargs) -> dict[str, orthotorch.ParameterPlan]:
    return {p.name: p for p in orthotorch.plan_parameters(Model(), **kwargs)}


def test_layouts_of_the_models_people_train() -> None:
    got = {n: (p.target, p.layout) for n, p in plans().items()}
    expected = {
        "wte.weight": ("adamw", None),
        "cls_token": ("adamw", None),
        "position_embeddings": ("adamw", None),
        "block.ln.weight": ("adamw", None),
        "block.ln.bias": ("adamw", None),
        "block.attn.c_attn.weight": ("orthogonal", "transposed+split(rows=16,16,16)"),
        "block.attn.c_attn.bias": ("adamw", None),
        "block.attn.c_proj.weight": ("orthogonal", "transposed"),
        "block.attn.c_proj.bias": ("adamw", None),
        "block.mlp.c_fc.weight": ("orthogonal", "transposed"),
        "block.mlp.c_fc.bias": ("adamw", None),
        "block.mlp.c_proj.weight": ("orthogonal", "transposed"),
        "block.mlp.c_proj.bias": ("adamw", None),
        "block.mha.in_proj_weight": ("orthogonal", "split(rows=16,16,16)"),
        "block.mha.in_proj_bias": ("adamw", None),
        "block.mha.out_proj.weight": ("orthogonal", "flatten"),
        "block.mha.out_proj.bias": ("adamw", None),
        "block.gqa.qkv_proj.weight": ("orthogonal", "split(rows=16,8,8)"),
        "block.gqa.o_proj.weight": ("orthogonal", "flatten"),
        "block.moe.gate.weight": ("adamw", None),
        "block.moe.experts.gate_up_proj": ("orthogonal", "batch+split(rows=12,12)"),
        "block.moe.experts.down_proj": ("orthogonal", "batch"),
        "block.moe_linear_gate.gate.weight": ("adamw", None),
        "block.moe_linear_gate.experts.gate_up_proj": ("orthogonal", "batch+split(rows=12,12)"),
        "block.moe_linear_gate.experts.down_proj": ("orthogonal", "batch"),
    }
    assert got == expected
    roles = {n: p.role for n, p in plans().items()}
    assert roles["block.moe.gate.weight"] == roles["block.moe_linear_gate.gate.weight"] == "router"
    assert roles["cls_token"] == "embedding" and roles["block.attn.c_proj.weight"] == "attention"
    assert roles["block.mlp.c_proj.weight"] == "mlp_out"


def test_symmetry_policy_decides_roles_by_module_not_by_a_shared_name() -> None:
    """Regression: GPT-2's attention c_proj got the MLP-down col_norm rule (a name shared with
    the MLP's c_proj), and a MoE router named "gate" got the MLP gate's row_norm."""
    got = {n: p.target for n, p in plans(policy="symmetry").items()}
    assert got["block.attn.c_proj.weight"] == "spectral"
    assert got["block.mlp.c_proj.weight"] == "col_norm"
    assert got["block.mlp.c_fc.weight"] == "row_norm"
    assert got["block.moe_linear_gate.gate.weight"] == "centered_row_norm"
    assert got["block.moe.experts.gate_up_proj"] == "row_norm"


def test_adamw_groups_split_decay_and_no_decay() -> None:
    groups = orthotorch.param_groups(Model())
    adamw = [g for g in groups if g.get("algorithm") == "adamw"]
    decayed, plain = ({n for n, _ in g["params"]} for g in adamw)
    assert "weight_decay" not in adamw[0] and adamw[1]["weight_decay"] == 0.0
    assert decayed == {"block.moe.gate.weight", "block.moe_linear_gate.gate.weight"}
    assert {"wte.weight", "cls_token", "block.ln.weight", "block.mha.in_proj_bias"} <= plain
    everything = orthotorch.param_groups(Model(), no_decay=())
    assert [g.get("weight_decay") for g in everything if g.get("algorithm") == "adamw"] == [None]
    with pytest.raises(ValueError, match=r"no_decay entries must be roles among 'bias', 'norm'"):
        orthotorch.param_groups(Model(), no_decay=("layernorm",))


def test_layout_overrides_and_their_errors() -> None:
    groups = orthotorch.param_groups(Model(), layout={"*.gqa.o_proj.weight": "per_head(4)"})
    layouts = {n: lay for g in groups for (n, _), lay in zip(g["params"], g.get("layouts", []))}
    assert layouts["block.gqa.o_proj.weight"] == "per_head(4)"
    with pytest.raises(ValueError, match=r"layout\['\*\.typo\.\*'\] matches no orthogonalized"):
        orthotorch.param_groups(Model(), layout={"*.typo.*": "batch"})
    with pytest.raises(ValueError, match=r"layout\['\*'\]: unknown layout 'stacked'"):
        orthotorch.param_groups(Model(), layout={"*": "stacked"})
    with pytest.raises(
        ValueError, match=r"parameter 'block.gqa.o_proj.weight' of shape \(16, 16\)"
    ):
        orthotorch.param_groups(Model(), layout={"*.o_proj.weight": "per_head(3)"})


def test_describe_shows_layouts_matrices_lr_and_decay() -> None:
    opt = orthotorch.Muon(orthotorch.param_groups(Model()), lr=0.02, adamw_lr=3e-4)
    rows = {line.split()[0]: line.split() for line in orthotorch.describe(opt).splitlines()}
    assert rows["block.moe.experts.gate_up_proj"][4:] == [
        *("batch+split(rows=12,12)", "4*(12x16+12x16)", "0.02", "0.1", "1")
    ]
    assert rows["block.attn.c_attn.weight"][4:6] == [
        "transposed+split(rows=16,16,16)",
        "16x16+16x16+16x16",
    ]
    assert rows["block.ln.weight"][2:] == ["adamw", "adam", "-", "-", "0.0003", "0", "1"]
    assert rows["block.moe.gate.weight"][-3:] == ["0.0003", "0.1", "1"]


def test_a_model_with_every_layout_trains() -> None:
    torch.manual_seed(0)
    model = Model()
    moe = model.block.moe
    x = torch.randn(32, 16)
    target = torch.randn(32, 16)
    opt = orthotorch.Muon(orthotorch.param_groups(model), lr=0.02, adamw_lr=3e-3)

    def loss_fn() -> torch.Tensor:
        h = x @ model.block.attn.c_attn.weight[:, :16] + model.block.mlp.c_proj.weight[:16].T.sum()
        e = torch.einsum("bd,eod->beo", h, moe.experts.gate_up_proj)[..., :12]
        y = torch.einsum("beo,edo->bd", torch.relu(e), moe.experts.down_proj)
        return nn.functional.mse_loss(y / 10, target)

    first = loss_fn().item()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_describe_of_optimizers_that_are_not_orthotorchs() -> None:
    """Regression: describe(torch.optim.AdamW(...)) listed every norm and bias as orthogonalized
    with a shape scale; SPECTRA(AdamW) showed no clipping."""
    model = TinyLM(False)
    table = orthotorch.describe(torch.optim.AdamW(model.parameters()))
    rows = [line.split() for line in table.splitlines()]
    assert all(r[2:4] == ["AdamW", "AdamW"] and r[4:6] == ["-", "-"] for r in rows[2:])
    wrapped = orthotorch.SPECTRA(torch.optim.AdamW(orthotorch.param_groups(model)), clip=4.0)
    table = [line.split() for line in orthotorch.describe(wrapped).splitlines()]
    assert table[0][-1] == "clip"
    by_name = {r[0]: r for r in table[2:]}
    assert by_name["block.1.weight"][-1] == "4" and by_name["block.1.bias"][-1] == "-"
    assert by_name["block.1.weight"][2] == "AdamW"


def test_describe_shows_the_state_options_only_when_used() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    plain = orthotorch.describe(orthotorch.Muon(orthotorch.param_groups(model), lr=0.02))
    assert "state" not in plain.splitlines()[0]
    model = model.to(torch.bfloat16)
    groups = orthotorch.param_groups(model, adamw={"momentum_dtype": torch.bfloat16})
    table = orthotorch.describe(orthotorch.Muon(groups, lr=0.02, master_weights=True))
    assert table.splitlines()[0].endswith("state")
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert rows["1.weight"].endswith("fp32 master")
    assert rows["0.weight"].endswith("bfloat16 first moment (SR), fp32 master")
