"""Turn a strategy's state (nested dicts/lists/sets of NumPy arrays and plain values) into named arrays plus
one JSON tree, and back. This is how checkpoints and device state are stored without pickle: arrays go
to safetensors, the structure and every scalar to JSON, with integer dict keys and tuples kept exact."""

from __future__ import annotations

import errno
import json
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


class StateError(ValueError):
    """A value the checkpoint format cannot hold, or a tree that does not match its arrays."""


def flatten_state(values: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays: dict[str, np.ndarray] = {}
    tree = {name: _encode(v, name, arrays) for name, v in values.items()}
    return arrays, tree


def unflatten_state(arrays: dict[str, np.ndarray], tree: dict[str, Any]) -> dict[str, Any]:
    return {name: _decode(node, arrays) for name, node in tree.items()}


def _encode(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        arrays[path] = np.ascontiguousarray(value)
        return {"a": path, "shape": list(value.shape)}  # shape: 0-d arrays survive safetensors round trips
    if isinstance(value, np.random.Generator):
        return {"g": value.bit_generator.state}
    if isinstance(value, np.generic):
        return {"v": value.item()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"v": value}
    if isinstance(value, Counter):
        return {"c": [[_key(k), _encode(v, f"{path}/{k}", arrays)] for k, v in value.items()]}
    if isinstance(value, dict):
        return {"d": [[_key(k), _encode(v, f"{path}/{k}", arrays)] for k, v in value.items()]}
    if isinstance(value, (set, frozenset)):
        return {"s": [_encode(v, f"{path}/{i}", arrays) for i, v in enumerate(sorted(value))]}
    if isinstance(value, tuple):
        return {"t": [_encode(v, f"{path}/{i}", arrays) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return {"l": [_encode(v, f"{path}/{i}", arrays) for i, v in enumerate(value)]}
    raise StateError(f"{path}: cannot checkpoint a {type(value).__name__}")


def _key(k: Any) -> list[Any]:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, str, np.integer)):
        raise StateError(f"dict key {k!r}: only int and str keys are supported")
    return ["i", int(k)] if isinstance(k, (int, np.integer)) else ["s", k]


def _decode(node: Any, arrays: dict[str, np.ndarray]) -> Any:
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise StateError(f"bad state node {node!r:.80}")
    if "a" in node:
        if node["a"] not in arrays:
            raise StateError(f"state array {node['a']!r} is missing")
        return arrays[node["a"]].reshape(node["shape"])
    (tag, body), = node.items()
    if tag == "v":
        return body
    if tag == "g":
        rng = np.random.default_rng()
        rng.bit_generator.state = body
        return rng
    if tag in ("d", "c"):
        out = {(int(k[1]) if k[0] == "i" else str(k[1])): _decode(v, arrays) for k, v in body}
        return Counter(out) if tag == "c" else out
    if tag == "s":
        return {_decode(v, arrays) for v in body}
    if tag == "t":
        return tuple(_decode(v, arrays) for v in body)
    if tag == "l":
        return [_decode(v, arrays) for v in body]
    raise StateError(f"unknown state tag {tag!r}")


class DiskError(OSError):
    """A file or folder could not be written: a read-only or full disk, a file where a folder should be.
    Commands report it in one line and exit 4 (``fedcmd_core.cli_exit.EXIT_DISK``)."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(errno_, message)

    def __str__(self) -> str:
        return str(self.strerror)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # never created, or the disk refuses even that: nothing more we can do


def _write_all(fd: int, blob: bytes) -> None:
    view = memoryview(blob)
    while view:
        view = view[os.write(fd, view):]


def save_state_file(path: str | Path, values: dict[str, Any], meta: dict[str, str] | None = None) -> None:
    """Write ``values`` to ``path`` atomically: a temporary file, fsync, rename, fsync of the folder.
    A crash at any point leaves either the old file or the new one, never a torn one. A failed write
    (full or read-only disk, ...) removes the temporary file, leaves the old file as it was and raises
    :class:`DiskError` (an OSError keeping the errno)."""
    from safetensors.numpy import save

    arrays, tree = flatten_state(values)
    metadata = {**(meta or {}), "fedcmd_state": json.dumps(tree)}
    blob = save(arrays, metadata=metadata)
    path = Path(path)
    # pid and thread: agents of one simulation process save on their own threads
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise DiskError(f"could not write {path}: {e.strerror or e}", e.errno) from e
    except BaseException:
        _remove_quietly(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: the file system cannot sync folders; the rename stands
            raise DiskError(f"could not sync the folder of {path}: {e.strerror or e}", e.errno) from e


def check_writable(folder: str | Path, what: str) -> Path:
    """Create ``folder`` (and its parents) and prove a file can be written there, before any work starts.
    ``what`` names the setting in the error, e.g. ``--checkpoint``. Returns the folder."""
    folder = Path(folder)
    probe = folder / f".fedcmd-write-probe-{os.getpid()}-{threading.get_ident()}"
    if folder.exists() and not folder.is_dir():
        raise DiskError(f"{what}: cannot write to {folder}: {os.strerror(errno.ENOTDIR)}", errno.ENOTDIR)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, b"fedcmd")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        _remove_quietly(probe)
        raise DiskError(f"{what}: cannot write to {folder}: {e.strerror or e}", e.errno) from e
    return folder


def load_state_file(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a file written by :func:`save_state_file`: (values, the other metadata)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
        arrays = load_file(str(path))
        tree = json.loads(metadata.pop("fedcmd_state"))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise StateError(f"{path} is not a fedcmd state file: {e}") from None
    return unflatten_state(arrays, tree), metadata
