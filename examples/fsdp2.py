"""FSDP2 + orthotorch.Muon (or DCTAdamW) on CPU (gloo) or GPU (nccl).

    torchrun --nproc_per_node 2 examples/fsdp2.py [--optimizer dct] [--quick]

torchrun's only message is its note that it set ``OMP_NUM_THREADS=1`` for each process;
``OMP_NUM_THREADS=1 torchrun ...`` silences it. The example itself runs free of warnings.

Muon: each rank orthogonalizes only the matrices it owns (whole matrices, gathered from the row
shards with all_to_all) and sends the row shards back; AdamW groups stay shard-local.
DCTAdamW (orthogonalize=True): tall weights keep row-sharded low-rank moments, wide ones
all-reduce their small projections; subspaces are found once and shared by every rank.
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
parser.add_argument("--optimizer", choices=["muon", "dct"], default="muon")
parser.add_argument("--quick", action="store_true", help="3 steps (a smoke test)")
args = parser.parse_args()

backend = "nccl" if torch.cuda.is_available() else "gloo"
dist.init_process_group(backend)
rank = dist.get_rank()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else "cpu"
mesh = init_device_mesh(device.type if backend == "nccl" else "cpu", (dist.get_world_size(),))

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
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)

if args.optimizer == "muon":
    optimizer = orthotorch.Muon(orthotorch.param_groups(model), lr=0.02, adamw_lr=3e-3)
else:
    optimizer = orthotorch.DCTAdamW(
        orthotorch.param_groups(model), lr=0.02, rank=0.25, orthogonalize=True, adamw_lr=3e-3
    )
if rank == 0:
    print(orthotorch.describe(optimizer))

gen = torch.Generator().manual_seed(rank)  # each rank sees its own data
for step in range(3 if args.quick else 40):
    # A learnable stream: each token is a fixed function of the previous one.
    columns = [torch.randint(0, 256, (16,), generator=gen)]
    for _ in range(32):
        columns.append((columns[-1] * 5 + 7) % 256)
    tokens = torch.stack(columns, dim=1).to(device)
    # The model is position-wise, so the (batch, time) tokens go in flattened: nn.Linear on a
    # 3-D input returns a *view* of a 2-D product, and FSDP2 warns about every module output
    # that is a view (an in-place op on it would skip the pre-backward hook). 2-D in, no views.
    logits = model(tokens[:, :-1].reshape(-1))
    loss = nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if rank == 0 and step % 10 == 0:
        print(f"step {step:2d}  loss {loss.item():.4f}")
dist.barrier()  # let every rank finish before gloo is torn down
dist.destroy_process_group()
