"""``--text`` corpora (folder, file, empty, binary) and the ``--model`` presets."""

from __future__ import annotations

import json
import random

import pytest
import torch

from orthotorch import bench
from orthotorch.bench.text import load_text_corpus
from orthotorch.cli import main


def _words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "über", "naïve", "λx", "def", "return", "\n"]
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(30):
        (root / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(_words(i, 120))
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0" + bytes(range(256)))
    (root / ".hidden.txt").write_text("never read")
    return root


def test_folder_is_split_by_file(folder):
    corpus = load_text_corpus(folder)
    assert corpus.files == 30 and corpus.skipped_binary == 1 and corpus.split.startswith("file")
    texts = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("doc*.txt")}
    train, val = (
        bytes(corpus.train.to(torch.uint8).tolist()),
        bytes(corpus.val.to(torch.uint8).tolist()),
    )
    # Every file lands whole on exactly one side (NUL-separated), none is lost or duplicated.
    train_docs, val_docs = set(train.split(b"\0")[:-1]), set(val.split(b"\0")[:-1])
    assert train_docs | val_docs == set(texts.values()) and not train_docs & val_docs
    assert val_docs and len(train) > len(val)
    assert b"never read" not in train + val


def test_single_file_is_split_by_contiguous_chunks(tmp_path):
    path = tmp_path / "book.txt"
    text = _words(0, 3000).encode()
    path.write_bytes(text)
    corpus = load_text_corpus(path)
    assert corpus.files == 1 and corpus.split.startswith("contiguous")
    train = bytes(corpus.train.to(torch.uint8).tolist())
    val = bytes(corpus.val.to(torch.uint8).tolist())
    assert len(train) + len(val) == len(text) and 0 < len(val) < len(train)
    assert val[:200] in text and val[:200] not in train


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"text\0with a NUL" * 300, "is binary"),
        (b"\xff\xfe\xfa" * 900, "binary"),
    ],
    ids=["empty", "nul", "not-utf8"],
)
def test_empty_and_binary_files_are_refused(tmp_path, content, message):
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_text_corpus(path)


def test_folder_without_text_and_missing_path(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\0\1\2" * 100)
    with pytest.raises(ValueError, match=r"1 binary file.*no text file"):
        load_text_corpus(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_text_corpus(tmp_path / "nope")
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    with pytest.raises(ValueError, match="at least 2048"):
        load_text_corpus(small)


def test_cli_text_folder_and_file_train(folder, tmp_path, capsys):
    for source in (folder, next(folder.rglob("doc3.txt")).parent / "doc3.txt"):
        if source.is_file():
            source.write_text(_words(3, 1500))
        out = tmp_path / f"out-{source.name}"
        argv = ["compare", "--text", str(source), "--optimizers", "adamw,muon", "--steps", "2"]
        argv += ["--seeds", "1", "--no-sweep", "--no-plots", "--no-progress", "--threads", "1"]
        argv += ["--out", str(out)]
        assert main(argv) == 0, capsys.readouterr().err
        data = json.loads((out / "results.json").read_text())
        assert data["task"] == "text-gpt-tiny" and str(source) in data["config"]["task_description"]
        assert data["config"]["optimizers"]["muon"]["lr_source"] == "default, not tuned"


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"\0\1\2\3" * 1000, "is binary")],
    ids=["empty", "binary"],
)
def test_cli_text_errors_are_one_line(tmp_path, content, message, capsys):
    path = tmp_path / "x.txt"
    path.write_bytes(content)
    out = tmp_path / "out"
    assert main(["compare", "--text", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not out.exists()


def test_model_presets_build_their_sizes():
    for name, preset in bench.MODEL_PRESETS.items():
        task = bench.bytelm_task(name)
        assert task.name == ("bytelm" if name == "gpt-tiny" else f"bytelm-{name}")
        assert task.lr_key == "bytelm"
        if name == "gpt-medium":
            continue  # 25M parameters: the count formula is checked on the smaller two
        setup = task.setup(0, torch.device("cpu"))
        assert sum(p.numel() for p in setup.model.parameters()) == preset.parameters()
        assert next(setup.batches).shape == (preset.batch_size, preset.context + 1)
    with pytest.raises(ValueError, match="valid models: gpt-tiny, gpt-small, gpt-medium"):
        bench.bytelm_task("gpt-huge")
