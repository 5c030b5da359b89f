"""Selection — each instance of a study becomes one of: our own object (skipped), outside the model's
intended use by its header (the rule and the reason), or a candidate for analysis; the header also
names the population of the patient's age when it gives one."""

from dataclasses import dataclass

from pydicom import Dataset

from common.identity import is_lung_vision_object
from inference.intended_use import GateVerdict, IntendedUse, header_text

OWN_OBJECT = "created by Lung Vision"


@dataclass(frozen=True)
class Selection:
    """What the header says about one instance, before any pixel is decoded."""

    skip_reason: str | None = None  # never analysed, and no intended-use question (our own objects)
    verdict: GateVerdict | None = None  # outside the intended use by its header
    population: str | None = None  # the population of the header's patient age; None: the image check chooses


def select(dataset: Dataset, gate: IntendedUse) -> Selection:
    """Sort one instance: our own object, outside the intended use by its header, or a candidate."""
    if is_lung_vision_object(
        sop_instance_uid=header_text(dataset, "SOPInstanceUID"),
        series_instance_uid=header_text(dataset, "SeriesInstanceUID"),
        manufacturer=header_text(dataset, "Manufacturer"),
    ):
        return Selection(skip_reason=OWN_OBJECT)
    header = gate.read_header(dataset)
    return Selection(verdict=header.verdict, population=header.population)
