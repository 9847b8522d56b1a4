"""The README quickstart, longer: a small MLP on scikit-learn's digits with Muon.

python examples/quickstart.py [--quick]   # --quick: 5 steps instead of 200
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import orthotorch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="5 full-batch steps (a smoke test)")
args = parser.parse_args()

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
model = nn.Sequential(
    nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
)

# Hidden matrices -> Muon; the head, biases (and embeddings, norms) -> AdamW, in one optimizer.
groups = orthotorch.param_groups(model, adamw={"lr": 3e-3})
optimizer = orthotorch.Muon(groups, lr=0.02)
print(orthotorch.describe(optimizer))

steps = 5 if args.quick else 201
for step in range(steps):
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0 or step == steps - 1:
        print(f"step {step:3d}  loss {loss.item():.4f}")
