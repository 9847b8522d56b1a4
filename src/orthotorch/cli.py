"""The ``orthotorch`` command: ``orthotorch compare`` and ``orthotorch bench``.

Bad input (unknown names, a malformed ``--lr``, an unwritable ``--out``, an empty or binary
``--text``, a missing optional dependency) ends with one line on stderr that lists the valid
choices (or the ``pip install`` to run) and exit status 2, never a traceback. A run that fails
with an error that is not a divergence ends ``compare`` with one line naming the optimizer and
exit status 1; the runs that finished are kept in ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block before its error; the contract here is one line.
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_lr(text: str, valid: Sequence[str]) -> dict[str, float]:
    """``"muon=0.02,adamw=3e-3"`` -> ``{"muon": 0.02, "adamw": 0.003}``; ``UsageError`` if bad."""
    rates = {}
    for item in _split_list(text):
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            rate = float(value)
        except ValueError:
            rate = math.nan
        if not sep or not name or not (math.isfinite(rate) and rate > 0):
            raise UsageError(
                f"malformed --lr item {item!r}: expected NAME=POSITIVE_NUMBER, e.g. "
                f"muon=0.02,adamw=3e-3 (names: {', '.join(valid)})"
            )
        if name not in valid:
            raise UsageError(
                f"--lr names {name!r}, which is not being compared; compared: {', '.join(valid)}"
            )
        rates[name] = rate
    if not rates:
        raise UsageError("--lr is empty: expected NAME=NUMBER[,NAME=NUMBER...]")
    return rates


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(
            f"--out {str(out)!r} is not a writable directory ({err.strerror})"
        ) from None


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown --device {device!r}; valid: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: CUDA is not available here; valid: cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device!r}: MPS is not available here; valid: cpu")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seeds(text: str) -> list[int]:
    # "3" -> seeds 0, 1, 2; "0,5,7" -> exactly those.
    items = _split_list(text)
    try:
        if len(items) == 1 and "," not in text:
            count = int(items[0])
            if count < 1:
                raise ValueError
            return list(range(count))
        return [int(s) for s in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a seed count (3) or a list of seeds (0,1,2), got {text!r}"
        ) from None


def _explicit_seeds(text: str) -> list[int]:
    # "1000" -> [1000]: tuning seeds are always listed (a count would collide with --seeds).
    try:
        seeds = [int(s) for s in _split_list(text)]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected a list of seeds (1000,1001), got {text!r}")
    return seeds


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _factors(text: str) -> list[float]:
    try:
        values = [float(v) for v in _split_list(text)]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive lr multipliers, e.g. 0.25,0.5,1,2,4; got {text!r}"
        )
    return values


def check_extras(progress: bool, plots: bool, task: str) -> None:
    """Raise ``UsageError`` naming the ``pip install`` if a package ``compare`` needs is missing.

    Checked before any work: tqdm (the progress bar), matplotlib (the plots, written after the
    first optimizer finished) and scikit-learn (the digits task).
    """
    needed = [("tqdm", progress), ("matplotlib", plots), ("sklearn", task == "digits")]
    missing = []
    for module, wanted in needed:
        if not wanted:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append("scikit-learn" if module == "sklearn" else module)
    if missing:
        raise UsageError(
            f"orthotorch compare needs {', '.join(missing)}, which is not installed: "
            "pip install 'orthotorch[bench]' (or pass --no-progress / --no-plots)"
        )


def _build_parser() -> _Parser:
    from ._version import __version__
    from .bench import MODEL_PRESETS, available_optimizers, available_schedules, available_tasks
    from .bench.runner import DEFAULT_OPTIMIZERS, DEFAULT_TUNING_SEEDS
    from .bench.sweep import DEFAULT_FACTORS

    parser = _Parser(prog="orthotorch", description="Orthogonalized optimizers for PyTorch.")
    parser.add_argument("--version", action="version", version=f"orthotorch {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    models = "; ".join(f"{k}: {p.describe()}" for k, p in MODEL_PRESETS.items())

    cmp = sub.add_parser(
        "compare",
        help="train a task with several optimizers and compare them",
        description="Train one task with several optimizers over several seeds; print a table "
        "and write results.md, results.json and PNG plots to --out. Optimizers without a "
        "learning rate tuned for the task are swept first on tuning seeds; every run follows "
        "the same schedule; rerunning with the same --out skips finished runs and resumes "
        "interrupted ones.",
    )
    cmp.add_argument("--task", default="bytelm", help=f"one of {', '.join(available_tasks())}")
    cmp.add_argument(
        "--text",
        help="bytelm on your own text: a file or a folder of text files (byte-level; split by "
        "file, or a single file by contiguous chunks, into train/validation)",
    )
    cmp.add_argument(
        "--model",
        choices=list(MODEL_PRESETS),
        help=f"bytelm model preset (default gpt-tiny). {models}",
    )
    cmp.add_argument(
        "--optimizers",
        default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma-separated, from {', '.join(available_optimizers())}",
    )
    cmp.add_argument("--steps", type=_positive_int, help="training steps (default: the task's)")
    cmp.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="count or list (default 3)")
    cmp.add_argument(
        "--lr", help="per-optimizer learning rates, used as given (never swept), e.g. muon=0.02"
    )
    sw = cmp.add_mutually_exclusive_group()
    sw.add_argument(
        "--sweep",
        action="store_true",
        default=None,
        help="sweep every optimizer's lr (default: only those without a tuned default)",
    )
    sw.add_argument(
        "--no-sweep",
        dest="sweep",
        action="store_false",
        help="sweep nothing: untuned defaults are used as is (and marked so)",
    )
    cmp.add_argument(
        "--sweep-factors",
        type=_factors,
        default=list(DEFAULT_FACTORS),
        help="lr grid as multiples of the default lr (default "
        f"{','.join(f'{f:g}' for f in DEFAULT_FACTORS)})",
    )
    cmp.add_argument(
        "--tuning-seeds",
        type=_explicit_seeds,
        default=list(DEFAULT_TUNING_SEEDS),
        help="seeds of the sweep runs, disjoint from --seeds "
        f"(default {','.join(map(str, DEFAULT_TUNING_SEEDS))}; a list such as 1000,1001)",
    )
    cmp.add_argument(
        "--schedule",
        choices=available_schedules(),
        default="cosine",
        help="lr schedule of every optimizer and group after warmup (default cosine to 0.1x)",
    )
    cmp.add_argument(
        "--warmup", type=_fraction, default=0.05, help="warmup fraction of the steps (0.05)"
    )
    cmp.add_argument(
        "--budget-s",
        type=_positive_float,
        help="per-run wall-time budget in seconds; a run past it stops early and is marked",
    )
    cmp.add_argument(
        "--checkpoint-s",
        type=float,
        default=60.0,
        help="checkpoint unfinished runs at most every N seconds (default 60; 0: every eval)",
    )
    cmp.add_argument("--out", default="orthotorch-compare", help="output directory")
    cmp.add_argument("--device", default="cpu", help="torch device (default cpu)")
    cmp.add_argument(
        "--threads",
        type=_positive_int,
        help="torch CPU threads (default: torch's); 1 is fastest for small models on a "
        "machine shared with other jobs",
    )
    cmp.add_argument("--target", type=float, help="target metric (default: AdamW's final)")
    cmp.add_argument("--eval-every", type=_positive_int, help="evaluate every N steps")
    cmp.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    cmp.add_argument("--no-progress", action="store_true", help="no progress bar")

    bn = sub.add_parser(
        "bench",
        help="kernel and optimizer-step micro-benchmarks",
        description="Time every orthogonalization method on the reference shapes and every "
        "optimizer's step on the reference parameter set (ratios to torch.optim.Muon/AdamW).",
    )
    bn.add_argument("--quick", action="store_true", help="small shapes, few repeats (seconds)")
    bn.add_argument("--methods", help="comma-separated orthogonalization methods (default: all)")
    bn.add_argument("--shapes", help="comma-separated shapes, e.g. 512x512,1024x4096")
    bn.add_argument("--optimizers", help="comma-separated bench optimizers (default: all)")
    bn.add_argument("--repeats", type=_positive_int, help="timed repeats (default 10; quick 3)")
    bn.add_argument("--no-kernels", action="store_true", help="skip the kernel benchmark")
    bn.add_argument("--no-steps", action="store_true", help="skip the optimizer-step benchmark")
    bn.add_argument("--device", default="cpu", help="torch device (default cpu)")
    bn.add_argument("--json", dest="json_path", help="write the results as JSON to this file")
    return parser


def _run_compare(args: argparse.Namespace) -> int:
    from .bench import available_optimizers, available_tasks, bytelm_task, compare
    from .bench.runner import RunFailedError
    from .bench.schedules import Schedule

    if args.task not in available_tasks():
        raise UsageError(f"unknown task {args.task!r}; valid tasks: {', '.join(available_tasks())}")
    if (args.text is not None or args.model is not None) and args.task != "bytelm":
        raise UsageError(f"--text and --model apply to --task bytelm, not {args.task!r}")
    check_extras(not args.no_progress, not args.no_plots, args.task)
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds lists a seed twice: {args.seeds}")
    if not math.isfinite(args.checkpoint_s) or args.checkpoint_s < 0:
        raise UsageError(f"--checkpoint-s must be >= 0, got {args.checkpoint_s}")
    names = _split_list(args.optimizers)
    unknown = [n for n in names if n not in available_optimizers()]
    if unknown or not names:
        raise UsageError(
            f"unknown optimizer {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"valid optimizers: {', '.join(available_optimizers())}"
        )
    if len(set(names)) != len(names):
        raise UsageError(f"--optimizers lists a name twice: {args.optimizers!r}")
    lr = parse_lr(args.lr, names) if args.lr is not None else None
    _check_device(args.device)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    task = args.task
    if args.task == "bytelm" and (args.text is not None or args.model not in (None, "gpt-tiny")):
        try:
            task = bytelm_task(args.model or "gpt-tiny", args.text)
        except ValueError as err:
            raise UsageError(str(err)) from None
    out = Path(args.out)
    _check_writable(out)
    try:
        result = compare(
            task,
            optimizers=names,
            steps=args.steps,
            seeds=args.seeds,
            lr=lr,
            sweep=args.sweep,
            sweep_factors=args.sweep_factors,
            tuning_seeds=args.tuning_seeds,
            schedule=Schedule(args.schedule, warmup=args.warmup),
            budget_s=args.budget_s,
            checkpoint_s=args.checkpoint_s,
            out=out,
            device=args.device,
            target=args.target,
            eval_every=args.eval_every,
            progress=not args.no_progress,
            plots=not args.no_plots,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    except RunFailedError as err:
        print(f"orthotorch: error: {err} (finished runs are kept in {out}/)", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; finished runs and checkpoints are in {out}/: rerun the same "
            "command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(result.table())
    print(
        f"\nwrote {out}/results.md, results.json"
        + ("" if args.no_plots else ", loss_vs_step.png, loss_vs_time.png")
    )
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from .bench import available_optimizers, bench
    from .bench.micro import parse_shape
    from .linalg import available_methods

    methods = _split_list(args.methods) if args.methods else None
    bad = [m for m in methods or () if m not in available_methods()]
    if bad:
        raise UsageError(
            f"unknown method {', '.join(map(repr, bad))}; "
            f"valid methods: {', '.join(available_methods())}"
        )
    optimizers = _split_list(args.optimizers) if args.optimizers else None
    bad = [o for o in optimizers or () if o not in available_optimizers()]
    if bad:
        raise UsageError(
            f"unknown optimizer {', '.join(map(repr, bad))}; "
            f"valid optimizers: {', '.join(available_optimizers())}"
        )
    shapes = None
    if args.shapes:
        try:
            shapes = [parse_shape(s) for s in _split_list(args.shapes)]
        except ValueError as err:
            raise UsageError(f"--shapes: {err}") from None
    _check_device(args.device)
    if args.json_path:
        _check_writable(Path(args.json_path).resolve().parent)
    result = bench(
        methods=methods,
        shapes=shapes,
        optimizers=optimizers,
        quick=args.quick,
        device=args.device,
        kernels=not args.no_kernels,
        steps=not args.no_steps,
        repeats=args.repeats,
    )
    print(result.table())
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        print(f"\nwrote {args.json_path}")
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A sweep that chose an lr at its grid's edge warns while compare runs: one line, no source.
    print(f"orthotorch: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orthotorch`` console script; returns the exit status."""
    import warnings

    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        with warnings.catch_warnings():  # restores showwarning for callers of main()
            warnings.showwarning = _one_line_warning
            if args.command == "compare":
                return _run_compare(args)
            if args.command == "bench":
                return _run_bench(args)
        parser.print_help()
        return EXIT_USAGE
    except UsageError as err:
        print(f"orthotorch: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
