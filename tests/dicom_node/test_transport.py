"""The node's server transport: whole-PDU reads, presentation contexts copied without re-validating UIDs, and
association threads that sleep until there is work."""

import copy
import socket
import threading

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from config.settings import NodeSettings
from dicom_node.application_entity import build_ae
from dicom_node.transport import IDLE_WAIT_S, ReactorGate, SharedUidContext, WholePduSocket, start_server


def _socket_over(raw: socket.socket) -> WholePduSocket:
    """A WholePduSocket around ``raw`` without an association (only ``recv`` is used)."""
    wrapped = WholePduSocket.__new__(WholePduSocket)
    wrapped.socket = raw
    return wrapped


def test_recv_returns_the_whole_length_when_the_peer_sends_it_in_small_pieces() -> None:
    ours, peer = socket.socketpair()
    payload = bytes(range(256)) * 1024  # 256 KiB

    def send_slowly() -> None:
        for start in range(0, len(payload), 1000):
            peer.sendall(payload[start : start + 1000])

    sender = threading.Thread(target=send_slowly)
    sender.start()
    try:
        received = _socket_over(ours).recv(len(payload))
    finally:
        sender.join()
        ours.close()
        peer.close()
    assert received == payload


def test_recv_returns_what_arrived_when_the_peer_closes_early() -> None:
    ours, peer = socket.socketpair()
    peer.sendall(b"abcdef")
    peer.close()
    try:
        assert _socket_over(ours).recv(100) == b"abcdef"
    finally:
        ours.close()


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


def test_the_reactor_gate_opens_on_work_and_on_set_and_stays_shut_while_cleared() -> None:
    gate = ReactorGate()
    gate.work()
    assert gate.wait() is True  # work queued before the wait: no sleep
    gate.clear()
    opened = threading.Event()

    def wait() -> None:
        gate.wait()
        opened.set()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    gate.work()  # work alone does not open a paused reactor
    assert not opened.wait(IDLE_WAIT_S * 4)
    gate.set()
    assert opened.wait(10)
    waiter.join(10)


def test_an_idle_association_sleeps_instead_of_polling_every_millisecond(monkeypatch) -> None:
    """pynetdicom's loops look for work 1 000 times a second; here an idle association's threads wake about
    1 / IDLE_WAIT_S times a second (counted over half a second: polling would make it ≈ 500 wake-ups)."""
    wakeups = {"dul": 0, "reactor": 0}
    ready, wait = WholePduSocket.ready.fget, ReactorGate.wait

    def counted_ready(self) -> bool:
        wakeups["dul"] += 1
        return ready(self)

    def counted_wait(self, timeout=None) -> bool:
        wakeups["reactor"] += 1
        return wait(self, timeout)

    monkeypatch.setattr(WholePduSocket, "ready", property(counted_ready))
    monkeypatch.setattr(ReactorGate, "wait", counted_wait)
    server = start_server(
        build_ae(NodeSettings(ae_title="LUNGVISION")), ("127.0.0.1", 0), ssl_context=None, evt_handlers=[]
    )
    try:
        requestor = AE(ae_title="TESTSCU")
        requestor.add_requested_context(Verification)
        assoc = requestor.associate("127.0.0.1", server.server_address[1], ae_title="LUNGVISION")
        assert assoc.send_c_echo().Status == 0x0000  # answered at once: the response woke the DUL
        before = dict(wakeups)
        threading.Event().wait(0.5)
        during = {name: wakeups[name] - before[name] for name in wakeups}
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    assert 0 < during["dul"] < 100 and 0 < during["reactor"] < 100, during
