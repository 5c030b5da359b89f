"""Where things lie: the repository, the shared data beside it, and pictures made from it."""

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
CHEST_XRAY = SHARED_DATA / "chest_xray"
DICOM_SAMPLES = SHARED_DATA / "dicom_samples"

TWO_POPULATIONS = [  # a two-population model card's operating points, far apart so tests can tell them apart
    {
        "name": "children",
        "min_age_years": 1.0,
        "max_age_years": 6.0,
        "description": "children (test)",
        "temperature": 1.0,
        "threshold": 0.2,
    },
    {
        "name": "adults",
        "min_age_years": 18.0,
        "max_age_years": 90.0,
        "description": "adults (test)",
        "temperature": 2.0,
        "threshold": 0.7,
    },
]


def require(path: Path) -> Path:
    """Skip the test when shared data is absent (e.g. a clone without ../shared)."""
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def chest_pixels(index: int = 0) -> np.ndarray:
    """A training radiograph (when the shared data is present) or a synthetic phantom."""
    folder = CHEST_XRAY / "train" / "PNEUMONIA"
    if folder.exists():
        from PIL import Image

        return np.asarray(Image.open(sorted(folder.glob("*.jpeg"))[index]).convert("L"))
    rows, cols = np.mgrid[0:320, 0:280]
    return ((np.sin(rows / 9.0) + np.cos(cols / 13.0) + 2) * 60).astype(np.uint8)
