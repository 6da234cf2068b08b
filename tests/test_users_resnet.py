"""A torchvision-style ResNet-18 (local copy, see tests/users.py): prune + int8 QAT + pack."""

import pytest
import torch
from torch import nn

from lightning_compress import PruneCallback, QATCallback
from lightning_compress.export import PackedConv2d, PackedLinear, load_into, pack, read

from .helpers import make_trainer
from .users import ResNet18, ResNetModule, colour_blobs


def _accuracy(model, data):
    x, y = data.tensors
    with torch.no_grad():
        return float((model.eval()(x).argmax(-1) == y).float().mean()), model(x)


@pytest.mark.slow
def test_resnet18_pruned_and_quantized_packs_into_the_model_it_trained(tmp_path):
    module = ResNetModule(width=8, n=128)
    qat = QATCallback(bits=8, start="2ep")
    prune = PruneCallback(sparsity=0.8, start="1ep", end="5ep", exclude=["^model.conv1"])
    trainer = make_trainer(tmp_path, [prune, qat], max_epochs=8, accumulate_grad_batches=2)
    trainer.fit(module)
    convs = [n for n, m in module.model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20  # the stem, 16 block convs, 3 downsampling 1x1 convs
    assert "model.conv1.weight" not in prune.targets  # the stem alone, not every block's conv1
    assert "model.layer1.0.conv1.weight" in prune.targets
    assert len(qat.layers.folds) == 20  # every conv quantized with its BatchNorm folded in

    data = colour_blobs(64, 1000)
    trained_acc, trained = _accuracy(module.model, data)  # the fake-quantized model after fit
    path = pack(module.model, tmp_path / "resnet.safetensors", qat=qat)
    qat.remove(module)
    reloaded = ResNet18(num_classes=4, width=8)
    reloaded.load_state_dict(module.model.state_dict())
    load_into(reloaded, path)
    packed_acc, packed = _accuracy(reloaded, data)
    assert packed_acc == trained_acc
    assert (packed.argmax(-1) == trained.argmax(-1)).float().mean() >= 0.98
    packed_names = {e["name"] for e in read(path).layers}
    for name in convs:
        assert isinstance(reloaded.get_submodule(name), PackedConv2d), name
        assert name in packed_names
    assert isinstance(reloaded.fc, PackedLinear)
