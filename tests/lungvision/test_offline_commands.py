"""`lungvision evaluate` and `lungvision analyze` on small folders the model has never seen."""

import json
import shutil
from datetime import UTC

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEG2000, RLELossless
from typer.testing import CliRunner

from inference.images import read_gray
from inference.sample_dicom import wrap_image, write_dataset
from lungvision.cli import app
from tests.kit.data import DICOM_SAMPLES, SHARED_DATA, require


def _as_dicom(jpeg, target, **options) -> None:
    write_dataset(wrap_image(np.asarray(Image.open(jpeg).convert("L")), **options), target)


def test_evaluate_writes_metrics_plots_and_report(tiny_labelled_folder, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_labelled_folder, data)
    first_pneumonia = sorted((data / "PNEUMONIA").iterdir())[0]
    _as_dicom(first_pneumonia, data / "PNEUMONIA" / "as-dicom.dcm", photometric="MONOCHROME1", bits_stored=12)
    _as_dicom(first_pneumonia, data / "PNEUMONIA" / "lateral.dcm", view_position="LL")  # refused by the gate
    (data / "NORMAL" / "broken.png").write_bytes(b"not a png")

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["evaluate", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "n",
        "accuracy",
        "recall",
        "specificity",
        "precision",
        "f1",
        "roc_auc",
        "pr_auc",
        "ece",
        "threshold",
        "confusion",
        "ci95",
    ):
        assert key in metrics, key
    # 10 readable images; the lateral is outside the intended use, and the image check may refuse a
    # training image too (it refuses ~1 % of in-distribution images): the figures use the accepted ones
    refused = metrics["refused"]
    assert refused["reasons"].get("view") == 1 and refused["n"] == sum(refused["reasons"].values())
    assert metrics["n"] == 10 - refused["n"] and metrics["coverage"] == pytest.approx(metrics["n"] / 10)
    assert set(metrics["confusion"]) == {"tp", "fp", "tn", "fn"}
    assert sum(metrics["confusion"].values()) == metrics["n"]
    assert metrics["operating_point"] == "shipped / children"
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
    adolescent = wrap_image(np.asarray(Image.open(jpeg).convert("L")))
    adolescent.PatientAge = "012Y"  # between the shipped populations (children 1–5, adults 18+): refused
    write_dataset(adolescent, inputs / "adolescent.dcm")
    samples = sorted(DICOM_SAMPLES.glob("*.dcm")) if DICOM_SAMPLES.exists() else []

    out = tmp_path / "overlays"
    result = CliRunner().invoke(app, ["analyze", str(inputs), str(jpeg), *map(str, samples), "--out", str(out)])
    assert result.exit_code == 1  # one bad file
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 5 + len(samples)
    errors = [line for line in lines if "error" in line]
    assert [line["path"].endswith("garbage.dcm") for line in errors] == [True]
    readable = [line for line in lines if "error" not in line]
    assert all(isinstance(line["intended_use"], bool) and "reason" in line for line in readable)
    (refused,) = [line for line in readable if line["path"].endswith("adolescent.dcm")]
    assert refused["intended_use"] is False and "12 years" in refused["reason"]
    assert "probability" not in refused and "overlay" not in refused  # never a probability
    good = [line for line in readable if "probability" in line]
    assert all(line["intended_use"] and line["reason"] is None for line in good)
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


def test_calibrate_writes_a_site_profile_that_analyze_then_uses(tiny_labelled_folder, tmp_path, monkeypatch) -> None:
    from inference.classifier import load_classifier

    profile_path = tmp_path / "site.json"
    result = CliRunner().invoke(
        app,
        [
            "calibrate",
            "--data",
            str(tiny_labelled_folder),
            "--out",
            str(profile_path),
            "--target-sensitivity",
            "0.9",
            "--name",
            "ward-7",
        ],
    )
    assert result.exit_code == 0, result.output
    profile = json.loads(profile_path.read_text())
    assert profile["id"] == "ward-7" and profile["weights_sha256"] == load_classifier().card.weights_sha256
    assert profile["target_met"] is False and "WARNING" in result.output  # 4 positives cannot show 0.9
    assert {"threshold", "temperature", "n", "expected", "created", "confidence"} <= set(profile)
    assert "expected sensitivity ≥" in result.output and "expected specificity" in result.output

    jpeg = sorted((tiny_labelled_folder / "PNEUMONIA").iterdir())[0]
    monkeypatch.setenv("LUNGVISION_MODEL__SITE_PROFILE", str(profile_path))
    result = CliRunner().invoke(app, ["analyze", str(jpeg)])
    line = json.loads(result.stdout.splitlines()[0])
    if line["intended_use"]:
        assert line["operating_point"] == "site profile ward-7 / children"
        assert line["threshold"] == pytest.approx(profile["threshold"])

    profile["weights_sha256"] = "f" * 64
    other = tmp_path / "other-weights.json"  # (a process loads its profile once: a new file, as a new start would)
    other.write_text(json.dumps(profile))
    monkeypatch.setenv("LUNGVISION_MODEL__SITE_PROFILE", str(other))
    result = CliRunner().invoke(app, ["analyze", str(jpeg)])
    assert result.exit_code == 2 and "made for weights sha256 ffff" in result.output


def test_calibrate_and_evaluate_need_one_source_of_labels(tmp_path) -> None:
    result = CliRunner().invoke(app, ["calibrate", "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 2 and "--data DIR or --from-worklist" in result.output
    result = CliRunner().invoke(app, ["evaluate", "--from-worklist", "--data", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 2


def test_evaluate_and_calibrate_from_the_worklist_reviews(tmp_path, monkeypatch) -> None:
    from datetime import datetime
    from uuid import uuid4

    from common.results import Verdict
    from common.store import Store, StudyResult
    from inference.classifier import load_classifier

    sha = load_classifier().card.weights_sha256
    store = Store(f"sqlite:///{tmp_path / 'lv.db'}")
    rng = np.random.default_rng(4)
    for index in range(160):  # 120 reviewed pneumonias and 40 normals, one study each
        pneumonia = index < 120
        logit = float(rng.normal(3.0 if pneumonia else -3.0, 1.0))
        finding = "POSITIVE" if logit > 0 else "NEGATIVE"
        result = StudyResult(
            message_id=uuid4().hex,
            study_instance_uid=f"2.25.{uuid4().int}",
            round=1,
            calling_ae="AE",
            modality="CR",
            accession_number=None,
            status="analysed",
            finding=finding,
            probability=None,
            threshold=0.5,
            model_version="m",
            model_sha256=sha,
            images=[{"sop_instance_uid": "1.2", "logit": logit}],
            timings_ms={},
            received_at=datetime.now(UTC),
        )
        store.save_result(result)
        agrees = (finding == "POSITIVE") == pneumonia
        store.save_review(result, Verdict.AGREE if agrees else Verdict.DISAGREE, "operator")
    monkeypatch.setenv("LUNGVISION_STORE__URL", f"sqlite:///{tmp_path / 'lv.db'}")

    result = CliRunner().invoke(app, ["evaluate", "--from-worklist", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 160 and metrics["confusion"]["tp"] + metrics["confusion"]["fn"] == 120
    assert metrics["data_dir"] == "worklist reviews" and "recall" in metrics["ci95"]

    result = CliRunner().invoke(
        app, ["calibrate", "--from-worklist", "--out", str(tmp_path / "site.json"), "--target-sensitivity", "0.95"]
    )
    assert result.exit_code == 0, result.output
    profile = json.loads((tmp_path / "site.json").read_text())
    assert profile["n"] == {"positive": 120, "negative": 40, "refused": 0} and profile["target_met"] is True


def test_from_worklist_without_reviews_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LUNGVISION_STORE__URL", f"sqlite:///{tmp_path / 'empty.db'}")
    result = CliRunner().invoke(app, ["calibrate", "--from-worklist", "--out", str(tmp_path / "site.json")])
    assert result.exit_code == 2 and "no study reviewed" in result.output


def test_analyze_names_each_images_population_and_operating_point(
    tiny_labelled_folder, two_population_weights, tmp_path, monkeypatch
) -> None:
    jpeg = sorted((tiny_labelled_folder / "PNEUMONIA").iterdir())[0]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for age in ("040Y", "004Y", "010Y"):
        dataset = wrap_image(np.asarray(Image.open(jpeg).convert("L")))
        dataset.PatientAge = age
        write_dataset(dataset, inputs / f"{age}.dcm")
    monkeypatch.setenv("LUNGVISION_MODEL__WEIGHTS_DIR", str(two_population_weights))
    monkeypatch.setenv("LUNGVISION_MODEL__INTENDED_USE_POLICY", "flag")  # the image check must not hide the choice
    result = CliRunner().invoke(app, ["analyze", str(inputs)])
    assert result.exit_code == 0, result.output
    lines = {json.loads(line)["path"].rsplit("/", 1)[-1]: json.loads(line) for line in result.stdout.splitlines()}
    adult, child, gap = lines["040Y.dcm"], lines["004Y.dcm"], lines["010Y.dcm"]
    assert (adult["population"], adult["operating_point"], adult["threshold"]) == ("adults", "shipped / adults", 0.7)
    assert (child["population"], child["operating_point"], child["threshold"]) == (
        "children",
        "shipped / children",
        0.2,
    )
    assert gap["intended_use"] is False and "populations 1 to <6, 18 to <90 years" in gap["reason"]
    assert gap["population"] in ("children", "adults")  # no age in a population: the image check chose


def test_evaluate_reports_each_population_and_the_heatmap_against_boxes(
    tiny_labelled_folder, two_population_weights, tmp_path, monkeypatch
) -> None:
    """Adult DICOMs (header age) with radiologists' boxes beside the pediatric JPEGs: one section per
    population at its own operating point, and the pointing game / energy with their baselines."""
    import csv

    adults_dir = require(SHARED_DATA / "adult_cxr")
    with (adults_dir / "MANIFEST.tsv").open() as handle:
        boxed = [row for row in csv.DictReader(handle, delimiter="\t") if row["rsna_boxes"]][:3]
    data = tmp_path / "data"
    shutil.copytree(tiny_labelled_folder, data)
    for row in boxed:
        dataset = wrap_image(np.asarray(Image.open(adults_dir / row["file"]).convert("L")))
        dataset.PatientAge = "045Y"
        write_dataset(dataset, data / "PNEUMONIA" / f"{row['original_id']}.dcm")
    with (tmp_path / "boxes.csv").open("w", newline="") as handle:  # boxes in the 1024 px originals' space
        writer = csv.writer(handle)
        writer.writerow(["file", "rsna_boxes", "orig_width", "orig_height"])
        writer.writerows([f"PNEUMONIA/{row['original_id']}.dcm", row["rsna_boxes"], 1024, 1024] for row in boxed)
    monkeypatch.setenv("LUNGVISION_MODEL__WEIGHTS_DIR", str(two_population_weights))
    monkeypatch.setenv("LUNGVISION_MODEL__INTENDED_USE_POLICY", "flag")  # the test card's image check is pediatric

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["evaluate", "--data", str(data), "--boxes", str(tmp_path / "boxes.csv"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    adults = metrics["by_population"]["adults"]
    # the three DICOMs by their age; the JPEGs (no header) by the test card's image check, which may say adults
    assert adults["n"] >= 3 and adults["threshold"] == 0.7 and adults["operating_point"] == "shipped / adults"
    assert metrics["threshold"] == "per population" and "children" in metrics["by_population"]
    located = metrics["localisation"]
    assert located["n"] == 3 and 0 <= located["pointing"] <= 1 and 0 < located["energy_uniform"] < 1
    assert {"pointing_centre", "energy", "ci95"} <= set(located)
    assert "## adults" in (out / "report.md").read_text() and "heatmap: n = 3 boxed images" in result.output

    result = CliRunner().invoke(
        app, ["evaluate", "--boxes", str(tmp_path / "missing.csv"), "--data", str(data), "--out", str(out)]
    )
    assert result.exit_code == 2 and "--boxes" in result.output
