"""orthotorch inside transformers: routing of real architectures, training, Trainer + resume.

Models are built from tiny configs (hidden 32, 2 layers; nothing is downloaded). For each one the
test lists where every parameter must go, as a Muon practitioner routes it: hidden matrices to
the orthogonalized group with the matrix layout of their storage (MoE expert stacks ``batch``,
GPT-2's ``Conv1D`` ``transposed``, its fused ``c_attn`` split into q, k, v), and embeddings
(token, position, class token), heads, routers, norms and biases to AdamW, without weight decay
on norms, biases and embeddings.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import pytest
import torch

import orthotorch

transformers = pytest.importorskip("transformers")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: with two intra-op threads per xdist worker on a shared 2-core
    machine, thread contention made each 30-step run 20-50x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 32, 4, 2, 8

# Expected route of a parameter: ("orthogonal", layout) or ("adamw", decays).
ORTH = "orthogonal"
ADAMW = "adamw"


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, num_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(config)


def _vit():
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=HEADS, intermediate_size=64, num_labels=5,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


# First matching glob wins; every pattern must match at least one parameter.
EXPECTED: dict[str, list[tuple[str, tuple[str, Any]]]] = {
    "llama": [
        ("model.embed_tokens.weight", (ADAMW, False)),
        ("*.self_attn.[qkvo]_proj.weight", (ORTH, "flatten")),
        ("*.mlp.gate_proj.weight", (ORTH, "flatten")),
        ("*.mlp.up_proj.weight", (ORTH, "flatten")),
        ("*.mlp.down_proj.weight", (ORTH, "flatten")),
        ("*norm.weight", (ADAMW, False)),
        ("lm_head.weight", (ADAMW, True)),
    ],
    "gpt2": [
        ("transformer.wte.weight", (ADAMW, False)),  # tied to the LM head
        ("transformer.wpe.weight", (ADAMW, False)),
        ("*.attn.c_attn.weight", (ORTH, f"transposed+split(rows={HIDDEN},{HIDDEN},{HIDDEN})")),
        ("*.attn.c_proj.weight", (ORTH, "transposed")),
        ("*.mlp.c_fc.weight", (ORTH, "transposed")),
        ("*.mlp.c_proj.weight", (ORTH, "transposed")),
        ("*.bias", (ADAMW, False)),
        ("*ln_*.weight", (ADAMW, False)),
    ],
    "qwen3_moe": [
        ("model.embed_tokens.weight", (ADAMW, False)),
        ("*.self_attn.[qkvo]_proj.weight", (ORTH, "flatten")),
        ("*.self_attn.[qk]_norm.weight", (ADAMW, False)),
        # (E, 2 * moe_intermediate, hidden): each expert's fused gate/up is two matrices.
        ("*.mlp.experts.gate_up_proj", (ORTH, "batch+split(rows=16,16)")),
        ("*.mlp.experts.down_proj", (ORTH, "batch")),
        ("*.mlp.gate.weight", (ADAMW, True)),  # the router (a raw Parameter)
        ("*norm.weight", (ADAMW, False)),
        ("lm_head.weight", (ADAMW, True)),
    ],
    "vit": [
        ("vit.embeddings.cls_token", (ADAMW, False)),
        ("vit.embeddings.position_embeddings", (ADAMW, False)),
        # The patch embedding (the input layer) stays orthogonalized, as param_groups documents.
        ("vit.embeddings.patch_embeddings.projection.weight", (ORTH, "flatten")),
        ("*.attention.[qkvo]_proj.weight", (ORTH, "flatten")),
        ("*.mlp.fc[12].weight", (ORTH, "flatten")),
        ("*.bias", (ADAMW, False)),
        ("*layernorm*.weight", (ADAMW, False)),
        ("classifier.weight", (ADAMW, True)),
    ],
}

BUILDERS = {"llama": _llama, "gpt2": _gpt2, "qwen3_moe": _qwen3_moe, "vit": _vit}


def _routes(groups: list[dict[str, Any]]) -> dict[str, tuple[str, Any]]:
    """Parameter name -> ("orthogonal", layout) or ("adamw", decays) from param_groups."""
    out = {}
    for group in groups:
        names = [name for name, _ in group["params"]]
        if group.get("algorithm") == ADAMW:
            decays = group.get("weight_decay", None) != 0.0
            out.update({name: (ADAMW, decays) for name in names})
        else:
            out.update({n: (ORTH, lay) for n, lay in zip(names, group["layouts"], strict=True)})
    return out


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_param_groups_route_every_parameter_as_a_practitioner_would(arch):
    torch.manual_seed(0)
    model = BUILDERS[arch]()
    routes = _routes(orthotorch.param_groups(model))
    names = [n for n, _ in model.named_parameters()]
    assert sorted(routes) == sorted(names)
    used, wrong = set(), []
    for name in names:
        pattern, expected = next(
            ((pat, exp) for pat, exp in EXPECTED[arch] if fnmatch.fnmatchcase(name, pat)),
            (None, None),
        )
        assert pattern is not None, f"{arch}: no expectation lists {name}"
        used.add(pattern)
        if routes[name] != expected:
            wrong.append(f"{name}: got {routes[name]}, expected {expected}")
    assert not wrong, f"{arch} routed differently:\n" + "\n".join(wrong)
    assert used == {pat for pat, _ in EXPECTED[arch]}


def _batch(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(8, 3, 16, 16, generator=g),
                "labels": torch.randint(0, 5, (8,), generator=g)}  # fmt: skip
    ids = torch.randint(0, VOCAB, (8, 16), generator=g)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_each_model_trains_30_steps_with_muon(arch):
    torch.manual_seed(0)
    model = BUILDERS[arch]()
    optimizer = orthotorch.Muon(orthotorch.param_groups(model), lr=0.02, adamw_lr=3e-3)
    batch = _batch(arch)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------- transformers.Trainer


class _Tokens(torch.utils.data.Dataset):
    """Counting sequences ``s, s+1, ...`` (mod VOCAB): learnable in a few steps."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (starts + torch.arange(16)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out: str, max_steps: int, **kw: Any):
    return transformers.TrainingArguments(
        output_dir=out, max_steps=max_steps, per_device_train_batch_size=4, save_strategy="steps",
        save_steps=3, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0, **kw,
    )  # fmt: skip


def _muon_and_schedule(model):
    optimizer = orthotorch.Muon(orthotorch.param_groups(model), lr=0.02, adamw_lr=3e-3)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 2, 6)
    return optimizer, schedule


def test_trainer_with_muon_and_schedule_saves_and_resumes_to_the_same_continuation(tmp_path):
    torch.manual_seed(0)
    model = _llama()
    trainer = transformers.Trainer(
        model=model, args=_args(str(tmp_path / "a"), 6), train_dataset=_Tokens(),
        optimizers=_muon_and_schedule(model),
    )  # fmt: skip
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]
    straight = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert trainer.optimizer.param_groups[0]["lr"] != 0.02  # the schedule drove the lr

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed_model = _llama()
    resumed = transformers.Trainer(
        model=resumed_model, args=_args(str(tmp_path / "b"), 6), train_dataset=_Tokens(),
        optimizers=_muon_and_schedule(resumed_model),
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for name, p in resumed_model.named_parameters():
        assert torch.equal(p.detach(), straight[name]), name


def test_trainer_optimizer_cls_and_kwargs(tmp_path):
    """Trainer builds ``optimizer_cls(its_groups, **kwargs)`` with its own decay/no-decay groups
    (1-D parameters beside matrices, embeddings beside hidden weights): Muon cannot route those
    and says so. Passing our groups as the ``params`` kwarg (Trainer uses it instead of its
    own) is the one-line way; ``optimizers=(Muon(param_groups(model)), None)`` is the other."""
    torch.manual_seed(0)
    model = _llama()
    plain = transformers.Trainer(
        model=model, args=_args(str(tmp_path / "plain"), 2), train_dataset=_Tokens(),
        optimizer_cls_and_kwargs=(orthotorch.Muon, {"lr": 0.02}),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"orthotorch\.param_groups"):
        plain.train()

    trainer = transformers.Trainer(
        model=model, args=_args(str(tmp_path / "ours"), 2), train_dataset=_Tokens(),
        optimizer_cls_and_kwargs=(
            orthotorch.Muon, {"params": orthotorch.param_groups(model), "lr": 0.02,
                              "adamw_lr": 3e-3}),
    )  # fmt: skip
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else None
    optimizer = optimizer or trainer.optimizer
    assert isinstance(optimizer, orthotorch.Muon)
    algorithms = {g["algorithm"] for g in optimizer.param_groups}
    assert algorithms == {orthotorch.Muon.algorithm, "adamw"}
    assert trainer.state.global_step == 2
