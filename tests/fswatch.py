"""A test helper: Linux inotify through ctypes, to see from outside a process which files it creates and
renames in one folder (e.g. the temporary file of an atomic checkpoint write), without polling."""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import time
from dataclasses import dataclass
from pathlib import Path

IN_CREATE = 0x00000100
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_DELETE = 0x00000200
IN_CLOSE_WRITE = 0x00000008
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Event:
    mask: int
    name: str


class FolderWatch:
    """Events of one folder (not recursive), in the order the kernel reports them."""

    def __init__(self, folder: Path, mask: int = IN_CREATE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(self.fd, os.fsencode(folder), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {folder}")
        self.events: list[Event] = []

    def poll(self, timeout: float = 0.0) -> list[Event]:
        """Read what has arrived (waiting up to ``timeout`` s for the first event); returns the new events."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        new: list[Event] = []
        while ready:
            try:
                buf = os.read(self.fd, 65536)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    break
                raise
            off = 0
            while off < len(buf):
                _, mask, _, length = _EVENT.unpack_from(buf, off)
                raw = buf[off + _EVENT.size : off + _EVENT.size + length]
                new.append(Event(mask, raw.rstrip(b"\0").decode()))
                off += _EVENT.size + length
        self.events.extend(new)
        return new

    def wait_for(self, mask: int, prefix: str, timeout: float) -> Event:
        """The first event (seen before or arriving within ``timeout`` s) of kind ``mask`` on a name that
        starts with ``prefix``; consumed, so a second call waits for the next one."""
        end = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.mask & mask and ev.name.startswith(prefix):
                    del self.events[i]
                    return ev
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no inotify event {mask:#x} on {prefix}* within {timeout} s")
            self.poll(min(left, 0.5))

    def close(self) -> None:
        os.close(self.fd)
