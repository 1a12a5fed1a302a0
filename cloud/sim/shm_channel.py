"""Objects between forked processes with their arrays in shared memory, not in the pipe.

A :class:`SharedBuffer` is an anonymous ``MAP_SHARED`` mapping made before ``fork``: parent and child see
the same pages, it has no name, so nothing is left in ``/dev/shm`` when a process is killed. An object is
pickled with protocol 5 and every out-of-band buffer (NumPy arrays, frames wrapped in
``pickle.PickleBuffer``) is copied once into the mapping; only the small in-band remainder travels through
the pipe. The receiver copies the buffers out (writable ``bytearray``) before the sender reuses the
mapping: the caller's protocol guarantees one message in flight per buffer. An object whose buffers do not
fit goes in band instead: slower, never wrong.

These messages pass only between a simulation's own forked processes; nothing here reads the network.
"""

from __future__ import annotations

import mmap
import pickle
from typing import Any

ALIGN = 64  # each buffer starts on a cache line

Spans = list[tuple[int, int]]  # (offset, length) of each out-of-band buffer in the mapping


class SharedBuffer:
    def __init__(self, size: int) -> None:
        self.size = max(ALIGN, int(size))
        self.map = mmap.mmap(-1, self.size)  # anonymous + MAP_SHARED: inherited by fork, unnamed

    def pack(self, obj: Any) -> tuple[bytes, Spans | None]:
        """Write ``obj``'s buffers into the mapping; returns (in-band pickle, spans) or (full pickle, None)."""
        buffers: list[pickle.PickleBuffer] = []
        meta = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        views = [b.raw() for b in buffers]
        spans: Spans = []
        offset = 0
        for view in views:
            offset = -(-offset // ALIGN) * ALIGN
            spans.append((offset, view.nbytes))
            offset += view.nbytes
        if offset > self.size:
            return pickle.dumps(obj, protocol=5), None
        for (start, length), view in zip(spans, views):
            self.map[start : start + length] = view
        return meta, spans

    def unpack(self, meta: bytes, spans: Spans | None) -> Any:
        if spans is None:
            return pickle.loads(meta)
        whole = memoryview(self.map)
        try:
            buffers = [bytearray(whole[start : start + length]) for start, length in spans]
        finally:
            whole.release()
        return pickle.loads(meta, buffers=buffers)

    def close(self) -> None:
        self.map.close()
