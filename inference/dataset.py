"""Dataset — a labelled image folder becomes a cached stack of 224×224 squares.

A labelled folder holds ``NORMAL/`` and ``PNEUMONIA/`` subfolders of JPEG, PNG or DICOM files; the
adult set is read through its ``MANIFEST.tsv`` (labels, patient groups, label sources, RSNA boxes).
Decoding happens once: the squares are stored in an ``.npz`` cache keyed by the file list.
"""

import csv
import hashlib
from pathlib import Path

import numpy as np

from inference.images import IMAGE_SUFFIXES, read_gray
from inference.preprocess import to_square_uint8
from inference.split import SplitRow

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
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, squares=squares)
    return squares


ADULT_LABELS = {"NORMAL": 0, "OTHER": 0, "PNEUMONIA": 1}


def parse_boxes(text: str, width: float, height: float) -> tuple[tuple[float, float, float, float], ...]:
    """``"x y w h;x y w h"`` in a ``width``×``height`` pixel space → boxes as fractions of the image."""
    boxes = []
    for part in filter(None, (piece.strip() for piece in (text or "").split(";"))):
        values = [float(value) for value in part.split()]
        if len(values) != 4:
            raise ValueError(f"a box needs four numbers 'x y w h', got {part!r}")
        x, y, w, h = values
        boxes.append((x / width, y / height, w / width, h / height))
    return tuple(boxes)


def adult_rows(folder: Path, use_other: bool = True) -> list[SplitRow]:
    """Split rows (side not yet set) for the adult set's ``MANIFEST.tsv``: NORMAL and OTHER are
    negatives (OTHER only with ``use_other``), PNEUMONIA positives; RSNA boxes as image fractions."""
    manifest = folder / "MANIFEST.tsv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{folder} has no MANIFEST.tsv (the adult set's index)")
    rows = []
    with manifest.open(newline="") as handle:
        for entry in csv.DictReader(handle, delimiter="\t"):
            if entry["label"] == "OTHER" and not use_other:
                continue
            boxes = parse_boxes(entry["rsna_boxes"], float(entry["orig_width"]), float(entry["orig_height"]))
            rows.append(
                SplitRow(
                    str(folder / entry["file"]),
                    ADULT_LABELS[entry["label"]],
                    entry["patient_group"],
                    population="adults",
                    folder=entry["label"],
                    source=entry["source"],
                    label_source=entry["label_source"],
                    boxes=boxes,
                )
            )
    return rows
