"""The one way we write a file that must never be seen half-written: a temporary file beside it, fsync,
rename over the target, fsync of the folder. A crash at any point leaves the old file or the new one. A
failed write (full or read-only disk, a file where the folder should be) removes the temporary file,
leaves the old file as it was and raises :class:`DiskError`, an OSError that keeps the errno.

Standard library only: the torch-free ``fedcmd[edge-infer]`` install uses it too."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class DiskError(OSError):
    """A file or folder could not be written: a read-only or full disk, a file where a folder should be.
    Commands report it in one line and exit 4 (``fedcmd_core.cli_exit.EXIT_DISK``)."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(errno_, message)

    def __str__(self) -> str:
        return str(self.strerror)


def atomic_write(
    path: str | Path, data: bytes | str | Callable[[BinaryIO], None], mode: int = 0o666, make_parents: bool = False
) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function that writes into the open binary file) to
    ``path`` atomically; ``mode`` is applied as given (the umask does not tighten it when it is not the
    default). Returns ``path``."""
    path = Path(path)
    if make_parents:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DiskError(f"could not create the folder of {path}: {e.strerror or e}", e.errno) from e
    # one temp name per writer (process and thread: agents of one simulation save on their own threads); a
    # leftover of an earlier writer with the same name is overwritten
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        if callable(data):
            with os.fdopen(fd, "wb") as f:
                _chmod(f.fileno(), mode)
                data(f)
                f.flush()
                os.fsync(f.fileno())
        else:
            try:
                _chmod(fd, mode)
                view = memoryview(data.encode() if isinstance(data, str) else data)
                while view:
                    view = view[os.write(fd, view) :]
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
    sync_folder(path.parent)
    return path


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
            os.write(fd, b"fedcmd")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        _remove_quietly(probe)
        raise DiskError(f"{what}: cannot write to {folder}: {e.strerror or e}", e.errno) from e
    return folder


def _chmod(fd: int, mode: int) -> None:
    if mode != 0o666:  # an explicit mode is kept exactly: the umask must not tighten it
        os.fchmod(fd, mode)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename into it survives a power cut."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: the file system cannot sync folders; the rename stands
            raise DiskError(f"could not sync the folder {folder}: {e.strerror or e}", e.errno) from e


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # never created, or the disk refuses even that: nothing more we can do
