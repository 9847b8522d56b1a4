"""THE task registry of ``orthotorch compare``: real problems that ship with nothing to download.

A task turns ``(seed, device)`` into a :class:`TaskSetup`: a freshly initialised model, an
endless iterator of training batches, a training loss and an evaluation. The same seed gives the
same initial weights and the same batch order to every optimizer, so runs are paired by seed.

- ``bytelm``: byte-level causal transformer on the Python standard library's own source files
  (found from the running interpreter), validation loss in bits per byte. :func:`bytelm_task`
  makes it on your own text (``--text``) or with a larger model preset (``--model``).
- ``digits``: small CNN on scikit-learn's 8x8 digits (1797 images), test loss and accuracy.
- ``matrix``: ill-conditioned matrix sensing ``y = M* x`` with a two-factor model whose exact
  optimum ``W = M*`` is known; reports the relative distance ``||W - M*||_F / ||M*||_F``.

Adding a task is one :class:`Task` entry in :data:`TASKS`.
"""

from __future__ import annotations

import functools
import math
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import ByteTransformer, DigitsCNN, Factorization
from .text import MODEL_PRESETS, TextCorpus, load_text_corpus

__all__ = [
    "TASKS",
    "Task",
    "TaskSetup",
    "available_tasks",
    "bytelm_task",
    "get_task",
    "stdlib_corpus",
]


@dataclass
class TaskSetup:
    """One seeded instance of a task: what the training loop needs.

    Attributes:
        model: the freshly initialised model (on the run's device).
        batches: endless iterator of training batches (any object ``loss`` accepts).
        loss: ``(model, batch) -> scalar tensor`` minimised by the optimizer.
        evaluate: ``model -> {metric: value}``; must contain the task's ``metric`` key. Called
            under ``torch.no_grad()`` with the model in eval mode. ``None``: the metric is the
            training loss of the latest step.
    """

    model: nn.Module
    batches: Iterator[Any]
    loss: Callable[[nn.Module, Any], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None


@dataclass(frozen=True)
class Task:
    """A named, seedable problem.

    Attributes:
        name: registry key (``--task``).
        setup: ``(seed, device) -> TaskSetup``.
        metric: key of the headline metric in ``evaluate``'s dict (lower is better).
        metric_label: how tables and plots name it (``"val bits/byte"``).
        default_steps: steps of a default run.
        eval_every: evaluate every this many steps (and after the last step).
        description: one line for help texts.
        extra_metrics: other keys of ``evaluate``'s dict shown in tables (``"accuracy"``).
        log_y: plot the metric on a log axis (it spans decades).
        family: the task whose registry learning rates apply (sweep centres); default ``name``.
            A registry lr counts as tuned only for the task ``name`` itself.
    """

    name: str
    setup: Callable[[int, torch.device], TaskSetup]
    metric: str = "loss"
    metric_label: str = "loss"
    default_steps: int = 200
    eval_every: int = 10
    description: str = ""
    extra_metrics: tuple[str, ...] = field(default_factory=tuple)
    log_y: bool = False
    family: str | None = None

    @property
    def lr_key(self) -> str:
        """The task name the optimizer registry's default learning rates are looked up by."""
        return self.family or self.name


def _endless(make_batch: Callable[[torch.Generator], Any], seed: int) -> Iterator[Any]:
    # A private generator per run: batch order depends on the seed only, never on what the model
    # or optimizer did with the global RNG.
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield make_batch(gen)


# ---------------------------------------------------------------------------------------- bytelm
@functools.lru_cache(maxsize=2)
def stdlib_corpus(val_fraction: float = 0.1) -> tuple[Tensor, Tensor, int]:
    """``(train_bytes, val_bytes, n_files)`` from the running interpreter's standard library.

    Every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` except ``site-packages`` and test
    directories, read in sorted path order. A file goes to validation when the CRC-32 of its
    relative path falls in the lowest ``val_fraction`` — a split by file (no validation text is
    ever seen in training, not even a neighbouring window) that is stable when files are added.
    Files are separated by a NUL byte, which never occurs in Python source.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}
    files = sorted(
        f
        for f in root.rglob("*.py")
        if not skip.intersection(f.relative_to(root).parts) and f.is_file()
    )
    if not files:
        raise RuntimeError(f"no Python source files found under {root}")
    train, val = bytearray(), bytearray()
    threshold = int(val_fraction * 2**32)
    for f in files:
        rel = f.relative_to(root).as_posix()
        target = val if zlib.crc32(rel.encode()) < threshold else train
        target += f.read_bytes() + b"\0"
    # bytearray is writable, so frombuffer shares it without a copy or a warning.
    as_tensor = functools.partial(torch.frombuffer, dtype=torch.uint8)
    return as_tensor(train).long(), as_tensor(val).long(), len(files)


def _windows(data: Tensor, context: int, what: str) -> None:
    if len(data) < context + 2:
        raise ValueError(
            f"the {what} text has {len(data)} bytes, fewer than the model's context "
            f"{context} + 2: give more text or a smaller --model"
        )


def _bytelm_setup(
    seed: int,
    device: torch.device,
    *,
    model: str = "gpt-tiny",
    corpus: Callable[[], tuple[Tensor, Tensor]] | None = None,
    val_windows: int = 64,
) -> TaskSetup:
    train, val = corpus() if corpus is not None else stdlib_corpus()[:2]
    preset = MODEL_PRESETS[model]
    context, batch_size = preset.context, preset.batch_size
    _windows(train, context, "training")
    _windows(val, context, "validation")
    torch.manual_seed(seed)
    net = ByteTransformer(
        width=preset.width, depth=preset.depth, heads=preset.heads, context=context
    ).to(device)

    def make_batch(gen: torch.Generator) -> Tensor:
        starts = torch.randint(0, len(train) - context - 1, (batch_size,), generator=gen)
        return torch.stack([train[s : s + context + 1] for s in starts.tolist()]).to(device)

    # Fixed, evenly spaced validation windows: the same bytes for every seed and optimizer.
    starts = torch.linspace(0, len(val) - context - 2, val_windows).long().tolist()
    val_batch = torch.stack([val[s : s + context + 1] for s in starts]).to(device)

    def loss(m: nn.Module, batch: Tensor) -> Tensor:
        logits = m(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict[str, float]:
        nats = float(loss(m, val_batch))
        return {"bpb": nats / math.log(2), "val_loss": nats}

    return TaskSetup(net, _endless(make_batch, seed), loss, evaluate)


def bytelm_task(model: str = "gpt-tiny", text: str | Path | None = None) -> Task:
    """The language-model task with a model preset and, optionally, your own text.

    Args:
        model: a key of :data:`~orthotorch.bench.text.MODEL_PRESETS` (``gpt-tiny`` is the
            default ``bytelm`` task).
        text: a text file or a folder of text files (see
            :func:`~orthotorch.bench.text.load_text_corpus`); ``None``: the Python stdlib.

    The corpus is read and checked here, before any training. Its name is ``bytelm`` for the
    default (tuned) setting and ``bytelm-<model>`` / ``text-<model>`` otherwise, so registry
    learning rates tuned on ``bytelm`` count as sweep centres, not as tuned values, there.
    """
    if model not in MODEL_PRESETS:
        raise ValueError(f"unknown model {model!r}; valid models: {', '.join(MODEL_PRESETS)}")
    preset = MODEL_PRESETS[model]
    corpus_fn = None
    if text is not None:
        loaded: TextCorpus = load_text_corpus(text)
        _windows(loaded.val, preset.context, "validation")
        _windows(loaded.train, preset.context, "training")

        def corpus_fn() -> tuple[Tensor, Tensor]:
            return loaded.train, loaded.val

        name, data = f"text-{model}", loaded.describe()
    else:
        name = "bytelm" if model == "gpt-tiny" else f"bytelm-{model}"
        data = "the Python stdlib sources"
    default = TASKS["bytelm"]
    return Task(
        name=name,
        setup=functools.partial(_bytelm_setup, model=model, corpus=corpus_fn),
        metric=default.metric,
        metric_label=default.metric_label,
        default_steps=default.default_steps,
        eval_every=default.eval_every,
        description=f"byte-level transformer {model} ({preset.describe()}) on {data} "
        "(val bits/byte)",
        family="bytelm",
    )


# ---------------------------------------------------------------------------------------- digits
@functools.lru_cache(maxsize=1)
def _digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the digits task needs scikit-learn: pip install 'orthotorch[bench]'"
        ) from err
    X, y = load_digits(return_X_y=True)
    # Fixed stratified split (random_state=0): the test set is the same for every run.
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)

    def images(a: Any) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0

    def labels(a: Any) -> Tensor:
        return torch.as_tensor(a, dtype=torch.long)

    return images(Xtr), labels(ytr), images(Xte), labels(yte)


def _digits_setup(seed: int, device: torch.device, *, batch_size: int = 64) -> TaskSetup:
    Xtr, ytr, Xte, yte = (t.to(device) for t in _digits_split())
    torch.manual_seed(seed)
    model = DigitsCNN().to(device)

    def make_batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(Xtr), (batch_size,), generator=gen).to(device)
        return Xtr[idx], ytr[idx]

    def loss(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(m(x), y)

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict[str, float]:
        logits = m(Xte)
        return {
            "test_loss": float(F.cross_entropy(logits, yte)),
            "accuracy": float((logits.argmax(1) == yte).float().mean()),
        }

    return TaskSetup(model, _endless(make_batch, seed), loss, evaluate)


# ---------------------------------------------------------------------------------------- matrix
def _matrix_setup(
    seed: int,
    device: torch.device,
    *,
    size: int = 64,
    condition: float = 1e3,
    batch_size: int = 128,
) -> TaskSetup:
    # The target is the same for every seed (seed 1234), so seeds vary only the initial factors
    # and the measurement order; its singular values are log-spaced from 1 down to 1/condition.
    gen = torch.Generator().manual_seed(1234)
    U, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    S = torch.logspace(0, -math.log10(condition), size, dtype=torch.float64)
    target = ((U * S) @ V.T).float().to(device)
    target_norm = float(torch.linalg.matrix_norm(target))
    torch.manual_seed(seed)
    model = Factorization(size, size, size).to(device)

    def make_batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(batch_size, size, generator=gen).to(device)
        return x, x @ target.T

    def loss(m: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        # Sum over outputs, mean over samples: E||(W - M*) x||^2 = ||W - M*||_F^2 for x ~ N(0, I).
        return (m(x) - y).square().sum(1).mean()

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict[str, float]:
        distance = float(torch.linalg.matrix_norm(m.matrix() - target)) / target_norm
        return {"distance": distance}

    return TaskSetup(model, _endless(make_batch, seed), loss, evaluate)


TASKS: dict[str, Task] = {
    "bytelm": Task(
        name="bytelm",
        setup=_bytelm_setup,
        metric="bpb",
        metric_label="val bits/byte",
        # 3 optimizers x 3 seeds x 150 steps is the default `orthotorch compare`: ~1 minute on
        # 2 quiet CPU cores, under 3 on a busy one, and Muon's lead is beyond the seed spread.
        default_steps=150,
        eval_every=15,
        description="byte-level transformer on the Python stdlib sources (val bits/byte)",
    ),
    "digits": Task(
        name="digits",
        setup=_digits_setup,
        metric="test_loss",
        metric_label="test loss",
        default_steps=200,
        eval_every=10,
        description="CNN on scikit-learn's 8x8 digits (test loss, accuracy)",
        extra_metrics=("accuracy",),
    ),
    "matrix": Task(
        name="matrix",
        setup=_matrix_setup,
        metric="distance",
        metric_label="rel. distance to optimum",
        default_steps=300,
        eval_every=10,
        description="ill-conditioned matrix sensing, kappa=1e3 (||W - M*||_F / ||M*||_F)",
        log_y=True,
    ),
}


def available_tasks() -> list[str]:
    """Names of the registered tasks."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """Look a task up, with an error that lists the valid names."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None
