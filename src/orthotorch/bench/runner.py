"""``compare()``: train one task with several optimizers over several seeds, record every curve.

Runs are paired by seed: seed ``s`` gives every optimizer the same initial weights and the same
batch order, so the seed-to-seed spread measures the noise a difference has to beat.

Fair tuning (:mod:`~orthotorch.bench.sweep`): an optimizer without a default lr tuned for the
task is swept over a grid on tuning seeds that are disjoint from the reported seeds, and its
reported runs use the best lr. The parameters every optimizer here updates with AdamW
(embeddings, head, norms, biases) use **the AdamW baseline's lr** (its swept best, or its tuned
default) inside every optimizer; they are not swept per optimizer, so a difference between rows
comes from the hidden-matrix update alone.

Every run follows the same :class:`~orthotorch.bench.schedules.Schedule` (default warmup +
cosine), applied to each param group's own base lr.

Runs are written to ``out`` one by one as they finish and checkpointed while they run
(:mod:`~orthotorch.bench.store`); the same call with the same ``out`` skips finished runs and
resumes an interrupted one from its checkpoint.

Timing: only the training step (forward, backward, optimizer step) is timed; evaluations are not,
so "time to target" and the loss-vs-time plot compare optimizer cost, not evaluation cost.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..optim import NonFiniteGradientError
from .optimizers import OptimizerSpec, get_optimizer, optimizer_state_bytes
from .report import CompareResult, RunRecord, environment
from .schedules import GroupSchedule, Schedule
from .store import RunStore, run_key
from .sweep import DEFAULT_FACTORS, SweepResult, lr_grid
from .tasks import Task, TaskSetup, get_task

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "DEFAULT_TUNING_SEEDS",
    "RunFailedError",
    "compare",
    "factory_task",
    "resolve_optimizers",
    "resolve_task",
]

DEFAULT_OPTIMIZERS: tuple[str, ...] = ("adamw", "muon", "torch-muon")
DEFAULT_TUNING_SEEDS: tuple[int, ...] = (1000,)
BASELINE = "adamw"
ADAMW_LR_POLICY = "fixed to the AdamW baseline's lr (its swept best or tuned default)"

OptimizerChoice = str | OptimizerSpec | Callable[[nn.Module], Any]
TaskChoice = str | Task | Callable[[int, torch.device], TaskSetup]


class RunFailedError(RuntimeError):
    """A run raised an error that is not a divergence: ``compare`` stops and names the run."""


@dataclass(frozen=True)
class _Candidate:
    name: str
    build: Callable[[nn.Module, float | None, float], Any]
    lr: float | None
    description: str
    # How ``lr`` was set: "given", "tuned default", "default, not tuned", "user factory".
    lr_source: str
    sweepable: bool


def resolve_task(task: TaskChoice) -> Task:
    """A :class:`Task` from a registry name, a ``Task``, or a ``(seed, device) -> TaskSetup``."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        return get_task(task)
    if callable(task):
        return Task(name=getattr(task, "__name__", "custom"), setup=task)
    raise TypeError(f"task must be a name, a Task or a callable, got {type(task).__name__}")


def _endless_batches(make_batches: Callable[[int], Iterable[Any]], seed: int) -> Iterator[Any]:
    # Re-iterate the user's iterable when it runs out (a DataLoader starts a new epoch).
    source = make_batches(seed)
    while True:
        empty = True
        for batch in source:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"make_batches({seed}) returned an empty iterable")
        if iter(source) is source:  # a one-shot iterator: ask for a fresh one
            source = make_batches(seed)


def factory_task(
    make_model: Callable[[], nn.Module],
    make_batches: Callable[[int], Iterable[Any]],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    evaluate: Callable[[nn.Module], float | Mapping[str, float]] | None = None,
    name: str = "custom",
) -> Task:
    """A :class:`Task` from three factories (what ``compare(make_model, make_batches, loss_fn)``
    builds).

    ``make_model()`` is called right after ``torch.manual_seed(seed)`` (so every optimizer starts
    from the same weights for a seed); ``make_batches(seed)`` returns an iterable of batches
    (re-iterated when it runs out); ``loss_fn(model, batch)`` is the training loss;
    ``evaluate(model)`` (optional) returns the validation loss, or a dict with a ``"loss"`` key.
    Without ``evaluate`` the metric is the mean training loss of the last 10 steps.
    """

    def setup(seed: int, device: torch.device) -> TaskSetup:
        torch.manual_seed(seed)
        model = make_model().to(device)
        run_eval = None
        if evaluate is not None:

            def run_eval(m: nn.Module) -> dict[str, float]:
                value = evaluate(m)
                return dict(value) if isinstance(value, Mapping) else {"loss": float(value)}

        return TaskSetup(model, _endless_batches(make_batches, seed), loss_fn, run_eval)

    label = "validation loss" if evaluate is not None else "train loss (mean of last 10 steps)"
    return Task(name=name, setup=setup, metric="loss", metric_label=label)


def resolve_optimizers(
    task: Task | str,
    optimizers: Iterable[str] | Mapping[str, OptimizerChoice] | None,
    lr: Mapping[str, float] | None = None,
) -> list[_Candidate]:
    """The optimizers to run and how each one's lr was set.

    ``optimizers`` is a list of registry names or a mapping ``label -> name | OptimizerSpec |
    (model -> optimizer)``; ``lr`` sets the lr per label (used as given, never swept). Raises
    ``ValueError`` for unknown names, unknown ``lr`` keys and non-positive learning rates.
    """
    spec_task = resolve_task(task) if isinstance(task, str) else task
    lr = dict(lr or {})
    if optimizers is None:
        optimizers = DEFAULT_OPTIMIZERS
    if isinstance(optimizers, str):
        raise TypeError("optimizers must be a list of names or a mapping, not one string")
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

    candidates = []
    for label, choice in items:
        if isinstance(choice, str):
            choice = get_optimizer(choice)
        if isinstance(choice, OptimizerSpec):
            if label in lr:
                rate, source = lr[label], "given"
            else:
                rate = choice.default_lr(spec_task.lr_key)
                tuned = choice.is_tuned(spec_task.name)
                source = "tuned default" if tuned else "default, not tuned"
            candidates.append(
                _Candidate(label, choice.build, rate, choice.description, source, True)
            )
        elif callable(choice):
            factory = choice
            if label in lr:
                raise ValueError(f"{label!r} is a user factory; set its lr inside the factory")
            candidates.append(
                _Candidate(
                    label,
                    lambda m, _lr, _alr, f=factory: f(m),
                    None,
                    f"user factory {getattr(factory, '__qualname__', type(factory).__name__)}",
                    "user factory",
                    False,
                )
            )
        else:
            raise TypeError(
                f"optimizer {label!r} must be a name, an OptimizerSpec or a callable, "
                f"got {type(choice).__name__}"
            )
    return candidates


@dataclass
class _Progress:
    bar: Any = None

    def step(self, n: int = 1) -> None:
        if self.bar is not None and n > 0:
            self.bar.update(n)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)


@dataclass(frozen=True)
class _RunConfig:
    task: Task
    steps: int
    eval_every: int
    schedule: Schedule
    budget_s: float | None
    checkpoint_s: float
    device: torch.device


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
    cfg: _RunConfig,
    candidate: _Candidate,
    lr: float | None,
    adamw_lr: float,
    seed: int,
    phase: str,
    store: RunStore,
    progress: _Progress,
) -> RunRecord:
    task, steps = cfg.task, cfg.steps
    key = run_key(
        {
            "task": task.name,
            "task_description": task.description,
            "optimizer": candidate.name,
            "description": candidate.description,
            "lr": lr,
            "adamw_lr": adamw_lr,
            "steps": steps,
            "eval_every": cfg.eval_every,
            "schedule": cfg.schedule.to_dict(),
            "budget_s": cfg.budget_s,
            "seed": seed,
            "phase": phase,
            "device": cfg.device.type,
        }
    )
    path = store.result_path(phase, candidate.name, seed, lr, key)
    finished = store.load_finished(path)
    if finished is not None:
        progress.step(steps)
        return finished

    setup = task.setup(seed, cfg.device)
    model = setup.model
    model.train()
    try:
        optimizer = candidate.build(model, lr, adamw_lr)
    except Exception as err:
        raise RunFailedError(
            f"optimizer {candidate.name!r} (lr {lr}) could not be built for task "
            f"{task.name!r}: {type(err).__name__}: {err}"
        ) from err
    schedule = GroupSchedule(optimizer, cfg.schedule, steps)
    record = RunRecord(optimizer=candidate.name, seed=seed, lr=lr, adamw_lr=adamw_lr, phase=phase)
    elapsed = 0.0  # this run's clock: step times from step 2 on
    wall_before = 0.0  # wall time spent by earlier sessions of this run (resumed)
    start_step = 0
    checkpoint = store.load_checkpoint(key)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        record = RunRecord.from_dict(checkpoint["record"])
        start_step, elapsed, wall_before = (
            checkpoint["step"],
            checkpoint["elapsed"],
            checkpoint["wall"],
        )
        for _ in range(start_step):  # the batch stream depends on the seed only: replay it
            next(setup.batches)
        torch.set_rng_state(checkpoint["rng"])
        if torch.cuda.is_available() and checkpoint.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        record.resumed_from = start_step
        progress.step(start_step)
    wall_start = time.perf_counter()
    last_checkpoint = wall_start

    def log_eval(step: int) -> bool:
        metrics = _evaluate(task, setup, record.train_loss)
        record.eval_steps.append(step)
        record.eval_time_s.append(elapsed)
        for name, value in metrics.items():
            record.metrics.setdefault(name, []).append(value)
        return math.isfinite(metrics[task.metric])

    if checkpoint is None and setup.evaluate is not None:
        # The untrained model's value; without an evaluation there is no training loss yet.
        log_eval(0)
    done = start_step
    for step in range(start_step + 1, steps + 1):
        factor = schedule.set(step - 1)
        batch = next(setup.batches)
        _sync(cfg.device)
        start = time.perf_counter()
        try:
            loss = setup.loss(model, batch)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                record.mark_diverged(step, f"loss is {loss_value} at step {step}")
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        except NonFiniteGradientError as err:
            # orthotorch optimizers refuse NaN/Inf gradients before changing anything.
            record.mark_diverged(step, str(err).splitlines()[0])
            break
        except Exception as err:
            raise RunFailedError(
                f"optimizer {candidate.name!r} (lr {lr}, seed {seed}, {phase} run) failed at "
                f"step {step} of task {task.name!r}: {type(err).__name__}: {err}"
            ) from err
        _sync(cfg.device)
        dt = time.perf_counter() - start
        if step > 1:
            elapsed += dt
        record.train_loss.append(loss_value)
        record.step_time_s.append(dt)
        record.lr_factor.append(factor)
        done = step
        progress.step()
        over_budget = (
            cfg.budget_s is not None
            and wall_before + time.perf_counter() - wall_start >= cfg.budget_s
            and step < steps
        )
        if step % cfg.eval_every == 0 or step == steps or over_budget:
            if not log_eval(step):
                record.mark_diverged(step, f"{task.metric} is not finite at step {step}")
                break
            value = record.metrics[task.metric][-1]
            progress.note(f"{candidate.name} seed {seed}: {task.metric}={value:.4g}")
            now = time.perf_counter()
            if not over_budget and step < steps and now - last_checkpoint >= cfg.checkpoint_s:
                saved = store.save_checkpoint(
                    key,
                    {
                        "step": step,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all()
                        if torch.cuda.is_available()
                        else None,
                        "record": record.to_dict(),
                        "elapsed": elapsed,
                        "wall": wall_before + now - wall_start,
                    },
                )
                if saved:
                    last_checkpoint = time.perf_counter()
        if over_budget:
            record.budget_stopped, record.stopped_at = True, step
            break
    # Count the steps a stopped run skipped, so the bar's ETA stays right.
    progress.step(steps - done)
    record.state_bytes = optimizer_state_bytes(optimizer)
    store.save_finished(record, path)
    store.drop_checkpoint(key)
    return record


def _final_value(task: Task, record: RunRecord) -> float | None:
    if record.diverged or not record.metrics.get(task.metric):
        return None
    return record.metrics[task.metric][-1]


def _seed_list(seeds: int | Sequence[int], what: str) -> list[int]:
    if isinstance(seeds, bool):
        raise ValueError(f"{what} must be a count or a list of ints, got {seeds!r}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError(f"{what} must name at least one seed")
    duplicates = sorted({s for s in seed_list if seed_list.count(s) > 1})
    if duplicates:
        raise ValueError(f"{what} lists seed(s) {duplicates} more than once: {seed_list}")
    return seed_list


def _sweep_set(sweep: bool | Iterable[str] | None, candidates: list[_Candidate]) -> set[str]:
    # Never swept: an lr the user gave, and user factories (their lr lives inside them).
    sweepable = {c.name for c in candidates if c.sweepable and c.lr_source != "given"}
    if sweep is None:
        return {c.name for c in candidates if c.lr_source == "default, not tuned"}
    if sweep is True:
        return sweepable
    if sweep is False:
        return set()
    names = set(sweep)
    unknown = names - {c.name for c in candidates}
    if unknown:
        raise ValueError(
            f"sweep names {', '.join(sorted(unknown))}, which is not being compared; "
            f"compared optimizers: {', '.join(c.name for c in candidates)}"
        )
    fixed = names - sweepable
    if fixed:
        raise ValueError(
            f"cannot sweep {', '.join(sorted(fixed))}: an lr given explicitly or a user "
            "factory is used as is"
        )
    return names


def compare(
    task: TaskChoice | Callable[[], nn.Module] = "bytelm",
    make_batches: Callable[[int], Iterable[Any]] | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    *,
    optimizers: Iterable[str] | Mapping[str, OptimizerChoice] | None = None,
    evaluate: Callable[[nn.Module], float | Mapping[str, float]] | None = None,
    steps: int | None = None,
    seeds: int | Sequence[int] = 3,
    lr: Mapping[str, float] | None = None,
    sweep: bool | Iterable[str] | None = None,
    sweep_factors: Sequence[float] = DEFAULT_FACTORS,
    tuning_seeds: int | Sequence[int] = DEFAULT_TUNING_SEEDS,
    schedule: Schedule | str = "cosine",
    budget_s: float | None = None,
    checkpoint_s: float = 60.0,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    target: float | None = None,
    eval_every: int | None = None,
    progress: bool = True,
    plots: bool = True,
    name: str | None = None,
) -> CompareResult:
    """Train a task with every optimizer over ``seeds`` and summarise who reaches what, when.

    Two ways to give the task::

        compare("bytelm", optimizers=["adamw", "muon"])                 # a built-in task
        compare(make_model, make_batches, loss_fn, optimizers=["adamw", "muon"],
                evaluate=val_loss)                                       # your model and data

    Args:
        task: a registry name (``"bytelm"``, ``"digits"``, ``"matrix"``), a :class:`Task`, your
            own ``setup(seed, device) -> TaskSetup``, or (with ``make_batches`` and ``loss_fn``)
            a model factory ``make_model()`` (see :func:`factory_task`).
        make_batches: ``seed -> iterable of batches`` (factory form only).
        loss_fn: ``(model, batch) -> scalar loss`` (factory form only).
        optimizers: registry names (default: ``adamw``, ``muon``, ``torch-muon``), or a mapping
            ``label -> name | OptimizerSpec | factory(model) -> optimizer``.
        evaluate: ``model -> validation loss`` (or a dict with ``"loss"``), factory form only.
        steps: training steps per run (default: the task's, 200 for the factory form).
        seeds: the reported seeds: a count (``3`` -> 0, 1, 2) or distinct explicit seeds.
        lr: learning rate per label, used as given (never swept).
        sweep: ``None`` (default): sweep every optimizer whose default lr is not tuned for this
            task; ``True``: sweep every registry optimizer without a given lr; ``False``: none;
            or the labels to sweep.
        sweep_factors: the grid, as multiples of the optimizer's default lr.
        tuning_seeds: seeds of the sweep runs; must be disjoint from ``seeds``.
        schedule: a :class:`Schedule` or its kind (``"constant"``, ``"cosine"``, ``"wsd"``),
            applied to every optimizer and every param group.
        budget_s: per-run wall-time budget in seconds; a run past it stops early and is marked.
        checkpoint_s: checkpoint an unfinished run at an evaluation at most this often (needs
            ``out``; 0: at every evaluation).
        out: directory for per-run files, checkpoints, ``results.json``, ``results.md`` and the
            PNG plots; rerunning with the same ``out`` skips finished runs and resumes
            interrupted ones. ``None`` writes nothing.
        device: torch device of the runs.
        target: metric value for steps/time-to-target (default: AdamW's mean final value).
        eval_every: evaluate every this many steps (default: the task's).
        progress: show a tqdm progress bar (stderr).
        plots: write PNG plots to ``out``.
        name: the task's name in reports (factory form; default ``"custom"``).

    Returns:
        A :class:`CompareResult` with every curve; ``.table()`` renders the summary.

    Raises:
        ValueError: bad arguments (named), before any training.
        RunFailedError: a run raised an error that is not a divergence (NaN/Inf loss or
            gradient); the runs finished before it are in ``out``.
    """
    if make_batches is not None or loss_fn is not None:
        if isinstance(make_batches, (list, tuple, Mapping, str)):
            raise TypeError(
                "compare()'s second argument is make_batches; pass optimizers by keyword: "
                "compare(task, optimizers=[...])"
            )
        if make_batches is None or loss_fn is None or not callable(task):
            raise TypeError(
                "the factory form needs all three: compare(make_model, make_batches, loss_fn)"
            )
        spec = factory_task(task, make_batches, loss_fn, evaluate, name or "custom")
        default_steps = 200
    else:
        if evaluate is not None:
            raise TypeError("evaluate= is for the factory form; a task brings its own")
        spec = resolve_task(task)
        default_steps = spec.default_steps
    steps = default_steps if steps is None else steps
    eval_every = spec.eval_every if eval_every is None else eval_every
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive int, got {eval_every!r}")
    if budget_s is not None and not (math.isfinite(budget_s) and budget_s > 0):
        raise ValueError(f"budget_s must be a positive number of seconds, got {budget_s!r}")
    if not (math.isfinite(checkpoint_s) and checkpoint_s >= 0):
        raise ValueError(f"checkpoint_s must be >= 0, got {checkpoint_s!r}")
    seed_list = _seed_list(seeds, "seeds")
    candidates = resolve_optimizers(spec, optimizers, lr)
    to_sweep = _sweep_set(sweep, candidates)
    # Checked even when nothing is swept: overlapping seeds are a mistake in the call itself.
    tune_list = _seed_list(tuning_seeds, "tuning_seeds")
    overlap = sorted(set(tune_list) & set(seed_list))
    if overlap:
        raise ValueError(
            f"tuning_seeds {tune_list} and seeds {seed_list} share {overlap}: a sweep must "
            "never see the seeds it is judged on"
        )
    for c in candidates:
        if c.name in to_sweep:
            lr_grid(c.lr, sweep_factors)  # validates the factors before any training
    sched = Schedule(schedule) if isinstance(schedule, str) else schedule
    if not isinstance(sched, Schedule):
        raise TypeError(f"schedule must be a Schedule or a kind name, got {schedule!r}")
    device = torch.device(device)
    out_dir = Path(out) if out is not None else None
    cfg = _RunConfig(spec, steps, eval_every, sched, budget_s, checkpoint_s, device)
    store = RunStore(out_dir)

    by_name = {c.name: c for c in candidates}
    baseline = by_name.get(BASELINE)
    # The AdamW-routed parameters of every optimizer use AdamW's lr (see the module docstring).
    adamw_lr = (
        baseline.lr
        if baseline is not None and baseline.sweepable
        else get_optimizer(BASELINE).default_lr(spec.lr_key)
    )
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
            "tuning_seeds": tune_list if to_sweep else [],
            "sweep_factors": list(sweep_factors) if to_sweep else [],
            "eval_every": eval_every,
            "schedule": sched.to_dict(),
            "budget_s": budget_s,
            "device": str(device),
            "target": target,
            "adamw_lr": adamw_lr,
            "adamw_lr_policy": ADAMW_LR_POLICY,
            "optimizers": {
                c.name: {"lr": c.lr, "lr_source": c.lr_source, "description": c.description}
                for c in candidates
            },
        },
        environment=environment(),
        target=target,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        runs = len(candidates) * len(seed_list) + sum(
            len(lr_grid(by_name[n].lr, sweep_factors)) * len(tune_list) for n in to_sweep
        )
        bar = tqdm(total=runs * steps, desc=f"compare {spec.name}", unit="step", dynamic_ncols=True)
    tracker = _Progress(bar)

    def save() -> None:
        if out_dir is not None:
            result.save(out_dir, plots=plots)

    def run_sweep(c: _Candidate, adamw: float) -> float:
        sw = SweepResult(c.name, lr_grid(c.lr, sweep_factors), tune_list)
        for rate in sw.grid:
            # AdamW's own sweep moves its AdamW lr with it (it is one lr for every parameter).
            group_lr = rate if c.name == BASELINE else adamw
            records = [
                _train_one(cfg, c, rate, group_lr, s, "tune", store, tracker) for s in tune_list
            ]
            result.tuning_runs += records
            sw.add([_final_value(spec, r) for r in records])
        chosen = sw.choose()
        result.sweeps[c.name] = asdict(sw)
        info = result.config["optimizers"][c.name]
        info["lr"] = chosen
        info["lr_source"] = "swept, AT GRID EDGE" if sw.at_edge else "swept"
        if sw.at_edge:
            warnings.warn(
                f"{c.name}: the best lr {chosen:.3g} is at the edge of the sweep grid "
                f"[{sw.grid[0]:.3g} .. {sw.grid[-1]:.3g}]; the optimum may lie outside: widen "
                "sweep_factors before trusting this row",
                UserWarning,
                stacklevel=3,
            )
        save()
        return chosen

    try:
        chosen: dict[str, float | None] = {c.name: c.lr for c in candidates}
        if baseline is not None and BASELINE in to_sweep:
            chosen[BASELINE] = adamw_lr = run_sweep(baseline, adamw_lr)
            result.config["adamw_lr"] = adamw_lr
        for c in candidates:
            if c.name in to_sweep and c.name != BASELINE:
                chosen[c.name] = run_sweep(c, adamw_lr)
            for seed in seed_list:
                group_lr = chosen[c.name] if c.name == BASELINE and c.sweepable else adamw_lr
                record = _train_one(cfg, c, chosen[c.name], group_lr, seed, "final", store, tracker)
                result.runs.append(record)
                if out_dir is not None:
                    result.save(out_dir, plots=False)
            save()
    finally:
        if bar is not None:
            bar.close()
    result.complete = True
    save()
    return result
