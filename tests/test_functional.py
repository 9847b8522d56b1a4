"""The functional core on its own: AdamW arithmetic, shape scales, buckets."""

from __future__ import annotations

import math

import pytest
import torch

from orthotorch.functional import adamw_step_, bucket_by_shape, matrix_shape, shape_scale


def test_adamw_step_matches_torch_functional_result() -> None:
    torch.manual_seed(0)
    p = [torch.randn(5, 3), torch.randn(7)]
    q = [t.clone().requires_grad_() for t in p]
    ref = torch.optim.AdamW(q, lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3)
    m = [torch.zeros_like(t) for t in p]
    v = [torch.zeros_like(t) for t in p]
    steps = [torch.tensor(0.0) for _ in p]
    for _ in range(4):
        g = [torch.randn_like(t) for t in p]
        for t, gt in zip(q, g, strict=True):
            t.grad = gt.clone()
        ref.step()
        adamw_step_(p, g, m, v, steps, lr=1e-2, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.3)
    for a, b in zip(p, q, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "shape,original,match",
    [((64, 16), 2.0, 1.6), ((16, 64), 1.0, 1.6), ((8, 2, 3, 3), 1.0, 0.2 * math.sqrt(18))],
)
def test_shape_scales(shape: tuple[int, ...], original: float, match: float) -> None:
    ms = matrix_shape(shape)
    assert shape_scale(ms, "original") == pytest.approx(original)
    assert shape_scale(ms, "match_rms_adamw") == pytest.approx(match)
    with pytest.raises(ValueError, match="adjust_lr must be one of"):
        shape_scale(ms, "none")


def test_buckets_group_by_flattened_shape_and_store_wide() -> None:
    updates = [torch.randn(6, 2), torch.randn(3, 4), torch.randn(6, 2), torch.randn(3, 2, 2)]
    buckets = bucket_by_shape(updates, torch.float32)
    assert [(b.shape, b.index, tuple(b.X.shape)) for b in buckets] == [
        ((6, 2), [0, 2], (2, 2, 6)),
        ((3, 4), [1, 3], (2, 3, 4)),
    ]
    for b in buckets:
        for i, d in zip(b.index, b.directions(), strict=True):
            assert torch.equal(d, updates[i].reshape(b.shape))
