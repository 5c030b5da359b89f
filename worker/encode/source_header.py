"""Source header — a received instance becomes the clean reference our outputs copy patient and study from.

Our SC and SR carry the source's patient, study and acquisition-equipment attributes, and PACS
refuse — or worse, store — objects with invalid values. Sources in the wild carry plenty: Patient's
Age ``58``, dates with dashes, wrong VRs, over-long names, national characters without a Specific
Character Set. So the reference is built afresh, attribute by attribute, from the list below:

* each value is read from the stored bytes (never through pydicom's conversion, whose warnings
  quote values into the logs), decoded as ``charset.decode_text`` says, and checked against the
  attribute's VR from the DICOM dictionary — whatever VR the source wrote;
* a value is kept, repaired or dropped by ``vr_values.clean_value``; identifiers (Patient ID,
  Accession Number…) are kept as received or dropped, never repaired: a shortened identifier could
  name another patient. A dropped Type 2 attribute comes back empty. One log line per header says
  how many attributes were repaired and dropped, and which — never a value;
* the reference declares ISO_IR 192 when non-ASCII text remains, else no character set;
* Type 2 attributes the source lacks (Patient ID, Study Date…) are added empty — never invented;
* everything else of the source (pixels, private and sequence attributes, other modules) is left
  behind: our outputs have no use for it.

UIDs are the exception to repair: they tie our outputs to the source's study, series and instance,
so they are copied as received (see ``vr_values._clean_uid``).
"""

import logging
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.tag import Tag

from worker.encode.charset import declare_character_set, declared_encodings, element_text
from worker.encode.vr_values import SINGLE_VALUE_TEXT_VRS, clean_value

LOG = logging.getLogger("lungvision.worker.encode")

PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
)
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
)
# read by highdicom for the "acquisition equipment" item of Contributing Equipment
EQUIPMENT_KEYWORDS = (
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "AcquisitionDateTime",
    "AcquisitionDate",
    "AcquisitionTime",
)
# what our outputs refer to, and the image attributes the heatmap SC keeps
IMAGE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Laterality", "PatientOrientation")
COPIED_KEYWORDS = PATIENT_KEYWORDS + STUDY_KEYWORDS + EQUIPMENT_KEYWORDS + IMAGE_KEYWORDS
REFERENCE_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")

TYPE2_PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# copied as received or not at all: a shortened or otherwise repaired identifier could name another patient
IDENTIFIER_KEYWORDS = frozenset({"PatientID", "IssuerOfPatientID", "StudyID", "AccessionNumber", "DeviceSerialNumber"})
ENUMERATED_VALUES = {"PatientSex": {"M", "F", "O"}, "PatientIdentityRemoved": {"YES", "NO"}, "Laterality": {"R", "L"}}


@dataclass
class HeaderReport:
    """What building the reference changed: attribute keywords only, never values."""

    repaired: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def clean_source_header(source: Dataset) -> tuple[Dataset, HeaderReport]:
    """The reference dataset for ``source`` (see the module docstring) and what it repaired or dropped."""
    encodings = declared_encodings(source)
    header, report = Dataset(), HeaderReport()
    for keyword in COPIED_KEYWORDS:
        tag = Tag(keyword)
        element = source.get_item(tag)
        if element is None:
            continue
        vr = dictionary_VR(tag)
        values = element_text(element, vr, encodings)
        if values == []:  # present and empty: nothing to check
            header.add_new(tag, vr, "")
            continue
        cleaned = None if values is None else _clean_values(keyword, vr, values)
        if values is None or cleaned is None:
            report.dropped.append(keyword)
            continue
        if cleaned != _unpadded(vr, values):
            report.repaired.append(keyword)
        header.add_new(tag, vr, cleaned[0] if len(cleaned) == 1 else cleaned)
    for keyword in TYPE2_PATIENT_STUDY_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, "")
    return declare_character_set(header), report


def complete_source_header(source: Dataset) -> Dataset:
    """The clean reference dataset for ``source``, with every Type 2 patient/study attribute present.

    Logs how many attributes were repaired and dropped, and their keywords, when there were any.
    """
    header, report = clean_source_header(source)
    if report.repaired or report.dropped:
        LOG.log(
            logging.WARNING if report.dropped else logging.INFO,
            "source header of %s: %d attribute(s) repaired (%s), %d dropped (%s)",
            header.get("SOPInstanceUID", ""),
            len(report.repaired),
            " ".join(report.repaired) or "-",
            len(report.dropped),
            " ".join(report.dropped) or "-",
        )
    return header


def require_references(source: Dataset, role: str) -> None:
    """Raise ValueError, naming ``role`` and the attributes, when ``source`` lacks one of the UIDs
    our outputs refer to it by (its study, series, SOP class and instance)."""
    missing = [keyword for keyword in REFERENCE_KEYWORDS if not source.get(keyword)]
    if missing:
        raise ValueError(f"{role} has no {', '.join(missing)}: an output cannot refer to it")


def instance_number(source: Dataset, default: int) -> int:
    """The source's Instance Number when it is one valid IS value, else ``default`` — for the
    Instance Number of our outputs, which the pipeline takes from their source."""
    element = source.get_item(Tag("InstanceNumber"))
    values = None if element is None else element_text(element, "IS", None)
    number = clean_value("IS", values[0]) if values and len(values) == 1 else None
    return int(number) if number else default


def _clean_values(keyword: str, vr: str, values: list[str]) -> list[str] | None:
    """Every value of one attribute cleaned, or None when any cannot be or their number is wrong."""
    if dictionary_VM(Tag(keyword)) == "1" and len(values) > 1:
        return None  # a backslash where the attribute holds one value: which part was meant is unknowable
    maybe_cleaned = [clean_value(vr, value) for value in values]
    cleaned = [value for value in maybe_cleaned if value is not None]
    if len(cleaned) < len(maybe_cleaned):
        return None
    if keyword in IDENTIFIER_KEYWORDS and cleaned != _unpadded(vr, values):
        return None
    allowed = ENUMERATED_VALUES.get(keyword)
    if allowed is not None and any(value and value not in allowed for value in cleaned):
        return None
    return cleaned


def _unpadded(vr: str, values: list[str]) -> list[str]:
    """The values as received, without padding (what an unchanged value is compared with)."""
    return [value.rstrip(" \x00") if vr in SINGLE_VALUE_TEXT_VRS else value.strip(" \x00") for value in values]
