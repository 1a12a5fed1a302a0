"""Tiny-ImageNet-200 from the official zip's layout under ``root/tiny-imagenet-200/``.

Classes are numbered in ``wnids.txt`` order (as FL-bench). Samples: the train images (class by class in
that order, files by name), then the val images (by name, labelled from ``val/val_annotations.txt``);
the test split has no labels and is not used. 3x64x64, normalised with FL-bench's statistics.
"""

from __future__ import annotations

from pathlib import Path

from .datasets import Dataset
from .errors import DataError
from .images import labels_tensor, normalise, read_images, require, sorted_files

MEAN = (0.48044, 0.44820, 0.39760)  # FL-bench's (122.5119, 114.2915, 101.388) / 255
STD = (0.23021, 0.22649, 0.22616)  # FL-bench's (58.7048, 57.7551, 57.6717) / 255
FETCH = ("download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into ROOT "
         "(ROOT/tiny-imagenet-200/wnids.txt)")
TITLE = "Tiny-ImageNet-200"


def _annotations(path: Path, index: dict[str, int]) -> dict[str, int]:
    """val_annotations.txt: ``file<TAB>wnid<TAB>x0 y0 x1 y1`` -> {file: label}."""
    out: dict[str, int] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split("\t")
        if not line.strip():
            continue
        if len(parts) < 2 or parts[1] not in index:
            raise DataError(f"{TITLE}: {path} line {n} is not 'file<TAB>wnid...' with a wnid of wnids.txt")
        out[parts[0]] = index[parts[1]]
    return out


def load_tinyimagenet(root: str | Path | None = None, download: bool = False) -> Dataset:
    if download:
        raise DataError(f"{TITLE} is not downloaded automatically; {FETCH}")
    if root is None:
        raise DataError(f"{TITLE} is read from local files: pass --root ROOT; {FETCH}")
    base = Path(root).expanduser() / "tiny-imagenet-200"
    wnids = [w.strip() for w in require(base / "wnids.txt", TITLE, FETCH).read_text().split() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{TITLE}: {base / 'wnids.txt'} must list distinct wnids, one a line; {FETCH}")
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        files = sorted_files(require(base / "train" / wnid / "images", TITLE, FETCH), (".jpeg", ".jpg", ".png"))
        paths += files
        labels += [label] * len(files)
    val = _annotations(require(base / "val" / "val_annotations.txt", TITLE, FETCH), index)
    val_dir = require(base / "val" / "images", TITLE, FETCH)
    for name in sorted(val):
        paths.append(val_dir / name)
        labels.append(val[name])
    x = normalise(read_images(paths, (64, 64), 3, TITLE), MEAN, STD)
    return Dataset("tinyimagenet", x, labels_tensor(labels), len(wnids))
