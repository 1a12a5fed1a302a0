"""Where a run came from, recorded in its ``config.json`` and ``summary.json``: the fedcmd version, the git
commit when run from a checkout, the partition's sha256, the command line, the library versions and the
kernels' backend. Nothing here depends on time, so two runs of one command still agree byte for byte."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout this code runs from (``+dirty`` when tracked files differ); None when installed."""
    if not (REPO / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head or None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def arrays_sha256(train: list[Any], test: list[Any]) -> str:
    """A generated partition's identity: sha256 over every client's index arrays (name, dtype, bytes)."""
    import numpy as np

    h = hashlib.sha256()
    for name, arrays in (("train", train), ("test", test)):
        for i, a in enumerate(arrays):
            a = np.ascontiguousarray(a, dtype=np.int64)
            h.update(f"{name}_{i}:{a.size};".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def kernels_backend() -> str | None:
    try:
        from fedcmd_core import kernels
    except ImportError:
        return None
    return kernels.backend()


OUT_FLAGS = ("--out", "-o")
RUN_FOLDER = "<this run folder>"


def command_without_out(command: list[str]) -> list[str]:
    """The command line with its output folder replaced by a placeholder: summary.json says what was run, and
    two runs of one command into two folders still agree byte for byte (config.json keeps the literal line)."""
    out: list[str] = []
    skip = False
    for arg in command:
        if skip:
            out.append(RUN_FOLDER)
            skip = False
        elif arg in OUT_FLAGS:
            out.append(arg)
            skip = True
        elif any(arg.startswith(f"{flag}=") for flag in OUT_FLAGS):
            out.append(arg.split("=", 1)[0] + "=" + RUN_FOLDER)
        else:
            out.append(arg)
    return out


def provenance(partition_sha256: str | None = None, partition_source: str | None = None) -> dict[str, Any]:
    """The provenance block of a run folder (the command line is this process's own)."""
    return {
        "fedcmd_version": _version("fedcmd"),
        "git_commit": git_commit(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else [],
        "partition_sha256": partition_sha256,
        "partition_source": partition_source,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "kernels_backend": kernels_backend(),
    }
