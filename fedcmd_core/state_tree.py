"""Turn a strategy's state (nested dicts/lists/sets of NumPy arrays and plain values) into named arrays plus
one JSON tree, and back. This is how checkpoints and device state are stored without pickle: arrays go
to safetensors, the structure and every scalar to JSON, with integer dict keys and tuples kept exact."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

# DiskError and check_writable are imported from here by the CLI layers as well
from fedcmd_core.atomic import DiskError, atomic_write, check_writable

__all__ = [
    "DiskError", "StateError", "check_writable", "flatten_state", "load_state_file", "save_state_file",
    "unflatten_state",
]


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


def save_state_file(path: str | Path, values: dict[str, Any], meta: dict[str, str] | None = None) -> None:
    """Write ``values`` to ``path`` atomically: a temporary file, fsync, rename, fsync of the folder.
    A crash at any point leaves either the old file or the new one, never a torn one. A failed write
    (full or read-only disk, ...) removes the temporary file, leaves the old file as it was and raises
    :class:`DiskError` (an OSError keeping the errno)."""
    from safetensors.numpy import save

    arrays, tree = flatten_state(values)
    metadata = {**(meta or {}), "fedcmd_state": json.dumps(tree)}
    atomic_write(path, save(arrays, metadata=metadata))


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
