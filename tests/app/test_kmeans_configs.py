"""The weight-sharing config and the Deep Compression recipes build a k-means QATCallback."""

import pytest

from lightning_compress import PruneCallback, QATCallback
from lightning_compress.app.build import build_job


def _callback(job, kind):
    (callback,) = [c for c in job.callbacks if isinstance(c, kind)]
    return callback


def test_kmeans4_option_is_weight_sharing_at_4_bits(compose_cfg):
    job = build_job(compose_cfg(["qat=kmeans4", "logger=none"]))
    qat = _callback(job, QATCallback)
    assert qat.scheme == "kmeans" and qat.bits == 4 and qat.groups == 1
    assert qat.activations is None and qat.refresh is None


@pytest.mark.parametrize(
    ("recipe", "bits", "overrides", "start"),
    [
        ("deep_compression_lenet300", 4, {}, "24ep"),
        ("deep_compression_lenet5", 4, {"conv1": 6, "conv2": 6}, "16ep"),
    ],
)
def test_deep_compression_recipes_prune_then_share(compose_cfg, recipe, bits, overrides, start):
    job = build_job(compose_cfg([f"recipe={recipe}", "logger=none"]))
    qat = _callback(job, QATCallback)
    assert (qat.scheme, qat.bits, qat.overrides, str(qat.start)) == (
        "kmeans",
        bits,
        overrides,
        start,
    )
    prune = _callback(job, PruneCallback)
    # Shared once the pruned network has been fine-tuned, re-assigned every 10 steps.
    assert prune.sparsity in (0.965, 0.95) and prune.end.value < qat.start.value
    assert str(qat.refresh) == "10it"
