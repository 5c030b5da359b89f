"""Shared test fixtures: where the shared data lies, and small labelled image folders."""

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHEST_XRAY = SHARED_DATA / "chest_xray"
DICOM_SAMPLES = SHARED_DATA / "dicom_samples"


def require(path: Path) -> Path:
    """Skip the test when shared data is absent (e.g. a clone without ../shared)."""
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def tiny_labelled_folder(tmp_path_factory) -> Path:
    """NORMAL/ and PNEUMONIA/ with 4 training JPEGs each, copied from the shared data."""
    source = require(CHEST_XRAY / "train")
    folder = tmp_path_factory.mktemp("labelled")
    for name in ("NORMAL", "PNEUMONIA"):
        (folder / name).mkdir()
        for path in sorted((source / name).glob("*.jpeg"))[:: 300][:4]:
            shutil.copy(path, folder / name / path.name)
    return folder
