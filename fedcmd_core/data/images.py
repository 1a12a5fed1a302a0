"""Shared helpers of the image-folder loaders: decode files with Pillow, normalise, name missing files.

Images are decoded into one preallocated uint8 [N, C, H, W] array (a few threads: Pillow releases the GIL
while decoding), then turned into the normalised float32 tensor every Dataset holds, chunk by chunk, so the
peak memory is the float tensor plus one uint8 copy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

_CHUNK = 8192  # samples normalised at a time


def require(path: Path, what: str, fetch: str) -> Path:
    """``path`` if it exists, else a DataError naming it, what it is, and where to get it."""
    if not path.exists():
        raise DataError(f"{what} not found: missing {path}; {fetch}")
    return path


def read_images(paths: Sequence[Path], size: tuple[int, int], channels: int, title: str) -> np.ndarray:
    """Decode ``paths`` as uint8 [N, channels, H, W], resized to ``size`` (H, W) where they differ."""
    from PIL import Image, UnidentifiedImageError  # lazy: only the image-folder sets need Pillow

    mode = "RGB" if channels == 3 else "L"
    height, width = size
    out = np.empty((len(paths), channels, height, width), dtype=np.uint8)

    def decode(i: int) -> None:
        path = paths[i]
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                if img.size != (width, height):
                    img = img.resize((width, height), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except FileNotFoundError:
            raise DataError(f"{title}: image {path} listed but missing; re-extract the dataset") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{title}: could not decode {path} ({type(e).__name__}: {e}); "
                            f"replace it with the official file") from None
        out[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)

    workers = max(1, min(8, os.cpu_count() or 1))
    if len(paths) < 64 or workers == 1:
        for i in range(len(paths)):
            decode(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(decode, range(len(paths)), chunksize=256):
                pass  # re-raises the first DataError
    return out


def normalise(u8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 (x / 255 - mean) / std per channel."""
    out = torch.empty(u8.shape, dtype=torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    for i in range(0, len(u8), _CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(u8[i:i + _CHUNK]))
        out[i:i + len(chunk)] = (chunk.float() / 255.0 - m) / s
    return out


def labels_tensor(labels: Sequence[int] | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1))


def sorted_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files of ``folder`` with one of ``suffixes`` (case-insensitive), by name: a fixed sample order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
