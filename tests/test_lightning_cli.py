"""The callbacks configured as LightningCLI users write them: YAML with class_path/init_args."""

import pytest
import torch

pytest.importorskip("jsonargparse")
from pytorch_lightning.cli import LightningCLI

from lightning_compress import PruneCallback, QATCallback

from .helpers import TinyMLP

CONFIG = """
trainer:
  max_epochs: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  accelerator: cpu
  callbacks:
    - class_path: lightning_compress.PruneCallback
      init_args:
        sparsity: 0.5
        schedule: oneshot
        scope: layer
        start: 1ep
        include: [fc1, fc2]
    - class_path: lightning_compress.QATCallback
      init_args:
        bits: 8
        exclude: fc3
"""


def test_callbacks_from_a_lightningcli_yaml_are_built_and_compress_the_model(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    cli = LightningCLI(
        TinyMLP,
        args=["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"],
        save_config_callback=None,
    )
    prune = next(c for c in cli.trainer.callbacks if isinstance(c, PruneCallback))
    qat = next(c for c in cli.trainer.callbacks if isinstance(c, QATCallback))
    assert (prune.sparsity, prune.schedule, str(prune.start)) == (0.5, "oneshot", "1ep")
    assert qat.bits == 8
    for name in ("fc1", "fc2"):
        weight = getattr(cli.model, name).weight
        assert torch.count_nonzero(weight).item() == weight.numel() // 2
    assert torch.count_nonzero(cli.model.fc3.weight).item() == cli.model.fc3.weight.numel()


def test_a_bad_init_arg_in_the_yaml_fails_with_the_callbacks_own_message(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("sparsity: 0.5", "sparsity: 1.5"))
    with pytest.raises((ValueError, SystemExit)) as err:
        LightningCLI(TinyMLP, args=["fit", "--config", str(config)], save_config_callback=None)
    if isinstance(err.value, ValueError):
        assert "`sparsity` must be in [0, 1), got 1.5" in str(err.value)
