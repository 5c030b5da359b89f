"""Association I/O without polling (common/association_io.py): whole-PDU reads and the reactor gate; the
server's and the delivery pool's associations are checked to sleep in tests/dicom_node/test_transport.py
and tests/common/test_association_pool.py."""

import socket
import threading

from common.association_io import IDLE_WAIT_S, ReactorGate, WholePduSocket


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


def test_bytes_pushed_back_are_read_again_before_the_socket_and_make_it_ready() -> None:
    ours, peer = socket.socketpair()
    wrapped = _socket_over(ours)
    wrapped._is_connected = True
    try:
        peer.sendall(b"header-body-next")
        taken = wrapped.recv(len(b"header-body"))
        wrapped.push_back(taken[len(b"header") :])
        wrapped.push_back(taken[: len(b"header")])
        assert wrapped.ready
        assert wrapped.recv(len(b"header")) == b"header"
        assert wrapped.recv(len(b"-body-next")) == b"-body-next"
    finally:
        ours.close()
        peer.close()


def test_recv_some_returns_pushed_back_bytes_first_then_what_has_arrived_then_nothing_once_closed() -> None:
    ours, peer = socket.socketpair()
    wrapped = _socket_over(ours)
    buffer = memoryview(bytearray(64))
    try:
        peer.sendall(b"arrived")
        wrapped.push_back(b"back")
        assert bytes(buffer[: wrapped.recv_some_into(buffer)]) == b"back"  # not joined with the socket's bytes
        assert bytes(buffer[: wrapped.recv_some_into(buffer)]) == b"arrived"  # no wait for the buffer to fill
        peer.close()
        assert wrapped.recv_some_into(buffer) == 0
    finally:
        ours.close()


def test_recv_returns_what_arrived_when_the_peer_closes_early() -> None:
    ours, peer = socket.socketpair()
    peer.sendall(b"abcdef")
    peer.close()
    try:
        assert _socket_over(ours).recv(100) == b"abcdef"
    finally:
        ours.close()


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
