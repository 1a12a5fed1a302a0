"""CelebA in the LEAF setting, read from the official files under ``root/celeba/``.

LEAF's task: a binary label from one attribute (``Smiling`` by default), users are celebrities, and only
celebrities with at least 5 images are kept. Files: ``img_align_celeba/*.jpg``, ``list_attr_celeba.txt``
(count line, the 40 attribute names, then ``file  1 -1 ...``) and ``identity_CelebA.txt`` (``file id``).
Images are resized to 84x84 as LEAF's CelebA model does (FL-bench keeps the full 218x178, ~6x the memory),
3 channels, normalised with FL-bench's statistics. Celebrities come in order of first appearance in the
identity file, each one's images contiguous, so the natural partition is one index range per celebrity.
``max_users`` > 0 keeps only the first that many celebrities (decoding all 200k images takes a while).
"""

from __future__ import annotations

from pathlib import Path

from .datasets import Dataset
from .errors import DataError
from .images import labels_tensor, normalise, read_images, require

SIZE = 84
MIN_IMAGES = 5  # LEAF keeps celebrities with at least this many images
MEAN = (128.7247 / 255, 108.0617 / 255, 97.2517 / 255)
STD = (67.6496 / 255, 62.2519 / 255, 61.163 / 255)
FETCH = ("download img_align_celeba.zip, Anno/list_attr_celeba.txt and Anno/identity_CelebA.txt from "
         "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into ROOT/celeba/ (unzip the images there)")
TITLE = "CelebA"


def _attributes(path: Path, attribute: str) -> dict[str, int]:
    """list_attr_celeba.txt -> {file: 0/1} for ``attribute``."""
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise DataError(f"{TITLE}: {path} must start with a count line and the attribute names")
    names = lines[1].split()
    if attribute not in names:
        raise DataError(f"{TITLE}: unknown attribute {attribute!r}; {path.name} has {', '.join(names)}")
    col = names.index(attribute) + 1
    out: dict[str, int] = {}
    for n, line in enumerate(lines[2:], 3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1 or parts[col] not in ("1", "-1"):
            raise DataError(f"{TITLE}: {path} line {n} is not 'file' and {len(names)} values of 1/-1")
        out[parts[0]] = (int(parts[col]) + 1) // 2
    return out


def _identities(path: Path) -> dict[str, list[str]]:
    """identity_CelebA.txt -> {celebrity: [files]} in order of first appearance."""
    users: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{TITLE}: {path} line {n} is not 'file identity'")
        users.setdefault(parts[1], []).append(parts[0])
    return users


def load_celeba(root: str | Path | None = None, download: bool = False, attribute: str = "Smiling",
                max_users: int = 0) -> Dataset:
    if download:
        raise DataError(f"{TITLE} is not downloaded automatically; {FETCH}")
    if root is None:
        raise DataError(f"{TITLE} is read from the official files: pass --root ROOT; {FETCH}")
    if max_users < 0:
        raise DataError(f"max_users must be >= 0, 0 meaning every celebrity (got {max_users})")
    base = Path(root).expanduser() / "celeba"
    image_dir = require(base / "img_align_celeba", TITLE, FETCH)
    labels_of = _attributes(require(base / "list_attr_celeba.txt", TITLE, FETCH), attribute)
    users = {u: f for u, f in _identities(require(base / "identity_CelebA.txt", TITLE, FETCH)).items()
             if len(f) >= MIN_IMAGES}
    names = list(users)[:max_users] if max_users else list(users)
    if not names:
        raise DataError(f"{TITLE}: no celebrity has {MIN_IMAGES} or more images in identity_CelebA.txt")
    files = [f for u in names for f in users[u]]
    unlabelled = [f for f in files if f not in labels_of]
    if unlabelled:
        raise DataError(f"{TITLE}: {unlabelled[0]} has an identity but no row in list_attr_celeba.txt; "
                        f"use the official annotation files")
    x = normalise(read_images([image_dir / f for f in files], (SIZE, SIZE), 3, TITLE), MEAN, STD)
    y = labels_tensor([labels_of[f] for f in files])
    parts, start = [], 0
    for u in names:
        parts.append(labels_tensor(range(start, start + len(users[u]))).numpy())
        start += len(users[u])
    options = {"attribute": attribute, "max_users": max_users}
    return Dataset("celeba", x, y, 2, natural_partition=parts, natural_unit="user", natural_names=names,
                   options=options)
