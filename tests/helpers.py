"""Tiny models and a small-Trainer runner shared by the callback tests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset


class EpochSeededSampler(Sampler[int]):
    """Shuffles from (seed, epoch) alone: Lightning calls ``set_epoch``, so resumed runs see the
    same order as uninterrupted ones without depending on the global RNG state."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 10_000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def random_classification(n: int = 64, features: int = 32, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    return TensorDataset(x, (x @ w).argmax(dim=1))


class TinyMLP(pl.LightningModule):
    """32-32-16-4 MLP on fixed random data; `optimizer` selects SGD with momentum or AdamW."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 32, bias=bias)
        self.fc2 = nn.Linear(32, 16, bias=bias)
        self.fc3 = nn.Linear(16, 4, bias=bias)
        self.optimizer_name = optimizer
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr / 10, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self):
        data = random_classification()
        return DataLoader(data, batch_size=8, sampler=EpochSeededSampler(len(data)))

    def val_dataloader(self):
        return DataLoader(random_classification(seed=1, n=16), batch_size=8)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return self.val_dataloader()


class DictBatches(Dataset):
    def __init__(self, n: int = 32) -> None:
        self.data = random_classification(n=n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"tokens": x.view(4, 8), "label": y}


class TinyTransformer(pl.LightningModule):
    """Attention + BatchNorm + keyword-argument forward + dict batches + per-step LR schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, batch_first=True
        )
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor, *, pool: str = "mean") -> torch.Tensor:
        h = self.encoder(tokens)
        h = h.mean(dim=1) if pool == "mean" else h[:, 0]
        return self.head(self.norm(h))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["tokens"], pool="mean"), batch["label"])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(DictBatches(), batch_size=8, shuffle=True)


def make_trainer(tmp_path: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 4,
        "limit_val_batches": 0,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "deterministic": True,
        "accelerator": "cpu",
        "devices": 1,
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def offline_wandb(tmp_path: Path, monkeypatch: Any) -> tuple[Any, list[dict[str, Any]]]:
    """An offline WandbLogger whose ``experiment.log`` payloads are also kept in a list."""
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="lc-test", save_dir=str(tmp_path), offline=True)
    logged: list[dict[str, Any]] = []
    real_log = logger.experiment.log

    def log(data, *args, **kwargs):
        logged.append(data)
        return real_log(data, *args, **kwargs)

    monkeypatch.setattr(logger.experiment, "log", log)
    return logger, logged
