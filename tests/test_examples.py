"""The example scripts run end to end (in their --fast mode), so they cannot rot."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("prune_existing_trainer.py", [], "% of weights zero"),
        ("lowrank_existing_trainer.py", [], "projected: test accuracy"),
        ("lottery_ticket.py", ["--rounds", "2"], "weights: test accuracy"),
        ("lottery_ticket.py", ["--rounds", "2", "--mode", "reinit"], "reinit: test accuracy"),
        ("prune_and_quantize.py", [], "pruned + int8: test accuracy"),
        ("distill_existing_trainer.py", [], "student distilled + pruned 90% + int8: test"),
        ("search_existing_trainer.py", [], "search: "),
    ],
)
def test_example_runs(script, args, expect):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--fast", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout


def run_fast(script):
    """The example in its --fast mode; it must succeed."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--fast"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_export_example_reloads_the_fake_quantized_model():
    out = run_fast("export_and_run.py")
    match = re.search(r"fake-quantized ([\d.]+)%, packed ([\d.]+)%", out.stdout)
    assert match, out.stdout[-2000:]
    assert abs(float(match[1]) - float(match[2])) <= 0.1
    assert "PackedLinear" not in out.stderr
    assert "smaller" in out.stdout and "batch 256:" in out.stdout


def test_weight_sharing_example_reloads_what_was_trained():
    out = run_fast("share_weights.py")
    match = re.search(r"trained ([\d.]+)%, reloaded ([\d.]+)%", out.stdout)
    assert match, out.stdout[-2000:]
    assert match[1] == match[2]
    assert "codebook 1 x 16" in out.stdout and "smaller" in out.stdout
