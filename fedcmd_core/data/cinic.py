"""CINIC-10 from its official folder layout: ``root/cinic10/{train,valid,test}/<class>/*.png``.

As FL-bench (and the paper, for every set) all three splits are concatenated, here train, valid, test in
that order; within a split, classes in the canonical order below, files by name. 3x32x32, normalised with
FL-bench's CINIC-10 statistics.
"""

from __future__ import annotations

from pathlib import Path

from .datasets import Dataset
from .errors import DataError
from .images import labels_tensor, normalise, read_images, require, sorted_files

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "valid", "test")
MEAN = (0.47889522, 0.47227842, 0.43047404)
STD = (0.24205776, 0.23828046, 0.25874835)
FETCH = ("download CINIC-10.tar.gz from https://datashare.ed.ac.uk/handle/10283/3192 and extract it so that "
         "ROOT/cinic10/train/airplane/*.png exists")


def load_cinic10(root: str | Path | None = None, download: bool = False) -> Dataset:
    if download:
        raise DataError(f"CINIC-10 is not downloaded automatically; {FETCH}")
    if root is None:
        raise DataError(f"CINIC-10 is read from local files: pass --root ROOT; {FETCH}")
    base = Path(root).expanduser() / "cinic10"
    paths: list[Path] = []
    labels: list[int] = []
    for split in SPLITS:
        for label, name in enumerate(CLASSES):
            folder = require(base / split / name, "CINIC-10", FETCH)
            files = sorted_files(folder, (".png",))
            paths += files
            labels += [label] * len(files)
    if not paths:
        raise DataError(f"CINIC-10 under {base} holds no .png images; {FETCH}")
    x = normalise(read_images(paths, (32, 32), 3, "CINIC-10"), MEAN, STD)
    return Dataset("cinic10", x, labels_tensor(labels), len(CLASSES))
