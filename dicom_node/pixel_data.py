"""Verify stage: is all the Pixel Data a received instance's header promises really there?

Checked before the node answers success, so a payload cut short on the way (or by the sender) is
refused with a failure status instead of being acknowledged and never sent again:

* native (uncompressed) transfer syntaxes: the Pixel Data value holds at least
  Rows × Columns × SamplesPerPixel × NumberOfFrames × BitsAllocated / 8 bytes (pydicom's
  ``get_expected_length``: 1-bit images pack 8 pixels a byte, rounded up; YBR_FULL_422 holds two
  thirds of that); a value one pad byte longer, to even length, is complete;
* encapsulated (compressed) transfer syntaxes: the value is an undefined-length sequence of items —
  the Basic Offset Table item, at least one fragment per frame — ended by the sequence delimiter,
  all inside the file. The compressed bytes themselves are not decoded.
"""

import struct
from pathlib import Path
from typing import cast

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD) with length 0, little endian
_ITEM_HEADER_BYTES = 8  # item tag + 32-bit length


def pixel_data_problem(dataset: Dataset, path: Path, transfer_syntax_uid: str | None) -> str | None:
    """Why the Pixel Data of ``dataset`` is incomplete, or None when it is all there (or absent).

    ``dataset`` was read from the Part-10 file ``path`` (values may be deferred: the pixel bytes
    are not loaded); encapsulated items are walked in the file itself, without reading fragments.
    The message names sizes and offsets only, never attribute values of the patient.
    """
    # keep_deferred: the raw element (length, value_tell), which get_item is typed as never returning
    element = cast(RawDataElement | None, dataset.get_item(PIXEL_DATA, keep_deferred=True))
    if element is None:
        return None  # "no Pixel Data" is the caller's own refusal
    try:
        for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):  # Type 1 in the Image Pixel module
            _positive(dataset, keyword)
        frames = _positive(dataset, "NumberOfFrames", default=1)
        if not dataset.get("PhotometricInterpretation"):
            raise ValueError("PhotometricInterpretation is missing")
    except ValueError as error:
        return f"cannot check the Pixel Data: {error}"
    if _is_encapsulated(transfer_syntax_uid, element.length):
        if element.length != UNDEFINED_LENGTH:
            return "Pixel Data of a compressed transfer syntax must have undefined length (encapsulated)"
        return _encapsulated_problem(path, element.value_tell, frames)
    if element.length == UNDEFINED_LENGTH:
        return "Pixel Data of an uncompressed transfer syntax has undefined length"
    expected = get_expected_length(dataset, unit="bytes")
    # A loaded value (small, or from a deflated file) is counted as read; a deferred one by its
    # length, which the header check has already compared with the file size.
    present = element.length if element.value is None else len(element.value)
    if present < expected:
        return f"Pixel Data has {present} of {expected} bytes"
    return None


def _is_encapsulated(transfer_syntax_uid: str | None, length: int) -> bool:
    """By the transfer syntax; by the value's form when the syntax is missing or not a known one."""
    syntax = UID(transfer_syntax_uid or "")
    return syntax.is_encapsulated if syntax.is_transfer_syntax else length == UNDEFINED_LENGTH


def _positive(dataset: Dataset, keyword: str, default: int | None = None) -> int:
    """The attribute as a positive integer; ``default`` when absent or empty; ValueError otherwise."""
    value = dataset.get(keyword)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"{keyword} is missing")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{keyword} is not an integer") from None
    if number < 1:
        raise ValueError(f"{keyword} is not positive")
    return number


def _encapsulated_problem(path: Path, value_offset: int, frames: int) -> str | None:
    """Walk the items of encapsulated Pixel Data starting at ``value_offset`` in ``path``."""
    with open(path, "rb") as stream:
        stream.seek(value_offset)
        try:
            parse_basic_offsets(stream)  # leaves the stream at the first fragment's item tag
            fragments, offsets = parse_fragments(stream)  # seeks over fragments, does not read them
        except (ValueError, struct.error) as error:
            return f"encapsulated Pixel Data is malformed: {error}"
        if fragments < frames:
            return f"encapsulated Pixel Data has {fragments} fragment(s) for {frames} frame(s)"
        stream.seek(offsets[-1] + 4)
        (last_length,) = struct.unpack("<L", stream.read(4))  # parse_fragments has read these 4 bytes
        delimiter_offset = offsets[-1] + _ITEM_HEADER_BYTES + last_length
        stream.seek(delimiter_offset)
        if stream.read(len(SEQUENCE_DELIMITER)) != SEQUENCE_DELIMITER:
            return f"encapsulated Pixel Data is not terminated: no sequence delimiter at offset {delimiter_offset}"
    return None
