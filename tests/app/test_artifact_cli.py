"""``lightning-compress-artifact`` on a run directory, as a user runs it (subprocesses)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_compress.export import read


def run(exe, args, cwd):
    path = shutil.which(exe) or str(Path(sys.executable).parent / exe)
    return subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("job")
    out = run(
        "lightning-compress",
        ["trainer=fast", "logger=none", "trainer.limit_train_batches=20", "hydra.run.dir=run"],
        cwd,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd / "run"


def test_run_directory_holds_checkpoint_and_artifact(run_dir):
    record = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "last.ckpt").is_file()
    art = read(run_dir / "model.packed.safetensors")
    assert [e["name"] for e in art.layers] == ["fc1", "fc2", "fc3"]
    # int8 activations recorded; the logits (fc3's output) stay float, as QAT trained them
    assert [e["act"] is not None for e in art.layers] == [True, True, False]
    assert record["packed"]["test_acc"] == record["packed"]["reference_acc"]


def test_export_from_checkpoint_reproduces_the_runs_artifact(run_dir, tmp_path):
    target = tmp_path / "again.safetensors"
    out = run(
        "lightning-compress-artifact", ["export", str(run_dir), "--out", str(target)], tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fc1" in out.stdout and "smaller" in out.stdout
    first, again = read(run_dir / "model.packed.safetensors"), read(target)
    assert first.layers == again.layers
    assert first.tensors.keys() == again.tensors.keys()
    for key, value in first.tensors.items():
        assert torch.equal(value, again.tensors[key]), key


def test_bench_and_report(run_dir, tmp_path):
    out = run(
        "lightning-compress-artifact",
        ["bench", str(run_dir), "--batches", "1", "8", "--reps", "2"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "packed" in out.stdout and "speed-up" in out.stdout
    lines = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(line[0]) for line in lines] == [1, 8]
    out = run(
        "lightning-compress-artifact",
        ["report", str(run_dir / "model.packed.safetensors")],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fc2" in out.stdout and "bytes on disk" in out.stdout


def test_bad_artifact_and_missing_run_fail_with_a_message(run_dir, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((run_dir / "model.packed.safetensors").read_bytes()[:-10])
    out = run("lightning-compress-artifact", ["report", str(broken)], tmp_path)
    assert out.returncode == 2 and "error" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    out = run("lightning-compress-artifact", ["export", str(tmp_path / "nothing")], tmp_path)
    assert out.returncode == 2 and "config.yaml" in out.stderr, out.stderr
