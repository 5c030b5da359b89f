"""The listening server: pynetdicom's threaded association server with three costs taken out of its hot paths.

Measured with ``bench/node.py`` (8 associations, 10 MB instances) and py-spy, pynetdicom 3.0.4 spends
the node's time in three places that have nothing to do with DICOM:

* **Reading a PDU 4 KiB at a time** (``AssociationSocket.recv``): 2 500 ``recv`` calls per 10 MB
  instance, each releasing and re-taking the GIL, so with several associations every call can queue
  behind the other threads. :class:`WholePduSocket` reads a PDU with one ``recv_into`` into a buffer
  of its announced length (``MSG_WAITALL`` on plain TCP; TLS sockets take no flags).
* **Copying 171 presentation contexts for every association** (``deepcopy(server.contexts)``):
  pydicom re-validates each of the 2 044 UIDs with a regular expression on a deep copy, ≈ 30 ms of
  GIL per association. :class:`SharedUidContext` copies a context without re-creating its UIDs
  (they are immutable strings); everything negotiation changes is still per association.
* **Polling every millisecond**: each association has two threads (the DUL reading the socket and the
  association serving DIMSE messages) that wake 1 000 times a second to look for work — 8 idle
  associations cost 14 % of a core, and under load each wake-up competes for the GIL with the threads
  moving data. Here both sleep until there is work: the DUL in ``select`` on its socket and a
  :class:`Wakeup` that is written when the association queues a primitive to send; the association
  behind a :class:`ReactorGate` that opens when a DIMSE message or a primitive from the peer arrives.
  Both still look at their timers and flags at least every ``IDLE_WAIT_S``.

Everything else — negotiation, the state machine, DIMSE — is pynetdicom's own.
"""

import copy
import queue
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import cast

from pynetdicom import AE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

IDLE_WAIT_S = 0.05  # longest an association's threads sleep before looking at their timers and flags again


class Wakeup:
    """A socket pair a ``select`` can wait on: :meth:`notify` wakes the thread waiting on it."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    def fileno(self) -> int:
        return self._read.fileno()

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


class _WakingQueue(queue.Queue):
    """A queue that calls ``wake()`` after every ``put``."""

    def __init__(self, items: queue.Queue, wake: Callable[[], None]) -> None:
        super().__init__()
        self.queue.extend(items.queue)
        self._wake = wake

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class WholePduSocket(AssociationSocket):
    """An ``AssociationSocket`` whose ``recv`` fills the requested length with as few system calls as it can,
    and whose ``ready`` waits (up to ``IDLE_WAIT_S``) for data or a :class:`Wakeup` instead of returning at once."""

    wakeup: Wakeup | None = None

    @property
    def ready(self) -> bool:
        if super().ready:
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

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only when the peer closes the connection), like pynetdicom's ``recv``."""
        raw = self.socket
        if raw is None:
            return bytearray()
        buffer = bytearray(nr_bytes)
        flags = 0 if isinstance(raw, ssl.SSLSocket) else socket.MSG_WAITALL
        received = 0
        with memoryview(buffer) as view:
            while received < nr_bytes:
                count = raw.recv_into(view[received:], nr_bytes - received, flags)
                if count == 0:  # the peer closed the connection
                    break
                received += count
        if received < nr_bytes:  # return what arrived, as pynetdicom does
            del buffer[received:]
        return buffer


class SharedUidContext(PresentationContext):
    """A supported presentation context whose deep copy shares its UIDs instead of re-validating them."""

    @classmethod
    def like(cls, context: PresentationContext) -> "SharedUidContext":
        twin = cls()
        twin.__dict__.update(copy.copy(context.__dict__))
        twin._transfer_syntax = list(context.transfer_syntax)
        return twin

    def __deepcopy__(self, memo: dict) -> "SharedUidContext":
        return SharedUidContext.like(self)


class _RequestHandler(RequestHandler):
    def _create_association(self):
        assoc = super()._create_association()
        # The socket pynetdicom built has already queued its "connection open" event, so it is kept
        # and given the faster ``recv`` and the waiting ``ready``.
        association_socket = cast(WholePduSocket, assoc.dul.socket)  # set by super(): the accepted connection
        association_socket.__class__ = WholePduSocket
        wakeup = association_socket.wakeup = Wakeup()
        assoc.dul.to_provider_queue = _WakingQueue(assoc.dul.to_provider_queue, wakeup.notify)
        gate = ReactorGate()
        assoc._reactor_checkpoint = gate  # type: ignore[assignment]  # used only as an Event is
        assoc.dimse.msg_queue = _WakingQueue(assoc.dimse.msg_queue, gate.work)
        assoc.dul.to_user_queue = _WakingQueue(assoc.dul.to_user_queue, gate.work)
        return assoc


class SharedListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, optionally on a listening socket another receiving process also accepts on.

    The listening socket is non-blocking: when several processes wait on it, whichever accepts first takes
    the connection, and the others' ``accept`` fails at once (``BlockingIOError``, which socketserver skips)
    instead of waiting for the next connection with the server loop stuck in it.
    """

    def __init__(self, *args, listener: socket.socket | None = None, **kwargs) -> None:
        self._listener = listener
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self._listener is None:
            super().server_bind()
            return
        self.listener.close()  # the one socketserver made: the inherited listener replaces it
        self.socket = self._listener
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._listener is None:
            super().server_activate()
        self.listener.setblocking(False)

    @property
    def listener(self) -> socket.socket:
        """The listening socket, to share with other receiving processes."""
        if self.socket is None:
            raise RuntimeError("the server is closed")
        return self.socket


def start_server(
    ae: AE,
    address: tuple[str, int],
    *,
    ssl_context: ssl.SSLContext | None,
    evt_handlers: list,
    listener: socket.socket | None = None,
) -> SharedListenerServer:
    """Like ``AE.start_server(..., block=False)``: the server runs in a daemon thread until ``shutdown()``.

    ``listener``: a listening socket made by another process (``address`` is then not bound again).
    """
    server = ae.make_server(
        address,
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
        contexts=[SharedUidContext.like(context) for context in ae.supported_contexts],
        server_class=SharedListenerServer,
        request_handler=_RequestHandler,
        listener=listener,
    )
    assert isinstance(server, SharedListenerServer)  # make_server returns ``server_class``'s instance
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() and AE.shutdown() look for it there
    threading.Thread(target=server.serve_forever, name="dicom-node-server", daemon=True).start()
    return server
