"""DomainNet from the official layout: ``root/domainnet/<domain>/<class>/<img>.jpg`` and the split files
``root/domainnet/<domain>_{train,test}.txt`` (lines ``clipart/aircraft_carrier/clipart_001_000018.jpg 0``).

As FL-bench's preprocessing: a subset of ``class_num`` classes (default 10) drawn with Python's
``random.Random(42).sample`` from the sorted class names, then sorted and numbered 0..class_num-1; images
resized to ``image_size`` (default 64; square, where FL-bench's Resize(64) keeps the aspect ratio) and
normalised with the ImageNet statistics FL-bench uses. Samples: domain by domain in the order below, each
domain's train lines then its test lines. The natural partition is one part per domain.
"""

from __future__ import annotations

import random
from pathlib import Path

from .datasets import Dataset
from .errors import DataError
from .images import labels_tensor, normalise, read_images, require

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
CLASS_SEED = 42  # FL-bench's default preprocessing seed
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FETCH = ("download the six domain zips and their <domain>_train.txt/<domain>_test.txt from "
         "http://ai.bu.edu/M3SDA/ into ROOT/domainnet/ (unzip so that ROOT/domainnet/clipart/<class>/ exists)")
TITLE = "DomainNet"


def _split_file(path: Path) -> list[tuple[str, str]]:
    """(relative image path, class name) per line; the class comes from the path, the index is checked."""
    rows: list[tuple[str, str]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        rel = parts[0].split("/")
        if len(parts) != 2 or len(rel) != 3 or not parts[1].isdigit():
            raise DataError(f"{TITLE}: {path} line {n} is not '<domain>/<class>/<file> <label>'")
        rows.append((parts[0], rel[1]))
    return rows


def choose_classes(names: list[str], class_num: int) -> list[str]:
    """FL-bench's rule: sorted(random.sample(sorted(names), class_num)) after random.seed(42)."""
    return sorted(random.Random(CLASS_SEED).sample(sorted(names), class_num))


def load_domainnet(root: str | Path | None = None, download: bool = False, class_num: int = 10,
                   image_size: int = 64) -> Dataset:
    if download:
        raise DataError(f"{TITLE} is not downloaded automatically; {FETCH}")
    if root is None:
        raise DataError(f"{TITLE} is read from local files: pass --root ROOT; {FETCH}")
    if image_size < 8:
        raise DataError(f"DomainNet image_size must be >= 8 pixels (got {image_size})")
    base = Path(root).expanduser() / "domainnet"
    rows = {d: [r for s in ("train", "test") for r in _split_file(require(base / f"{d}_{s}.txt", TITLE, FETCH))]
            for d in DOMAINS}
    names = sorted({c for d in DOMAINS for _, c in rows[d]})
    if not 1 <= class_num <= len(names):
        raise DataError(f"DomainNet class_num must be between 1 and the {len(names)} classes of the split "
                        f"files (got {class_num})")
    index = {c: i for i, c in enumerate(choose_classes(names, class_num))}
    paths, labels, domain_of = [], [], []
    for d, domain in enumerate(DOMAINS):
        for rel, cls in rows[domain]:
            if cls in index:
                paths.append(base / rel)
                labels.append(index[cls])
                domain_of.append(d)
    x = normalise(read_images(paths, (image_size, image_size), 3, TITLE), MEAN, STD)
    dom = labels_tensor(domain_of).numpy()
    parts = [(dom == d).nonzero()[0].astype("int64") for d in range(len(DOMAINS))]
    return Dataset("domainnet", x, labels_tensor(labels), class_num, natural_partition=parts,
                   natural_unit="domain", natural_names=list(DOMAINS),
                   options={"class_num": class_num, "image_size": image_size})
