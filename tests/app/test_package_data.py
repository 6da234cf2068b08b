"""A wheel ships every file of configs/ and recipes/, and the installed app reads that copy."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = "lightning_compress/_configs/"
# What a wheel is built from; venvs, run outputs and build folders of the checkout stay behind.
BUILD_INPUTS = (
    "pyproject.toml",
    "setup.py",
    "README.md",
    "lightning_compress",
    "configs",
    "recipes",
)


def files_under(root: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def source_configs() -> dict[str, Path]:
    """Each file the app's config tree should hold, by its path there: recipes/ is the ``recipe``
    group (which configs/recipe links in the repository)."""
    configs = files_under(ROOT / "configs")
    configs = {name: p for name, p in configs.items() if not name.startswith("recipe/")}
    return configs | files_under(ROOT / "recipes", "recipe/")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the build inputs, without compiling the ops (seconds)."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip("pip is not installed")
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.so")
            shutil.copytree(path, src / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q"]
    out = subprocess.run(
        [*build, "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        env=dict(os.environ, LIGHTNING_COMPRESS_BUILD_EXT="0"),
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (path,) = dist.glob("lightning_compress-*.whl")
    return path


def test_wheel_ships_every_config_and_recipe_unchanged(wheel):
    expected = source_configs()
    assert "config.yaml" in expected and any(k.startswith("recipe/") for k in expected)
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n.removeprefix(SHIPPED): n for n in zf.namelist() if n.startswith(SHIPPED)}
        assert sorted(shipped) == sorted(expected)
        for name, path in expected.items():
            assert zf.read(shipped[name]) == path.read_bytes(), name


def test_installed_app_reads_the_shipped_configs(wheel, tmp_path):
    """Outside the source tree the unpacked wheel's app finds its own copy and composes a recipe."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    script = (
        "import hydra, lightning_compress\n"
        "from lightning_compress.app.main import config_dir\n"
        "print(lightning_compress.__file__)\n"
        "print(config_dir())\n"
        "with hydra.initialize_config_dir(str(config_dir()), version_base='1.3'):\n"
        "    cfg = hydra.compose('config', ['recipe=han2015_lenet300', 'trainer=fast'])\n"
        "print(cfg.name, cfg.trainer.max_epochs)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(site), LIGHTNING_COMPRESS_DISABLE_EXT="1"),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    module, configs, composed = out.stdout.splitlines()[-3:]
    assert Path(module) == site / "lightning_compress" / "__init__.py"
    assert Path(configs) == site / SHIPPED
    assert composed == "han2015-lenet300 30"
