"""The ``orthotorch`` command: smoke runs of every task, output files, and the error paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from orthotorch.bench import available_tasks
from orthotorch.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OUTPUTS = ("results.json", "results.md", "loss_vs_step.png", "loss_vs_time.png")


@pytest.mark.parametrize("task", available_tasks())
def test_compare_smoke_writes_every_output(task, tmp_path, capsys):
    out = tmp_path / "cmp"
    # bytelm is the slow one: one seed keeps the suite fast (the summary is then "1 seed").
    seeds = 1 if task == "bytelm" else 2
    argv = ["compare", "--task", task, "--steps", "3", "--seeds", str(seeds), "--eval-every", "2"]
    assert main([*argv, "--out", str(out), "--lr", "muon=0.01"]) == 0
    stdout = capsys.readouterr().out
    assert "vs adamw" in stdout and "torch-muon" in stdout
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for name in OUTPUTS[2:]:
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is True and data["config"]["steps"] == 3
    assert data["config"]["optimizers"]["muon"]["lr"] == 0.01
    assert {"torch", "python", "orthotorch"} <= set(data["environment"])
    assert len(data["runs"]) == 3 * seeds
    for run in data["runs"]:
        assert run["eval_steps"] == [0, 2, 3] and len(run["train_loss"]) == 3
        assert all(len(v) == 3 for v in run["metrics"].values())
    assert [row["optimizer"] for row in data["summary"]] == ["adamw", "muon", "torch-muon"]
    md = (out / "results.md").read_text()
    assert md.count("\n| ") >= 4 and "loss_vs_step.png" in md


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--task", "imagenet"], "valid tasks: bytelm, digits, matrix"),
        (["compare", "--optimizers", "adamw,lion"], "valid optimizers: adamw, muon, torch-muon"),
        (["compare", "--lr", "muon"], "malformed --lr item 'muon'"),
        (["compare", "--lr", "muon=fast"], "malformed --lr"),
        (["compare", "--lr", "muon=-1"], "malformed --lr"),
        (["compare", "--optimizers", "adamw", "--lr", "muon=0.02"], "compared: adamw"),
        (["compare", "--steps", "0"], "positive integer"),
        (["compare", "--seeds", "a,b"], "seed count"),
        (["compare", "--device", "nonsense"], "valid: cpu"),
        (["bench", "--methods", "qr"], "valid methods: muon, polar_express"),
        (["bench", "--optimizers", "lion"], "valid optimizers"),
        (["bench", "--shapes", "512"], "512x2048"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("orthotorch: error: ")
    assert message in err
    assert "Traceback" not in err


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["compare", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a writable directory" in err


def test_python_m_error_path_has_no_traceback(tmp_path):
    """The real process: exit status 2, one stderr line, nothing written."""
    proc = subprocess.run(
        [sys.executable, "-m", "orthotorch", "compare", "--task", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "orthotorch: error: unknown task 'nope'; valid tasks: bytelm, digits, matrix"
    ]
    assert not any(tmp_path.iterdir())


def test_bench_quick_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--shapes", "32x64", "--repeats", "2", "--json", str(path)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "GFLOP/s" in stdout and "vs torch.optim.Muon" in stdout
    data = json.loads(path.read_text())
    assert {k["method"] for k in data["kernels"]} >= {"muon", "polar_express", "svd"}
    assert {s["optimizer"] for s in data["steps"]} >= {"adamw", "muon", "torch-muon"}
    assert all(s["repeats"] == 2 for s in data["steps"])


# ----------------------------------------------------------------------------------- compare v2
@pytest.mark.parametrize("missing", ["tqdm", "matplotlib"])
def test_missing_extra_fails_up_front_with_the_pip_command(missing, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # import of it raises ImportError
    out = tmp_path / "out"
    assert main(["compare", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and missing in err and "pip install 'orthotorch[bench]'" in err
    assert not out.exists()  # nothing ran, nothing written


def test_version(capsys):
    from orthotorch import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"orthotorch {__version__}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--seeds", "1,1"], "lists a seed twice"),
        (["compare", "--seeds", "0,1", "--tuning-seeds", "1"], "never see the seeds"),
        (["compare", "--task", "digits", "--model", "gpt-small"], "apply to --task bytelm"),
        (["compare", "--model", "gpt-huge"], "invalid choice"),
        (["compare", "--schedule", "linear"], "invalid choice"),
        (["compare", "--warmup", "1.5"], "fraction"),
        (["compare", "--sweep", "--no-sweep"], "not allowed with"),
        (["compare", "--sweep-factors", "1,-2"], "positive lr multipliers"),
        (["compare", "--budget-s", "0"], "positive number"),
    ],
)
def test_compare_v2_bad_input_is_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_failing_optimizer_exits_1_naming_it(tmp_path, monkeypatch, capsys):
    from orthotorch import bench

    class Broken(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("kernel exploded")

    spec = bench.OptimizerSpec("broken", lambda m, lr, _: Broken(m.parameters(), lr=lr))
    monkeypatch.setitem(bench.OPTIMIZERS, "broken", spec)
    argv = ["compare", "--task", "matrix", "--optimizers", "adamw,broken", "--lr", "broken=0.1"]
    argv += ["--steps", "2", "--seeds", "1", "--no-plots", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "'broken'" in err and "kernel exploded" in err and "Traceback" not in err
