"""Training command on a tiny subset: split CSV, weights, card, checkpoint and --resume."""

import csv
import json
from pathlib import Path

from typer.testing import CliRunner

from inference.classifier import Classifier
from lungvision.cli import app
from tests.kit.data import CHEST_XRAY, SHARED_DATA, require


def _train(data: Path, run: Path, *options: str, epochs: int = 1, max_images: int = 24) -> str:
    """``lungvision train`` of a tiny model (64 pixels) on ``data`` into ``run``; returns its output."""
    arguments = ["train", "--data", str(data), "--out", str(run), "--epochs", str(epochs), "--input-size", "64"]
    result = CliRunner().invoke(app, [*arguments, "--max-train-images", str(max_images), *options])
    assert result.exit_code == 0, result.output
    return result.output


def test_train_writes_a_loadable_model_and_resumes(tmp_path) -> None:
    data = require(CHEST_XRAY)
    run = tmp_path / "run"
    _train(data, run)
    for name in ("split.csv", "checkpoint.pt", "lungvision-resnet18.safetensors", "model_card.json", "MODEL_CARD.md"):
        assert (run / name).exists(), name
    with (run / "split.csv").open() as handle:
        sides = {row["side"] for row in csv.DictReader(handle)}
    assert sides == {"train", "val"}
    card = json.loads((run / "model_card.json").read_text())
    assert card["input_size"] == 64 and 0 < card["threshold"] <= 1
    assert card["image_check"]["file"] == "image-check.safetensors" and (run / "image-check.safetensors").exists()
    assert card["image_check"]["threshold"] > 0 and "stressed" in card["operating_point"]["rule"]
    assert card["population"]["min_age_years"] == 1.0
    assert [point["name"] for point in card["populations"]] == ["children"]

    classifier = Classifier(run)
    assert classifier.card.weights_sha256 == card["weights_sha256"]

    assert "resumed after epoch 1" in _train(data, run, "--resume", epochs=2)
    assert json.loads((run / "model_card.json").read_text())["training"]["epochs"] == 2


def test_train_on_both_populations_gives_each_its_operating_point(tmp_path) -> None:
    data, adults = require(CHEST_XRAY), require(SHARED_DATA / "adult_cxr")
    run = tmp_path / "run"
    _train(data, run, "--adult-data", str(adults), max_images=120)
    with (run / "split.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(row["population"], row["side"]) for row in rows} >= {
        ("children", "val"),
        ("adults", "val"),
        ("children", "train"),
        ("adults", "train"),
    }
    card = json.loads((run / "model_card.json").read_text())
    points = {point["name"]: point for point in card["populations"]}
    assert set(points) == {"children", "adults"} and card["version"].startswith("2.")
    assert points["adults"]["min_age_years"] == 18.0 and "radiologist" in points["adults"]["threshold_rule"]
    assert set(points["adults"]["validation_by_source"]) == {"nih", "rsna"}
    assert card["image_check"]["populations"] == ["children", "adults"]
    assert card["localisation"]["n"] > 0 and "pointing_centre" in card["localisation"]
    assert any("NIH Clinical Center" in line for line in card["attribution"])
    assert "Populations and their operating points" in (run / "MODEL_CARD.md").read_text()
    assert len(Classifier(run).populations) == 2


def test_train_rejects_a_folder_without_train(tmp_path) -> None:
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "training folder" in result.output


def test_refit_finalises_existing_weights_again(tmp_path, monkeypatch) -> None:
    from inference.model_card import WEIGHTS_DIR, ModelCard

    data = require(CHEST_XRAY)
    result = CliRunner().invoke(
        app, ["refit", "--data", str(data), "--out", str(tmp_path / "refit"), "--max-train-images", "24"]
    )
    assert result.exit_code == 0, result.output
    shipped, refitted = ModelCard.load(WEIGHTS_DIR), ModelCard.load(tmp_path / "refit")
    assert refitted.weights_sha256 == shipped.weights_sha256  # the same network, finalised again
    assert refitted.version.split(".")[1] == str(int(shipped.version.split(".")[1]) + 1)
    assert Classifier(tmp_path / "refit").image_check is not None
