"""Association I/O without polling: pynetdicom associations whose threads sleep until there is work.

pynetdicom 3.0.4 runs two threads per association, each waking 1 000 times a second to look for work:
the DUL (it reads the socket and sends what is queued) and the association's reactor (it serves DIMSE
messages, releases and aborts). 8 idle associations cost 14 % of a core that way, and under load each
wake-up competes for the GIL with the threads moving data. :func:`sleep_until_work` makes both sleep
instead — the DUL in ``select`` on its socket and on a :class:`Wakeup` written when something is queued
to send; the reactor behind a :class:`ReactorGate` that opens when a DIMSE message or a primitive from
the peer is queued — and gives the socket a faster ``recv`` (a whole PDU with one ``recv_into``
instead of 4 KiB at a time). Both threads still look at their timers and flags every ``IDLE_WAIT_S``.

Used by the node's server (``dicom_node/transport.py``) and the delivery pool (``common/scu.py``).
"""

import queue
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import cast

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket

IDLE_WAIT_S = 0.05  # longest an association's threads sleep before looking at their timers and flags again


class Wakeup:
    """A socket pair a ``select`` can wait on: :meth:`notify` wakes the thread waiting on it."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    def fileno(self) -> int:
        return self._read.fileno()

    def write_fileno(self) -> int:
        """The end :meth:`notify` writes to (non-blocking), e.g. for ``signal.set_wakeup_fd``."""
        return self._write.fileno()

    def notify(self) -> None:
        try:
            self._write.send(b"\0")
        except BlockingIOError:  # the pair's buffer is full: a wake-up is pending already
            return
        except OSError:  # closed: the association has ended and nothing waits any more
            return

    def drain(self) -> None:
        try:
            while self._read.recv(4096):
                continue
        except BlockingIOError:  # nothing more to read: drained
            return

    def close(self) -> None:
        self._read.close()
        self._write.close()


class ReactorGate:
    """Stands in for an association's ``_reactor_checkpoint`` (a ``threading.Event``).

    pynetdicom's reactor thread waits on the checkpoint once per loop, and other threads clear and set it
    to pause the reactor. Here ``wait()`` also lets the reactor sleep until there is work — :meth:`work`
    (a DIMSE message or a primitive from the peer was queued), a ``set()`` (kill, end of a pause) — or
    ``IDLE_WAIT_S`` passes; while cleared it waits until set, as the Event did.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._open = True
        self._pending = False

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._condition:
            self._open = self._pending = True
            self._condition.notify_all()

    def clear(self) -> None:
        with self._condition:
            self._open = False

    def work(self) -> None:
        with self._condition:
            self._pending = True
            self._condition.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        with self._condition:
            self._condition.wait_for(lambda: self._open and self._pending, IDLE_WAIT_S)
            self._condition.wait_for(lambda: self._open, timeout)
            self._pending = False
            return self._open


class WholePduSocket(AssociationSocket):
    """An ``AssociationSocket`` whose ``recv`` fills the requested length with as few system calls as it can,
    and whose ``ready`` waits (up to ``IDLE_WAIT_S``) for data or a :class:`Wakeup` instead of returning at once.

    Bytes a reader took ahead of pynetdicom can be given back with :meth:`push_back`: the next reads return
    them first (see ``dicom_node/transport.py``, which reads P-DATA-TF PDUs itself)."""

    wakeup: Wakeup | None = None
    _pushed_back: bytes = b""  # class default: instances get theirs by a class swap, not by __init__

    @property
    def ready(self) -> bool:
        if self._pushed_back or super().ready:
            return True
        raw = self.socket
        if raw is None or not self._is_connected or self.wakeup is None:
            return False
        try:
            readable, _, _ = select.select([raw.fileno(), self.wakeup.fileno()], [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # closed meanwhile: the next call reports it to the state machine
            return False
        if self.wakeup.fileno() in readable:
            self.wakeup.drain()
        return raw.fileno() in readable and super().ready

    def close(self) -> None:
        super().close()
        if self.wakeup is not None:
            self.wakeup.close()

    def push_back(self, data: bytes | bytearray) -> None:
        """Put ``data`` (read from this socket) back in front of the stream."""
        self._pushed_back = bytes(data) + self._pushed_back

    def _take_pushed_back(self, view: memoryview) -> int:
        """Copy bytes given back into the start of ``view`` (as many as fit); return how many."""
        count = min(len(view), len(self._pushed_back))
        if count:
            view[:count] = self._pushed_back[:count]
            self._pushed_back = self._pushed_back[count:]
        return count

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only when the peer closes the connection), like pynetdicom's ``recv``."""
        buffer = bytearray(nr_bytes)
        received = self.recv_into(memoryview(buffer))
        if received < nr_bytes:  # return what arrived, as pynetdicom does
            del buffer[received:]
        return buffer

    def recv_some_into(self, view: memoryview) -> int:
        """Read what is there, up to ``len(view)`` bytes, waiting only for the first; 0 when the peer has closed."""
        taken = self._take_pushed_back(view)
        if taken:
            return taken
        raw = self.socket
        return 0 if raw is None else raw.recv_into(view, len(view))

    def recv_into(self, view: memoryview) -> int:
        """Fill ``view``; return how many bytes arrived (fewer only when the peer closes the connection)."""
        received = self._take_pushed_back(view)
        raw = self.socket
        if raw is None:
            return received
        flags = 0 if isinstance(raw, ssl.SSLSocket) else socket.MSG_WAITALL
        while received < len(view):
            count = raw.recv_into(view[received:], len(view) - received, flags)
            if count == 0:  # the peer closed the connection
                break
            received += count
        return received


def sleep_until_work(assoc: Association) -> None:
    """Make ``assoc``'s threads sleep until there is work (see the module's docstring).

    Safe on an association being set up (the server's) and on one already running (a requestor's, right
    after ``associate``): the queues are kept, only their ``put`` also wakes the thread that waits for it.
    """
    association_socket = cast(WholePduSocket, assoc.dul.socket)  # an association has its socket by now
    association_socket.__class__ = WholePduSocket
    wakeup = association_socket.wakeup = Wakeup()
    _wake_after_put(assoc.dul.to_provider_queue, wakeup.notify)
    gate = ReactorGate()
    if not assoc._reactor_checkpoint.is_set():
        gate.clear()
    assoc._reactor_checkpoint = gate  # type: ignore[assignment]  # used only as an Event is
    _wake_after_put(assoc.dimse.msg_queue, gate.work)
    _wake_after_put(assoc.dul.to_user_queue, gate.work)


def _wake_after_put(items: queue.Queue, wake: Callable[[], None]) -> None:
    put = items.put

    def put_and_wake(item, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    items.put = put_and_wake  # type: ignore[method-assign]  # this queue only
