"""orthotorch inside Lightning: ``configure_optimizers`` with our optimizer and a schedule,
checkpoint + ``ckpt_path`` resume to the same continuation, and ``precision="bf16-mixed"``."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthotorch

L = pytest.importorskip("lightning")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Classifier(L.LightningModule):
    """Embedding -> two hidden Linear layers -> head: one orthogonalized and two AdamW groups."""

    def __init__(self, vocab: int = 32, d: int = 32, decay_lr: bool = True) -> None:
        super().__init__()
        self.decay_lr = decay_lr
        self.net = nn.Sequential(
            nn.Embedding(vocab, d), nn.Flatten(), nn.Linear(4 * d, d), nn.GELU(),
            nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, vocab),
        )  # fmt: skip
        self.losses: list[float] = []
        self.logit_dtypes: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.logit_dtypes.add(logits.dtype)
        loss = F.cross_entropy(logits.float(), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        optimizer = orthotorch.Muon(orthotorch.param_groups(self), lr=0.02, adamw_lr=3e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 1.0 / (1 + step) if self.decay_lr else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 32, (64, 4), generator=g)
    y = (x[:, 0] + x[:, 1]) % 32  # a fixed function of the input
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _trainer(tmp_path, max_steps: int, **kw) -> L.Trainer:
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}"
    )
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=[checkpoint],
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, **kw,
    )  # fmt: skip


def _fit(trainer: L.Trainer, model: L.LightningModule, **kw) -> None:
    with warnings.catch_warnings():  # num_workers / small-dataset hints
        warnings.simplefilter("ignore")
        trainer.fit(model, _data(), **kw)


def test_configure_optimizers_checkpoint_and_ckpt_path_resume(tmp_path):
    torch.manual_seed(0)
    model = _Classifier()
    trainer = _trainer(tmp_path / "a", 8)
    _fit(trainer, model)
    assert isinstance(trainer.optimizers[0], orthotorch.Muon)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02 / 9)  # schedule ran
    assert model.losses[-1] < model.losses[0]
    straight = {n: p.detach().clone() for n, p in model.named_parameters()}
    ckpt = tmp_path / "a" / "step=4.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "a").iterdir())

    torch.manual_seed(1)  # another init: everything must come from the checkpoint
    resumed = _Classifier()
    trainer = _trainer(tmp_path / "b", 8)
    _fit(trainer, resumed, ckpt_path=str(ckpt))
    state = trainer.optimizers[0].state_dict()["state"]
    assert any("momentum_buffer" in s for s in state.values())
    for name, p in resumed.named_parameters():
        assert torch.equal(p.detach(), straight[name]), name


def test_bf16_mixed_precision_trains_and_keeps_fp32_parameters(tmp_path):
    torch.manual_seed(0)
    model = _Classifier(decay_lr=False)
    trainer = _trainer(tmp_path, 20, precision="bf16-mixed")
    _fit(trainer, model)
    assert model.logit_dtypes == {torch.bfloat16}  # autocast ran the forward in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(model.losses)))
    assert sum(model.losses[-4:]) < 0.8 * sum(model.losses[:4]), model.losses
