"""QK-Clip (the "Clip" of MuonClip, Kimi K2): keep attention logits bounded by rescaling weights.

Training with Muon at scale can make the largest pre-softmax attention logit grow without bound
("MaxLogit explosion"). QK-Clip (Kimi Team, *Kimi K2: Open Agentic Intelligence*, 2025,
arXiv:2507.20534, Algorithm 1; J. Su, "QK-Clip", kexue.fm/archives/11126) leaves the forward and
backward passes alone and, **after** each optimizer step, shrinks the query and key projections
of every head whose logit went over a threshold ``tau``:

.. math::

    S^h_{\\max} = \\max_{X \\in B} \\max_{i,j} \\tfrac{1}{\\sqrt d}\\, q^h_i \\cdot k^h_j, \\qquad
    \\gamma_h = \\min(1, \\tau / S^h_{\\max}), \\qquad
    W^h_q \\leftarrow \\sqrt{\\gamma_h}\\, W^h_q, \\quad
    W^h_k \\leftarrow \\sqrt{\\gamma_h}\\, W^h_k

so the logits of head ``h`` on the recorded batch are multiplied by exactly ``gamma_h`` and end
at most ``tau``. Heads under the threshold are untouched (``gamma_h = 1``, a bit-exact no-op).

Two details beyond the formula, both chosen so that head ``h``'s logits scale by ``gamma_h`` and
no other head's change:

- **Shared keys (GQA / MQA).** When ``num_kv_heads < num_heads`` a key head serves several query
  heads. K2 meets the same coupling in MLA, whose rotary key is shared by all heads: it leaves
  the shared key untouched and scales that head's query part by the whole ``gamma_h``. We apply
  the same rule to grouped keys: each query head takes ``gamma_h``, shared key heads are left as
  they are. (Scaling a shared key by the group's smallest ``gamma`` would also bound the logits,
  but would shrink heads that did not need it.)
- **Biases.** ``q = W_q x + b_q``; scaling ``W_q`` alone would not scale ``q``. A bias passed
  with its weight is scaled with it, so fused projections with biases (``nn.MultiheadAttention``,
  GPT-2's ``c_attn``) clip exactly.

Rotary embeddings (RoPE) rotate each head's ``q`` and ``k`` after the projection; a rotation
commutes with the scaling, so they need nothing special. MLA's decoupled rotary parts are passed
as separate tensors: its non-rotary ``q^C, k^C`` as ``q``/``k``, its per-head rotary query
``q^R`` with ``rotary_q`` (scaled by ``gamma_h``), its shared rotary key not at all.

Usage: the attention code reports its per-head maximum logits (:func:`attention_max_logits`, or
:class:`QKClip` hooks on ``nn.MultiheadAttention``), and ``clip.step()`` runs after
``optimizer.step()``. Everything stays on the device: no host synchronisation, so it is safe
inside a compiled training step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "QKClip",
    "attention_max_logits",
    "fused_qk_parts",
    "qk_clip_",
    "qk_clip_factors",
]

TensorOrParts = Tensor | Sequence[Tensor]


def attention_max_logits(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """The per-head maximum pre-softmax logit ``S^h_max`` of one attention call.

    ``max over batch, i, j of scale * q^h_i . k^{g(h)}_j`` with ``g(h) = h // (H / H_kv)`` (grouped
    keys are repeated as ``scaled_dot_product_attention(enable_gqa=True)`` does). Computed without
    gradient, in float32; positions masked out (``is_causal``, or a boolean ``attn_mask`` that is
    ``False``) do not count.

    Args:
        q: ``(batch, num_heads, L, head_dim)``.
        k: ``(batch, num_kv_heads, S, head_dim)``; ``num_heads`` must be a multiple of
            ``num_kv_heads``.
        scale: the softmax scale (default ``1/sqrt(head_dim)``, as
            ``scaled_dot_product_attention``).
        is_causal: query ``i`` sees keys ``j <= i`` only.
        attn_mask: boolean, broadcastable to ``(batch, num_heads, L, S)``; ``True`` = attend.
            (An additive float mask changes the logits the softmax sees; pass its boolean
            support instead.)

    Returns:
        ``(num_heads,)`` float32 tensor on ``q``'s device.
    """
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(
            "attention_max_logits: q and k must be (batch, heads, length, head_dim), got "
            f"shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads != 0 or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention_max_logits: q has {heads} heads of size {q.shape[-1]} and k has "
            f"{kv_heads} of size {k.shape[-1]}; head sizes must match and num_heads must be a "
            "multiple of num_kv_heads"
        )
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise ValueError(
            "attention_max_logits: attn_mask must be boolean (True = attend), got "
            f"{attn_mask.dtype}"
        )
    with torch.no_grad():
        if kv_heads != heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
        factor = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        logits = torch.matmul(q.float(), k.float().transpose(-2, -1)) * factor
        keep = attn_mask
        if is_causal:
            L, S = logits.shape[-2:]
            causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
            keep = causal if keep is None else keep & causal
        if keep is not None:
            logits = logits.masked_fill(~keep, -math.inf)
        return logits.amax(dim=(0, 2, 3))


def qk_clip_factors(max_logits: Tensor, tau: float) -> Tensor:
    """``gamma_h = min(1, tau / S^h_max)`` (1 for heads at or under ``tau``, and for ``-inf``)."""
    _check_tau(tau)
    s = max_logits.detach().float()
    return torch.where(s > tau, tau / s, torch.ones_like(s))


def _check_tau(tau: float) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0 < tau < math.inf):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")


def _parts(x: TensorOrParts, what: str) -> list[Tensor]:
    parts = [x] if isinstance(x, Tensor) else list(x)
    if not parts or not all(isinstance(p, Tensor) for p in parts):
        raise ValueError(f"qk_clip_: {what} must be a tensor or a sequence of tensors, got {x!r}")
    return parts


def _head_axis(t: Tensor, heads: int, transposed: bool, what: str, index: int) -> int:
    """The output axis of ``t`` (rows of a weight, columns if ``transposed``, a bias's only
    axis), checked to split into ``heads`` blocks."""
    axis = 1 if (transposed and t.ndim == 2) else 0
    if t.ndim not in (1, 2) or t.shape[axis] % heads != 0:
        raise ValueError(
            f"qk_clip_: {what}[{index}] has shape {tuple(t.shape)}; expected a weight (2-D) or "
            f"bias (1-D) whose {'columns' if axis else 'rows'} split into {heads} heads"
        )
    return axis


def _scale_heads_(t: Tensor, factors: Tensor, axis: int) -> None:
    """Multiply head ``h``'s block of ``t`` along ``axis`` by ``factors[h]``, in place."""
    heads = factors.numel()
    f = factors.to(device=t.device, dtype=t.dtype)
    if axis == 0:
        t.view(heads, -1, *t.shape[1:]).mul_(f.view(heads, *([1] * t.ndim)))
    else:
        t.view(t.shape[0], heads, -1).mul_(f.view(1, heads, 1))


@torch.no_grad()
def qk_clip_(
    q: TensorOrParts,
    k: TensorOrParts,
    max_logits: Tensor,
    tau: float,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    transposed: bool = False,
    rotary_q: TensorOrParts | None = None,
) -> Tensor:
    """Rescale the query/key projections of heads whose max logit exceeds ``tau``, in place.

    Args:
        q: the query projection's weight, or ``[weight, bias]``: tensors whose output axis
            (rows of a weight, or columns when ``transposed``; a bias's only axis) holds
            ``num_heads`` contiguous head blocks. Views of fused weights work (in place through
            the view): see :func:`fused_qk_parts`.
        k: the key projection, likewise, with ``num_kv_heads`` head blocks.
        max_logits: ``(num_heads,)`` per-head maximum logits ``S^h_max`` recorded in the forward
            pass (with the softmax scale), e.g. by :func:`attention_max_logits`.
        tau: the logit threshold (K2 used 100).
        num_heads: query heads.
        num_kv_heads: key heads (default ``num_heads``). Fewer (GQA/MQA): shared key heads are
            left untouched and each query head takes its whole ``gamma_h`` (module docstring).
        transposed: 2-D weights are stored ``(in, out)`` (GPT-2 ``Conv1D``).
        rotary_q: MLA's per-head rotary query projection, scaled by ``gamma_h`` (not its root).

    Returns:
        ``gamma``, ``(num_heads,)``: the factor each head's logits were multiplied by.
    """
    _check_tau(tau)
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if not (isinstance(num_heads, int) and num_heads > 0 and isinstance(kv_heads, int)):
        raise ValueError(f"qk_clip_: num_heads must be a positive int, got {num_heads!r}")
    if kv_heads <= 0 or num_heads % kv_heads != 0:
        raise ValueError(
            f"qk_clip_: num_kv_heads must be a positive divisor of num_heads={num_heads}, "
            f"got {num_kv_heads!r}"
        )
    if tuple(max_logits.shape) != (num_heads,):
        raise ValueError(
            f"qk_clip_: max_logits must have shape ({num_heads},) (one per query head), got "
            f"{tuple(max_logits.shape)}"
        )
    q_parts, k_parts = _parts(q, "q"), _parts(k, "k")
    rotary_parts = [] if rotary_q is None else _parts(rotary_q, "rotary_q")
    # Validate every tensor before touching any, so bad input changes nothing.
    q_axes = [_head_axis(t, num_heads, transposed, "q", i) for i, t in enumerate(q_parts)]
    k_axes = [_head_axis(t, kv_heads, transposed, "k", i) for i, t in enumerate(k_parts)]
    r_axes = [
        _head_axis(t, num_heads, transposed, "rotary_q", i) for i, t in enumerate(rotary_parts)
    ]
    gamma = qk_clip_factors(max_logits, tau)
    shared = kv_heads != num_heads
    q_factor = gamma if shared else gamma.sqrt()
    for t, axis in zip(q_parts, q_axes):
        _scale_heads_(t, q_factor, axis)
    for t, axis in zip(rotary_parts, r_axes):
        _scale_heads_(t, gamma, axis)
    if not shared:
        for t, axis in zip(k_parts, k_axes):
            _scale_heads_(t, gamma.sqrt(), axis)
    return gamma


def fused_qk_parts(
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    q_size: int,
    k_size: int | None = None,
    transposed: bool = False,
) -> tuple[list[Tensor], list[Tensor]]:
    """Views of the q and k blocks of a fused ``[q | k | v ...]`` projection, for :func:`qk_clip_`.

    ``nn.MultiheadAttention.in_proj_weight`` is ``(3d, d)`` with ``q_size = k_size = d``; a
    grouped-query ``qkv`` Linear is ``(q_dim + 2 kv_dim, d)`` with ``q_size = q_dim,
    k_size = kv_dim``; GPT-2's ``c_attn`` is stored ``(d, 3d)``: ``transposed=True``.
    """
    k_size = q_size if k_size is None else k_size
    axis = 1 if transposed else 0
    if weight.ndim != 2 or q_size <= 0 or k_size <= 0 or q_size + k_size > weight.shape[axis]:
        raise ValueError(
            f"fused_qk_parts: a weight of shape {tuple(weight.shape)} (transposed={transposed}) "
            f"has no q block of {q_size} and k block of {k_size} along its outputs"
        )
    q_w = weight.narrow(axis, 0, q_size)
    k_w = weight.narrow(axis, q_size, k_size)
    if bias is None:
        return [q_w], [k_w]
    return [q_w, bias[:q_size]], [k_w, bias[q_size : q_size + k_size]]


@dataclass
class _Target:
    q: list[Tensor]
    k: list[Tensor]
    num_heads: int
    num_kv_heads: int
    transposed: bool
    max_logits: Tensor | None = None
    hook: Any = field(default=None, repr=False)


class QKClip:
    """QK-Clip for a whole model: collects each attention's per-head max logits, clips after
    ``optimizer.step()``.

    >>> clip = QKClip(tau=100.0)
    >>> clip.attach(model)                      # every nn.MultiheadAttention, by forward hooks
    >>> clip.add(block.attn, q=block.attn.q_proj.weight, k=block.attn.k_proj.weight,
    ...          num_heads=8, num_kv_heads=2)   # a hand-written attention...
    >>> # ...whose forward calls clip.record(self, attention_max_logits(q, k)) (or self-reports)
    >>> loss.backward(); optimizer.step(); clip.step()

    The maxima recorded since the last :meth:`step` are reduced with ``max`` (gradient
    accumulation: several forwards per step), used once, and cleared. An attention with nothing
    recorded is left alone.

    ``nn.MultiheadAttention`` does not expose its logits, so :meth:`attach` adds a forward hook
    that recomputes ``q k^T`` from the module's inputs and projection weights without gradient
    (one more ``(L, S)`` product per head; masks are honoured; ``batch_first`` either way).
    """

    def __init__(self, tau: float) -> None:
        _check_tau(tau)
        self.tau = float(tau)
        self._targets: dict[int, _Target] = {}
        self._names: dict[int, str] = {}

    # ---------------------------------------------------------------- registration
    def add(
        self,
        module: nn.Module,
        *,
        q: TensorOrParts,
        k: TensorOrParts,
        num_heads: int,
        num_kv_heads: int | None = None,
        transposed: bool = False,
        name: str | None = None,
    ) -> None:
        """Register an attention ``module`` whose q/k projections are ``q``/``k`` (see
        :func:`qk_clip_`); its forward reports logits with :meth:`record`."""
        kv = num_heads if num_kv_heads is None else num_kv_heads
        target = _Target(_parts(q, "q"), _parts(k, "k"), num_heads, kv, transposed)
        if kv <= 0 or num_heads <= 0 or num_heads % kv != 0:
            raise ValueError(
                f"QKClip.add: num_kv_heads must be a positive divisor of num_heads={num_heads}, "
                f"got {num_kv_heads!r}"
            )
        for what, parts, heads in (("q", target.q, num_heads), ("k", target.k, kv)):
            for i, t in enumerate(parts):
                _head_axis(t, heads, transposed, what, i)
        self._targets[id(module)] = target
        self._names[id(module)] = name or type(module).__name__

    def attach(self, model: nn.Module) -> list[str]:
        """Hook every ``nn.MultiheadAttention`` in ``model``; returns their names."""
        names = []
        for name, module in model.named_modules():
            if isinstance(module, nn.MultiheadAttention) and id(module) not in self._targets:
                self._add_multihead_attention(module, name or "<root>")
                names.append(name or "<root>")
        return names

    def _add_multihead_attention(self, mha: nn.MultiheadAttention, name: str) -> None:
        d, h = mha.embed_dim, mha.num_heads
        if mha.in_proj_weight is not None:
            q, k = fused_qk_parts(mha.in_proj_weight, mha.in_proj_bias, q_size=d)
        else:  # kdim/vdim != embed_dim: separate projections
            bias = mha.in_proj_bias
            q = [mha.q_proj_weight] + ([bias[:d]] if bias is not None else [])
            k = [mha.k_proj_weight] + ([bias[d : 2 * d]] if bias is not None else [])
        self.add(mha, q=q, k=k, num_heads=h, name=name)
        target = self._targets[id(mha)]
        target.hook = mha.register_forward_hook(self._multihead_hook, with_kwargs=True)

    def _multihead_hook(self, mha: nn.MultiheadAttention, args, kwargs, output) -> None:
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        query, key = bound["query"], bound["key"]
        if not mha.batch_first and query.ndim == 3:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        if query.ndim == 2:  # unbatched
            query, key = query.unsqueeze(0), key.unsqueeze(0)
        target = self._targets[id(mha)]
        with torch.no_grad():
            qw, kw = target.q[0], target.k[0]
            qb = target.q[1] if len(target.q) > 1 else None
            kb = target.k[1] if len(target.k) > 1 else None
            B, L, S, h = query.shape[0], query.shape[1], key.shape[1], mha.num_heads
            qh = F.linear(query, qw, qb).view(B, L, h, -1).transpose(1, 2)
            kh = F.linear(key, kw, kb).view(B, S, h, -1).transpose(1, 2)
            keep = None
            attn_mask = bound.get("attn_mask")
            if attn_mask is not None:
                keep = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask > -math.inf
                keep = keep.view(B, h, L, S) if keep.ndim == 3 else keep
            padding = bound.get("key_padding_mask")
            if padding is not None:
                pad = ~padding if padding.dtype == torch.bool else padding > -math.inf
                pad = pad.view(B, 1, 1, S)
                keep = pad if keep is None else keep & pad
            logits = attention_max_logits(
                qh, kh, attn_mask=keep, is_causal=bool(bound.get("is_causal", False))
            )
        self.record(mha, logits)

    def detach(self) -> None:
        """Remove the hooks :meth:`attach` added and forget every registration."""
        for target in self._targets.values():
            if target.hook is not None:
                target.hook.remove()
        self._targets.clear()
        self._names.clear()

    # ---------------------------------------------------------------- recording and clipping
    def record(self, module: nn.Module, max_logits: Tensor) -> None:
        """Report ``module``'s per-head max logits of one forward (kept as a running max until
        :meth:`step`)."""
        target = self._targets.get(id(module))
        if target is None:
            raise ValueError(
                f"QKClip.record: {type(module).__name__} was not registered; call "
                "QKClip.add(module, q=..., k=..., num_heads=...) first"
            )
        s = max_logits.detach().float()
        target.max_logits = s if target.max_logits is None else torch.maximum(target.max_logits, s)

    def max_logits(self) -> dict[str, Tensor]:
        """The per-head maxima recorded since the last :meth:`step`, by module name."""
        return {
            self._names[key]: t.max_logits
            for key, t in self._targets.items()
            if t.max_logits is not None
        }

    def reset(self) -> None:
        """Forget the logits recorded since the last :meth:`step` without clipping (e.g. after an
        evaluation forward that should not count)."""
        for target in self._targets.values():
            target.max_logits = None

    @torch.no_grad()
    def step(self) -> dict[str, Tensor]:
        """Clip every attention that recorded logits; returns each one's ``gamma`` by name and
        clears the records."""
        gammas = {}
        for key, t in self._targets.items():
            if t.max_logits is None:
                continue
            gammas[self._names[key]] = qk_clip_(
                t.q, t.k, t.max_logits, self.tau,
                num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, transposed=t.transposed,
            )  # fmt: skip
            t.max_logits = None
        return gammas
