"""The callbacks on a Hugging Face GPT-2 (Conv1D projections, a tied head) in a user's module."""

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from lightning_compress import PruneCallback  # noqa: E402

from .helpers import make_trainer  # noqa: E402
from .users import GPT2Module, fit_and_validate  # noqa: E402


def _conv1d(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}


def test_default_pruning_prunes_every_conv1d_and_keeps_the_tied_head_tied(tmp_path, caplog):
    module = GPT2Module(n=64)
    prune = PruneCallback(sparsity=0.8, schedule="oneshot", start=0)
    with caplog.at_level(logging.INFO, logger="lightning_compress.targets"):
        make_trainer(tmp_path, callbacks=[prune], max_epochs=1).fit(module)
    layers = _conv1d(module.model)
    assert sorted(prune.targets) == sorted(f"model.{n}.weight" for n in layers)
    kept = sum(int(torch.count_nonzero(m.weight)) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    assert kept / total == pytest.approx(0.2, abs=1e-3)
    assert module.model.lm_head.weight is module.model.transformer.wte.weight
    assert "model.lm_head.weight" in caplog.text and "tied to" in caplog.text


def test_two_four_groups_run_along_each_conv1d_reduction_dimension(tmp_path):
    module = GPT2Module(n=64)
    prune = PruneCallback(structure="2:4", schedule="oneshot", start=0)
    make_trainer(tmp_path, callbacks=[prune], max_epochs=1).fit(module)
    for name, layer in _conv1d(module.model).items():
        weight = layer.weight.detach()  # (in, out): y = x @ W
        groups = weight.t().reshape(weight.shape[1], -1, 4)  # runs of 4 inputs per output
        per_group = (groups != 0).sum(-1)
        assert int(per_group.max()) <= 2, name
        assert (weight == 0).float().mean().item() == pytest.approx(0.5), name


@pytest.mark.slow
def test_prune_and_int8_qat_of_gpt2_pack_and_reload_as_trained(tmp_path):
    from lightning_compress import QATCallback
    from lightning_compress.export import PackedLinear, load_into, pack, report

    epochs = 30

    def fit(callbacks):
        module = GPT2Module(n=256)
        return module, fit_and_validate(tmp_path, module, callbacks, epochs)

    _, dense = fit([])
    qat = QATCallback(bits=8)
    module, compressed = fit([PruneCallback(sparsity=0.8, start="2ep", end="10ep"), qat])
    assert dense >= 0.7, "the float model must learn the task for the comparison to mean much"
    assert compressed >= dense - 0.03, (dense, compressed)
    layers = _conv1d(module.model)
    for name, layer in layers.items():
        record = qat.record[f"model.{name}.weight"]
        out_features = layer.weight.shape[1]  # Conv1D: (in, out)
        assert record.scale.shape == (out_features,), name  # one scale per output channel
    assert module.model.lm_head.weight is module.model.transformer.wte.weight

    path = pack(module.model, tmp_path / "gpt2.safetensors", qat=qat)
    ids = next(iter(module.val_dataloader()))["input_ids"]
    with torch.no_grad():
        trained = module.eval()(ids)  # still the fake-quantized model after fit
        qat.remove(module)
        reloaded = GPT2Module(n=256)
        reloaded.model.load_state_dict(module.model.state_dict())
        load_into(reloaded.model, path)
        packed = reloaded.eval()(ids)
    assert all(isinstance(reloaded.model.get_submodule(name), PackedLinear) for name in layers)
    assert reloaded.model.lm_head.weight is reloaded.model.transformer.wte.weight
    assert torch.equal(trained.argmax(-1), packed.argmax(-1))
    assert torch.allclose(trained, packed, atol=1e-3 * trained.abs().max())
    text = str(report(path))
    assert "lm_head" in text and "tied" in text
