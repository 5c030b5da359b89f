"""Fixtures shared by every test folder: small labelled image folders, a two-population model, a spool
and a seeded site. Helpers that are not fixtures live in tests/kit/."""

import shutil
from pathlib import Path

import pytest

from common.spool import Spool
from tests.kit.data import CHEST_XRAY, TWO_POPULATIONS, require


@pytest.fixture(scope="session")
def tiny_labelled_folder(tmp_path_factory) -> Path:
    """NORMAL/ and PNEUMONIA/ with 4 training JPEGs each, copied from the shared data."""
    source = require(CHEST_XRAY / "train")
    folder = tmp_path_factory.mktemp("labelled")
    for name in ("NORMAL", "PNEUMONIA"):
        (folder / name).mkdir()
        for path in sorted((source / name).glob("*.jpeg"))[::300][:4]:
            shutil.copy(path, folder / name / path.name)
    return folder


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
    card["image_check"].update(
        sha256=sha256_of(folder / card["image_check"]["file"]), populations=["children", "adults"]
    )
    card["populations"] = TWO_POPULATIONS
    (folder / "model_card.json").write_text(json.dumps(card, indent=2))
    assert ModelCard.load(folder).populations == TWO_POPULATIONS
    return folder


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """An empty spool in the test's folder (no free-space watermark)."""
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    return spool


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A fresh site per test module (:func:`tests.kit.site.seed`), so no module sees another's replays or
    HL7 events."""
    from tests.kit.site import seed  # the model and the pipeline: imported only by the tests that need a site

    return seed(tmp_path_factory.mktemp("site"))
