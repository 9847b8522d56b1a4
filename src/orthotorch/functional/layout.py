"""Matrix layouts: how a parameter tensor is seen as the matrices an optimizer orthogonalizes.

A weight is not always one matrix. A convolution kernel ``(out, in, kh, kw)`` is the matrix
``(out, in*kh*kw)``; a mixture-of-experts stack ``(E, out, in)`` is ``E`` independent matrices;
a fused projection (``qkv``, ``gate_up``) is several matrices stacked along its rows; a GPT-2
``Conv1D`` weight is stored ``(in, out)``, the transpose of the layer's matrix. Orthogonalizing
an expert stack as one ``E x (out*in)`` matrix or ``q, k, v`` as one matrix gives every block
the wrong update (and the wrong shape scale), so each parameter carries a layout:

========================  ======================================================================
``flatten``               ``(shape[0], prod(shape[1:]))`` (default; conv kernels, 2-D weights)
``batch``                 leading dims index independent matrices: ``(..., m, n)`` (expert stacks)
``transposed``            the stored matrix is ``(in, out)``; blocks and scales use ``(out, in)``
``split(rows=a,b,...)``   blocks of ``a, b, ...`` rows (fused q/k/v, gate/up), each its own matrix
``split(cols=a,b,...)``   blocks of columns
``per_head(h)``           ``h`` equal row blocks (``per_head(h,cols)``: column blocks)
========================  ======================================================================

Parts combine with ``+`` in any order, e.g. ``"batch+split(rows=512,512)"`` (fused gate/up
experts) or ``"transposed+split(rows=768,768,768)"`` (GPT-2's ``c_attn``). The layout is a
string in the optimizer's param groups (``group["layouts"]``, parallel to ``params``), so it is
saved in ``state_dict()`` and compared on load; :func:`parse_layout` turns it into a
:class:`MatrixLayout`.

The matrices are always in the layer's ``(out, in)`` orientation, as views of the tensor
(:meth:`MatrixLayout.matrices`), so the same call reads a momentum and writes an update.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LAYOUT_NAMES",
    "MatrixLayout",
    "check_layout",
    "layout_matrices",
    "parse_layout",
]

LAYOUT_NAMES: tuple[str, ...] = ("flatten", "batch", "transposed", "split", "per_head")

_PART = re.compile(r"^(?P<name>[a-z_]+)(?:\((?P<args>[^()]*)\))?$")


@dataclass(frozen=True)
class MatrixLayout:
    """A parsed layout; see the module docstring for the meaning of each part.

    Attributes:
        batch: leading dimensions (all but the last two) index independent matrices.
        transposed: the (last two dims of the) tensor store the matrix as ``(in, out)``.
        rows / cols: block sizes along the matrix's rows / columns (``None``: one block).
        heads: ``(h, "rows"|"cols")``: ``h`` equal blocks, sizes known only with the shape.
    """

    batch: bool = False
    transposed: bool = False
    rows: tuple[int, ...] | None = None
    cols: tuple[int, ...] | None = None
    heads: tuple[int, str] | None = None

    def __str__(self) -> str:
        parts = []
        if self.batch:
            parts.append("batch")
        if self.transposed:
            parts.append("transposed")
        if self.rows is not None:
            parts.append(f"split(rows={','.join(map(str, self.rows))})")
        if self.cols is not None:
            parts.append(f"split(cols={','.join(map(str, self.cols))})")
        if self.heads is not None:
            h, axis = self.heads
            parts.append(f"per_head({h})" if axis == "rows" else f"per_head({h},cols)")
        return "+".join(parts) or "flatten"

    @property
    def is_flatten(self) -> bool:
        return self == FLATTEN

    # ------------------------------------------------------------------ shapes
    def matrix_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """``(count, out, in)``: how many whole matrices the tensor holds and their shape, before
        any row/column split (``out x in`` in the layer's orientation)."""
        if self.batch:
            count = math.prod(shape[:-2])
            a, b = shape[-2], shape[-1]
        else:
            count, a, b = 1, shape[0], math.prod(shape[1:])
        return (count, b, a) if self.transposed else (count, a, b)

    def _blocks(self, m: int, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        rows, cols = self.rows or (m,), self.cols or (n,)
        if self.heads is not None:
            h, axis = self.heads
            if axis == "rows":
                rows = (m // h,) * h
            else:
                cols = (n // h,) * h
        return rows, cols

    def block_shapes(self, shape: torch.Size | tuple[int, ...]) -> list[tuple[int, int]]:
        """The ``(rows, cols)`` of every matrix :meth:`matrices` returns, in the same order."""
        count, m, n = self.matrix_shape(shape)
        rows, cols = self._blocks(m, n)
        return [(r, c) for _ in range(count) for r in rows for c in cols]

    def check(self, shape: torch.Size | tuple[int, ...], name: str = "parameter") -> None:
        """Raise ``ValueError`` naming ``name``, its shape and the layout unless it fits."""
        shape = tuple(shape)
        where = f"{name} of shape {shape} with layout {str(self)!r}"
        if len(shape) < 2:
            raise ValueError(f"{where}: a layout needs a tensor of 2 or more dimensions")
        if self.batch and len(shape) < 3:
            raise ValueError(
                f"{where}: 'batch' needs 3 or more dimensions (leading dims index the "
                "matrices, e.g. (num_experts, out, in)); use 'flatten' for a 2-D weight"
            )
        _, m, n = self.matrix_shape(shape)
        for axis, blocks, size in (("rows", self.rows, m), ("cols", self.cols, n)):
            if blocks is not None and sum(blocks) != size:
                raise ValueError(
                    f"{where}: split({axis}=...) blocks add up to {sum(blocks)}, but the matrix "
                    f"has {size} {axis} (as (out, in) = ({m}, {n}))"
                )
        if self.heads is not None:
            h, axis = self.heads
            size = m if axis == "rows" else n
            if size % h:
                raise ValueError(
                    f"{where}: per_head({h}) needs the {axis} ({size}) to be a multiple of the "
                    "head count"
                )

    # ------------------------------------------------------------------ views
    def matrices(self, t: Tensor) -> list[Tensor]:
        """The 2-D ``(out, in)`` matrices of ``t`` as views (batch-major, then row blocks, then
        column blocks). Writing into them writes into ``t``; a flattened non-contiguous ``t``
        is the one case that may copy (as ``reshape`` does)."""
        # Explicit sizes: an empty shard (0 rows) has no "-1" to infer.
        if self.batch:
            stack = t.reshape(math.prod(t.shape[:-2]), t.shape[-2], t.shape[-1])
        else:
            stack = t.reshape(1, t.shape[0], math.prod(t.shape[1:]))
        if self.transposed:
            stack = stack.mT
        rows, cols = self._blocks(stack.shape[1], stack.shape[2])
        if len(rows) == 1 and len(cols) == 1:
            return list(stack.unbind(0))
        out = []
        for matrix in stack.unbind(0):
            for row_block in matrix.split(rows, dim=0):
                out.extend(row_block.split(cols, dim=1))
        return out

    def assemble(
        self, blocks: list[Tensor], shape: torch.Size | tuple[int, ...], device: torch.device
    ) -> Tensor:
        """The tensor of ``shape`` whose :meth:`matrices` are ``blocks`` (the inverse of
        :meth:`matrices`), in the blocks' dtype; a ``flatten`` result is a reshape, no copy."""
        if self.is_flatten:
            return blocks[0].reshape(shape)
        out = torch.empty(shape, dtype=blocks[0].dtype, device=device)
        for view, block in zip(self.matrices(out), blocks, strict=True):
            view.copy_(block)
        return out


FLATTEN = MatrixLayout()


def _ints(text: str, part: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ValueError(f"layout part {part!r}: sizes must be positive integers, e.g. 64,16,16")
    return values


def _parse(spec: str) -> MatrixLayout:
    fields: dict[str, object] = {}
    for raw in spec.replace(" ", "").split("+"):
        match = _PART.match(raw)
        name = match.group("name") if match else raw
        args = (match.group("args") if match else None) or ""
        if name not in LAYOUT_NAMES:
            raise ValueError(
                f"unknown layout {raw!r} in {spec!r}; valid layouts: "
                "flatten, batch, transposed, split(rows=a,b,...), split(cols=a,b,...), "
                "per_head(h) or per_head(h,cols), combined with '+'"
            )
        if name == "flatten":
            continue
        if name in ("batch", "transposed"):
            if args:
                raise ValueError(f"layout part {raw!r} takes no arguments")
            fields[name] = True
        elif name == "split":
            key, _, values = args.partition("=")
            if key not in ("rows", "cols"):
                raise ValueError(
                    f"layout part {raw!r}: write split(rows=a,b,...) or split(cols=a,b,...)"
                )
            if key in fields:
                raise ValueError(f"layout {spec!r} splits {key} twice")
            fields[key] = _ints(values, raw)
        else:  # per_head
            count, _, axis = args.partition(",")
            axis = axis or "rows"
            heads = _ints(count, raw)
            if len(heads) != 1 or axis not in ("rows", "cols"):
                raise ValueError(f"layout part {raw!r}: write per_head(h) or per_head(h,cols)")
            fields["heads"] = (heads[0], axis)
    layout = MatrixLayout(**fields)  # type: ignore[arg-type]
    if layout.heads is not None and getattr(layout, layout.heads[1]) is not None:
        raise ValueError(f"layout {spec!r} both splits and per-head-splits {layout.heads[1]}")
    return layout


def parse_layout(spec: str | MatrixLayout | None) -> MatrixLayout:
    """A :class:`MatrixLayout` from its string (``None`` -> ``flatten``); ``ValueError`` listing
    the valid names for anything else."""
    if spec is None:
        return FLATTEN
    if isinstance(spec, MatrixLayout):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a layout must be a string such as 'batch', got {spec!r}")
    # A plain dict, not functools.lru_cache: torch.compile traces through it without warning
    # (and guards on it, so a step recompiles only when a new layout string is first parsed).
    layout = _PARSED.get(spec)
    if layout is None:
        layout = _PARSED[spec] = _parse(spec)
    return layout


_PARSED: dict[str, MatrixLayout] = {}


def check_layout(spec: str | MatrixLayout | None, shape: tuple[int, ...], name: str) -> str:
    """Validate ``spec`` against ``shape`` and return its canonical string."""
    layout = parse_layout(spec)
    layout.check(shape, name)
    return str(layout)


def layout_matrices(tensors: list[Tensor], layouts: list[MatrixLayout]) -> list[Tensor]:
    """All matrices of ``tensors``, in order (see :meth:`MatrixLayout.matrices`)."""
    return [m for t, layout in zip(tensors, layouts, strict=True) for m in layout.matrices(t)]
