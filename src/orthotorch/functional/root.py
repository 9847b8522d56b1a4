"""ROOT's outlier-robust direction as pure functions (He et al., 2025, arXiv:2511.20626).

.. math::

    B_t = \\mu B_{t-1} + G_t, \\quad M_t = G_t + \\mu B_t \\ (\\text{Nesterov}), \\\\
    \\varepsilon_t = Q_q(|M_t|), \\quad
    \\bar M_t = \\mathrm{clip}(M_t, -\\varepsilon_t, \\varepsilon_t), \\quad
    O_t = M_t - \\bar M_t \\ (\\text{discarded}), \\\\
    \\theta_t = (1 - \\eta\\lambda)\\theta_{t-1} - \\eta\\, 0.2\\sqrt{\\max(m, n)}\\,
        \\mathrm{NS}_{\\text{root}}(\\bar M_t)

``Q_q`` is the ``q``-quantile (default 0.9) of the entries of ``|M_t|`` of one matrix. The clip is
the proximal split of the momentum into a bounded part and sparse outliers (soft-thresholding
gives the outliers ``O``; ROOT keeps only the bounded part), so one huge gradient entry cannot
take over the spectrum that Newton–Schulz equalises.

The momentum here is :func:`~orthotorch.functional.nesterov_momentum_`'s lerp form, ``(1 - mu)``
times the paper's ``B = mu B + G``: quantile, clip and polar factor are all positively
homogeneous, so the direction is the same and the buffer stays at gradient scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..linalg.registry import OrthogonalizationMethod
from .rules import Kernel

__all__ = ["DEFAULT_QUANTILE_SAMPLES", "outlier_threshold", "root_kernel", "soft_clip"]

# Per-matrix sample size of the quantile. Exact selection (kthvalue) costs ~30 ns per entry on
# CPU, ~0.4 s on the reference parameter set, a third of a Muon step; 65536 samples put the
# threshold within about +-0.2 percentile points of the exact one (binomial standard error
# sqrt(q (1 - q) / n) = 0.0012) at 1/16 of the cost for the 512x2048 matrices.
DEFAULT_QUANTILE_SAMPLES = 1 << 16


def _coprime_stride(numel: int, samples: int, row: int) -> int:
    """The smallest stride ``>= numel / samples`` coprime to the row length.

    Coprime matters: a stride that divides the row length would read the same few columns of
    every row, and outliers in gradients come in columns (features) and rows (tokens, units).
    """
    stride = max(1, math.ceil(numel / samples))
    while math.gcd(stride, row) != 1:
        stride += 1
    return stride


def outlier_threshold(X: Tensor, quantile: float, samples: int | None = None) -> Tensor:
    """Per-matrix ``q``-quantile of ``|X|`` for ``X`` of shape ``(batch, m, n)``: ``(batch, 1, 1)``.

    The quantile is the order statistic ``torch.quantile(|x|, q, interpolation="lower")``: no
    interpolation, so clipping at it commutes with the monotone rounding to the compute dtype.
    It is found with ``kthvalue``, which, unlike ``torch.quantile``, accepts more than ``2^24``
    entries, and reads no value back to the host (``k`` comes from the shape).

    Args:
        X: ``(batch, m, n)``.
        quantile: ``q`` in ``(0, 1]``.
        samples: above this many entries per matrix, estimate the quantile from a deterministic
            strided sample of about ``samples`` entries (stride coprime to the row length);
            ``None``: always exact.
    """
    flat = X.reshape(X.shape[0], -1)
    numel = flat.shape[1]
    if samples is not None and numel > samples:
        flat = flat[:, :: _coprime_stride(numel, samples, X.shape[-1])]
    n = flat.shape[1]
    k = math.floor(quantile * (n - 1)) + 1  # 1-based rank of the "lower" order statistic
    values = flat.abs().kthvalue(k, dim=1, keepdim=True).values
    return values.unsqueeze(-1)


def soft_clip(X: Tensor, quantile: float, samples: int | None = None) -> Tensor:
    """``clip(X, -eps, eps)`` with ``eps = outlier_threshold(X, quantile)`` per matrix.

    The bounded part of the proximal split; the outliers ``X - clip(X)`` are discarded. Returns a
    new tensor: kernels must not modify the stacks they are given.
    """
    eps = outlier_threshold(X, quantile, samples)
    return torch.clamp(X, min=-eps, max=eps)


def root_kernel(
    spec: OrthogonalizationMethod,
    steps: int | None,
    *,
    outlier_quantile: float | None,
    quantile_samples: int | None = DEFAULT_QUANTILE_SAMPLES,
) -> Kernel:
    """The kernel ``(X, transposed) -> NS(clip(X, -eps, eps))`` on a wide ``(k, m, n)`` stack.

    Run by :func:`orthotorch.distributed.map_matrices` on whole matrices (the quantile is a
    property of the whole matrix, so it must never see a shard), with one ``kthvalue`` call per
    same-shape stack. ``outlier_quantile=None`` skips the clip (plain orthogonalization).
    """

    def kernel(X: Tensor, transposed: bool) -> Tensor:
        del transposed  # clip and polar factor commute with transposition
        if outlier_quantile is not None:
            X = soft_clip(X, outlier_quantile, quantile_samples)
        return spec.iterate(X, steps)

    return kernel
