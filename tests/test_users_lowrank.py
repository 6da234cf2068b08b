"""LowRankCallback on the models users train: GPT-2 (Conv1D, tied head), BERT, a ResNet."""

import pytest
import torch

from lightning_compress import LowRankCallback
from lightning_compress.layout import layout_for_name

from .helpers import make_trainer
from .users import ResNetModule


def _ranks(module, names):
    out = {}
    for name in names:
        matrix = layout_for_name(module, name).matrix(module.get_parameter(name).detach())
        s = torch.linalg.svdvals(matrix.double())
        out[name] = int((s > 1e-5 * s[0]).sum())
    return out


@pytest.mark.parametrize("method", ["projected", "factored"])
def test_gpt2_conv1d_projections_are_held_at_rank_along_their_in_out_layout(tmp_path, method):
    pytest.importorskip("transformers")
    from .users import GPT2Module

    module = GPT2Module(n=32)
    lowrank = LowRankCallback(rank=4, schedule="oneshot", start=0, method=method)
    make_trainer(tmp_path, [lowrank], max_epochs=2).fit(module)
    assert lowrank.targets and all(".c_" in n for n in lowrank.targets)  # the tied head left out
    assert module.model.lm_head.weight is module.model.transformer.wte.weight
    assert _ranks(module, lowrank.targets) == dict.fromkeys(lowrank.targets, 4)
    for name in lowrank.targets:  # the record's factors multiply back to the (in, out) weight
        layer = lowrank.record[name]
        weight = module.get_parameter(name).detach()
        assert torch.allclose(layer.matrix(), weight.T, atol=1e-5)


def test_bert_attention_projections_at_a_fraction_of_their_rank(tmp_path):
    pytest.importorskip("transformers")
    from .users import BertModule

    module = BertModule(n=32)
    lowrank = LowRankCallback(
        rank=0.25, schedule="oneshot", start=0, include=["query", "key", "value"]
    )
    make_trainer(tmp_path, [lowrank], max_epochs=1).fit(module)
    assert any(n.endswith("query.weight") for n in lowrank.targets)
    ranks = _ranks(module, lowrank.targets)
    assert all(ranks[n] <= lowrank.ranks[n] < min(module.get_parameter(n).shape) for n in ranks)


def test_resnet_convolutions_before_batchnorm_are_factored(tmp_path):
    module = ResNetModule(width=8, n=32)
    lowrank = LowRankCallback(
        rank=0.5, schedule="oneshot", start=0, include="*.conv*", method="factored"
    )
    make_trainer(tmp_path, [lowrank], max_epochs=1).fit(module)
    convs = [n for n in lowrank.targets if "conv" in n]
    assert convs and _ranks(module, convs) == {n: lowrank.ranks[n] for n in convs}
