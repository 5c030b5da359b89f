"""Image files — a JPEG, PNG or DICOM file becomes a 2-D gray float array (bright = dense)."""

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".dcm", ".dicom"}
_PLAIN_SUFFIXES = {".jpg", ".jpeg", ".png"}


def read_gray(path: Path) -> np.ndarray:
    """Read an image file as gray float32; DICOM goes through the worker's pixel pipeline."""
    return read_image(path)[0]


def read_image(path: Path) -> tuple[np.ndarray, Dataset | None]:
    """Gray float32 pixels and, for DICOM, the header (None for JPEG and PNG, which have none)."""
    if path.suffix.lower() in _PLAIN_SUFFIXES:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"), dtype=np.float32), None
    from inference.dicom_pixels import dataset_to_gray, read_dicom_dataset

    dataset = read_dicom_dataset(path)
    return dataset_to_gray(dataset), dataset
