"""torchvision datasets read from local files in torchvision's own layout under ``root``.

As in the paper, the train and test sets are concatenated (train first). Images are scaled to [0, 1] and
normalised per channel with the constants below (training-set statistics commonly used for each set).
Nothing is downloaded unless ``download=True``; a missing file raises DataError naming the path.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from fedcmd_core.atomic import atomic_write

from .dataset import Dataset
from .errors import DataError

EMNIST_SPLITS: dict[str, int] = {
    "byclass": 62, "bymerge": 47, "balanced": 47, "letters": 27, "digits": 10, "mnist": 10,
}  # letters: labels 1..26, torchvision keeps an unused class 0 ("N/A")
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
_CHUNK = 65536  # samples converted to float at a time, to bound the temporary memory


@dataclass(frozen=True)
class _Spec:
    title: str
    files: Callable[[dict[str, Any]], list[str]]  # paths relative to root, from the options
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: Callable[[dict[str, Any]], int]
    open_split: Callable[[Path, bool, bool, dict[str, Any]], tuple[np.ndarray | torch.Tensor, Any]]


def _mnist_family(cls_name: str) -> Callable[[Path, bool, bool, dict[str, Any]], tuple[Any, Any]]:
    def open_split(root: Path, train: bool, download: bool, options: dict[str, Any]) -> tuple[Any, Any]:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        extra = {"split": options["split"]} if cls_name == "EMNIST" else {}
        ds = cls(str(root), train=train, download=download, **extra)
        return ds.data.unsqueeze(1), ds.targets  # uint8 [N,1,28,28], int64 [N]

    return open_split


def _open_cifar(cls_name: str) -> Callable[[Path, bool, bool, dict[str, Any]], tuple[Any, Any]]:
    def open_split(root: Path, train: bool, download: bool, options: dict[str, Any]) -> tuple[Any, Any]:
        import torchvision.datasets as tvd

        ds = getattr(tvd, cls_name)(str(root), train=train, download=download)
        return np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), ds.targets  # HWC -> CHW

    return open_split


def _open_svhn(root: Path, train: bool, download: bool, options: dict[str, Any]) -> tuple[Any, Any]:
    from torchvision.datasets import SVHN

    ds = SVHN(str(root), split="train" if train else "test", download=download)
    return ds.data, ds.labels  # already [N,3,32,32], digit 0 relabelled from 10 to 0


def _open_usps(root: Path, train: bool, download: bool, options: dict[str, Any]) -> tuple[Any, Any]:
    from torchvision.datasets import USPS

    ds = USPS(str(root), train=train, download=download)
    return ds.data[:, None], ds.targets  # [N,1,16,16], labels 0..9


def _emnist_files(options: dict[str, Any]) -> list[str]:
    split = options["split"]
    return [f"EMNIST/raw/emnist-{split}-{part}-{kind}-ubyte"
            for part in ("train", "test") for kind in ("images-idx3", "labels-idx1")]


_SPECS: dict[str, _Spec] = {
    "mnist": _Spec("MNIST", lambda o: [f"MNIST/raw/{f}" for f in _MNIST_FILES],
                   (0.1307,), (0.3081,), lambda o: 10, _mnist_family("MNIST")),
    "fmnist": _Spec("FashionMNIST", lambda o: [f"FashionMNIST/raw/{f}" for f in _MNIST_FILES],
                    (0.2860,), (0.3530,), lambda o: 10, _mnist_family("FashionMNIST")),
    "emnist": _Spec("EMNIST", _emnist_files, (0.1736,), (0.3317,),
                    lambda o: EMNIST_SPLITS[o["split"]], _mnist_family("EMNIST")),
    "cifar10": _Spec("CIFAR-10", lambda o: [f"cifar-10-batches-py/{f}" for f in (
        "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
        "batches.meta")], (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), lambda o: 10,
        _open_cifar("CIFAR10")),
    "cifar100": _Spec("CIFAR-100", lambda o: ["cifar-100-python/train", "cifar-100-python/test",
                                              "cifar-100-python/meta"],
                      (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), lambda o: 100,
                      _open_cifar("CIFAR100")),
    "svhn": _Spec("SVHN", lambda o: ["train_32x32.mat", "test_32x32.mat"],
                  (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), lambda o: 10, _open_svhn),
    "usps": _Spec("USPS", lambda o: ["usps.bz2", "usps.t.bz2"], (0.2469,), (0.2989,), lambda o: 10,
                  _open_usps),
}


def _extract_gz(path: Path) -> None:
    """torchvision reads the MNIST family uncompressed; unpack a lone ``.gz`` the way its download does."""
    gz = path.with_name(path.name + ".gz")
    if path.is_file() or not gz.is_file():
        return
    def unpack(dst: BinaryIO) -> None:
        with gzip.open(gz, "rb") as src:
            shutil.copyfileobj(src, dst)

    try:
        atomic_write(path, unpack)
    except (OSError, EOFError) as e:
        raise DataError(f"could not unpack {gz}: {e}; replace it with a good copy") from e


def _check_files(name: str, spec: _Spec, root: Path, options: dict[str, Any]) -> None:
    rel = spec.files(options)
    paths = [root / r for r in rel]
    if name in ("mnist", "fmnist", "emnist"):
        for p in paths:
            _extract_gz(p)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        where = sorted({str(Path(r).parent) for r in rel})
        folder = root if where == ["."] else root / where[0]
        names = ", ".join(Path(r).name for r in rel)
        raise DataError(
            f"{spec.title} not found: missing {missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; put the torchvision files "
            f"under {folder}/ ({names}) or pass --download where the network allows"
        )


def _to_float(parts: list[tuple[Any, Any]], mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    arrays = [torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x for x, _ in parts]
    total = sum(int(a.shape[0]) for a in arrays)
    out = torch.empty((total, *arrays[0].shape[1:]), dtype=torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    start = 0
    for a in arrays:
        for i in range(0, int(a.shape[0]), _CHUNK):
            chunk = a[i:i + _CHUNK]
            out[start:start + len(chunk)] = (chunk.float() / 255.0 - m) / s
            start += len(chunk)
    return out


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_vision(name: str, root: str | Path | None, download: bool = False, **options: Any) -> Dataset:
    """Load torchvision set ``name`` from ``root`` as one Dataset: train samples, then test samples."""
    spec = _SPECS[name]
    if name == "emnist":
        options = {"split": "byclass", **options}
        if options["split"] not in EMNIST_SPLITS:
            raise DataError(f"unknown EMNIST split {options['split']!r}; "
                            f"choose one of {', '.join(EMNIST_SPLITS)}")
    if root is None:
        raise DataError(
            f"{spec.title} is read from local torchvision files: pass --root DIR with "
            f"DIR/{spec.files(options)[0]} and the rest of its files (or --download where the network allows)"
        )
    root = Path(root).expanduser()
    if not download:
        _check_files(name, spec, root, options)
    try:
        parts = [spec.open_split(root, train, download, options) for train in (True, False)]
    except RuntimeError as e:
        # After the existence check, torchvision's RuntimeError means a failed md5 or a failed download.
        how = "download failed" if download else "files failed torchvision's integrity (md5) check"
        raise DataError(
            f"{spec.title} under {root}: {how} ({_first_line(e)}); put fresh official files under "
            f"{root / Path(spec.files(options)[0]).parent}/ or pass --download where the network allows"
        ) from e
    except (OSError, EOFError, ValueError, TypeError, KeyError, AssertionError, pickle.UnpicklingError) as e:
        fix = "check the network or put the files there by hand" if download else "use the official files"
        raise DataError(f"could not read {spec.title} files under {root} ({_first_line(e)}); {fix}") from e
    y = torch.cat([torch.as_tensor(np.asarray(t), dtype=torch.int64).reshape(-1) for _, t in parts])
    x = _to_float(parts, spec.mean, spec.std)
    num_classes = spec.num_classes(options)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{spec.title} under {root}: {x.shape[0]} images but {y.shape[0]} labels; "
                        f"replace the files with the official ones")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"{spec.title} under {root}: labels outside 0..{num_classes - 1}; "
                        f"replace the files with the official ones")
    return Dataset(name, x, y, num_classes, options=dict(options))
