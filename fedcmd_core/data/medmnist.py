"""MedMNIST organ sets S/A/C (OrganSMNIST, OrganAMNIST, OrganCMNIST) from the official 28x28 npz files.

The npz (keys train/val/test _images uint8 [n,28,28] and _labels [n,1]) is looked up as
``root/medmnist/<file>`` first, then ``root/<file>``. The three splits are concatenated (train, val, test);
11 organ classes, 1x28x28, normalised with FL-bench's per-set statistics.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from .datasets import Dataset
from .errors import DataError
from .images import labels_tensor, normalise

NUM_CLASSES = 11
SPLITS = ("train", "val", "test")
# name -> (file, title, mean, std); FL-bench's statistics on the 0..255 scale, divided by 255.
SETS: dict[str, tuple[str, str, float, float]] = {
    "medmnists": ("organsmnist.npz", "OrganSMNIST (MedMNIST-S)", 124.9587 / 255, 57.5856 / 255),
    "medmnista": ("organamnist.npz", "OrganAMNIST (MedMNIST-A)", 118.7546 / 255, 62.3489 / 255),
    "medmnistc": ("organcmnist.npz", "OrganCMNIST (MedMNIST-C)", 124.424 / 255, 58.8092 / 255),
}
URL = "https://zenodo.org/records/10519652"


def _find(root: Path, file: str, title: str) -> Path:
    for path in (root / "medmnist" / file, root / file):
        if path.is_file():
            return path
    raise DataError(f"{title} not found: missing {root / 'medmnist' / file} (or {root / file}); download "
                    f"{file} (the 28x28 one) from {URL} into {root / 'medmnist'}/")


def load_medmnist(name: str, root: str | Path | None = None, download: bool = False) -> Dataset:
    file, title, mean, std = SETS[name]
    if download:
        raise DataError(f"{title} is not downloaded automatically; get {file} from {URL}")
    if root is None:
        raise DataError(f"{title} is read from the official {file}: pass --root ROOT with ROOT/medmnist/{file}")
    path = _find(Path(root).expanduser(), file, title)
    try:
        with np.load(path, allow_pickle=False) as npz:
            images = [np.asarray(npz[f"{s}_images"]) for s in SPLITS]
            labels = [np.asarray(npz[f"{s}_labels"]).reshape(-1) for s in SPLITS]
    except KeyError as e:
        raise DataError(f"{path} lacks {e}; it is not an official MedMNIST npz") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DataError(f"could not read {path} ({type(e).__name__}: {e}); download it again from {URL}") from None
    for s, im, lab in zip(SPLITS, images, labels, strict=True):
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[1:] != (28, 28) or len(im) != len(lab):
            raise DataError(f"{path}: {s}_images must be uint8 [n,28,28] matching {s}_labels (got {im.dtype} "
                            f"{im.shape}, {len(lab)} labels); use the 28x28 file, not a _64/_128/_224 one")
    y = labels_tensor(np.concatenate(labels))
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise DataError(f"{path}: labels outside 0..{NUM_CLASSES - 1}; it is not an organ MedMNIST file")
    x: torch.Tensor = normalise(np.concatenate(images)[:, None], (mean,), (std,))
    return Dataset(name, x, y, NUM_CLASSES)
