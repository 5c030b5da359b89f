"""Durable writes — the fsync of a folder, so that a rename or a new name in it survives a crash.
Shared by the spool (instances) and the worker (result objects)."""

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s listing (names created, renamed or removed in it) to disk."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
