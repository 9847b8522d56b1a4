"""Benchmarks and optimizer comparisons: the Python API under ``orthotorch compare`` / ``bench``.

Compare optimizers on a built-in task or on your own::

    from orthotorch import bench

    result = bench.compare("digits", ["adamw", "muon"], steps=200, seeds=3, out="runs/digits")
    print(result.table())

    def my_task(seed, device):            # your model factory, data and loss
        torch.manual_seed(seed)
        model = MyNet().to(device)
        return bench.TaskSetup(model, batches=my_iterator(seed), loss=my_loss, evaluate=my_eval)

    sgd = lambda model: torch.optim.SGD(model.parameters(), lr=0.1)
    bench.compare(my_task, {"adamw": "adamw", "sgd": sgd}, steps=300, seeds=3, out="runs/mine")

Micro-benchmarks of the kernels and optimizer steps: :func:`bench` (``orthotorch bench``).
Registries (one entry adds a task or optimizer everywhere): :data:`TASKS`, :data:`OPTIMIZERS`.
"""

from .micro import BenchResult, KernelTiming, StepTiming, bench, bench_kernels, bench_steps
from .optimizers import (
    OPTIMIZERS,
    OptimizerSpec,
    TorchMuonWithAdamW,
    available_optimizers,
    get_optimizer,
    optimizer_state_bytes,
    register_optimizer,
)
from .report import CompareResult, RunRecord, Summary
from .runner import DEFAULT_OPTIMIZERS, RunFailedError, compare, factory_task
from .schedules import SCHEDULES, Schedule, available_schedules
from .sweep import SweepResult, lr_grid, pick_best
from .tasks import TASKS, Task, TaskSetup, available_tasks, bytelm_task, get_task, stdlib_corpus
from .text import MODEL_PRESETS, TextCorpus, load_text_corpus

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "MODEL_PRESETS",
    "OPTIMIZERS",
    "SCHEDULES",
    "TASKS",
    "BenchResult",
    "CompareResult",
    "KernelTiming",
    "OptimizerSpec",
    "RunFailedError",
    "RunRecord",
    "Schedule",
    "StepTiming",
    "Summary",
    "SweepResult",
    "Task",
    "TaskSetup",
    "TextCorpus",
    "TorchMuonWithAdamW",
    "available_optimizers",
    "available_schedules",
    "available_tasks",
    "bench",
    "bench_kernels",
    "bench_steps",
    "bytelm_task",
    "compare",
    "factory_task",
    "get_optimizer",
    "get_task",
    "load_text_corpus",
    "lr_grid",
    "optimizer_state_bytes",
    "pick_best",
    "register_optimizer",
    "stdlib_corpus",
]
