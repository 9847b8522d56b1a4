"""``compare()``: train one task with several optimizers over several seeds, record every curve.

Runs are paired by seed: seed ``s`` gives every optimizer the same initial weights and the same
batch order, so the seed-to-seed spread measures the noise a difference has to beat. Each
optimizer's runs are written to ``out`` as soon as it finishes (``results.json``, ``results.md``,
plots), so an interrupted comparison keeps what it finished.

Timing: only the training step (forward, backward, optimizer step) is timed; evaluations are not,
so "time to target" and the loss-vs-time plot compare optimizer cost, not evaluation cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .optimizers import OptimizerSpec, get_optimizer, optimizer_state_bytes
from .report import CompareResult, RunRecord, environment
from .tasks import Task, TaskSetup, get_task

__all__ = ["DEFAULT_OPTIMIZERS", "compare", "resolve_optimizers", "resolve_task"]

DEFAULT_OPTIMIZERS: tuple[str, ...] = ("adamw", "muon", "torch-muon")
BASELINE = "adamw"

OptimizerChoice = str | OptimizerSpec | Callable[[nn.Module], Any]
TaskChoice = str | Task | Callable[[int, torch.device], TaskSetup]


@dataclass(frozen=True)
class _Candidate:
    name: str
    build: Callable[[nn.Module, float, float], Any]
    lr: float | None
    description: str


def resolve_task(task: TaskChoice) -> Task:
    """A :class:`Task` from a registry name, a ``Task``, or a ``(seed, device) -> TaskSetup``."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        return get_task(task)
    if callable(task):
        return Task(name=getattr(task, "__name__", "custom"), setup=task)
    raise TypeError(f"task must be a name, a Task or a callable, got {type(task).__name__}")


def resolve_optimizers(
    task: str,
    optimizers: Iterable[str] | Mapping[str, OptimizerChoice] | None,
    lr: Mapping[str, float] | None = None,
) -> tuple[list[_Candidate], float]:
    """The optimizers to run with their learning rates, and the lr of the AdamW-routed params.

    ``optimizers`` is a list of registry names or a mapping ``label -> name | OptimizerSpec |
    (model -> optimizer)``; ``lr`` overrides the registry default per label. Raises
    ``ValueError`` for unknown names, unknown ``lr`` keys and non-positive learning rates.
    """
    lr = dict(lr or {})
    if optimizers is None:
        optimizers = DEFAULT_OPTIMIZERS
    items = (
        list(optimizers.items())
        if isinstance(optimizers, Mapping)
        else [(name, name) for name in optimizers]
    )
    if not items:
        raise ValueError("no optimizers to compare")
    labels = [label for label, _ in items]
    if len(set(labels)) != len(labels):
        raise ValueError(f"optimizer names must be unique, got {', '.join(labels)}")
    unknown = sorted(set(lr) - set(labels))
    if unknown:
        raise ValueError(
            f"--lr names {', '.join(unknown)}, which is not being compared; "
            f"compared optimizers: {', '.join(labels)}"
        )
    for label, value in lr.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"lr of {label!r} must be a positive number, got {value!r}")

    adamw_lr = lr.get(BASELINE, get_optimizer(BASELINE).default_lr(task))
    candidates = []
    for label, choice in items:
        if isinstance(choice, str):
            choice = get_optimizer(choice)
        if isinstance(choice, OptimizerSpec):
            rate = lr.get(label, choice.default_lr(task))
            candidates.append(_Candidate(label, choice.build, rate, choice.description))
        elif callable(choice):
            factory = choice
            if label in lr:
                raise ValueError(f"{label!r} is a user factory; set its lr inside the factory")
            candidates.append(
                _Candidate(label, lambda m, _lr, _alr, f=factory: f(m), None, "user factory")
            )
        else:
            raise TypeError(
                f"optimizer {label!r} must be a name, an OptimizerSpec or a callable, "
                f"got {type(choice).__name__}"
            )
    return candidates, adamw_lr


@dataclass
class _Progress:
    bar: Any = None

    def step(self, n: int = 1) -> None:
        if self.bar is not None and n > 0:
            self.bar.update(n)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _evaluate(task: Task, setup: TaskSetup, recent_losses: list[float]) -> dict[str, float]:
    if setup.evaluate is None:
        # No evaluation: the metric is the mean training loss of the last few steps (a single
        # minibatch loss is too noisy to read a target from).
        window = recent_losses[-10:]
        return {task.metric: sum(window) / len(window) if window else math.nan}
    was_training = setup.model.training
    setup.model.eval()
    with torch.no_grad():
        metrics = setup.evaluate(setup.model)
    setup.model.train(was_training)
    if task.metric not in metrics:
        raise KeyError(f"task {task.name!r}: evaluate() returned no {task.metric!r} metric")
    return {k: float(v) for k, v in metrics.items()}


def _train_one(
    task: Task,
    candidate: _Candidate,
    seed: int,
    steps: int,
    eval_every: int,
    adamw_lr: float,
    device: torch.device,
    progress: _Progress,
) -> RunRecord:
    setup = task.setup(seed, device)
    model = setup.model
    model.train()
    optimizer = candidate.build(model, candidate.lr, adamw_lr)
    record = RunRecord(optimizer=candidate.name, seed=seed, lr=candidate.lr)
    elapsed = 0.0

    def log_eval(step: int) -> bool:
        metrics = _evaluate(task, setup, record.train_loss)
        record.eval_steps.append(step)
        record.eval_time_s.append(elapsed)
        for key, value in metrics.items():
            record.metrics.setdefault(key, []).append(value)
        return math.isfinite(metrics[task.metric])

    if setup.evaluate is not None:
        # The untrained model's value; without an evaluation there is no training loss yet.
        log_eval(0)
    done = 0
    for step in range(1, steps + 1):
        batch = next(setup.batches)
        _sync(device)
        start = time.perf_counter()
        loss = setup.loss(model, batch)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            record.mark_diverged(step, f"loss is {loss_value} at step {step}")
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        try:
            optimizer.step()
        except ValueError as err:
            # orthotorch optimizers refuse NaN/Inf gradients with a ValueError (nothing updated).
            record.mark_diverged(step, str(err).splitlines()[0])
            break
        _sync(device)
        dt = time.perf_counter() - start
        elapsed += dt
        record.train_loss.append(loss_value)
        record.step_time_s.append(dt)
        done = step
        progress.step()
        if step % eval_every == 0 or step == steps:
            if not log_eval(step):
                record.mark_diverged(step, f"{task.metric} is not finite at step {step}")
                break
            value = record.metrics[task.metric][-1]
            progress.note(f"{candidate.name} seed {seed}: {task.metric}={value:.4g}")
    # Count the steps a diverged run skipped, so the bar's ETA stays right.
    progress.step(steps - done)
    record.state_bytes = optimizer_state_bytes(optimizer)
    return record


def compare(
    task: TaskChoice = "bytelm",
    optimizers: Iterable[str] | Mapping[str, OptimizerChoice] | None = None,
    *,
    steps: int | None = None,
    seeds: int | Sequence[int] = 3,
    lr: Mapping[str, float] | None = None,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    target: float | None = None,
    eval_every: int | None = None,
    progress: bool = True,
    plots: bool = True,
) -> CompareResult:
    """Train ``task`` with every optimizer over ``seeds`` and summarise who reaches what, when.

    Args:
        task: a registry name (``"bytelm"``, ``"digits"``, ``"matrix"``), a :class:`Task`, or
            your own ``setup(seed, device) -> TaskSetup`` (model factory, batch iterator, loss,
            optional evaluation).
        optimizers: registry names (default: ``adamw``, ``muon``, ``torch-muon``), or a mapping
            ``label -> name | OptimizerSpec | factory(model) -> optimizer``.
        steps: training steps per run (default: the task's).
        seeds: a count (``3`` -> seeds 0, 1, 2) or explicit seeds.
        lr: learning rate per label, overriding the registry's per-task default. The AdamW
            baseline's lr is also the lr of the parameters the other optimizers give to AdamW.
        out: directory for ``results.json``, ``results.md`` and the PNG plots (written after
            each optimizer finishes); ``None`` writes nothing.
        device: torch device of the runs.
        target: metric value for steps/time-to-target (default: AdamW's mean final value).
        eval_every: evaluate every this many steps (default: the task's).
        progress: show a tqdm progress bar (stderr).
        plots: write PNG plots to ``out``.

    Returns:
        A :class:`CompareResult` with every curve; ``.table()`` renders the summary.
    """
    spec = resolve_task(task)
    steps = spec.default_steps if steps is None else steps
    eval_every = spec.eval_every if eval_every is None else eval_every
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive int, got {eval_every!r}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("seeds must name at least one seed")
    candidates, adamw_lr = resolve_optimizers(spec.name, optimizers, lr)
    device = torch.device(device)
    out_dir = Path(out) if out is not None else None

    result = CompareResult(
        task=spec.name,
        metric=spec.metric,
        metric_label=spec.metric_label,
        log_y=spec.log_y,
        extra_metrics=spec.extra_metrics,
        config={
            "task": spec.name,
            "task_description": spec.description,
            "steps": steps,
            "seeds": seed_list,
            "eval_every": eval_every,
            "device": str(device),
            "target": target,
            "adamw_lr": adamw_lr,
            "optimizers": {c.name: {"lr": c.lr, "description": c.description} for c in candidates},
        },
        environment=environment(),
        target=target,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(candidates) * len(seed_list) * steps,
            desc=f"compare {spec.name}",
            unit="step",
            dynamic_ncols=True,
        )
    tracker = _Progress(bar)
    try:
        for candidate in candidates:
            for seed in seed_list:
                record = _train_one(
                    spec, candidate, seed, steps, eval_every, adamw_lr, device, tracker
                )
                result.runs.append(record)
            if out_dir is not None:
                result.save(out_dir, plots=plots)
    finally:
        if bar is not None:
            bar.close()
    result.complete = True
    if out_dir is not None:
        result.save(out_dir, plots=plots)
    return result
