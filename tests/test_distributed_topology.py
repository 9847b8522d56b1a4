"""The explicit-topology arguments (``process_group=``, ``device_mesh=``, ``overlap=``) of every
orthogonalizing optimizer: accepted, validated with a ValueError naming the argument, and kept
in ``opt.distributed`` (a :class:`orthotorch.distributed.Topology`). Single process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import orthotorch
from orthotorch.distributed import Topology

NAMES = ["Muon", "ROOT", "AuON", "ARO", "NorMuon", "Dion", "DCTAdamW", "GaLoreAdamW", "SPECTRA"]


def build(name: str, **topology) -> torch.optim.Optimizer:
    weight = nn.Parameter(torch.randn(8, 6))
    if name == "SPECTRA":
        return orthotorch.SPECTRA(torch.optim.AdamW([weight]), clip=0.5, **topology)
    return getattr(orthotorch, name)([weight], **topology)


@pytest.mark.parametrize("name", NAMES)
def test_topology_is_kept(name: str) -> None:
    group = object()  # any handle: stored as given, used only under an initialised group
    opt = build(name, process_group=group, overlap=False)
    assert isinstance(opt.distributed, Topology)
    assert opt.distributed.group is group and opt.distributed.mesh is None
    assert opt.distributed.overlap is False and opt.distributed.mode == "auto"


@pytest.mark.parametrize("name", NAMES)
def test_bad_topology_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"process_group=.*device_mesh=.*not both"):
        build(name, process_group=object(), device_mesh=object())
    with pytest.raises(ValueError, match=r"device_mesh must be a .*DeviceMesh, got str"):
        build(name, device_mesh="mesh")
    with pytest.raises(ValueError, match="overlap must be True or False"):
        build(name, overlap="yes")
