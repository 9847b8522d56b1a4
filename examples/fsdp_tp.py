"""FSDP2 + tensor parallelism (a 2-D ``(dp, tp)`` mesh) + orthotorch.Muon, CPU (gloo) or GPU.

    torchrun --nproc_per_node 4 examples/fsdp_tp.py [--quick]

``parallelize_module`` splits the MLP Megatron-style over ``tp``: ``up`` column-wise
(``Shard(0)``), ``down`` row-wise (``Shard(1)``); ``fully_shard`` then shards every weight
over ``dp`` too. FSDP's dim-0 sharding of the column-parallel ``up`` gives the strided placement
``(_StridedShard(0), Shard(0))``, of ``down`` ``(Shard(0), Shard(1))``. Muon assigns each
weight an owner among all 4 ranks, brings its pieces there with one ``all_to_all`` over the
whole mesh (each piece placed by its rank's index map, whatever the placement), orthogonalizes
the whole matrix and sends the pieces back: the same update as one process.

torchrun's only message is its note that it set ``OMP_NUM_THREADS=1`` for each process.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import orthotorch

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="3 steps (a smoke test)")
args = parser.parse_args()

backend = "nccl" if torch.cuda.is_available() else "gloo"
dist.init_process_group(backend)
rank, world = dist.get_rank(), dist.get_world_size()
if world % 2:
    raise SystemExit(f"dp x tp with tp=2 needs an even number of processes, got {world}")
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else "cpu"
mesh = init_device_mesh(
    device.type if backend == "nccl" else "cpu", (world // 2, 2), mesh_dim_names=("dp", "tp")
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 64)
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 256)
        self.down = nn.Linear(256, 64)
        self.head = nn.Linear(64, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.down(nn.functional.gelu(self.up(self.norm(h))))
        return self.head(h)


torch.manual_seed(0)
model = Block().to(device)
parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
# One FSDP unit at the root: a per-layer unit around the tensor-parallel up/down would return
# a view (the TP output's to_local), which FSDP2 warns about.
fully_shard(model, mesh=mesh["dp"])

optimizer = orthotorch.Muon(orthotorch.param_groups(model), lr=0.02, adamw_lr=3e-3)
if rank == 0:
    for name in ("up.weight", "down.weight"):
        print(f"placements of {name}: {model.get_parameter(name).placements}")
    print(orthotorch.describe(optimizer))

# The ranks of one tp group must see the same batch; the dp groups see different ones.
gen = torch.Generator().manual_seed(mesh.get_local_rank("dp"))
for step in range(3 if args.quick else 40):
    columns = [torch.randint(0, 256, (16,), generator=gen)]
    for _ in range(32):
        columns.append((columns[-1] * 5 + 7) % 256)
    tokens = torch.stack(columns, dim=1).to(device)
    logits = model(tokens[:, :-1].reshape(-1))
    loss = nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if rank == 0 and step % 10 == 0:
        print(f"step {step:2d}  loss {loss.item():.4f}")
dist.barrier()  # let every rank finish before gloo is torn down
dist.destroy_process_group()
