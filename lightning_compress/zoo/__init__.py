"""Example models and offline datamodules."""

from lightning_compress.zoo.data import Digits, MNIST5k, MNISTIdx
from lightning_compress.zoo.models import BNConvNet, LeNet5, LeNet300100, ResNet18, TinyEncoder
from lightning_compress.zoo.module import ClassificationModule

__all__ = [
    "BNConvNet",
    "ClassificationModule",
    "Digits",
    "LeNet5",
    "LeNet300100",
    "MNIST5k",
    "MNISTIdx",
    "ResNet18",
    "TinyEncoder",
]
