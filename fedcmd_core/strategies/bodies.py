"""Per-client bodies (flat parameter vectors) kept by the cloud, within a memory budget.

FedCMD keeps, for every device it has seen, the body it last trained and the body it last started from:
with 10,000 devices and a 3.5M-parameter model that is 280 GB. A :class:`BodyStore` holds bodies in
memory up to ``budget_bytes``; beyond that the least recently written ones move to memory-mapped ``.npy``
files under ``spill_dir`` (NumPy's own format, read with ``allow_pickle=False``), which the page cache,
not the process heap, holds. Reads of a spilled body return a read-only memory map of it; arithmetic on it
gives ordinary arrays. With ``budget_bytes = 0`` everything stays in memory (the default: small runs).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np

_stores = itertools.count()
_files = itertools.count()


class BodyStore(MutableMapping[int, np.ndarray]):
    def __init__(self, budget_bytes: int = 0, spill_dir: str | Path | None = None, name: str = "bodies") -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 (got {budget_bytes})")
        self.budget_bytes = int(budget_bytes)
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._folder: Path | None = None
        self._name = f"{name}-{os.getpid()}-{next(_stores)}"
        self._mem: dict[int, np.ndarray] = {}  # insertion order = write order: the first is the oldest
        self._disk: dict[int, np.ndarray] = {}  # client -> read-only memory map of its spilled body
        self._files: dict[int, Path] = {}  # client -> the file its map reads
        self._owned: set[Path] = set()  # files this store wrote (a copy shares, never deletes, the others)
        self._mem_bytes = 0
        self.spilled = 0  # bodies written to disk so far (a measure of the budget's pressure)

    # ----------------------------------------------------------------------------- mapping
    def __getitem__(self, cid: int) -> np.ndarray:
        body = self._mem.get(cid)
        if body is None:
            return self._disk[cid]
        return body

    def __setitem__(self, cid: int, body: np.ndarray) -> None:
        body = np.asarray(body)
        self._forget(cid)
        self._mem[cid] = body
        self._mem_bytes += body.nbytes
        if self.budget_bytes:
            while self._mem_bytes > self.budget_bytes and len(self._mem) > 1:
                self._spill(next(iter(self._mem)))

    def __delitem__(self, cid: int) -> None:
        if cid not in self:
            raise KeyError(cid)
        self._forget(cid)

    def __contains__(self, cid: object) -> bool:
        return cid in self._mem or cid in self._disk

    def __iter__(self) -> Iterator[int]:
        return iter(sorted([*self._mem, *self._disk]))

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the bodies held in the heap (the budget bounds this)."""
        return self._mem_bytes

    # ----------------------------------------------------------------------------- checkpoints
    def to_state(self) -> dict[int, np.ndarray]:
        """Every body as an array (a checkpoint reads spilled ones from their files)."""
        return {cid: np.array(self[cid]) for cid in self}

    def load_state(self, values: Any) -> None:
        if not isinstance(values, dict):
            raise TypeError(f"a body store's state is a dict of client -> array, not {type(values).__name__}")
        self.clear()
        for cid, body in values.items():
            self[int(cid)] = np.asarray(body)

    # ----------------------------------------------------------------------------- spilling
    def _forget(self, cid: int) -> None:
        body = self._mem.pop(cid, None)
        if body is not None:
            self._mem_bytes -= body.nbytes
        if self._disk.pop(cid, None) is not None:
            path = self._files.pop(cid)
            if path in self._owned:  # an open map of it (a copy's) stays valid after the unlink
                self._owned.discard(path)
                path.unlink(missing_ok=True)

    def _new_path(self, cid: int) -> Path:
        # every spill gets a new name: a file is never rewritten while a copy of the store may map it
        if self._folder is None:
            root = self._spill_root
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix=f"{self._name}-", dir=root))
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder / f"{cid}-{next(_files)}.npy"

    def _spill(self, cid: int) -> None:
        body = self._mem.pop(cid)
        self._mem_bytes -= body.nbytes
        path = self._new_path(cid)
        np.save(path, np.ascontiguousarray(body), allow_pickle=False)
        self._disk[cid] = np.load(path, mmap_mode="r", allow_pickle=False)
        self._files[cid] = path
        self._owned.add(path)
        self.spilled += 1

    def __deepcopy__(self, memo: dict[int, Any]) -> BodyStore:
        """A snapshot (the coordinator's, to retry an aggregation): the in-memory bodies copied, the spilled
        ones shared read-only (their files are never rewritten, only unlinked, and a map outlives that)."""
        copy = BodyStore.__new__(BodyStore)
        copy.__dict__.update(self.__dict__)
        copy._mem = {c: b.copy() for c, b in self._mem.items()}
        copy._disk, copy._files, copy._owned = dict(self._disk), dict(self._files), set()
        memo[id(self)] = copy
        return copy

    def close(self) -> None:
        """Remove this store's spill files (the store is empty afterwards)."""
        self._mem.clear()
        self._mem_bytes = 0
        self._disk.clear()
        self._files.clear()
        for path in self._owned:
            path.unlink(missing_ok=True)
        self._owned.clear()
        if self._folder is not None:
            try:
                self._folder.rmdir()  # fails while a copy's files are there: the last one out removes it
            except OSError:
                pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to tidy with
            pass

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BodyStore | dict):
            keys = sorted(other)
            return keys == list(self) and all(np.array_equal(self[k], other[k]) for k in keys)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]
