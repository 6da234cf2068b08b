import gzip
import struct

import numpy as np
import pytest
import torch

from lightning_compress.zoo import Digits, MNIST5k, MNISTIdx
from lightning_compress.zoo.data import random_shift, read_idx


def _indices(dataset):
    return {tuple(x.flatten()[:50].tolist()) for x, _ in dataset}


def test_mnist5k_split_sizes_disjoint_balanced_and_seeded():
    dm = MNIST5k(seed=0)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (3500, 500, 1000)
    test_labels = dm.test_set.tensors[1]
    assert torch.bincount(test_labels, minlength=10).tolist() == [100] * 10
    again = MNIST5k(seed=0)
    again.setup()
    assert torch.equal(dm.test_set.tensors[0], again.test_set.tensors[0])
    other = MNIST5k(seed=1)
    other.setup()
    assert not torch.equal(dm.test_set.tensors[0], other.test_set.tensors[0])
    train, test = dm.train_set.tensors[0], dm.test_set.tensors[0]
    # No image appears in two splits (rows compared exactly).
    joined = torch.cat([train.flatten(1), test.flatten(1)])
    assert torch.unique(joined, dim=0).shape[0] == joined.shape[0]
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28)
    assert abs(float(train.mean())) < 0.1  # normalised


def test_digits_splits():
    dm = Digits(seed=0)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1197, 300, 300)
    assert dm.input_shape == (1, 8, 8)


def test_random_shift_moves_content_and_keeps_shape():
    torch.manual_seed(0)
    x = torch.zeros(16, 1, 10, 10)
    x[:, :, 4:6, 4:6] = 1.0
    shifted = random_shift(x, 2)
    assert shifted.shape == x.shape
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # nothing cut off
    assert not torch.equal(shifted, x)
    assert torch.equal(random_shift(x, 0), x)


def _write_idx(path, array, gz=False):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(data)


def make_idx_dir(root, n_train=120, n_test=30, gz=False, layout="torchvision"):
    folder = root / "MNIST" / "raw" if layout == "torchvision" else root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(
            folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz
        )
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,)), gz)
    return folder


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_mnist_idx_reads_files(tmp_path, gz, layout):
    make_idx_dir(tmp_path, gz=gz, layout=layout)
    dm = MNISTIdx(root=str(tmp_path), val_size=20)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (100, 20, 30)
    assert dm.train_set.tensors[0].shape[1:] == (1, 28, 28)


def test_mnist_idx_missing_directory(tmp_path):
    dm = MNISTIdx(root=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dm.setup()


def test_mnist_idx_missing_file_is_named(tmp_path):
    folder = make_idx_dir(tmp_path)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        MNISTIdx(root=str(tmp_path), val_size=20).setup()


def test_idx_bad_magic_and_truncation(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(ValueError, match="unsigned-byte"):
        read_idx(path, ndim=3)
    good = tmp_path / "good"
    _write_idx(good, np.zeros((5, 28, 28)))
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(truncated, ndim=3)
    with pytest.raises(ValueError, match="too short"):
        (tmp_path / "tiny").write_bytes(b"\x00")
        read_idx(tmp_path / "tiny", ndim=1)


def test_mnist_idx_label_count_mismatch(tmp_path):
    folder = make_idx_dir(tmp_path)
    _write_idx(folder / "train-labels-idx1-ubyte", np.zeros(119))
    with pytest.raises(ValueError, match="disagree"):
        MNISTIdx(root=str(tmp_path), val_size=20).setup()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"root": "x", "dataset": "CIFAR"}, "`dataset`"),
        ({"root": None}, "`root`"),
        ({"root": "x", "batch_size": 0}, "`batch_size`"),
        ({"root": "x", "shift": -1}, "`shift`"),
    ],
)
def test_mnist_idx_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MNISTIdx(**kwargs)
