"""Every config option and every recipe composes and its objects instantiate (no training)."""

import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf

from lightning_compress.app.build import build_job

from ..zoo.test_data import make_idx_dir
from .conftest import RECIPES, group_options


def resolve_all(cfg):
    """Resolves every interpolation outside Hydra's own node (raises on a broken one)."""
    return {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in cfg
        if k != "hydra"
    }


def _extra(group, option, tmp_path):
    if (group, option) == ("data", "mnist_idx"):
        make_idx_dir(tmp_path / "idx")
        return [f"data.root={tmp_path / 'idx'}", "data.val_size=20"]
    return []


def test_every_group_has_options():
    groups = {g for g, _ in group_options()}
    assert {"model", "data", "trainer", "logger"} <= groups


@pytest.mark.parametrize(("group", "option"), group_options())
def test_group_option_composes_and_instantiates(compose_cfg, tmp_path, group, option):
    overrides = [f"{group}={option}", *_extra(group, option, tmp_path)]
    if group != "logger":
        overrides.append("logger=none")
    cfg = compose_cfg(overrides)
    resolve_all(cfg)
    job = build_job(cfg)
    assert isinstance(job.trainer, pl.Trainer)
    assert isinstance(job.datamodule, pl.LightningDataModule)
    assert job.module.net(job.datamodule.train_set.tensors[0][:2]).shape == (2, 10)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_instantiates(compose_cfg, recipe):
    cfg = compose_cfg([f"recipe={recipe}", "logger=none"])
    resolve_all(cfg)
    job = build_job(cfg)
    assert isinstance(job.trainer, pl.Trainer)
    assert cfg.hydra.runtime.choices.recipe == recipe


def test_recipes_exist_and_state_expected_figures():
    assert RECIPES, "no recipes found through configs/recipe"
    from .conftest import CONFIG_DIR

    for name in RECIPES:
        text = (CONFIG_DIR / "recipe" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_"), name
        assert "Expected" in text or "expected" in text, f"{name} states no expected figure"
