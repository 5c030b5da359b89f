"""`lungvision evaluate` and `lungvision analyze` on small folders the model has never seen."""

import json
import shutil

import numpy as np
from PIL import Image
from pydicom.uid import JPEG2000, RLELossless
from typer.testing import CliRunner

from inference.images import read_gray
from inference.sample_dicom import wrap_image, write_dataset
from lungvision.cli import app
from tests.conftest import DICOM_SAMPLES


def _as_dicom(jpeg, target, **options) -> None:
    write_dataset(wrap_image(np.asarray(Image.open(jpeg).convert("L")), **options), target)


def test_evaluate_writes_metrics_plots_and_report(tiny_labelled_folder, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_labelled_folder, data)
    first_pneumonia = sorted((data / "PNEUMONIA").iterdir())[0]
    _as_dicom(first_pneumonia, data / "PNEUMONIA" / "as-dicom.dcm", photometric="MONOCHROME1", bits_stored=12)
    (data / "NORMAL" / "broken.png").write_bytes(b"not a png")

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["evaluate", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("n", "accuracy", "recall", "specificity", "precision", "f1", "roc_auc", "pr_auc", "ece",
                "threshold", "confusion", "ci95"):
        assert key in metrics, key
    assert metrics["n"] == 9
    assert set(metrics["confusion"]) == {"tp", "fp", "tn", "fn"}
    assert sum(metrics["confusion"].values()) == 9
    assert [entry["path"].endswith("broken.png") for entry in metrics["skipped"]] == [True]
    for name in ("roc.png", "pr.png", "reliability.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert "roc_auc" in result.output


def test_evaluate_names_a_missing_class_folder(tmp_path) -> None:
    (tmp_path / "NORMAL").mkdir()
    result = CliRunner().invoke(app, ["evaluate", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "PNEUMONIA" in result.output


def test_analyze_prints_json_lines_and_overlays(tiny_labelled_folder, tmp_path) -> None:
    jpeg = sorted((tiny_labelled_folder / "PNEUMONIA").iterdir())[0]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _as_dicom(jpeg, inputs / "mono1-j2k.dcm", photometric="MONOCHROME1", bits_stored=12, transfer_syntax=JPEG2000)
    _as_dicom(jpeg, inputs / "rle.dcm", transfer_syntax=RLELossless)
    (inputs / "garbage.dcm").write_bytes(b"\x00" * 300)
    samples = sorted(DICOM_SAMPLES.glob("*.dcm")) if DICOM_SAMPLES.exists() else []

    out = tmp_path / "overlays"
    result = CliRunner().invoke(app, ["analyze", str(inputs), str(jpeg), *map(str, samples), "--out", str(out)])
    assert result.exit_code == 1  # one bad file
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 4 + len(samples)
    errors = [line for line in lines if "error" in line]
    assert [line["path"].endswith("garbage.dcm") for line in errors] == [True]
    good = [line for line in lines if "error" not in line]
    for line in good:
        assert 0 <= line["probability"] <= 1 and line["label"] in ("NORMAL", "PNEUMONIA")
        assert {"threshold", "model_version", "milliseconds"} <= set(line)
        assert Image.open(line["overlay"]).mode == "RGB"
    by_name = {line["path"].rsplit("/", 1)[-1]: line["probability"] for line in good}
    # The same radiograph as JPEG, as MONOCHROME1 JPEG 2000 and as RLE gets (nearly) the same answer.
    assert abs(by_name["mono1-j2k.dcm"] - by_name[jpeg.name]) < 0.1
    assert abs(by_name["rle.dcm"] - by_name[jpeg.name]) < 0.05


def test_dicom_and_jpeg_of_one_image_preprocess_alike(tiny_labelled_folder, tmp_path) -> None:
    jpeg = sorted((tiny_labelled_folder / "NORMAL").iterdir())[0]
    _as_dicom(jpeg, tmp_path / "x.dcm", photometric="MONOCHROME1", bits_stored=16)
    from inference.preprocess import to_square_uint8

    difference = to_square_uint8(read_gray(tmp_path / "x.dcm")).astype(int) - to_square_uint8(read_gray(jpeg))
    assert np.abs(difference).max() <= 1
