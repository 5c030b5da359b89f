"""Verify stage: complete Pixel Data passes; fixtures broken on purpose get a reason, and the intake refuses them."""

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate, generate_fragments, parse_basic_offsets
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicom_node.intake import Disposition, Intake, Received, StoreStatus
from dicom_node.pixel_data import PIXEL_DATA, SEQUENCE_DELIMITER, pixel_data_problem
from inference.sample_dicom import wrap_image, write_dataset
from tests.kit.dicom_fixtures import make_image, save, truncated_copy

COMPRESSED = [RLELossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless]
BOT_ONLY = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # an empty Basic Offset Table item


def picture() -> np.ndarray:
    rows, columns = np.mgrid[0:96, 0:80]
    return (rows * 3 + columns * 2) % 256


def problem(path: Path, *, read_from: Path | None = None) -> str | None:
    """The check as the node runs it: header values from ``read_from`` (default: ``path``), items walked in ``path``."""
    dataset = dcmread(read_from or path, defer_size=4096)
    return pixel_data_problem(dataset, path, dataset.file_meta.TransferSyntaxUID)


def compressed_file(folder: Path, syntax: str) -> Path:
    return write_dataset(wrap_image(picture(), transfer_syntax=syntax), folder / f"{syntax}.dcm")


def with_pixel_data(
    folder: Path,
    name: str,
    *,
    rows: int,
    columns: int,
    bits: int,
    pixel_bytes: bytes,
    frames: int | None = None,
    syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """A CR with the given geometry and exactly ``pixel_bytes`` as its Pixel Data value (pydicom pads odd lengths)."""
    dataset = make_image(size=(rows, columns))
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, bits, bits - 1
    if frames is not None:
        dataset.NumberOfFrames = frames
    dataset.PixelData = pixel_bytes
    return save(dataset, folder / name)


def encapsulated_file(folder: Path, name: str, value: bytes, *, frames: int = 1) -> Path:
    """An RLE CR whose Pixel Data value is ``value`` as given (pydicom writes it with undefined length + delimiter)."""
    dataset = wrap_image(picture(), transfer_syntax=RLELossless)
    if frames > 1:
        dataset.NumberOfFrames = frames
    dataset.PixelData = value
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    return write_dataset(dataset, folder / name)


def rle_fragment() -> bytes:
    dataset = wrap_image(picture(), transfer_syntax=RLELossless)
    buffer = BytesIO(dataset.PixelData)
    parse_basic_offsets(buffer)
    [fragment] = generate_fragments(buffer)
    return fragment


# --- native ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_complete_native_pixel_data_passes_and_a_short_value_is_named(tmp_path, syntax: str) -> None:
    whole = with_pixel_data(
        tmp_path, "whole.dcm", rows=64, columns=48, bits=16, pixel_bytes=bytes(64 * 48 * 2), syntax=syntax
    )
    assert problem(whole) is None
    # What pynetdicom sends for a file whose tail was cut: a consistent data set with a short value.
    short = with_pixel_data(tmp_path, "short.dcm", rows=64, columns=48, bits=16, pixel_bytes=bytes(4000), syntax=syntax)
    assert problem(short) == "Pixel Data has 4000 of 6144 bytes"


@pytest.mark.parametrize(
    ("rows", "columns", "bits", "present", "expected"),
    [
        (3, 3, 8, 9, None),  # 9 bytes, written with a pad byte to 10: complete
        (5, 5, 8, 25, None),
        (3, 3, 1, 2, None),  # 1-bit: 9 pixels packed into 2 bytes
        (5, 5, 1, 4, None),  # 25 bits → 4 bytes
        (5, 5, 1, 2, "Pixel Data has 2 of 4 bytes"),
        (5, 5, 8, 23, "Pixel Data has 24 of 25 bytes"),  # 23 bytes + pad: still short of 25
    ],
)
def test_odd_lengths_and_one_bit_images_are_counted_in_whole_bytes(
    tmp_path, rows, columns, bits, present, expected
) -> None:
    path = with_pixel_data(tmp_path, "odd.dcm", rows=rows, columns=columns, bits=bits, pixel_bytes=bytes(present))
    assert problem(path) == expected


def test_multi_frame_native_pixel_data_needs_every_frame(tmp_path) -> None:
    frame = 16 * 16 * 2
    whole = with_pixel_data(tmp_path, "whole.dcm", rows=16, columns=16, bits=16, frames=3, pixel_bytes=bytes(3 * frame))
    two_of_three = with_pixel_data(
        tmp_path, "short.dcm", rows=16, columns=16, bits=16, frames=3, pixel_bytes=bytes(2 * frame)
    )
    assert problem(whole) is None
    assert problem(two_of_three) == f"Pixel Data has {2 * frame} of {3 * frame} bytes"


def test_missing_image_attributes_make_the_length_uncheckable(tmp_path) -> None:
    dataset = make_image()
    del dataset.Rows
    assert problem(save(dataset, tmp_path / "no-rows.dcm")) == "cannot check the Pixel Data: Rows is missing"


# --- encapsulated ---------------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", COMPRESSED)
def test_complete_encapsulated_pixel_data_passes(tmp_path, syntax: str) -> None:
    assert problem(compressed_file(tmp_path, syntax)) is None


@pytest.mark.parametrize("syntax", [RLELossless, JPEGBaseline8Bit])
@pytest.mark.parametrize("drop_bytes", [8, 9, 200])  # the delimiter only; into the last fragment
def test_a_cut_encapsulated_stream_is_not_terminated(tmp_path, syntax: str, drop_bytes: int) -> None:
    whole = compressed_file(tmp_path, syntax)
    cut = truncated_copy(whole, tmp_path / "cut.dcm", drop_bytes=drop_bytes)
    found = problem(cut, read_from=whole)  # the header as far as the Pixel Data is the same in both files
    assert found is not None and found.startswith("encapsulated Pixel Data is not terminated"), found


def test_a_missing_sequence_delimiter_is_named(tmp_path) -> None:
    whole = compressed_file(tmp_path, RLELossless)
    raw = whole.read_bytes()
    assert raw.endswith(SEQUENCE_DELIMITER)
    end = len(raw) - len(SEQUENCE_DELIMITER)
    missing = tmp_path / "no-delimiter.dcm"
    missing.write_bytes(raw[:end])
    assert problem(missing, read_from=whole) == (
        f"encapsulated Pixel Data is not terminated: no sequence delimiter at offset {end}"
    )
    replaced = tmp_path / "padding-instead.dcm"  # Data Set Trailing Padding (FFFC,FFFC) OB where the delimiter belongs
    replaced.write_bytes(raw[:end] + b"\xfc\xff\xfc\xffOB\x00\x00\x02\x00\x00\x00\x00\x00")
    assert problem(replaced, read_from=whole) == (
        f"encapsulated Pixel Data is malformed: Unexpected tag '(FFFC,FFFC)' at offset {end} when parsing the "
        "encapsulated pixel data fragment items"
    )


def test_an_encapsulated_stream_needs_a_basic_offset_table_and_a_fragment_per_frame(tmp_path) -> None:
    fragment = rle_fragment()
    assert problem(encapsulated_file(tmp_path, "one.dcm", encapsulate([fragment]))) is None
    assert problem(encapsulated_file(tmp_path, "three.dcm", encapsulate([fragment] * 3), frames=3)) is None
    assert problem(encapsulated_file(tmp_path, "two-of-three.dcm", encapsulate([fragment] * 2), frames=3)) == (
        "encapsulated Pixel Data has 2 fragment(s) for 3 frame(s)"
    )
    assert problem(encapsulated_file(tmp_path, "bot-only.dcm", BOT_ONLY)) == (
        "encapsulated Pixel Data has 0 fragment(s) for 1 frame(s)"
    )
    whole = compressed_file(tmp_path, RLELossless)  # its Basic Offset Table's item tag overwritten:
    offset = dcmread(whole, defer_size=4096).get_item(PIXEL_DATA, keep_deferred=True).value_tell
    raw = whole.read_bytes()
    no_table = tmp_path / "no-table.dcm"
    no_table.write_bytes(raw[:offset] + b"\x01\x02\x03\x04" + raw[offset + 4 :])
    assert problem(no_table) == (
        "encapsulated Pixel Data is malformed: Found unexpected tag (0201,0403) instead of "
        "(FFFE,E000) when parsing the Basic Offset Table item"
    )


def test_a_compressed_syntax_with_native_pixel_data_is_named(tmp_path) -> None:
    native = with_pixel_data(tmp_path, "native.dcm", rows=8, columns=8, bits=8, pixel_bytes=bytes(64))
    path = tmp_path / "relabelled.dcm"  # pydicom refuses to write it; the two UIDs have the same length
    path.write_bytes(native.read_bytes().replace(ExplicitVRLittleEndian.encode(), RLELossless.encode(), 1))
    assert problem(path) == "Pixel Data of a compressed transfer syntax must have undefined length (encapsulated)"


# --- the intake refuses them ----------------------------------------------------------------------


def receive(intake: Intake, path: Path):
    dataset = dcmread(path, stop_before_pixels=True)
    return intake.receive(
        Received(
            path,
            "MODALITY",
            str(dataset.SOPClassUID),
            str(dataset.SOPInstanceUID),
            str(dataset.file_meta.TransferSyntaxUID),
        )
    )


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize(
    "kind", ["short-native", "short-multi-frame", "cut-rle", "cut-jpeg", "no-delimiter-jpeg2000", "missing-frame-rle"]
)
def test_the_intake_refuses_incomplete_pixel_data_and_keeps_nothing(intake, spool, tracker, tmp_path, kind) -> None:
    received_dir = spool.receiving_dir
    if kind == "short-native":
        path = with_pixel_data(received_dir, "x.dcm", rows=64, columns=64, bits=16, pixel_bytes=bytes(5000))
    elif kind == "short-multi-frame":
        path = with_pixel_data(received_dir, "x.dcm", rows=16, columns=16, bits=8, frames=4, pixel_bytes=bytes(768))
    elif kind == "missing-frame-rle":
        path = encapsulated_file(received_dir, "x.dcm", encapsulate([rle_fragment()] * 2), frames=3)
    else:
        syntax = {"cut-rle": RLELossless, "cut-jpeg": JPEGBaseline8Bit, "no-delimiter-jpeg2000": JPEG2000Lossless}[kind]
        whole = compressed_file(tmp_path, syntax)
        path = truncated_copy(whole, received_dir / "x.dcm", drop_bytes=8 if kind.startswith("no-delimiter") else 300)
    outcome = receive(intake, path)
    assert outcome.status == StoreStatus.CANNOT_UNDERSTAND, outcome
    assert outcome.disposition in (Disposition.INCOMPLETE_PIXEL_DATA, Disposition.UNREADABLE), outcome
    assert "Pixel Data" in outcome.detail, outcome
    assert not list((spool.root / "studies").iterdir())
    assert len(tracker) == 0


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, *COMPRESSED])
def test_the_intake_stores_complete_instances_of_every_kind(intake, spool, syntax: str) -> None:
    path = write_dataset(
        wrap_image(picture(), transfer_syntax=syntax, study_uid=generate_uid()), spool.receiving_dir / "x.dcm"
    )
    assert receive(intake, path).disposition == Disposition.STORED
