import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_prune_script.py")


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_masks_identical_across_two_cpu_processes(tmp_path, criterion):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), criterion],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["masks"] == records[1]["masks"]
    assert records[0]["weights"] == records[1]["weights"]
    # 64 samples / 8 per batch / 2 ranks = 4 optimizer steps per epoch: events on that clock.
    assert records[0]["events"] == records[1]["events"]
    assert records[0]["events"][-1] == 8
    assert records[0]["global_step"] == 12
    assert abs(records[0]["sparsity"] - 0.8) < 1e-3


def test_flipout_counts_and_masks_identical_across_two_cpu_processes(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "flipout"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0]["flips"] == records[1]["flips"]
    assert records[0]["masks"] == records[1]["masks"]
    assert records[0]["weights"] == records[1]["weights"]  # same noise, same rewinds
    assert records[0]["events"] == [4, 8]
    assert abs(records[0]["sparsity"] - 0.75) < 1e-3


def test_quantizer_state_identical_across_two_cpu_processes(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "qat"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0]["observers"] is not None
    assert records[0]["observers"] == records[1]["observers"]
    assert records[0]["masks"] == records[1]["masks"]
    assert records[0]["weights"] == records[1]["weights"]
