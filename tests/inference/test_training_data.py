"""Training data for two populations: the adult manifest, the grouped stratified split, the sampling
and loss weights, the box masks that move with augmentation, and the localisation measures."""

import numpy as np
import pytest
import torch

from inference.augment import training_transform
from inference.dataset import adult_rows, parse_boxes
from inference.localisation import image_figures, localisation_figures, read_boxes_csv
from inference.split import SplitRow, assign_sides, read_split_csv, write_split_csv
from inference.train import box_mask, loss_weights, sample_weights
from tests.kit.data import SHARED_DATA, require

ADULT_CXR = SHARED_DATA / "adult_cxr"


def _adult(patient: str, folder: str, source: str = "rsna", boxes=()) -> SplitRow:
    label = 1 if folder == "PNEUMONIA" else 0
    return SplitRow(
        f"x/{source}_{patient}.jpg",
        label,
        patient,
        population="adults",
        folder=folder,
        source=source,
        label_source="radiologist" if source == "rsna" else "nlp-report-mining",
        boxes=boxes,
    )


def test_boxes_are_fractions_of_their_pixel_space() -> None:
    assert parse_boxes("256 512 128 64;0 0 1024 1024", 1024, 1024) == ((0.25, 0.5, 0.125, 0.0625), (0.0, 0.0, 1.0, 1.0))
    assert parse_boxes("", 1024, 1024) == ()
    with pytest.raises(ValueError, match="four numbers"):
        parse_boxes("1 2 3", 1024, 1024)


def test_split_groups_patients_across_folders_and_keeps_every_stratum() -> None:
    rows = [
        _adult(f"p{i}", folder, source)
        for i in range(40)
        for folder, source in (("NORMAL", "nih"), ("PNEUMONIA", "rsna"), ("OTHER", "rsna"))
    ]
    rows += [_adult("shared", "NORMAL", "nih"), _adult("shared", "PNEUMONIA", "nih")]  # one NIH patient, two films
    rows += [SplitRow(f"k/person{i}_bacteria_1.jpeg", 1, f"person{i}", folder="PNEUMONIA") for i in range(30)]
    split = assign_sides(rows, {"children": 0.2, "adults": 0.25}, seed=3)
    sides: dict[tuple[str, str], set[str]] = {}
    for row in split:
        sides.setdefault((row.population, row.patient), set()).add(row.side)
    assert all(len(found) == 1 for found in sides.values())
    assert split == assign_sides(rows, {"children": 0.2, "adults": 0.25}, seed=3)
    val_strata = {row.stratum for row in split if row.side == "val"}
    assert {
        ("adults", "NORMAL", "nih"),
        ("adults", "PNEUMONIA", "rsna"),
        ("adults", "OTHER", "rsna"),
        ("children", "PNEUMONIA", "kermany"),
    } <= val_strata


def test_split_csv_round_trip_keeps_boxes_and_sources(tmp_path) -> None:
    rows = assign_sides(
        [_adult("a", "PNEUMONIA", boxes=((0.1, 0.2, 0.3, 0.4),)), _adult("b", "NORMAL", "nih")], {"adults": 0.5}, seed=1
    )
    write_split_csv(rows, tmp_path / "split.csv")
    again = read_split_csv(tmp_path / "split.csv")
    assert [(r.path, r.side, r.source, r.label_source, r.folder) for r in again] == [
        (r.path, r.side, r.source, r.label_source, r.folder) for r in rows
    ]
    assert again[0].boxes[0] == pytest.approx(rows[0].boxes[0]) and again[1].boxes == ()


def test_sampling_balances_populations_and_classes_and_nih_positives_weigh_less() -> None:
    rows = [SplitRow(f"k{i}", i % 4 == 0, f"k{i}") for i in range(400)]  # 100 positives, 300 negatives
    rows += [_adult(f"a{i}", "PNEUMONIA" if i < 10 else "NORMAL", "nih") for i in range(50)]
    weights = sample_weights(rows, adult_share=0.5)
    adults = np.array([row.population == "adults" for row in rows])
    positive = np.array([row.label == 1 for row in rows])
    assert weights[adults].sum() == pytest.approx(weights[~adults].sum())
    assert weights[adults & positive].sum() == pytest.approx(weights[adults & ~positive].sum())
    natural = sample_weights(rows, adult_share=None)
    assert natural[adults].sum() / natural.sum() == pytest.approx(50 / 450)
    loss = loss_weights(rows, nih_positive_weight=0.5)
    assert set(loss[adults & positive]) == {0.5} and set(loss[~(adults & positive)]) == {1.0}


def test_the_box_mask_moves_with_the_image() -> None:
    torch.manual_seed(0)
    square = torch.zeros(1, 224, 224, dtype=torch.uint8)
    square[:, 40:100, 120:200] = 255  # a bright block exactly where the box is
    mask = box_mask(((120 / 224, 40 / 224, 80 / 224, 60 / 224),), 224)
    assert int(mask.sum()) == 60 * 80
    transform = training_transform(160)
    transform.photometric = torch.nn.Identity()  # geometry only: the block must stay under the mask
    for _ in range(5):
        image, moved = transform.with_mask(square, mask)
        bright = image[0] > 127
        overlap = (bright & (moved[0] > 0)).sum() / bright.sum().clamp_min(1)
        assert overlap > 0.9


def test_pointing_game_energy_and_baselines() -> None:
    cam = torch.zeros(7, 7)
    cam[1, 5] = 1.0  # peak in the upper right
    inside = ((0.6, 0.0, 0.4, 0.4),)
    outside = ((0.0, 0.6, 0.3, 0.3),)
    hit, miss = image_figures(cam, inside), image_figures(cam, outside)
    assert hit["pointing"] == 1.0 and miss["pointing"] == 0.0
    assert hit["energy"] > hit["energy_uniform"] > 0 and miss["energy"] < miss["energy_uniform"]
    assert hit["pointing_centre"] == 0.0 and image_figures(cam, ((0.4, 0.4, 0.2, 0.2),))["pointing_centre"] == 1.0
    figures = localisation_figures([cam, cam, cam], [inside, outside, ()])
    assert figures["n"] == 2 and figures["pointing"] == 0.5
    low, high = figures["ci95"]["pointing"]
    assert low <= 0.5 <= high


def test_boxes_csv_accepts_the_manifest_and_a_plain_csv(tmp_path) -> None:
    (tmp_path / "plain.csv").write_text("file,boxes\na.dcm,10 20 30 40\nb.dcm,\n")
    assert read_boxes_csv(tmp_path / "plain.csv") == {"a.dcm": ("10 20 30 40", None, None)}
    (tmp_path / "bad.csv").write_text("name,where\na.dcm,1 2 3 4\n")
    with pytest.raises(ValueError, match="'file'"):
        read_boxes_csv(tmp_path / "bad.csv")


def test_the_adult_manifest_reads_labels_groups_and_boxes() -> None:
    rows = adult_rows(require(ADULT_CXR))
    assert len(rows) == 2304
    assert {row.folder for row in rows} == {"NORMAL", "PNEUMONIA", "OTHER"}
    assert all(row.label == (row.folder == "PNEUMONIA") for row in rows)
    boxed = [row for row in rows if row.boxes]
    assert boxed and all(row.source == "rsna" and row.label == 1 for row in boxed)
    assert all(0 <= x <= 1 and 0 <= y <= 1 and 0 < w <= 1 and 0 < h <= 1 for row in boxed for x, y, w, h in row.boxes)
    assert len(adult_rows(ADULT_CXR, use_other=False)) == 2304 - 726
    with pytest.raises(FileNotFoundError, match="MANIFEST"):
        adult_rows(ADULT_CXR / "train")
