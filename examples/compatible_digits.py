"""Compatible representations on scikit-learn's digits: query a new model against an old gallery.

Two small MLPs are trained on the same training split with different seeds and widths: the
"old" model embeds into 16 dimensions, the "new" one into 32. The test split is divided into
a gallery (indexed once, by the old model) and queries (embedded by the new model). Their
spaces are unrelated, so the new queries cannot search the old gallery directly. An
old->new map fitted on the *training* split (embeddings of the same images by both models)
fixes that without re-embedding the gallery:

- relaxed: a free 32x16 matrix with the λ-orthogonality penalty (lam = 12, OCA);
- exact: ``exp(P - P^T)`` applied to the zero-padded old embedding (BT^2 basis expansion);
- Procrustes: the closed-form best isometry (the reference).

Run: ``python examples/compatible_digits.py [--quick]`` (CPU, well under a minute; ``--quick``:
a few epochs, seconds).
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from orthotorch.linalg import orthogonality_error
from orthotorch.metrics import compatibility_report
from orthotorch.nn.compatible import (
    OrthogonalTransform,
    fit_orthogonal_transform,
    train_orthogonal_transform,
)

KS = (1, 5)


class EmbeddingMLP(nn.Module):
    """64 pixels -> hidden -> embedding -> 10 classes; retrieval uses the embedding."""

    def __init__(self, hidden: int, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, 10))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_model(X, y, *, hidden: int, dim: int, seed: int, epochs: int) -> EmbeddingMLP:
    torch.manual_seed(seed)
    model = EmbeddingMLP(hidden, dim)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def unit(E: torch.Tensor) -> torch.Tensor:
    # Retrieval is by cosine, and an isometry cannot rescale: align directions, not norms.
    return nn.functional.normalize(E, dim=1)


def main(quick: bool = False) -> None:
    start = time.perf_counter()
    epochs, steps = ((2, 3), 20) if quick else ((15, 40), 600)
    torch.set_num_threads(1)  # tiny matrices: extra threads only add contention
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    idx = torch.arange(len(y))
    train, test = train_test_split(idx, test_size=0.4, stratify=y, random_state=0)
    gallery, query = train_test_split(test, test_size=1 / 3, stratify=y[test], random_state=0)
    train, gallery, query = (torch.as_tensor(i) for i in (train, gallery, query))

    old = train_model(X[train], y[train], hidden=32, dim=16, seed=0, epochs=epochs[0])
    new = train_model(X[train], y[train], hidden=128, dim=32, seed=1, epochs=epochs[1])
    with torch.no_grad():
        old_emb = {
            s: unit(old.embed(X[i])) for s, i in [("train", train), ("g", gallery), ("q", query)]
        }
        new_emb = {
            s: unit(new.embed(X[i])) for s, i in [("train", train), ("g", gallery), ("q", query)]
        }

    relaxed = OrthogonalTransform(16, 32, constraint="relaxed", lam=12.0)
    train_orthogonal_transform(relaxed, old_emb["train"], new_emb["train"], steps=steps, lr=1e-2)
    exact = OrthogonalTransform(16, 32, constraint="exact")
    train_orthogonal_transform(exact, old_emb["train"], new_emb["train"], steps=steps, lr=1e-2)
    Q = fit_orthogonal_transform(old_emb["train"], new_emb["train"])
    maps = {
        "no map (zero-pad)": lambda E: nn.functional.pad(E, (0, 16)),
        "relaxed (lam=12)": relaxed,
        "exact exp(skew)": exact,
        "Procrustes": lambda E: E @ Q.T,
    }

    def orth_err(fn) -> float:
        if isinstance(fn, OrthogonalTransform):
            return fn.orthogonality_error()
        return float(orthogonality_error(fn(torch.eye(16)).T))  # rows of fn(I) = columns of Q

    def align_err(fn) -> float:
        # On the held-out gallery images, which both models embedded.
        with torch.no_grad():
            mapped = fn(old_emb["g"])
        return float(torch.linalg.matrix_norm(mapped - new_emb["g"]) / len(gallery) ** 0.5)

    def fmt(row: dict[str, float]) -> str:
        return "".join(f"{100 * row[k]:>8.2f}" for k in ("top1", "top5", "mAP"))

    args = (old_emb["q"], old_emb["g"], new_emb["q"], new_emb["g"], y[query], y[gallery])
    print(f"digits: {len(train)} train, {len(gallery)} gallery, {len(query)} queries (cosine)")
    header = f"{'query / gallery':<34}{'top1':>8}{'top5':>8}{'mAP':>8}{'orth err':>10}{'align':>8}"
    print(header)
    print("-" * len(header))
    for i, (name, fn) in enumerate(maps.items()):
        with torch.no_grad():
            report = compatibility_report(*args, gallery_transform=fn, ks=KS)
        if i == 0:
            print(f"{'old / old (16-d)':<34}{fmt(report.old_old)}")
            print(f"{'new / new (32-d)':<34}{fmt(report.new_new)}")
        print(
            f"{'new / old, ' + name:<34}{fmt(report.cross)}{orth_err(fn):>10.1e}"
            f"{align_err(fn):>8.3f}" + ("  compatible" if report.compatible else "")
        )
    print(
        "orth err: ||Q^T Q - I||_F / sqrt(16); align: RMS ||T(old) - new|| per gallery image "
        "(unit vectors)"
    )
    print("('compatible': cross >= old/old on top1, top5 and mAP; BCT's criterion)")
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs/steps (seconds)")
    main(parser.parse_args().quick)
