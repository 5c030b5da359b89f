"""Durable writes — the fsync of a folder, so that a rename or a new name in it survives a crash, and an early
start of a file's write-back. Shared by the spool (instances), the node's receiver and the worker (result objects)."""

import ctypes
import os
from pathlib import Path

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-out of dirty pages not already being written; don't wait


def _libc_sync_file_range():
    """Linux's sync_file_range(2), or None where the C library has none (it is not in Python's ``os``)."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


_sync_file_range = _libc_sync_file_range()


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s listing (names created, renamed or removed in it) to disk."""
    fsync_and_close(open_dir(path))


def open_dir(path: Path) -> int:
    """A descriptor of the folder ``path``, to flush its listing later with ``fsync_and_close``: taken while a
    lock is held, it stays this folder's even if the folder is renamed once the lock is released."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_and_close(descriptor: int) -> None:
    """Flush the open file or folder to disk, then close it (closed even when the flush fails, which raises)."""
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def start_writeback(descriptor: int) -> None:
    """Start writing the open file's dirty pages to disk now, without waiting for them.

    A hint, not a promise: the ``fsync`` that must follow then finds most of the file written (for a file
    received over seconds, the disk works while it arrives instead of all at once at the end). Its result is
    not looked at: a write error is reported again by that ``fsync``. A no-op where Linux's call is missing.
    """
    if _sync_file_range is not None:
        _sync_file_range(descriptor, 0, 0, _SYNC_FILE_RANGE_WRITE)
