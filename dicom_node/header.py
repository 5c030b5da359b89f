"""Parse stage: a received Part-10 file → the identifying attributes the node needs, and whether it is complete.

Pixel data is not loaded: its length and, when compressed, its item structure are checked on disk
(dicom_node.pixel_data).
"""

import os
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.pixel_data import pixel_data_problem

PIXEL_DATA = 0x7FE00010
_DEFER_BYTES = 4096  # values larger than this are skipped, not read: pixel data stays on disk
_UNDEFINED_LENGTH = 0xFFFFFFFF


class UnreadableDataset(ValueError):
    """The payload is not a complete DICOM dataset (empty, truncated, garbage); the message says why."""


@dataclass(frozen=True)
class Header:
    """What the node reads from one instance. Deliberately no patient attributes."""

    transfer_syntax_uid: str | None  # from the File Meta Information
    sop_class_uid: object
    sop_instance_uid: object
    study_instance_uid: object
    series_instance_uid: object
    manufacturer: str | None
    has_pixel_data: bool
    pixel_data_problem: str | None  # why the Pixel Data is incomplete; None when it is all there


def read_header(path: Path) -> Header:
    """Read ``path`` and check it is structurally complete, or raise :class:`UnreadableDataset`.

    UIDs are returned as found (possibly missing or malformed); checking them is the caller's job.
    """
    size = os.path.getsize(path)
    try:
        deflated = read_file_meta_info(path).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        # A deflated data set is inflated into memory anyway; reading its values (no deferring) lets
        # the pixel check count the bytes really there, since its offsets are not file offsets.
        dataset = dcmread(path, defer_size=None if deflated else _DEFER_BYTES)
        if deflated:
            _check_not_empty(dataset, path)  # inflating already failed on a truncated stream
        else:
            _check_complete(dataset, size, path)
        transfer_syntax_uid = _text(dataset.file_meta.get("TransferSyntaxUID"))
        return Header(
            transfer_syntax_uid=transfer_syntax_uid,
            sop_class_uid=_value(dataset, "SOPClassUID"),
            sop_instance_uid=_value(dataset, "SOPInstanceUID"),
            study_instance_uid=_value(dataset, "StudyInstanceUID"),
            series_instance_uid=_value(dataset, "SeriesInstanceUID"),
            manufacturer=_text(_value(dataset, "Manufacturer")),
            has_pixel_data=PIXEL_DATA in dataset,
            pixel_data_problem=pixel_data_problem(dataset, path, transfer_syntax_uid),
        )
    except UnreadableDataset:
        raise
    except Exception as error:  # pydicom raises many types on garbage; each becomes a named refusal
        raise UnreadableDataset(f"{type(error).__name__}: {error}") from error


def _check_not_empty(dataset: Dataset, path: Path) -> None:
    """Raise when no element could be read.

    pydicom also returns an empty data set when an undefined-length value (a sequence, or compressed
    Pixel Data) runs to the end of the file without its delimiter; reading again up to the Pixel
    Data tells that truncation apart from an empty payload.
    """
    if len(dataset) > 0:
        return
    if len(dcmread(path, defer_size=_DEFER_BYTES, stop_before_pixels=True)) > 0:
        raise UnreadableDataset("truncated: the Pixel Data ends before its sequence delimiter")
    raise UnreadableDataset("the dataset is empty, or truncated inside an undefined-length sequence")


def _check_complete(dataset: Dataset, file_size: int, path: Path) -> None:
    """Raise when the dataset is empty or an element's value runs past the end of the file (truncated)."""
    _check_not_empty(dataset, path)
    for tag in dataset.keys():  # noqa: SIM118 (a pydicom Dataset iterates elements; keys() gives the tags)
        element = dataset.get_item(tag, keep_deferred=True)
        value_tell = getattr(element, "value_tell", None)
        length = getattr(element, "length", None)
        if value_tell is None or length is None or length == _UNDEFINED_LENGTH:
            continue
        if value_tell + length > file_size:
            raise UnreadableDataset(
                f"truncated: element {tag} needs {length} bytes at offset {value_tell}, file has {file_size}"
            )


def _value(dataset: Dataset, keyword: str) -> object:
    """The element's value, or None when absent."""
    return dataset.get(keyword)


def _text(value: object) -> str | None:
    return None if value is None else str(value)
