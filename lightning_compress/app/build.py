"""Turns a composed config into objects: datamodule, LightningModule, callbacks, logger, trainer.

Kept separate from the entry point so tests can compose every config and instantiate its objects
without training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_compress.zoo import ClassificationModule

# Config groups whose selected option is one callback (added by the compression issues).
CALLBACK_GROUPS = ("prune", "rewind", "qat", "distill", "lowrank", "search")


# Trainer arguments that Lightning only asserts on; checked here for a readable message.
_INT_TRAINER_ARGS = ("max_epochs", "min_epochs", "max_steps", "accumulate_grad_batches")


@dataclass
class Job:
    datamodule: pl.LightningDataModule
    module: ClassificationModule
    callbacks: list[pl.Callback]
    logger: Any
    trainer: pl.Trainer


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    return instantiate(cfg.data)


def build_module(cfg: DictConfig, datamodule: pl.LightningDataModule) -> ClassificationModule:
    shape = tuple(datamodule.input_shape)
    num_classes = datamodule.num_classes
    net = instantiate(cfg.model.net, input_shape=shape, num_classes=num_classes)
    scheduler = cfg.model.get("scheduler")
    module = ClassificationModule(
        net,
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(scheduler) if scheduler else None,
        scheduler_interval=cfg.model.get("scheduler_interval", "epoch"),
        num_classes=num_classes,
    )
    # One input, for callbacks that time the model (SearchCallback) and the model summary.
    module.example_input_array = torch.zeros(1, *shape)
    return module


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    for group in CALLBACK_GROUPS:
        node = cfg.get(group)
        if node:
            callbacks.append(instantiate(node))
    return callbacks


def build_logger(cfg: DictConfig) -> Any:
    node = cfg.get("logger")
    if not node or "_target_" not in node:
        return False
    return instantiate(node)


def build_job(cfg: DictConfig, setup_data: bool = True) -> Job:
    """Instantiates everything a run needs; fails before any training on bad input.

    Args:
        cfg: The composed config.
        setup_data: Load and split the data now, so missing or malformed files fail early.
    """
    datamodule = build_datamodule(cfg)
    if setup_data:
        datamodule.prepare_data()
        datamodule.setup("fit")
    module = build_module(cfg, datamodule)
    callbacks = build_callbacks(cfg)
    logger = build_logger(cfg)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in _INT_TRAINER_ARGS:
        value = trainer_kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"`trainer.{key}` must be an integer, got {value!r}")
    trainer = pl.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs)
    return Job(datamodule, module, callbacks, logger, trainer)
