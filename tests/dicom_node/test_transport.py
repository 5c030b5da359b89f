"""The node's server transport: presentation contexts copied without re-validating UIDs, associations that sleep
until there is work (common/association_io.py)."""

import copy

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from common.association_io import WholePduSocket
from config.settings import NodeSettings
from dicom_node.application_entity import build_ae
from dicom_node.transport import SharedUidContext, start_server
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
