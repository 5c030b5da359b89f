"""Intended use — a DICOM header and the image check become a verdict: inside the population the
model was validated for, or outside it with a reason, decided before any probability is shown.

Two layers:

* **Header rules** (no pixels needed): a radiograph (CR/DX, or a Secondary Capture with chest
  hints) of the chest, a frontal view, and a patient age inside one of the model's populations
  (e.g. children 1 to <6 years and adults 18 to <90 years: an age between them is refused). The age
  comes from Patient's Age, else from Patient's Birth Date and the Study / Acquisition / Content /
  Series Date, read tolerantly ("058Y", "58", "5 Y", "005M", "3 years"…); an unreadable, empty or
  impossible age (birth after the study) is *unknown*, which the header rules let through and the
  image check then decides.
* **Image check**: the classifier's out-of-distribution score (``inference.image_check``) from the
  same forward pass, compared with the threshold shipped in the model card.

The populations (name and age range) come from the model card, i.e. from the training data; a
site may narrow them with outer age bounds in the settings. The header also chooses the population
whose operating point an image gets (``read_header``): the one its age falls in; with no age the
classifier's image check chooses. ``Policy.REFUSE`` turns a verdict into "not analysed";
``Policy.FLAG`` analyses the image and marks it "outside intended use".
"""

import re
from dataclasses import dataclass
from datetime import date
from enum import Enum
from typing import TypeGuard

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from common.results import GateReason  # the rules' names are shared with the store, the web and the metrics

RADIOGRAPH_MODALITIES = {"CR", "DX"}
SECONDARY_CAPTURE_MODALITIES = {"OT", "SC", "CR", "DX"}
SECONDARY_CAPTURE_CLASSES = {"1.2.840.10008.5.1.4.1.1.7"}  # Secondary Capture Image Storage (single frame)
CHEST_BODY_PARTS = {"CHEST", "THORAX"}
FRONTAL_VIEWS = {"PA", "AP", ""}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT"}
CHEST_WORDS = ("CHEST", "THORAX", "THORAC", "LUNG", "CXR", "PNEUMO")
DATE_KEYWORDS = ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate")
OLDEST_PLAUSIBLE_YEARS = 130.0
_AGE = re.compile(r"^(\d{1,3})\s*(D|W|M|Y|DAYS?|WEEKS?|MONTHS?|YEARS?)?$")
_YEARS_PER_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
_DATE = re.compile(r"^(\d{4})[.\-/]?(\d{2})[.\-/]?(\d{2})")


class Policy(str, Enum):
    """What happens to an image outside the intended use."""

    REFUSE = "refuse"  # not analysed, with the reason; no probability anywhere
    FLAG = "flag"  # analysed, and marked "outside intended use" with the reason


@dataclass(frozen=True)
class GateVerdict:
    """Why an image is outside the intended use: the rule and a sentence for people."""

    reason: GateReason
    text: str


DEFAULT_POPULATION = "children"  # the one population of model cards made before populations (Kermany only)


@dataclass(frozen=True)
class Population:
    """Patients the model was validated for: ages ``min_age_years`` ≤ age < ``max_age_years``."""

    min_age_years: float
    max_age_years: float
    name: str = DEFAULT_POPULATION

    def describe(self) -> str:
        return f"{self.min_age_years:g} to <{self.max_age_years:g} years"

    def contains(self, age_years: float) -> bool:
        return self.min_age_years <= age_years < self.max_age_years


@dataclass(frozen=True)
class HeaderReading:
    """What the header rules say about one image: the verdict (None = the header allows analysis) and
    the population its patient's age falls in (None: no age in the header, or an age in no population)."""

    verdict: GateVerdict | None = None
    population: str | None = None


def _text(dataset: Dataset, keyword: str) -> str:
    """``header_text`` in upper case."""
    return header_text(dataset, keyword).upper()


def header_text(dataset: Dataset, keyword: str) -> str:
    """An attribute as text, read from the element's stored value without pydicom's value
    conversion (whose warnings would print invalid values — birth dates — into the logs, and which
    raises on a wrong VR or length); '' when absent or empty."""
    element = dataset.get_item(Tag(keyword))
    value = None if element is None else element.value
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(item) for item in value)
    return str(value or "").strip().strip("\x00").strip()


def parse_age_string(value: str) -> float | None:
    """Patient's Age text → years, tolerant of real-world forms ("058Y", "58", "5 Y", "005M",
    "3 years"); None when empty or not an age."""
    match = _AGE.match(value.strip().upper())
    if match is None:
        return None
    unit = (match.group(2) or "Y")[0]
    years = int(match.group(1)) * _YEARS_PER_UNIT[unit]
    return years if years <= OLDEST_PLAUSIBLE_YEARS else None


def parse_date(value: str) -> date | None:
    """A DA value ("20240131", also "2024.01.31" / "2024-01-31") → date; None when not a date."""
    match = _DATE.match(value.strip())
    if match is None:
        return None
    try:
        return date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:  # e.g. month 13: not a date, so the age is unknown
        return None


def patient_age_years(dataset: Dataset) -> float | None:
    """The patient's age at the examination in years, or None when the header does not tell."""
    age = parse_age_string(_text(dataset, "PatientAge"))
    if age is not None:
        return age
    birth = parse_date(_text(dataset, "PatientBirthDate"))
    if birth is None:
        return None
    examination = next((day for day in (parse_date(_text(dataset, k)) for k in DATE_KEYWORDS) if day), None)
    if examination is None or examination < birth:  # no reference date, or born after the study
        return None
    years = (examination - birth).days / 365.25
    return years if years <= OLDEST_PLAUSIBLE_YEARS else None


def _has_chest_hint(dataset: Dataset) -> bool:
    if _text(dataset, "BodyPartExamined") in CHEST_BODY_PARTS:
        return True
    descriptions = " ".join(_text(dataset, k) for k in ("StudyDescription", "SeriesDescription", "ProtocolName"))
    return any(word in descriptions for word in CHEST_WORDS)


@dataclass(frozen=True)
class IntendedUse:
    """The intended-use gate of one loaded model: its populations, image-check threshold and policy, and
    the site's outer age bounds (settings ``model.min_age_years`` / ``max_age_years``; None: none)."""

    populations: tuple[Population, ...]
    image_check_threshold: float | None  # None: the weights ship no image check
    policy: Policy = Policy.REFUSE
    min_age_years: float | None = None  # younger patients are refused, whatever their population
    max_age_years: float | None = None  # patients this old or older are refused, whatever their population

    def read_header(self, dataset: Dataset | None) -> HeaderReading:
        """The header rules' verdict and the population of the patient's age; an image without a header
        (JPEG, PNG: ``dataset`` None) has neither, so the image check decides both."""
        if dataset is None:
            return HeaderReading()
        return HeaderReading(self.header_verdict(dataset), self.header_population(dataset))

    def header_population(self, dataset: Dataset) -> str | None:
        """The name of the population the header's patient age falls in; None when the header gives no
        age (the image check then chooses) or an age in no population (the header verdict refuses it)."""
        age = patient_age_years(dataset)
        population = None if age is None else self.population_of_age(age)
        return None if population is None else population.name

    def population_of_age(self, age_years: float) -> Population | None:
        return next((population for population in self.populations if population.contains(age_years)), None)

    def header_verdict(self, dataset: Dataset) -> GateVerdict | None:
        """None when the header allows analysis, else the first rule it breaks."""
        modality = _text(dataset, "Modality")
        if header_text(dataset, "SOPClassUID") in SECONDARY_CAPTURE_CLASSES:
            if modality not in SECONDARY_CAPTURE_MODALITIES or not _has_chest_hint(dataset):
                return GateVerdict(GateReason.MODALITY, "secondary capture without chest radiograph hints")
        elif modality not in RADIOGRAPH_MODALITIES:
            return GateVerdict(GateReason.MODALITY, f"modality {modality or 'missing'} is not a radiograph (CR/DX)")
        body_part = _text(dataset, "BodyPartExamined")
        if body_part and body_part not in CHEST_BODY_PARTS:
            return GateVerdict(GateReason.BODY_PART, f"body part {body_part} is not the chest")
        view = _text(dataset, "ViewPosition")
        if view not in FRONTAL_VIEWS:
            kind = "lateral" if view in LATERAL_VIEWS else "non-frontal"
            return GateVerdict(GateReason.VIEW, f"{kind} view (ViewPosition {view})")
        age = patient_age_years(dataset)
        if age is None:
            return None
        if not (self.min_age_years or 0.0) <= age < (self.max_age_years or float("inf")):
            return GateVerdict(
                GateReason.AGE,
                f"patient age {_age_words(age)}, site allows {_bounds_words(self.min_age_years, self.max_age_years)}",
            )
        if self.population_of_age(age) is None:
            return GateVerdict(GateReason.AGE, f"patient age {_age_words(age)}, {self.describe_populations()}")
        return None

    def describe_populations(self) -> str:
        """The age ranges of the populations, short enough for an SR code meaning (64 characters)."""
        if len(self.populations) == 1:
            return f"model's population {self.populations[0].describe()}"
        ranges = ", ".join(f"{p.min_age_years:g} to <{p.max_age_years:g}" for p in self.populations)
        return f"populations {ranges} years"

    def verdict(self, header: GateVerdict | None, image_check_score: float | None) -> GateVerdict | None:
        """The header's verdict if it has one, else the image check's."""
        return header or self.image_verdict(image_check_score)

    def refuses(self, verdict: GateVerdict | None) -> TypeGuard[GateVerdict]:
        """True when ``verdict`` means "not analysed" under this gate's policy."""
        return verdict is not None and self.policy is Policy.REFUSE

    def image_verdict(self, image_check_score: float | None) -> GateVerdict | None:
        """None when the image looks like the training images, else the image-check verdict."""
        threshold = self.image_check_threshold
        if threshold is None or image_check_score is None or image_check_score <= threshold:
            return None
        return GateVerdict(
            GateReason.IMAGE_CHECK,
            f"image unlike the training radiographs (image check {image_check_score:.1f} > {threshold:.1f})",
        )


def _age_words(years: float) -> str:
    return f"{years:.0f} years" if years >= 2 else f"{years * 12:.0f} months"


def _bounds_words(min_years: float | None, max_years: float | None) -> str:
    if max_years is None:
        return f"{min_years:g} years and older"
    return f"{min_years or 0:g} to <{max_years:g} years"
