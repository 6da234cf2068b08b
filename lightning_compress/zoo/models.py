"""Example networks. Layer names follow the papers (``fc1``..., ``conv1``...) so recipes can
target them by name."""

from __future__ import annotations

import math

import torch
from torch import nn


class LeNet300100(nn.Module):
    """LeNet-300-100: a 784-300-100-10 MLP (Han et al. 2015, Frankle & Carbin 2019).

    Args:
        input_shape: (channels, height, width) of one example; flattened.
        num_classes: Output classes.
        hidden: Hidden widths.
        dropout: Dropout probability after each hidden layer (Hinton et al. 2015's teacher: 0.5).
        input_dropout: Dropout probability on the input pixels (0.2 in the same recipe).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        hidden: tuple[int, int] = (300, 100),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_features = math.prod(input_shape)
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)
        self.input_dropout = nn.Dropout(input_dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(self.input_dropout(x.flatten(1))))
        x = torch.relu(self.fc2(self.dropout(x)))
        return self.fc3(self.dropout(x))


class LeNet5(nn.Module):
    """LeNet-5, Caffe variant: conv 20 (5x5), pool, conv 50 (5x5), pool, fc 500, fc classes.

    Args:
        input_shape: (channels, height, width); height and width must be at least 12.
        num_classes: Output classes.
    """

    def __init__(
        self, input_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        if min(height, width) < 12:
            raise ValueError(f"LeNet5 needs images of at least 12x12, got {height}x{width}")
        self.conv1 = nn.Conv2d(channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        h, w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(50 * h * w, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(self.conv1(x), 2)
        x = torch.max_pool2d(self.conv2(x), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class BNConvNet(nn.Module):
    """A small conv net with BatchNorm: two conv-BN-ReLU blocks, global pooling, a linear head.

    Args:
        input_shape: (channels, height, width).
        num_classes: Output classes.
        width: Channels of the first block (the second has twice as many).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        width: int = 16,
    ) -> None:
        super().__init__()
        channels = input_shape[0]
        self.conv1 = nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.max_pool2d(x, 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two 3x3 conv-BN, ReLU between, a residual add.

    Args:
        inplanes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution.
        downsample: Applied to the input of the residual add where the shape changes
            (a 1x1 conv-BN); None for the identity.
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` architecture (layers [2, 2, 2, 2]) at base width ``width``,
    written out so that nothing depends on torchvision (whose only build beside the CPU torch
    fails to import).

    Args:
        num_classes: Output classes.
        width: Channels of the first stage (64 in torchvision; later stages double it).
    """

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, 2)
        self.layer2 = self._make_layer(width * 2, 2, stride=2)
        self.layer3 = self._make_layer(width * 4, 2, stride=2)
        self.layer4 = self._make_layer(width * 8, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class EncoderBlock(nn.Module):
    """Post-norm self-attention and a GELU feed-forward, the feed-forward as two nn.Linear.

    Args:
        hidden: Width of the block's input and output.
        heads: Attention heads (nn.MultiheadAttention, batch first).
        ffn: Feed-forward width.
    """

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn1 = nn.Linear(hidden, ffn)
        self.ffn2 = nn.Linear(ffn, hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.ffn2(nn.functional.gelu(self.ffn1(x))))


class TinyEncoder(nn.Module):
    """A BERT-like encoder classifier: token and learned position embeddings, ``layers``
    :class:`EncoderBlock`, mean pooling, a linear head. ``forward(ids)`` takes int64 token ids
    ``[batch, length]``, ``length`` at most ``seq_len``.

    Args:
        vocab: Token vocabulary size.
        seq_len: Longest sequence (learned positions).
        hidden: Model width; a multiple of ``heads``.
        heads: Attention heads.
        ffn: Feed-forward width.
        layers: Encoder blocks.
        classes: Output classes.
    """

    def __init__(
        self,
        vocab: int = 1000,
        seq_len: int = 32,
        hidden: int = 128,
        heads: int = 4,
        ffn: int = 512,
        layers: int = 2,
        classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.position = nn.Parameter(torch.randn(seq_len, hidden) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(hidden, heads, ffn) for _ in range(layers))
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.position.shape[0]:
            raise ValueError(
                f"`ids` has {ids.shape[1]} tokens per sequence, more than the "
                f"{self.position.shape[0]} positions (`seq_len`) the model was built with"
            )
        x = self.embed(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))
