"""Image files — a JPEG, PNG or DICOM file becomes a 2-D gray float array (bright = dense)."""

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".dcm", ".dicom"}
_PLAIN_SUFFIXES = {".jpg", ".jpeg", ".png"}


def read_gray(path: Path) -> np.ndarray:
    """Read an image file as gray float32; DICOM goes through the worker's pixel pipeline."""
    if path.suffix.lower() in _PLAIN_SUFFIXES:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"), dtype=np.float32)
    from inference.dicom_pixels import read_dicom_file

    return read_dicom_file(path)
