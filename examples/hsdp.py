"""HSDP (replicate x shard) + orthotorch.Muon on CPU (gloo) or GPU (nccl).

    torchrun --nproc_per_node 4 examples/hsdp.py [--quick]

A 2-D mesh ``(replicate=2, shard=2)``: ``fully_shard`` shards every weight over the ``shard``
dimension and replicates it over ``replicate`` (parameters are ``DTensor`` objects with
placements ``(Replicate(), Shard(0))``). Muon gives each weight one owner among all 4 ranks:
the shard dimension brings its row shards to the owner (``all_to_all``), the owner
orthogonalizes it whole and returns the shards, and an ``all_gather`` over the replicate
dimension completes the other replica's shards, so the replicas split the Newton–Schulz work
instead of repeating it. Any even world size works (``replicate = world / 2``).

torchrun's only message is its note that it set ``OMP_NUM_THREADS=1`` for each process.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import orthotorch

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="3 steps (a smoke test)")
args = parser.parse_args()

backend = "nccl" if torch.cuda.is_available() else "gloo"
dist.init_process_group(backend)
rank, world = dist.get_rank(), dist.get_world_size()
if world % 2:
    raise SystemExit(f"HSDP here needs an even number of processes, got {world}")
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else "cpu"
mesh = init_device_mesh(
    device.type if backend == "nccl" else "cpu",
    (world // 2, 2),
    mesh_dim_names=("replicate", "shard"),
)

torch.manual_seed(0)
model = nn.Sequential(
    nn.Embedding(256, 64),
    nn.Linear(64, 256),
    nn.GELU(),
    nn.Linear(256, 64),
    nn.LayerNorm(64),
    nn.Linear(64, 256),
).to(device)
for layer in (model[1], model[3]):
    fully_shard(layer, mesh=mesh)  # a 2-D mesh: HSDP
fully_shard(model, mesh=mesh)

optimizer = orthotorch.Muon(orthotorch.param_groups(model), lr=0.02, adamw_lr=3e-3)
if rank == 0:
    print(f"placements of model[1].weight: {model[1].weight.placements}")
    print(orthotorch.describe(optimizer))

# Ranks of one replica group see the same data stream; the two replicas see different ones
# (HSDP's data parallelism runs over both dimensions, so here every rank gets its own batch).
gen = torch.Generator().manual_seed(rank)
for step in range(3 if args.quick else 40):
    columns = [torch.randint(0, 256, (16,), generator=gen)]
    for _ in range(32):
        columns.append((columns[-1] * 5 + 7) % 256)
    tokens = torch.stack(columns, dim=1).to(device)
    # 2-D input, no views of module outputs (FSDP2 warns about those): see examples/fsdp2.py.
    logits = model(tokens[:, :-1].reshape(-1))
    loss = nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if rank == 0 and step % 10 == 0:
        print(f"step {step:2d}  loss {loss.item():.4f}")
dist.barrier()  # let every rank finish before gloo is torn down
dist.destroy_process_group()
