"""The ``lightning-compress`` command as a user runs it (subprocesses, tiny trainer settings)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FAST = ["trainer=fast"]


def run_cli(args, cwd, env_extra=None):
    exe = shutil.which("lightning-compress") or str(
        Path(sys.executable).parent / "lightning-compress"
    )
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )


def test_sweep_writes_one_results_file_per_job(tmp_path):
    out = run_cli(["-m", *FAST, "logger=csv", "trainer.max_epochs=1,2"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    records = sorted((tmp_path / "multirun").rglob("results.json"))
    assert len(records) == 2
    epochs = sorted(json.loads(p.read_text())["config"]["trainer"]["max_epochs"] for p in records)
    assert epochs == [1, 2]
    for path in records:
        record = json.loads(path.read_text())
        assert {"config", "metrics", "parameters", "model_bytes", "wall_time_s"} <= record.keys()
        assert 0.0 <= record["metrics"]["test/acc"] <= 1.0
        size = (path.parent / "model.safetensors").stat().st_size
        assert record["model_bytes"] == size
        assert record["parameters"]["total"] == 266_610
        assert (path.parent / "csv").is_dir()


NO_NETWORK = """
import socket, sys
real_connect = socket.socket.connect
def guarded(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise AssertionError(f"network connection attempted: {address}")
    return real_connect(self, address)
socket.socket.connect = guarded
sys.argv = ["lightning-compress", *sys.argv[1:]]
from lightning_compress.app.main import main
main()
"""


def test_wandb_offline_run_directory_with_metrics(tmp_path):
    env = {"WANDB_MODE": "", "WANDB_API_KEY": ""}
    cmd = [sys.executable, "-c", NO_NETWORK, *FAST, "logger=wandb"]
    out = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ, **env)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "network connection attempted" not in out.stderr
    runs = list((tmp_path / "outputs").rglob("offline-run-*"))
    assert len(runs) == 1, runs
    logs = list(runs[0].glob("*.wandb"))
    assert logs and logs[0].stat().st_size > 0
    data = logs[0].read_bytes()
    for metric in (b"train/loss", b"val/acc", b"test/acc"):
        assert metric in data, metric


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=nope"], "Could not find 'model/nope'"),
        (["data=mnist_idx"], "Missing mandatory value: data.root"),
        (["data=mnist_idx", "data.root=/nonexistent/idx"], "does not exist"),
        # The default QAT schedule reads max_epochs first.
        (["trainer.max_epochs=abc"], "must be a non-negative int"),
        (["trainer.max_epochs=abc", "qat=none"], "`trainer.max_epochs` must be an integer"),
        (["data.batch_size=0"], "`batch_size` must be >= 1"),
        (["model.optimizer.lr=[1"], "no viable alternative at input"),
    ],
)
def test_bad_input_fails_before_training_with_a_message(tmp_path, args, message):
    out = run_cli([*FAST, "logger=none", *args], tmp_path)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout
    assert not list(tmp_path.rglob("results.json"))
    assert "Epoch" not in out.stderr + out.stdout


def test_main_job_reaches_paper_accuracy(tmp_path):
    """The default job (LeNet-300-100 pruned to 90% by cubic GMP with int8 QAT on mnist5k) keeps
    >= 95%; its packed artifact is >= 16x smaller than the fp32 file and, reloaded, scores what
    the fake-quantized model scores."""
    out = run_cli(["logger=none", "trainer.enable_progress_bar=false"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = list((tmp_path / "outputs").rglob("results.json"))
    record = json.loads(path.read_text())
    assert record["metrics"]["test/acc"] >= 0.95, record["metrics"]
    assert record["sparsity"] >= 0.9 - 1e-3, record["sparsity"]
    assert record["config"]["prune"]["schedule"] == "cubic"
    assert "test accuracy" in out.stdout
    packed = record["packed"]
    assert packed["quantization"] == "qat"
    assert abs(packed["test_acc"] - record["metrics"]["test/acc"]) <= 0.001, packed
    assert packed["test_acc"] == packed["reference_acc"]
    assert packed["bytes"] * 16 <= record["model_bytes"], packed
    assert packed["bytes"] == (path.parent / "model.packed.safetensors").stat().st_size
    assert "packed acc." in out.stdout and "latency b=1" in out.stdout
