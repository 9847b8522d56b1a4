r"""Recompute batch-norm statistics of a merged model from a few batches (REPAIR-style reset).

A merged weight is not the weight any statistic was measured with: the running mean and
variance a merge carries over (the models' mean, :mod:`.merging`) describe *their* activations,
not the merged model's, and the mismatch compounds layer by layer ("variance collapse" of
interpolated networks). Jordan et al., "REPAIR: REnormalizing Permuted Activations for
Interpolation Repair" (ICLR 2023, arXiv:2211.08403) show that for networks with batch norm,
resetting the statistics on a few training batches ("reset BN") already repairs it; REPAIR
itself generalises that to networks without batch norm by rescaling channels to the interpolated
statistics of the endpoints, which is not implemented here.

:func:`recompute_batchnorm_statistics` is that reset: every batch norm with running statistics
(``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) forgets its statistics and re-estimates them as the
exact average over the given batches (``momentum=None``: cumulative moving average), with the
rest of the model in eval mode; the weights are not touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["recompute_batchnorm_statistics"]


@torch.no_grad()
def recompute_batchnorm_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Reset and re-estimate every batch norm's running statistics from ``batches``, in place.

    After the call each batch norm's ``running_mean`` is the mean over batches of its batch
    means (equal batch sizes: the mean over all samples) and ``running_var`` the mean of its
    unbiased batch variances, as :class:`torch.nn.BatchNorm2d` accumulates them with
    ``momentum=None``; ``num_batches_tracked`` counts the batches. Dropout and every other
    module run in eval mode; each module's ``training`` flag and ``momentum`` are restored.

    Args:
        model: the (merged) model; modified in place and returned.
        batches: an iterable of inputs, e.g. ``[x for x, _ in itertools.islice(loader, 10)]``.
        forward: ``forward(model, batch)``; default ``model(batch)``.

    Returns:
        ``model``.

    Raises:
        ValueError: ``model`` has no batch-norm module, or ``batches`` is empty (the statistics
            would be left reset), checked before anything is changed.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        raise ValueError("model has no batch-norm module with running statistics to recompute")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; pass at least one batch of inputs")
    run = forward if forward is not None else (lambda m, b: m(b))
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in batches:
            run(model, batch)
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for m, momentum in momenta.items():
            m.momentum = momentum
    return model
