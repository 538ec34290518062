"""Datasets and the Dirichlet split."""

import gzip
import os

import numpy as np
import pytest
import torch

from spafl_fl.data import (
    CIFAR10_FILES,
    FMNIST_FILES,
    Dataset,
    load_cifar10,
    load_dataset,
    load_fmnist,
    load_synthetic,
    split_dirichlet,
)


def _pooled(n=600, classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)  # the value names the sample
    return Dataset("toy", x, torch.randint(classes, (n,), generator=gen), classes)


def test_pooled_split_covers_every_sample_once():
    data = _pooled()
    clients = split_dirichlet(data, 8, alpha=0.3, seed=1)
    ids = torch.cat([torch.cat([c.x_train.flatten(), c.x_test.flatten()]) for c in clients]).long()
    assert sorted(ids.tolist()) == list(range(600))
    for c in clients:
        assert c.num_train >= 2 and c.y_test.numel() >= 1
        assert set(c.x_train.flatten().tolist()).isdisjoint(c.x_test.flatten().tolist())
        assert torch.equal(c.y_train, data.y[c.x_train.flatten().long()])


def test_split_is_seeded_and_non_iid():
    data = _pooled()
    a = split_dirichlet(data, 8, alpha=0.1, seed=5)
    b = split_dirichlet(data, 8, alpha=0.1, seed=5)
    c = split_dirichlet(data, 8, alpha=0.1, seed=6)
    assert all(torch.equal(x.x_train, y.x_train) and torch.equal(x.x_test, y.x_test) for x, y in zip(a, b))
    assert any(not torch.equal(x.x_train, y.x_train) for x, y in zip(a, c))
    # alpha = 0.1 concentrates classes: most clients miss some class entirely.
    missing = [10 - len(torch.unique(cl.y_train)) for cl in a]
    assert np.mean(missing) >= 2


def test_official_test_set_follows_the_train_proportions():
    data = _pooled(400)
    data.x_test = torch.arange(400, 600, dtype=torch.float32).view(-1, 1, 1, 1)
    data.y_test = torch.randint(10, (200,), generator=torch.Generator().manual_seed(2))
    clients = split_dirichlet(data, 5, alpha=1.0, seed=0)
    assert sorted(torch.cat([c.x_train.flatten() for c in clients]).long().tolist()) == list(range(400))
    assert sorted(torch.cat([c.x_test.flatten() for c in clients]).long().tolist()) == list(range(400, 600))


def test_impossible_split_says_why():
    with pytest.raises(ValueError, match="fewer clients or a larger alpha"):  # possible, but not drawn
        split_dirichlet(_pooled(30), 10, alpha=0.01, seed=0, max_attempts=5)
    with pytest.raises(ValueError, match="use at most 10 clients"):  # impossible: said before any draw
        split_dirichlet(_pooled(30), 20, alpha=0.01, seed=0, max_attempts=5)


def test_bundled_datasets_load_offline():
    digits = load_dataset("digits")
    assert digits.x.shape == (1797, 1, 8, 8) and digits.x.max() <= 1 and digits.y.max() == 9
    mnist = load_dataset("mnist5k")
    assert mnist.x.shape == (5000, 1, 28, 28) and mnist.x.dtype == torch.float32
    assert torch.bincount(mnist.y).tolist() == [500] * 10
    synthetic = load_synthetic(num_samples=50, shape=(3, 8, 8))
    assert synthetic.x.shape == (50, 3, 8, 8) and 0 <= synthetic.x.min() and synthetic.x.max() <= 1


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path + ".gz", "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fmnist_reads_idx_files_and_names_them_when_absent(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        load_fmnist(str(tmp_path))
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in zip(FMNIST_FILES, (6, 6, 4, 4)):
        shape = (n, 28, 28) if "images" in name else (n,)
        _write_idx(os.path.join(raw, name), rng.integers(0, 10 if "labels" in name else 256, shape))
    data = load_fmnist(str(tmp_path))
    assert data.x.shape == (6, 1, 28, 28) and data.x_test.shape == (4, 1, 28, 28) and data.y_test.shape == (4,)


def test_cifar10_reads_the_binary_release(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.bin.*test_batch.bin"):
        load_cifar10(str(tmp_path))
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in CIFAR10_FILES:
        records = rng.integers(0, 256, (3, 3073)).astype(np.uint8)
        records[:, 0] = [1, 2, 3]
        (folder / name).write_bytes(records.tobytes())
    data = load_cifar10(str(tmp_path))
    assert data.x.shape == (15, 3, 32, 32) and data.y.tolist() == [1, 2, 3] * 5 and data.x_test.shape[0] == 3
