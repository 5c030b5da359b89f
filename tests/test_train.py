"""Training command on a tiny subset: split CSV, weights, card, checkpoint and --resume."""

import csv
import json

from typer.testing import CliRunner

from inference.classifier import Classifier
from lungvision.cli import app
from tests.conftest import CHEST_XRAY, require


def test_train_writes_a_loadable_model_and_resumes(tmp_path) -> None:
    data = require(CHEST_XRAY)
    run = tmp_path / "run"
    arguments = ["train", "--data", str(data), "--out", str(run), "--epochs", "1", "--input-size", "64",
                 "--max-train-images", "24"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
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

    classifier = Classifier(run)
    assert classifier.card.weights_sha256 == card["weights_sha256"]

    result = CliRunner().invoke(app, [*arguments[:5], "--epochs", "2", "--input-size", "64",
                                      "--max-train-images", "24", "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed after epoch 1" in result.output
    assert json.loads((run / "model_card.json").read_text())["training"]["epochs"] == 2


def test_train_rejects_a_folder_without_train(tmp_path) -> None:
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "training folder" in result.output


def test_refit_finalises_existing_weights_again(tmp_path, monkeypatch) -> None:
    from inference.model_card import WEIGHTS_DIR, ModelCard

    data = require(CHEST_XRAY)
    result = CliRunner().invoke(app, ["refit", "--data", str(data), "--out", str(tmp_path / "refit"),
                                      "--max-train-images", "24"])
    assert result.exit_code == 0, result.output
    shipped, refitted = ModelCard.load(WEIGHTS_DIR), ModelCard.load(tmp_path / "refit")
    assert refitted.weights_sha256 == shipped.weights_sha256  # the same network, finalised again
    assert refitted.version.split(".")[1] == str(int(shipped.version.split(".")[1]) + 1)
    assert Classifier(tmp_path / "refit").image_check is not None
