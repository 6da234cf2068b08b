"""int8 QAT keeps the accuracy of models initialised the Hugging Face way (std 0.02)."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import PruneCallback, QATCallback

from .helpers import EpochSeededSampler, make_trainer, random_classification

transformers = pytest.importorskip("transformers")
from .users import BertModule, fit_and_validate  # noqa: E402


def _prune():
    return PruneCallback(sparsity=0.8, start="1ep", end="5ep", every="1ep")


@pytest.mark.slow
def test_bert_int8_qat_keeps_float_accuracy_and_pruned_qat_keeps_pruned_accuracy(tmp_path):
    epochs = 8
    dense = fit_and_validate(tmp_path, BertModule(), [], epochs)
    qat = fit_and_validate(tmp_path, BertModule(), [QATCallback(bits=8)], epochs)
    pruned = fit_and_validate(tmp_path, BertModule(), [_prune()], epochs)
    pruned_qat = fit_and_validate(tmp_path, BertModule(), [_prune(), QATCallback(bits=8)], epochs)
    assert dense >= 0.95, "the float model must learn the task for the comparison to mean much"
    assert qat >= dense - 0.01, (dense, qat)
    assert pruned_qat >= pruned - 0.03, (pruned, pruned_qat)


class SmallInitMLP(pl.LightningModule):
    """A 2-layer MLP initialised the Hugging Face way (std 0.02, zero bias): logits start tiny."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 4)
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.weight, std=0.02, generator=g)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())
        self.log("val/logit_range", logits.abs().max())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def train_dataloader(self):
        data = random_classification(n=256)
        return DataLoader(data, batch_size=16, sampler=EpochSeededSampler(len(data)))

    def val_dataloader(self):
        return DataLoader(random_classification(n=256), batch_size=256)


@pytest.mark.parametrize("quantize_output", [False, True])
def test_small_initialisation_logits_grow_as_in_float_under_int8_qat(tmp_path, quantize_output):
    def run(callbacks):
        trainer = make_trainer(
            tmp_path,
            callbacks,
            max_epochs=20,
            limit_val_batches=None,
            num_sanity_val_steps=0,
            check_val_every_n_epoch=20,
        )
        trainer.fit(SmallInitMLP())
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    dense = run([])
    qat = run([QATCallback(bits=8, quantize_output=quantize_output)])
    assert qat["val/acc"] >= dense["val/acc"] - 0.01
    # A range observed while the logits were small must not cap them (it capped them at half
    # the float range when clipped values got no gradient and the range only averaged).
    assert qat["val/logit_range"] >= 0.85 * dense["val/logit_range"], (dense, qat)
