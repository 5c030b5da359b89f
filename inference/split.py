"""Patient split — assigns every training file to the train or validation side, grouped by patient.

Rule (Kermany file names): ``personN_bacteria_K`` / ``personN_virus_K`` → patient ``personN``;
``IM-XXXX-YYYY`` → ``IM-XXXX``; ``NORMAL2-IM-XXXX-YYYY`` → ``NORMAL2-IM-XXXX``. Anything else is
its own patient. Patients are shuffled with a fixed seed separately per class, and the first
``val_fraction`` of each class's patients go to validation, so no patient is on both sides and
both sides keep the class mix.
"""

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path

_PATTERNS = (
    re.compile(r"^(person\d+)_"),
    re.compile(r"^(NORMAL2-IM-\d+)-"),
    re.compile(r"^(IM-\d+)-"),
)


@dataclass(frozen=True)
class SplitRow:
    """One training file, its label (1 = pneumonia), patient and side ("train" or "val")."""

    path: str
    label: int
    patient: str
    side: str


def patient_of(file_name: str) -> str:
    """The patient group a Kermany file name belongs to."""
    for pattern in _PATTERNS:
        match = pattern.match(file_name)
        if match:
            return match.group(1)
    return Path(file_name).stem


def split_by_patient(files: list[tuple[str, int]], val_fraction: float, seed: int) -> list[SplitRow]:
    """Split ``(path, label)`` pairs into train/val sides with no patient on both."""
    patients_by_class: dict[int, set[str]] = {}
    for path, label in files:
        patients_by_class.setdefault(label, set()).add(patient_of(Path(path).name))
    val_patients: set[str] = set()
    rng = random.Random(seed)
    for label in sorted(patients_by_class):
        patients = sorted(patients_by_class[label])
        rng.shuffle(patients)
        val_patients.update(patients[: round(len(patients) * val_fraction)])
    rows = []
    for path, label in files:
        patient = patient_of(Path(path).name)
        rows.append(SplitRow(path, label, patient, "val" if patient in val_patients else "train"))
    return rows


def write_split_csv(rows: list[SplitRow], path: Path) -> None:
    """Write the split as CSV (path, label, patient, side)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient", "side"])
        for row in rows:
            writer.writerow([row.path, row.label, row.patient, row.side])
