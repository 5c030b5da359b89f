"""Patient split: the grouping rule, and no patient on both sides of the real training data."""

from inference.dataset import list_labelled
from inference.split import patient_of, split_by_patient
from tests.kit.data import CHEST_XRAY, require


def test_patient_rule() -> None:
    assert patient_of("person1000_bacteria_2931.jpeg") == "person1000"
    assert patient_of("person1000_virus_1681.jpeg") == "person1000"
    assert patient_of("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_of("NORMAL2-IM-0115-0001.jpeg") == "NORMAL2-IM-0115"


def _assert_no_leak(rows) -> None:
    sides: dict[str, set[str]] = {}
    for row in rows:
        sides.setdefault(row.patient, set()).add(row.side)
    assert all(len(found) == 1 for found in sides.values())


def test_synthetic_split_is_grouped_seeded_and_stratified() -> None:
    files = [(f"x/person{p}_bacteria_{k}.jpeg", 1) for p in range(50) for k in range(3)]
    files += [(f"x/IM-{p:04d}-0001.jpeg", 0) for p in range(40)]
    rows = split_by_patient(files, 0.2, seed=7)
    _assert_no_leak(rows)
    assert rows == split_by_patient(files, 0.2, seed=7)
    assert {row.label for row in rows if row.side == "val"} == {0, 1}


def test_real_training_data_has_no_patient_on_both_sides() -> None:
    rows = split_by_patient(list_labelled(require(CHEST_XRAY) / "train"), 0.15, seed=42)
    _assert_no_leak(rows)
    val_share = sum(row.side == "val" for row in rows) / len(rows)
    assert 0.10 < val_share < 0.20
