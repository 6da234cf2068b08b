"""The zoo's ResNet-18 and TinyEncoder: shapes, torchvision's layout, what packing may replace."""

import pytest
import torch
from torch import nn

from lightning_compress.export import plan_layers
from lightning_compress.zoo import ResNet18, TinyEncoder


@pytest.mark.parametrize("size", [32, 64])
def test_resnet18_gives_logits_at_any_image_size(size):
    net = ResNet18(num_classes=7, width=8).eval()
    assert net(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_resnet18_has_torchvisions_layout():
    net = ResNet18(num_classes=1000)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20  # the stem, 16 block convs, 3 downsampling 1x1 convs
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert sum(p.numel() for p in net.parameters()) == 11_689_512  # torchvision's resnet18


def test_resnet18_packs_every_conv_and_the_head():
    net = ResNet18(num_classes=10, width=8)
    plan = plan_layers(net)
    assert len(plan.packable) == 21 and "fc" in plan.packable
    assert plan.unpacked == {}


def test_tiny_encoder_defaults_are_bert_like():
    net = TinyEncoder()
    block = net.blocks[0]
    assert isinstance(block.attn, nn.MultiheadAttention) and block.attn.batch_first
    assert block.attn.embed_dim == 128 and block.attn.num_heads == 4
    assert (block.ffn1.in_features, block.ffn1.out_features) == (128, 512)
    assert len(net.blocks) == 2
    assert net(torch.randint(0, 1000, (3, 32))).shape == (3, 10)


def test_tiny_encoder_keeps_attention_and_embedding_fp32_with_reasons():
    net = TinyEncoder(vocab=50, seq_len=8, hidden=32, heads=2, ffn=64, layers=1, classes=3)
    plan = plan_layers(net)
    assert "inside nn.MultiheadAttention" in plan.unpacked["blocks.0.attn.out_proj"].reason
    assert "nn.MultiheadAttention" in plan.unpacked["blocks.0.attn"].reason
    assert "embed" in plan.unpacked


def test_tiny_encoder_refuses_sequences_longer_than_its_positions():
    net = TinyEncoder(vocab=50, seq_len=8, hidden=32, heads=2, ffn=64, layers=1, classes=3)
    with pytest.raises(ValueError, match=r"`ids` has 9 tokens .* 8 positions"):
        net(torch.zeros(1, 9, dtype=torch.long))
