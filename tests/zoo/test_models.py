import pytest
import torch

from lightning_compress.zoo import BNConvNet, LeNet5, LeNet300100


@pytest.mark.parametrize("cls", [LeNet300100, LeNet5, BNConvNet])
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 16, 16)])
def test_forward_gives_logits(cls, shape):
    if cls is LeNet5 and min(shape[1:]) < 12:
        with pytest.raises(ValueError, match="at least 12x12"):
            cls(input_shape=shape, num_classes=7)
        return
    net = cls(input_shape=shape, num_classes=7)
    out = net(torch.randn(4, *shape))
    assert out.shape == (4, 7)


def test_lenet300_layer_sizes_follow_the_paper():
    net = LeNet300100()
    sizes = [tuple(m.weight.shape) for m in (net.fc1, net.fc2, net.fc3)]
    assert sizes == [(300, 784), (100, 300), (10, 100)]
    assert sum(p.numel() for p in net.parameters()) == 266_610


def test_lenet5_is_the_caffe_variant():
    net = LeNet5()
    assert net.conv1.out_channels == 20 and net.conv2.out_channels == 50
    assert net.fc1.in_features == 800 and net.fc1.out_features == 500


def test_tiny_encoder_packs_its_feed_forward_and_keeps_attention_fp32():
    from lightning_compress.export import plan_layers
    from lightning_compress.zoo import TinyEncoder

    net = TinyEncoder(vocab=50, seq_len=12, hidden=32, heads=4, ffn=64, layers=2, classes=3)
    ids = torch.randint(0, 50, (5, 12))
    assert net(ids).shape == (5, 3)
    assert net(ids[:, :7]).shape == (5, 3)  # shorter sequences use the first positions
    plan = plan_layers(net)
    assert set(plan.packable) == {f"blocks.{i}.ffn{j}" for i in (0, 1) for j in (1, 2)} | {"head"}
    assert "blocks.0.attn" in plan.unpacked
