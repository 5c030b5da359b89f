"""Result files are sent as they lie on disk — the data set's bytes read in PDU-sized pieces, neither decoded
nor encoded again — when the destination accepts their transfer syntax, and converted when it does not
(issue 12: decoding and re-encoding a study's SC and SR was ≈ a sixth of the deliverer's CPU). Against the
test storage SCP in a process of its own (tests/kit/storage_scp.py)."""

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import _config
from pynetdicom.dsutils import encode, split_dataset

from common.scu import InstanceFile, send_datasets
from tests.common.test_association_pool import ScpProcess
from tests.kit.dicom_fixtures import make_image
from worker.encode.equipment import Algorithm
from worker.encode.heatmap_sc import build_heatmap_sc

# (0008,1030) Study Description, LO, 8 bytes, explicit VR little endian: written after the Pixel Data it is
# out of tag order, as files in the wild sometimes are; pydicom would put it back in order on encoding.
ELEMENT_OUT_OF_ORDER = b"\x08\x00\x30\x10" + b"LO" + (8).to_bytes(2, "little") + b"APPENDED"


@pytest.fixture
def implicit_only_scp() -> Iterator[ScpProcess]:
    server = ScpProcess(transfer_syntaxes=[ImplicitVRLittleEndian])
    yield server
    server.stop()


@pytest.fixture
def scp() -> Iterator[ScpProcess]:
    server = ScpProcess()
    yield server
    server.stop()


def written(path: Path, *, out_of_order: bool = False) -> tuple[str, bytes]:
    """A small CR written to ``path`` as Part 10 (explicit VR little endian), optionally with an element out
    of tag order at the end; its SOP Instance UID and its data set's bytes as on disk."""
    dataset = make_image()
    if "StudyDescription" in dataset:
        del dataset.StudyDescription
    dataset.save_as(path, enforce_file_format=True)
    if out_of_order:
        with path.open("ab") as handle:
            handle.write(ELEMENT_OUT_OF_ORDER)
    _, offset = split_dataset(path)
    return str(dataset.SOPInstanceUID), path.read_bytes()[offset:]


def test_a_file_goes_byte_for_byte_as_it_lies_on_disk(scp, tmp_path) -> None:
    uid, on_disk = written(tmp_path / "image.dcm", out_of_order=True)
    assert send_datasets(scp.destination, [InstanceFile.read(tmp_path / "image.dcm")]) == [0]
    transfer_syntax, sha256 = scp.received[uid]
    assert transfer_syntax == ExplicitVRLittleEndian
    assert sha256 == hashlib.sha256(on_disk).hexdigest()  # re-encoded, the element would have moved
    assert _config.STORE_SEND_CHUNKED_DATASET is False  # pynetdicom's default again, for other callers


def test_a_file_in_a_syntax_the_destination_refuses_is_converted_to_one_it_accepts(implicit_only_scp, tmp_path) -> None:
    uid, _ = written(tmp_path / "image.dcm")
    files = [InstanceFile.read(tmp_path / "image.dcm")]
    assert files[0].transfer_syntax_uid == ExplicitVRLittleEndian
    assert send_datasets(implicit_only_scp.destination, files) == [0]
    assert implicit_only_scp.received[uid][0] == ImplicitVRLittleEndian
    assert str(dcmread(tmp_path / "image.dcm").SOPInstanceUID) == uid


def jpeg_sc(path: Path) -> str:
    """A JPEG Baseline heatmap SC (the worker's default) written to ``path``; its SOP Instance UID."""
    source = make_image()
    picture = np.zeros((64, 48, 3), np.uint8)
    picture[:, :24] = (200, 40, 40)
    sc = build_heatmap_sc(
        source,
        picture,
        algorithm=Algorithm("lungvision-resnet18", "1.0.0", "ab" * 32),
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9901,
        instance_number=1,
        compression="jpeg",
    )
    sc.save_as(path, enforce_file_format=True)
    return str(sc.SOPInstanceUID)


def test_a_jpeg_file_goes_as_it_is_where_jpeg_is_accepted(tmp_path) -> None:
    uid = jpeg_sc(tmp_path / "sc.dcm")
    server = ScpProcess(transfer_syntaxes=[JPEGBaseline8Bit, ExplicitVRLittleEndian])
    try:
        assert send_datasets(server.destination, [InstanceFile.read(tmp_path / "sc.dcm")]) == [0]
        assert server.received[uid][0] == JPEGBaseline8Bit
    finally:
        server.stop()


def test_a_jpeg_file_is_decompressed_for_a_destination_that_accepts_uncompressed_only(scp, tmp_path) -> None:
    """A PACS that does not take JPEG still gets the heatmap: decoded to RGB, same SOP Instance UID."""
    uid = jpeg_sc(tmp_path / "sc.dcm")
    assert send_datasets(scp.destination, [InstanceFile.read(tmp_path / "sc.dcm")]) == [0]
    assert scp.received[uid][0] in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert dcmread(tmp_path / "sc.dcm").file_meta.TransferSyntaxUID == JPEGBaseline8Bit  # the file is left as it was


def test_a_file_without_file_meta_is_refused_naming_the_file(tmp_path) -> None:
    path = tmp_path / "bare.dcm"
    path.write_bytes(encode(make_image(), False, True))  # the data set alone: no preamble, no file meta
    with pytest.raises(ValueError, match="bare.dcm cannot be sent: its file meta information lacks"):
        InstanceFile.read(path)
