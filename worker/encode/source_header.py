"""Source header — a received instance becomes the reference our outputs copy patient and study from.

Real inputs are often incomplete (no Patient ID, no Study Date, no Referring Physician). Those are
Type 2 attributes in every IOD we write: they must be present, and empty when unknown. Copying the
source's defects would make our outputs invalid, so missing ones are added empty here — never
invented.
"""

from pydicom import Dataset

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


def complete_source_header(source: Dataset) -> Dataset:
    """A copy of ``source`` without pixel data, with every Type 2 patient/study attribute present."""
    header = Dataset()
    header.update({element.tag: element for element in source if element.keyword != "PixelData"})
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    for keyword in TYPE2_PATIENT_STUDY_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, "")
    return header
