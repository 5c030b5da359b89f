"""DICOM test data made here, never taken from a patient: small node images, radiographs of the shipped
model's population, and headers broken on purpose the way real sources break them — invalid AS/DA/TM/PN/LO
values, over-long values, national characters without (or with an unknown) Specific Character Set, wrong
VRs, odd value lengths, implicit VR files.

pydicom writes valid files, so the breakage is done on the written bytes: :func:`write_broken` writes the
dataset, then replaces the stored value (and, in explicit VR files, the VR) of the named attributes with
exactly the bytes asked for — odd lengths included.
"""

import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydicom import Dataset, config, dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset as write_encoded_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from inference.sample_dicom import wrap_image, write_dataset
from tests.kit.data import chest_pixels

# Patient attributes every test dataset carries; none may ever appear in a log line.
PATIENT_NAME = "Secretname^Patient"
PATIENT_ID = "PID-SECRET-4711"
PATIENT_BIRTH_DATE = "19311231"


def make_image(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    sop_class_uid: str = ComputedRadiographyImageStorage,
    size: tuple[int, int] = (64, 64),
    manufacturer: str = "Test Modality Inc.",
) -> Dataset:
    """A small 16-bit MONOCHROME2 image (CR by default), explicit VR little endian, with file meta."""
    sop_uid = sop_uid or generate_uid()
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = sop_class_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
    dataset.SOPClassUID = sop_class_uid
    dataset.SOPInstanceUID = sop_uid
    dataset.StudyInstanceUID = study_uid if study_uid is not None else generate_uid()
    dataset.SeriesInstanceUID = series_uid or generate_uid()
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    dataset.PatientBirthDate = PATIENT_BIRTH_DATE
    dataset.Modality = "CR"
    dataset.Manufacturer = manufacturer
    dataset.BodyPartExamined = "CHEST"
    rows, columns = size
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    pixels = (np.arange(rows * columns, dtype=np.uint32) % 4096).astype(np.uint16)
    dataset.PixelData = pixels.tobytes()
    return dataset


def save(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def raw_part10(path: Path, body: bytes, *, sop_class_uid: str, sop_uid: str) -> Path:
    """A file with valid File Meta Information followed by ``body`` as the dataset (may be anything)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(path, "wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(handle, meta)
        handle.write(body)
    return path


def encoded_body(dataset: Dataset) -> bytes:
    """The dataset encoded explicit VR little endian, without file meta: what travels in a C-STORE."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_encoded_dataset(buffer, dataset)
    return buffer.getvalue()


def truncated_copy(source: Path, target: Path, drop_bytes: int) -> Path:
    target.write_bytes(source.read_bytes()[:-drop_bytes])
    return target


# explicit VR little endian: these VRs have a 2-byte length right after the VR; the others reserve 2 bytes, then 4
SHORT_LENGTH_VRS = frozenset("AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())


def radiograph(index: int = 0, *, implicit: bool = False, study_uid: str | None = None, **attributes: str) -> Dataset:
    """A frontal chest CR of a 4-year-old (inside the shipped model's population), with ``attributes`` set."""
    dataset = wrap_image(
        chest_pixels(index),
        study_uid=study_uid or generate_uid(),
        transfer_syntax=ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian,
    )
    dataset.PatientAge = "004Y"
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    return dataset


def write_broken(
    dataset: Dataset,
    path: Path,
    *,
    values: Mapping[str, bytes] | None = None,
    vrs: Mapping[str, str] | None = None,
    without: tuple[str, ...] = (),
) -> Path:
    """Write ``dataset`` to ``path``, then store ``values`` (keyword → the exact value bytes, any
    length) with the VRs in ``vrs`` (keyword → VR; explicit VR files only), after removing the
    attributes named in ``without``. Returns ``path``."""
    values, vrs = values or {}, vrs or {}
    dataset = dataset.copy()
    for keyword in without:
        if keyword in dataset:
            delattr(dataset, keyword)
    for keyword in values:  # a placeholder of the right kind, replaced byte for byte below
        tag = tag_for_keyword(keyword)
        vr = vrs.get(keyword, dictionary_VR(tag))
        dataset[tag] = DataElement(tag, vr, _placeholder(keyword, vr), validation_mode=config.IGNORE)
    write_dataset(dataset, path)
    if values:
        _replace_values(path, {tag_for_keyword(keyword): raw for keyword, raw in values.items()})
    return path


def _replace_values(path: Path, replacements: Mapping[int, bytes]) -> None:
    """Splice new value bytes (and length fields) into the file, the last element first so that
    the offsets read before stay right."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    implicit = meta.TransferSyntaxUID == ImplicitVRLittleEndian
    data = bytearray(path.read_bytes())
    with open(path, "rb") as file:
        # preamble and "DICM" (132 bytes), the group length element (12 bytes), then the rest of the meta
        file.seek(132 + 12 + meta.FileMetaInformationGroupLength)
        elements = [
            element
            for element in data_element_generator(file, implicit, True, stop_when=_at_pixel_data)
            if element.tag in replacements
        ]
    assert {element.tag for element in elements} == set(replacements), "an attribute to break was not written"
    for element in sorted(elements, key=lambda element: element.value_tell, reverse=True):
        raw = replacements[element.tag]
        start = element.value_tell
        if not implicit and element.VR in SHORT_LENGTH_VRS:
            data[start - 2 : start] = struct.pack("<H", len(raw))
        else:
            data[start - 4 : start] = struct.pack("<I", len(raw))
        data[start : start + element.length] = raw
    path.write_bytes(bytes(data))


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag >= 0x7FE00010


def _placeholder(keyword: str, vr: str) -> bytes | int | float:
    """A value pydicom can write for ``vr``: it parses numbers, writes binary numbers from Python
    numbers, encodes text with the character set, and reads an UN element with the dictionary's VR."""
    if keyword == "SpecificCharacterSet":
        return b"ISO_IR 100"
    if vr == "UN":
        vr = dictionary_VR(tag_for_keyword(keyword))
    if vr in ("US", "SS", "UL", "SL"):
        return 0
    if vr in ("FL", "FD"):
        return 0.0
    return b"0 " if vr in ("IS", "DS") else b"XX"
