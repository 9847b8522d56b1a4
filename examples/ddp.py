"""DDP + orthotorch.Muon (or DCTAdamW): each rank orthogonalizes 1/world_size of the matrices.

torchrun --nproc_per_node 2 examples/ddp.py [--optimizer dct] [--quick]

With DCTAdamW each rank also finds 1/world_size of the subspaces and shares them, so the
selected DCT columns are the same on every rank.
"""

import argparse

import torch
import torch.distributed as dist
from torch import nn

import orthotorch

parser = argparse.ArgumentParser()
parser.add_argument("--optimizer", choices=["muon", "dct"], default="muon")
parser.add_argument("--quick", action="store_true", help="3 steps (a smoke test)")
args = parser.parse_args()

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.Sequential(
    nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)
)
ddp = nn.parallel.DistributedDataParallel(model)
if args.optimizer == "muon":
    optimizer = orthotorch.Muon(orthotorch.param_groups(model), lr=0.02, adamw_lr=3e-3)
else:
    optimizer = orthotorch.DCTAdamW(
        orthotorch.param_groups(model), lr=0.02, rank=0.25, orthogonalize=True, adamw_lr=3e-3
    )

gen = torch.Generator().manual_seed(rank)
target = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
for step in range(3 if args.quick else 60):
    x = torch.randn(64, 32, generator=gen)
    loss = (ddp(x) - x @ target).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if rank == 0 and step % 20 == 0:
        print(f"step {step:2d}  loss {loss.item():.4f}")
dist.barrier()  # let every rank finish before gloo is torn down
dist.destroy_process_group()
