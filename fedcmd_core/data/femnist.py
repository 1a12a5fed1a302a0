"""FEMNIST in LEAF's json format: ``root/femnist/data/{train,test}/*.json``, split naturally by writer.

Each json is ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]], "y": [...]}}}``
with pixels in [0, 1] (white background) and 62 classes. A writer's train samples come first, then their
test samples; writers in order of first appearance (files by name). LEAF's own train/test split is not kept:
the partition tool re-splits every writer with --fraction (or whole writers with --split user). Where LEAF was
run without its split step, ``data/all_data/*.json`` is read instead. Normalised with FL-bench's statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .datasets import Dataset
from .errors import DataError
from .images import labels_tensor

NUM_CLASSES = 62
MEAN, STD = 0.9637, 0.155
FETCH = ("generate it with LEAF (https://github.com/TalwalkarLab/leaf, data/femnist/preprocess.sh) and copy "
         "its data/train and data/test folders to ROOT/femnist/data/")


def _json_files(base: Path) -> list[Path]:
    folders = [base / "train", base / "test"]
    if not any(f.is_dir() for f in folders) and (base / "all_data").is_dir():
        folders = [base / "all_data"]
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise DataError(f"FEMNIST not found: missing {missing[0]}; {FETCH}")
    files = [p for f in folders for p in sorted(f.glob("*.json"))]
    if not files:
        raise DataError(f"FEMNIST: no .json files in {' or '.join(map(str, folders))}; {FETCH}")
    return files


def _read(path: Path) -> dict[str, dict[str, list]]:
    try:
        blob = json.loads(path.read_text())
        return {str(u): {"x": blob["user_data"][u]["x"], "y": blob["user_data"][u]["y"]} for u in blob["users"]}
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f"FEMNIST: {path} is not a LEAF json with users and user_data x/y "
                        f"({type(e).__name__}: {e}); regenerate it with LEAF") from None


def load_femnist(root: str | Path | None = None, download: bool = False) -> Dataset:
    if download:
        raise DataError(f"FEMNIST is not downloaded automatically; {FETCH}")
    if root is None:
        raise DataError(f"FEMNIST is read from LEAF's json files: pass --root ROOT; {FETCH}")
    files = _json_files(Path(root).expanduser() / "femnist" / "data")
    xs: dict[str, list[np.ndarray]] = {}
    ys: dict[str, list[np.ndarray]] = {}
    for path in files:
        for user, data in _read(path).items():
            x = np.asarray(data["x"], dtype=np.float32)
            y = np.asarray(data["y"], dtype=np.int64).reshape(-1)
            if x.size == 0 and y.size == 0:
                continue
            if x.ndim != 2 or x.shape[1] != 28 * 28 or len(x) != len(y):
                raise DataError(f"FEMNIST: {path} user {user}: x must be [n, 784] with n labels "
                                f"(got {x.shape}, {len(y)} labels)")
            xs.setdefault(user, []).append(x)
            ys.setdefault(user, []).append(y)
    users = list(xs)
    if not users:
        raise DataError(f"FEMNIST: the json files hold no samples; {FETCH}")
    sizes = [sum(len(a) for a in ys[u]) for u in users]
    y_all = labels_tensor(np.concatenate([a for u in users for a in ys[u]]))
    if int(y_all.min()) < 0 or int(y_all.max()) >= NUM_CLASSES:
        raise DataError(f"FEMNIST: labels outside 0..{NUM_CLASSES - 1}; regenerate the json with LEAF")
    x_all = torch.from_numpy(np.concatenate([a for u in users for a in xs[u]]))
    x_all = x_all.sub_(MEAN).div_(STD).view(-1, 1, 28, 28)
    bounds = np.cumsum([0, *sizes])
    parts = [np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(len(users))]
    return Dataset("femnist", x_all, y_all, NUM_CLASSES, natural_partition=parts,
                   natural_unit="user", natural_names=users)
