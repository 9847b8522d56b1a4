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
    assert row[:6] + row[-1:] == ["block.1.weight", "64x16", "aro", "aro", "flatten", "64x16", "0.1"]
    wrapped = orthotorch.SPECTRA(orthotorch.ARO(groups))  # the base's scale (without alpha)
    rows = [line.split() for line in orthotorch.describe(wrapped).splitlines()]
    assert row + ["10"] in rows  # and the clip threshold c
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
