"""The ``orthotorch`` command: ``orthotorch compare`` and ``orthotorch bench``.

Bad input (unknown names, a malformed ``--lr``, an unwritable ``--out``) ends with one line on
stderr that lists the valid choices and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["main"]

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


def _build_parser() -> _Parser:
    from .bench import available_optimizers, available_tasks
    from .bench.runner import DEFAULT_OPTIMIZERS

    parser = _Parser(prog="orthotorch", description="Orthogonalized optimizers for PyTorch.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    cmp = sub.add_parser(
        "compare",
        help="train a task with several optimizers and compare them",
        description="Train one task with several optimizers over several seeds; print a table "
        "and write results.md, results.json and PNG plots to --out.",
    )
    cmp.add_argument("--task", default="bytelm", help=f"one of {', '.join(available_tasks())}")
    cmp.add_argument(
        "--optimizers",
        default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma-separated, from {', '.join(available_optimizers())}",
    )
    cmp.add_argument("--steps", type=_positive_int, help="training steps (default: the task's)")
    cmp.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="count or list (default 3)")
    cmp.add_argument("--lr", help="per-optimizer learning rates, e.g. muon=0.02,adamw=3e-3")
    cmp.add_argument("--out", default="orthotorch-compare", help="output directory")
    cmp.add_argument("--device", default="cpu", help="torch device (default cpu)")
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
    from .bench import available_optimizers, available_tasks, compare

    if args.task not in available_tasks():
        raise UsageError(f"unknown task {args.task!r}; valid tasks: {', '.join(available_tasks())}")
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
    out = Path(args.out)
    _check_writable(out)
    try:
        result = compare(
            args.task,
            names,
            steps=args.steps,
            seeds=args.seeds,
            lr=lr,
            out=out,
            device=args.device,
            target=args.target,
            eval_every=args.eval_every,
            progress=not args.no_progress,
            plots=not args.no_plots,
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; results of the optimizers that finished are in {out}/",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orthotorch`` console script; returns the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
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
