"""Models as users write them: Hugging Face GPT-2 and BERT from small configs, a ResNet-18.

Each LightningModule is in the style the callbacks meet in the wild: dict batches,
``self.model(**batch).loss``, AdamW with a warmup schedule stepped per batch, or SGD with momentum
and gradient accumulation for the ResNet. Data are synthetic and learnable, so accuracy figures
mean something and nothing is downloaded.

torchvision cannot be installed beside the CPU torch 2.13 (its only build for it is a CUDA build
that fails to import), so :class:`ResNet18` is a faithful local copy of torchvision's
``resnet18``: BasicBlock, BatchNorm, residual adds, the 3-channel 7x7 stem with max-pooling, and
1x1 downsampling convolutions, at a configurable width.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_compress.zoo import ResNet18

VOCAB = 32
SEQ = 16


class DictDataset(Dataset):
    """A dataset of dicts of tensors (what HF collators produce)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def counting_sequences(n: int, seed: int) -> torch.Tensor:
    """Sequences that count up by a per-sequence stride mod VOCAB: the next token is learnable."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup: int) -> dict:
    lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr, "interval": "step"}}


class HFModule(pl.LightningModule):
    """What the two Hugging Face modules share: the loss from ``self.model(**batch)``, AdamW with
    a per-step warmup, and dict-batch loaders of :meth:`dataset` (shuffled, seeded)."""

    lr: float
    seed: int

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        return warmup_schedule(optimizer, warmup=10)

    def dataset(self, seed: int) -> DictDataset:
        raise NotImplementedError

    def _loader(self, seed: int, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.dataset(seed), batch_size=32, shuffle=shuffle, generator=g)

    def train_dataloader(self):
        return self._loader(self.seed, shuffle=True)

    def val_dataloader(self):
        return self._loader(1000 + self.seed, shuffle=False)


class GPT2Module(HFModule):
    """A small GPT-2 language model trained on counting sequences."""

    def __init__(self, lr: float = 3e-3, n: int = 256, seed: int = 0) -> None:
        super().__init__()
        import transformers

        config = transformers.GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=SEQ,
            bos_token_id=0,
            eos_token_id=0,
        )
        torch.manual_seed(seed)
        self.model = transformers.GPT2LMHeadModel(config)
        self.lr, self.n, self.seed = lr, n, seed

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model(input_ids=input_ids, **kwargs).logits

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", next_token_accuracy(self(batch["input_ids"]), batch["input_ids"]))

    def dataset(self, seed: int) -> DictDataset:
        ids = counting_sequences(self.n, seed)
        return DictDataset(input_ids=ids, labels=ids.clone())


def fit_and_validate(tmp_path, module: pl.LightningModule, callbacks: list, epochs: int) -> float:
    """Trains ``module`` for ``epochs`` and returns its ``val/acc`` on the whole validation set,
    measured once, at the end."""
    from .helpers import make_trainer

    trainer = make_trainer(
        tmp_path,
        callbacks,
        max_epochs=epochs,
        limit_val_batches=None,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=epochs,
    )
    trainer.fit(module)
    return float(trainer.callback_metrics["val/acc"])


def next_token_accuracy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean()


def keyed_sentences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences whose label is whether token 1 appears more often than token 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    marks = torch.randint(1, 4, (n,), generator=g)
    for i in range(n):
        pos = torch.randperm(SEQ - 1, generator=g)[: int(marks[i]) + 1] + 1
        token = 1 if labels[i] else 2
        ids[i, pos[:-1]] = token
        ids[i, pos[-1]] = 3 - token if marks[i] > 1 else ids[i, pos[-1]]
    ids[:, 0] = 0  # [CLS]
    return ids, labels


class BertModule(HFModule):
    """A tiny BERT sequence classifier (HF ``BertForSequenceClassification``)."""

    def __init__(self, lr: float = 2e-3, n: int = 512, seed: int = 0) -> None:
        super().__init__()
        import transformers

        config = transformers.BertConfig(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=2,
            intermediate_size=128,
            vocab_size=VOCAB,
            max_position_embeddings=SEQ,
            num_labels=2,
        )
        torch.manual_seed(seed)
        self.model = transformers.BertForSequenceClassification(config)
        self.lr, self.n, self.seed = lr, n, seed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.log("val/acc", (logits.argmax(-1) == batch["labels"]).float().mean())

    def dataset(self, seed: int) -> DictDataset:
        ids, labels = keyed_sentences(self.n, seed)
        return DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def colour_blobs(n: int, seed: int, classes: int = 4, size: int = 32):
    """Images whose class is the quadrant holding a bright blob, in one of three colours."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 0.3
    y = torch.randint(0, classes, (n,), generator=g)
    half = size // 2
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, int(y[i]) % 3, r * half : (r + 1) * half, c * half : (c + 1) * half] += 1.5
    return TensorDataset(x, y)


class ResNetModule(pl.LightningModule):
    """ResNet-18 (narrow) on colour blobs: tuple batches, SGD with momentum, BatchNorm."""

    def __init__(self, width: int = 8, lr: float = 0.05, n: int = 128, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = ResNet18(num_classes=4, width=width)
        self.lr, self.n, self.seed = lr, n, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(colour_blobs(self.n, self.seed), batch_size=16, shuffle=True, generator=g)

    def val_dataloader(self):
        return DataLoader(colour_blobs(64, 1000 + self.seed), batch_size=32)
