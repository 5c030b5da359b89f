"""The node's server transport: presentation contexts copied without re-validating UIDs, associations that sleep
until there is work (common/association_io.py), data set PDUs written to the C-STORE's file by our reader."""

import copy
import struct
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification
from pynetdicom.transport import AssociationSocket

from common.association_io import WholePduSocket
from config.settings import NodeSettings
from dicom_node.application_entity import build_ae
from dicom_node.transport import DataSetFragmentReader, SharedUidContext, start_server, write_all
from tests.kit.wakeups import counted_wakeups, wakeups_while_idle


def test_a_copied_context_negotiates_independently_and_shares_its_uids() -> None:
    original = SharedUidContext.like(
        build_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    )
    twin = copy.deepcopy(original)
    assert type(twin) is SharedUidContext
    twin.context_id, twin.result = 3, 0x00
    twin.transfer_syntax.remove(ImplicitVRLittleEndian)
    assert (original.context_id, original.result) == (None, None)
    assert original.transfer_syntax == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert twin.abstract_syntax is original.abstract_syntax  # shared, not re-validated


def test_the_server_accepts_what_the_ae_supports_and_stops() -> None:
    ae = build_ae(NodeSettings(ae_title="LUNGVISION"))
    server = start_server(ae, ("127.0.0.1", 0), ssl_context=None, evt_handlers=[])
    try:
        assert all(isinstance(context, SharedUidContext) for context in server.contexts)
        assert len(server.contexts) == len(ae.supported_contexts)
        requestor = AE(ae_title="TESTSCU")
        requestor.add_requested_context(Verification)
        assoc = requestor.associate("127.0.0.1", server.server_address[1], ae_title="LUNGVISION")
        assert assoc.is_established
        assert isinstance(server.active_associations[0].dul.socket, WholePduSocket)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert server not in ae._servers


def test_an_idle_association_sleeps_instead_of_polling_every_millisecond(monkeypatch) -> None:
    """Polling would wake each thread ≈ 500 times in half a second; sleeping, about 0.5 / IDLE_WAIT_S times."""
    server = start_server(
        build_ae(NodeSettings(ae_title="LUNGVISION")), ("127.0.0.1", 0), ssl_context=None, evt_handlers=[]
    )
    try:
        with counted_wakeups(monkeypatch) as wakeups:
            requestor = AE(ae_title="TESTSCU")
            requestor.add_requested_context(Verification)
            assoc = requestor.associate("127.0.0.1", server.server_address[1], ae_title="LUNGVISION")
            assert assoc.send_c_echo().Status == 0x0000  # answered at once: the response woke the DUL
            idle = wakeups_while_idle(wakeups)
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
    finally:
        server.shutdown()
    assert 0 < idle["dul"] < 100 and 0 < idle["reactor"] < 100, idle


def _received_files(
    monkeypatch, tmp_path, *, pdu_handler: bool, instances: int = 1, split_sends: bool = False
) -> tuple[list[bytes], int]:
    """Send ``instances`` ≈1 MB CRs over 16 KiB PDUs on one association to a server; return the stored files and
    how many PDUs pynetdicom read. ``split_sends``: the requestor sends each PDU in two parts, a moment apart,
    so that the server's reads end inside PDUs."""
    tmp_path.mkdir()
    monkeypatch.setattr(pynetdicom_config, "STORE_RECV_CHUNKED_DATASET", True)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    read_by_pynetdicom = []
    original_read = DULServiceProvider._read_pdu_data

    def counted(dul: DULServiceProvider) -> None:
        if dul.assoc.is_acceptor:  # the server's side, not the requestor's
            read_by_pynetdicom.append(1)
        original_read(dul)

    monkeypatch.setattr(DULServiceProvider, "_read_pdu_data", counted)
    if split_sends:
        original_send = AssociationSocket.send

        def split_send(association_socket: AssociationSocket, bytestream: bytes) -> None:
            if association_socket.assoc.is_acceptor:
                original_send(association_socket, bytestream)
                return
            original_send(association_socket, bytestream[: len(bytestream) // 2])
            time.sleep(0.002)
            original_send(association_socket, bytestream[len(bytestream) // 2 :])

        monkeypatch.setattr(AssociationSocket, "send", split_send)
    stored: list[bytes] = []

    def handle_store(event) -> int:
        stored.append(Path(event.dataset_path).read_bytes())
        return 0x0000

    handlers: list = [(evt.EVT_C_STORE, handle_store)]
    if pdu_handler:
        handlers.append((evt.EVT_PDU_RECV, lambda event: None))
    ae = build_ae(NodeSettings(ae_title="LUNGVISION", max_pdu_bytes=16384))
    server = start_server(ae, ("127.0.0.1", 0), ssl_context=None, evt_handlers=handlers)
    try:
        requestor = AE(ae_title="TESTSCU")
        requestor.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        assoc = requestor.associate("127.0.0.1", server.server_address[1], ae_title="LUNGVISION")
        for index in range(instances):
            assert assoc.send_c_store(_cr_image(index)).Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    return stored, len(read_by_pynetdicom)


def _cr_image(index: int = 0) -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID = ComputedRadiographyImageStorage
    dataset.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{index + 1}"
    dataset.Rows, dataset.Columns, dataset.BitsAllocated = 512, 1024, 16
    dataset.PixelData = (np.arange(512 * 1024, dtype=np.uint16) + index).tobytes()  # 1 MiB: 64 PDUs of 16 KiB
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset


def test_data_set_pdus_are_written_by_the_reader_byte_for_byte_as_pynetdicom_writes_them(monkeypatch, tmp_path) -> None:
    taken_over, read_by_pynetdicom = _received_files(monkeypatch, tmp_path / "reader", pdu_handler=False)
    # A handler on EVT_PDU_RECV must see every PDU: the reader steps aside and pynetdicom reads them all.
    as_pynetdicom, read_all = _received_files(monkeypatch, tmp_path / "pynetdicom", pdu_handler=True)
    assert taken_over == as_pynetdicom and len(taken_over) == 1
    assert dcmread(BytesIO(taken_over[0])).PixelData == _cr_image().PixelData
    assert read_all > 64  # association, command, 64 data set PDUs, release
    assert read_by_pynetdicom <= 5, read_by_pynetdicom  # association, command, the last fragment, release


@pytest.mark.parametrize("split_sends", [False, True], ids=["whole PDUs", "PDUs sent in two parts"])
def test_several_instances_on_one_association_arrive_byte_for_byte(monkeypatch, tmp_path, split_sends) -> None:
    """Reads that take several PDUs at once, or end inside one, must give back whatever is not a data set
    fragment (the last one, the next command) with the bytes after it."""
    taken_over, read_by_pynetdicom = _received_files(
        monkeypatch, tmp_path / "reader", pdu_handler=False, instances=3, split_sends=split_sends
    )
    as_pynetdicom, _ = _received_files(monkeypatch, tmp_path / "pynetdicom", pdu_handler=True, instances=3)
    assert taken_over == as_pynetdicom and len(taken_over) == 3
    assert [dcmread(BytesIO(data)).PixelData for data in taken_over] == [_cr_image(i).PixelData for i in range(3)]
    assert read_by_pynetdicom <= 2 + 2 * 3 + 3, read_by_pynetdicom  # association, release; command + last per C-STORE


def _pdv(context_id: int, control: int, value: bytes) -> bytes:
    return struct.pack(">LBB", len(value) + 2, context_id, control) + value


@pytest.mark.parametrize(
    ("body", "taken"),
    [
        (_pdv(1, 0b00, b"abcd"), [b"abcd"]),
        (_pdv(1, 0b00, b"ab") + _pdv(1, 0b00, b"cd"), [b"ab", b"cd"]),
        (_pdv(1, 0b10, b"abcd"), None),  # the last fragment: pynetdicom completes the message
        (_pdv(1, 0b00, b"ab") + _pdv(1, 0b10, b"cd"), None),
        (_pdv(1, 0b01, b"abcd"), None),  # a command fragment
        (_pdv(3, 0b00, b"abcd"), None),  # another presentation context
        (_pdv(1, 0b00, b"abcd")[:-1], None),  # an item longer than the PDU
        (_pdv(1, 0b00, b"abcd") + b"\0\0", None),  # bytes after the last item
    ],
)
def test_only_pdus_of_mid_data_set_fragments_on_the_message_context_are_taken_over(body, taken) -> None:
    reader = DataSetFragmentReader.__new__(DataSetFragmentReader)
    reader._spans = []
    view = memoryview(body)
    found = reader._data_set_spans(view, 1)
    assert (found, [bytes(view[start:end]) for start, end in reader._spans] if found else None) == (
        taken is not None,
        taken,
    )


def test_write_all_writes_more_buffers_than_one_writev_takes_in_order(tmp_path) -> None:
    pieces = [bytes([index % 251]) * (index % 7) for index in range(3000)]  # some empty; more than _IOV_MAX
    with open(tmp_path / "out", "wb") as file:
        assert write_all(file.fileno(), [memoryview(piece) for piece in pieces]) == sum(map(len, pieces))
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)
