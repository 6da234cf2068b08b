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
