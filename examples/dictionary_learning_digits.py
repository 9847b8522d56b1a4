"""Learn an orthogonal dictionary of the 8x8 digits and code them with k non-zeros.

    python examples/dictionary_learning_digits.py [--k 8] [--objective k_sparse] [--save atoms.png]
        [--quick]

Fits :class:`orthotorch.decomposition.OnlineOrthogonalDictionaryLearning` on the centred
``load_digits`` images (64-dim samples, 80/20 split), prints the held-out relative
reconstruction error at ``k`` non-zeros next to the fixed PCA basis, checks ``D^T D = I``, and
optionally saves the 64 atoms as an image grid (needs matplotlib). Runs in a few seconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from orthotorch.decomposition import (
    OnlineOrthogonalDictionaryLearning,
    principal_basis,
    sparse_codes,
)


def relative_error(Y: np.ndarray, Y_hat: np.ndarray) -> float:
    return float(np.linalg.norm(Y - Y_hat) / np.linalg.norm(Y))


def save_atoms(components: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(8, 8, figsize=(6, 6))
    for atom, ax in zip(components, axes.ravel(), strict=True):
        ax.imshow(atom.reshape(8, 8), cmap="gray")
        ax.set_axis_off()
    fig.suptitle("orthogonal dictionary atoms (8x8 digits)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="non-zeros per code")
    parser.add_argument("--objective", choices=["l4", "k_sparse"], default="k_sparse")
    parser.add_argument("--save", default=None, help="path of a PNG grid of the atoms")
    parser.add_argument("--quick", action="store_true", help="two passes over the data")
    args = parser.parse_args()

    Y = load_digits().data
    order = np.random.default_rng(0).permutation(len(Y))
    train, test = Y[order[:1437]], Y[order[1437:]]
    mean = train.mean(axis=0)
    train, test = train - mean, test - mean

    model = OnlineOrthogonalDictionaryLearning(
        objective=args.objective,
        transform_n_nonzero_coefs=args.k,
        random_state=0,
        **({"max_iter": 2} if args.quick else {}),
    )
    start = time.perf_counter()
    model.fit(train)
    seconds = time.perf_counter() - start
    W = model.components_
    codes = model.transform(test)
    print(f"fit: {seconds:.2f} s, {model.n_steps_} Frank-Wolfe steps, objective={args.objective}")
    print(f"max |W W^T - I| = {np.abs(W @ W.T - np.eye(len(W))).max():.1e}")
    print(f"non-zeros per code: {int((codes != 0).sum(axis=1).max())}")
    ours = relative_error(test, model.inverse_transform(codes))

    # The fixed PCA basis with the same exact top-k coding rule: what learning must improve on.
    W_pca = principal_basis(torch.from_numpy(train), 64)
    pca_codes = sparse_codes(W_pca, torch.from_numpy(test), "topk", n_nonzero_coefs=args.k)
    pca = relative_error(test, (pca_codes @ W_pca).numpy())
    print(f"held-out relative error at k={args.k}: learned {ours:.4f}, PCA basis {pca:.4f}")
    if args.save:
        save_atoms(W, args.save)
        print(f"atoms saved to {args.save}")


if __name__ == "__main__":
    main()
