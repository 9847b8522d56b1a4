"""The README's code runs as written: the quickstart, then the checkpoint/resume recipe.

Blocks are taken from README.md by their section headings, so an edit that breaks them fails
here (issue 18: the quickstart used ``model``, ``loader`` and ``loss_fn`` without defining them).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(heading: str) -> str:
    """The first ```python block after the line ``heading`` (a Markdown heading)."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no python block after {heading!r}"
    return match.group(1)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_quickstart() -> dict:
    namespace: dict = {"__name__": "readme"}
    exec(compile(python_block("## Quickstart"), "README.md (Quickstart)", "exec"), namespace)
    return namespace


def test_quickstart_runs_and_trains(one_thread, capsys) -> None:
    namespace = run_quickstart()
    out = capsys.readouterr().out
    assert "0.weight" in out and "muon" in out  # describe() printed the routing
    x, y, model = namespace["x"], namespace["y"], namespace["model"]
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9, accuracy  # 10 epochs of Muon on digits (measured: 0.99)


def test_checkpoint_recipe_resumes_bitwise(one_thread, tmp_path, monkeypatch) -> None:
    namespace = run_quickstart()
    monkeypatch.chdir(tmp_path)  # the recipe writes checkpoint.pt to the working directory
    recipe = python_block("### Checkpoint and resume")
    exec(compile(recipe, "README.md (Checkpoint and resume)", "exec"), namespace)
    assert (tmp_path / "checkpoint.pt").exists()
    build, train = namespace["build"], namespace["train"]
    resumed, resumed_scheduler = namespace["model"], namespace["scheduler"]

    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, epochs=5)  # the same 3 + 2 epochs, never stopped
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert scheduler.get_last_lr() == resumed_scheduler.get_last_lr()

    # What the recipe warns about: constructing a scheduler writes every group's lr, so one
    # created after loading overwrites the restored values (a warm-up LambdaLR writes its
    # first-step lr over the checkpoint's).
    _, late_optimizer, _ = build()
    late_optimizer.load_state_dict(torch.load("checkpoint.pt")["optimizer"])
    restored = [group["lr"] for group in late_optimizer.param_groups]
    torch.optim.lr_scheduler.LambdaLR(late_optimizer, lambda epoch: min(1.0, (epoch + 1) / 4))
    assert [group["lr"] for group in late_optimizer.param_groups] != restored
