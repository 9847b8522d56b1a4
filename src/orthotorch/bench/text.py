"""Your own text for the language-model task (``--text PATH``) and the model presets (``--model``).

A corpus is read as raw bytes (a byte-level model needs no tokenizer) and split into train and
validation text that never overlap:

- a folder: every regular file under it (recursively, hidden files and folders skipped) that is
  text; a file goes to validation when the CRC-32 of its relative path falls in the lowest
  ``val_fraction`` (a split by file, stable when files are added). Files are separated by a NUL
  byte, which text never contains.
- a single file, or a folder whose files all fell on one side: contiguous chunks of
  ``chunk_bytes`` bytes (fewer for small files), every ``round(1 / val_fraction)``-th chunk
  going to validation (so validation is spread over the file instead of being its last pages).

"Text" means: not empty, no NUL byte and valid UTF-8 (checked on the first 64 KiB). A binary
file given directly is an error; binary files inside a folder are skipped and counted (a source
tree has its images and archives), and a folder with no text file left is an error.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MODEL_PRESETS", "ModelPreset", "TextCorpus", "load_text_corpus"]

_SNIFF_BYTES = 65536


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of a :class:`~orthotorch.bench.models.ByteTransformer` and its batches."""

    width: int
    depth: int
    heads: int
    context: int
    batch_size: int

    def parameters(self, vocab: int = 256) -> int:
        """Trainable parameter count (embedding + blocks + norms + head)."""
        per_block = 12 * self.width**2 + 2 * self.width
        return 2 * vocab * self.width + self.depth * per_block + self.width

    def describe(self) -> str:
        """``"width 256, 4 layers, 4 heads, context 128, batch 16 (3.3M params)"``."""
        return (
            f"width {self.width}, {self.depth} layers, {self.heads} heads, context "
            f"{self.context}, batch {self.batch_size} ({self.parameters() / 1e6:.1f}M params)"
        )


# gpt-tiny is the default bytelm model (the one the registry's learning rates were tuned on);
# the larger ones keep the head size at 32 or 64 and grow width, depth and context together.
MODEL_PRESETS: dict[str, ModelPreset] = {
    "gpt-tiny": ModelPreset(width=128, depth=2, heads=4, context=64, batch_size=16),
    "gpt-small": ModelPreset(width=256, depth=4, heads=4, context=128, batch_size=16),
    "gpt-medium": ModelPreset(width=512, depth=8, heads=8, context=256, batch_size=32),
}


@dataclass(frozen=True)
class TextCorpus:
    """Train and validation bytes (``long`` tensors) and how they were made."""

    train: Tensor
    val: Tensor
    files: int
    skipped_binary: int
    split: str
    source: str

    def describe(self) -> str:
        """One line for reports."""
        skipped = f", {self.skipped_binary} binary skipped" if self.skipped_binary else ""
        return (
            f"{self.source}: {self.files} file(s){skipped}, {len(self.train):,} train / "
            f"{len(self.val):,} val bytes, split by {self.split}"
        )


def _is_text(data: bytes) -> bool:
    head = data[:_SNIFF_BYTES]
    if b"\0" in head:
        return False
    if len(data) > _SNIFF_BYTES:
        head = head[:-4]  # a multi-byte character cut at the sniff boundary is not an error
    try:
        head.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return False
    return True


def _as_tensor(data: bytes | bytearray) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _split_chunks(data: bytes, val_fraction: float, chunk_bytes: int) -> tuple[bytes, bytes]:
    # Every k-th chunk (k = round(1 / val_fraction)), from the middle of the first k: validation
    # is spread evenly over the text and made of whole chunks. At least ~2k chunks, so that a
    # small file still has a validation part of its own share.
    every = max(2, round(1 / val_fraction))
    chunk_bytes = max(256, min(chunk_bytes, len(data) // (2 * every)))
    chunks = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
    offset = min(every // 2, len(chunks) // 2)
    to_val = [i % every == offset for i in range(len(chunks))]
    train = b"".join(c for c, v in zip(chunks, to_val) if not v)
    val = b"".join(c for c, v in zip(chunks, to_val) if v)
    return train, val


def load_text_corpus(
    path: str | Path,
    *,
    val_fraction: float = 0.1,
    chunk_bytes: int = 4096,
    min_bytes: int = 2048,
) -> TextCorpus:
    """Read a text file or a folder of text files into a byte-level train/validation split.

    Args:
        path: a text file, or a folder searched recursively (hidden entries skipped).
        val_fraction: share of files (or chunks) that go to validation, in ``(0, 0.5]``.
        chunk_bytes: chunk size of the contiguous split of a single file.
        min_bytes: the smallest usable corpus (train and validation together).

    Raises:
        ValueError: the path does not exist, is empty, is binary, has no text file, or is too
            small for a train/validation split; the message names the path.
    """
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    root = Path(path)
    if not root.exists():
        raise ValueError(f"--text {str(root)!r} does not exist")
    if root.is_file():
        data = root.read_bytes()
        if not data:
            raise ValueError(f"--text {str(root)!r} is empty")
        if not _is_text(data):
            raise ValueError(
                f"--text {str(root)!r} is binary (a NUL byte or invalid UTF-8), not text"
            )
        texts, skipped = {root.name: data}, 0
    elif root.is_dir():
        texts, skipped = {}, 0
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or not f.is_file():
                continue
            data = f.read_bytes()
            if not data:
                continue
            if _is_text(data):
                texts[rel.as_posix()] = data
            else:
                skipped += 1
        if not texts:
            what = f"{skipped} binary file(s) and no" if skipped else "no non-empty"
            raise ValueError(f"--text folder {str(root)!r} has {what} text file")
    else:
        raise ValueError(f"--text {str(root)!r} is neither a file nor a folder")

    total = sum(len(d) for d in texts.values())
    if total < min_bytes:
        raise ValueError(
            f"--text {str(root)!r} has {total} bytes of text; at least {min_bytes} are needed "
            "for a train/validation split"
        )
    threshold = int(val_fraction * 2**32)
    by_file = {name: zlib.crc32(name.encode()) < threshold for name in texts}
    if len(texts) > 1 and any(by_file.values()) and not all(by_file.values()):
        train = b"".join(d + b"\0" for n, d in texts.items() if not by_file[n])
        val = b"".join(d + b"\0" for n, d in texts.items() if by_file[n])
        split = "file (CRC-32 of the relative path)"
    else:
        joined = b"\0".join(texts.values())
        train, val = _split_chunks(joined, val_fraction, chunk_bytes)
        split = (
            "contiguous chunks (every 10th to validation)"
            if val_fraction == 0.1
            else (f"contiguous chunks (every {round(1 / val_fraction)}th to validation)")
        )
    return TextCorpus(
        train=_as_tensor(train),
        val=_as_tensor(val),
        files=len(texts),
        skipped_binary=skipped,
        split=split,
        source=str(root),
    )
