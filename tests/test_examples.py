"""Every script in examples/ and benchmarks/ runs with ``--quick`` (issue 18: they were linted but
never run, so a broken example could land).

Scripts are discovered by glob, so a new one is picked up without editing this file, and each
must accept ``--quick`` (a run of a few seconds that goes through the script's code paths; its
numbers mean nothing). Scripts whose docstring launches them with ``torchrun --nproc_per_node N``
run that way, on CPU with gloo. All of them start at once on a small thread pool when the first
test asks for a result, with ``OMP_NUM_THREADS=1`` (on 2 shared cores, 2 threads per process made
the short runs several times slower), in a scratch working directory so that outputs such as
``runs/...`` never land in the repository.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("examples/*.py"), *ROOT.glob("benchmarks/*.py")])
TIMEOUT_S = 600  # per script; a loaded 2-core machine is slow to start many Python processes
WORKERS = 2  # the machine's cores; more only oversubscribes them
TORCHRUN = re.compile(r"torchrun\s+(?:--standalone\s+)?--nproc_per_node[ =](\d+)")


def script_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def command(path: Path) -> list[str]:
    match = TORCHRUN.search(path.read_text(encoding="utf-8"))
    if match:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        return [*launcher, "--nproc_per_node", match.group(1), str(path), "--quick"]
    return [sys.executable, str(path), "--quick"]


# gloo's teardown at interpreter exit can abort a rank ("terminate called without an active
# exception", SIGABRT, no Python frame left) on a loaded machine. It is not ours: plain DDP with
# torch.optim.AdamW in examples/ddp.py aborted 3 times in 14 runs beside a busy process (torch
# 2.13, gloo, 2 cores). Such a run is retried once; any other failure is reported as it is.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def run(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = command(path)
    attempts = 2 if "torch.distributed.run" in cmd else 1
    for _ in range(attempts):
        result = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
        if result.returncode == 0 or GLOO_EXIT_ABORT not in result.stderr:
            break
    return result


@pytest.fixture(scope="module")
def results(request, tmp_path_factory) -> dict[Path, Future]:
    """Every selected script's run, started together on a small pool (the tests then only
    wait); scripts deselected with ``-k`` are not started."""
    selected = {
        item.callspec.params["path"]
        for item in request.session.items
        if getattr(item, "callspec", None) is not None and "path" in item.callspec.params
    }
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    futures = {}
    for path in SCRIPTS:
        if path in selected and "--quick" in path.read_text(encoding="utf-8"):
            futures[path] = pool.submit(run, path, tmp_path_factory.mktemp(path.stem))
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def test_every_script_was_found() -> None:
    names = {script_id(p) for p in SCRIPTS}
    assert {"examples/quickstart.py", "examples/fsdp2.py", "benchmarks/lowrank.py"} <= names


@pytest.mark.slow  # ~3 min of CPU for ~26 scripts (each mostly the import of torch)
@pytest.mark.parametrize("path", SCRIPTS, ids=script_id)
def test_script_runs_with_quick(path: Path, results) -> None:
    source = path.read_text(encoding="utf-8")
    assert "--quick" in source, f"{script_id(path)} has no --quick flag: add one (a run of seconds)"
    result = results[path].result()
    tail = (result.stdout[-3000:] + "\n--- stderr ---\n" + result.stderr[-3000:]).strip()
    assert result.returncode == 0, f"{' '.join(command(path))} failed:\n{tail}"
    assert result.stdout.strip(), f"{script_id(path)} --quick printed nothing"
