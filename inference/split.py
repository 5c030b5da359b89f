"""Patient split — assigns every training image to the train or validation side, grouped by patient.

Patient groups: Kermany file names carry the patient (``personN_bacteria_K`` / ``personN_virus_K``
→ ``personN``; ``IM-XXXX-YYYY`` → ``IM-XXXX``; ``NORMAL2-IM-XXXX-YYYY`` → ``NORMAL2-IM-XXXX``;
anything else is its own patient); the adult set's manifest names the group (``patient_group``).

Each *stratum* (population, folder, source: e.g. adults / OTHER / rsna) is split on its own: its
patient groups are shuffled with a fixed seed and the first ``val_fraction`` go to validation, so no
patient is on both sides and both sides keep the mix of populations, classes and label sources. A
group with images in several strata (an NIH patient with a normal and a later pneumonia film) is
assigned by its first stratum. The children's strata are split exactly as before the adult set
existed, so their validation split stays comparable across model versions.
"""

import csv
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

_PATTERNS = (
    re.compile(r"^(person\d+)_"),
    re.compile(r"^(NORMAL2-IM-\d+)-"),
    re.compile(r"^(IM-\d+)-"),
)

Box = tuple[float, float, float, float]  # x, y, width, height as fractions of the image's width / height


@dataclass(frozen=True)
class SplitRow:
    """One training image: label (1 = pneumonia), patient group, side ("train" or "val") and where it
    comes from (population, folder, source, who labelled it, radiologist boxes if any)."""

    path: str
    label: int
    patient: str
    side: str = ""
    population: str = "children"
    folder: str = ""  # NORMAL, PNEUMONIA or OTHER
    source: str = "kermany"  # kermany, nih or rsna
    label_source: str = "clinician"  # clinician (Kermany), nlp-report-mining (NIH) or radiologist (RSNA)
    boxes: tuple[Box, ...] = ()

    @property
    def stratum(self) -> tuple[str, str, str]:
        return self.population, self.folder or str(self.label), self.source


def patient_of(file_name: str) -> str:
    """The patient group a Kermany file name belongs to."""
    for pattern in _PATTERNS:
        match = pattern.match(file_name)
        if match:
            return match.group(1)
    return Path(file_name).stem


def kermany_rows(files: list[tuple[str, int]]) -> list[SplitRow]:
    """Rows (side not yet set) for Kermany ``(path, label)`` pairs."""
    return [
        SplitRow(path, label, patient_of(Path(path).name), folder=("NORMAL", "PNEUMONIA")[label])
        for path, label in files
    ]


def assign_sides(rows: list[SplitRow], val_fractions: dict[str, float], seed: int) -> list[SplitRow]:
    """Set every row's side: per population and stratum, ``val_fractions[population]`` of the patient
    groups (shuffled with ``seed``) go to validation."""
    first_stratum: dict[tuple[str, str], tuple] = {}
    for row in rows:
        first_stratum.setdefault((row.population, row.patient), row.stratum)
    groups_by_stratum: dict[tuple, set[str]] = {}
    for (_population, patient), stratum in first_stratum.items():
        groups_by_stratum.setdefault(stratum, set()).add(patient)
    val_groups: set[tuple[str, str]] = set()
    for population in sorted({row.population for row in rows}):
        rng = random.Random(seed)  # one generator per population: adding a population moves no child
        for stratum in sorted(s for s in groups_by_stratum if s[0] == population):
            patients = sorted(groups_by_stratum[stratum])
            rng.shuffle(patients)
            val_groups.update((population, p) for p in patients[: round(len(patients) * val_fractions[population])])
    return [replace(row, side="val" if (row.population, row.patient) in val_groups else "train") for row in rows]


def split_by_patient(files: list[tuple[str, int]], val_fraction: float, seed: int) -> list[SplitRow]:
    """Split Kermany ``(path, label)`` pairs into train/val sides with no patient on both."""
    return assign_sides(kermany_rows(files), {"children": val_fraction}, seed)


def write_split_csv(rows: list[SplitRow], path: Path) -> None:
    """Write the split as CSV (path, label, patient, side, population, folder, source, label source, boxes)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient", "side", "population", "folder", "source", "label_source", "boxes"])
        for row in rows:
            boxes = ";".join(" ".join(f"{v:.5f}" for v in box) for box in row.boxes)
            writer.writerow(
                [
                    row.path,
                    row.label,
                    row.patient,
                    row.side,
                    row.population,
                    row.folder,
                    row.source,
                    row.label_source,
                    boxes,
                ]
            )


def read_split_csv(path: Path) -> list[SplitRow]:
    """The rows ``write_split_csv`` wrote (a run's split, e.g. to finalise or ablate it again)."""
    with path.open(newline="") as handle:
        return [
            SplitRow(
                entry["path"],
                int(entry["label"]),
                entry["patient"],
                entry["side"],
                entry.get("population") or "children",
                entry.get("folder", ""),
                entry.get("source") or "kermany",
                entry.get("label_source") or "clinician",
                tuple(
                    cast(Box, tuple(float(v) for v in box.split()))
                    for box in entry.get("boxes", "").split(";")
                    if box.strip()
                ),
            )
            for entry in csv.DictReader(handle)
        ]
