"""Durable file writes: the one atomic-write helper of the package.

``atomic_write`` replaces a file all at once (temp file, fsync, rename, fsync the directory), so that after a
crash the path holds either the old bytes or the new ones, never a torn mix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

Fsync = Callable[[int], None]


def fsync_dir(directory: Path, fsync: Fsync = os.fsync) -> None:
    """Make a directory's entries (a created, renamed or deleted file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: Path, data: bytes, mode: int = 0o600, fsync: Fsync = os.fsync) -> None:
    """Replace ``path`` with ``data`` all at once: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data)
        fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent, fsync)
