from pathlib import Path

from tests.callbacks.test_prune_ddp import run_two_ranks

SCRIPT = Path(__file__).with_name("ddp_lowrank_script.py")


def test_ranks_bases_and_weights_identical_across_two_cpu_processes(tmp_path):
    records = run_two_ranks(tmp_path, "plain", SCRIPT)
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["weights"] == records[1]["weights"]
    assert records[0]["bases"] == records[1]["bases"]
    assert records[0]["ranks"] == records[1]["ranks"] == {"fc1.weight": 8, "fc2.weight": 4}
    # 64 samples / 8 per batch / 2 ranks = 4 optimizer steps per epoch: events on that clock.
    assert records[0]["events"] == [0, 2, 4, 6, 8] and records[0]["global_step"] == 12
    assert records[0]["max_rank"] == records[0]["ranks"]
