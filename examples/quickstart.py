"""The README quickstart as a runnable script: a small MLP on scikit-learn's digits with Muon."""

import torch
from sklearn.datasets import load_digits
from torch import nn

import orthotorch

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

for step in range(201):
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}")
