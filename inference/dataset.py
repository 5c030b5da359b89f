"""Dataset — a labelled image folder becomes a cached stack of 224×224 squares.

A labelled folder holds ``NORMAL/`` and ``PNEUMONIA/`` subfolders of JPEG, PNG or DICOM files.
Decoding happens once: the squares are stored in an ``.npz`` cache keyed by the file list.
"""

import hashlib
from pathlib import Path

import numpy as np

from inference.images import IMAGE_SUFFIXES, read_gray
from inference.preprocess import to_square_uint8

CLASS_NAMES = ("NORMAL", "PNEUMONIA")


def list_labelled(folder: Path) -> list[tuple[str, int]]:
    """``(path, label)`` for every image under ``folder/NORMAL`` (0) and ``folder/PNEUMONIA`` (1)."""
    missing = [name for name in CLASS_NAMES if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {' or '.join(missing)} subfolder")
    files = []
    for label, name in enumerate(CLASS_NAMES):
        for path in sorted((folder / name).rglob("*")):
            if path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or path.suffix == ""):
                files.append((str(path), label))
    return files


def load_squares(paths: list[str], cache_dir: Path | None = None) -> np.ndarray:
    """Decode ``paths`` into an N×224×224 uint8 array, reusing a cache when one matches."""
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
        cache_file = cache_dir / f"squares-{key}.npz"
        if cache_file.exists():
            return np.load(cache_file)["squares"]
    squares = np.stack([to_square_uint8(read_gray(Path(path))) for path in paths])
    if cache_file is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, squares=squares)
    return squares
