"""The listening server: pynetdicom's threaded association server with four costs taken out of its hot paths,
on a listening socket that several receiving processes may share.

Measured with ``bench/node.py`` (8 associations, 10 MB instances) and py-spy, pynetdicom 3.0.4 spends
the node's time in four places that have nothing to do with DICOM:

* **Reading a PDU 4 KiB at a time** (``AssociationSocket.recv``): 2 500 ``recv`` calls per 10 MB
  instance, each releasing and re-taking the GIL, so with several associations every call can queue
  behind the other threads; and **polling every millisecond**: two threads per association wake
  1 000 times a second to look for work. Both are taken out by ``common/association_io.py``
  (:func:`sleep_until_work`), which the delivery pool uses too.
* **Copying 171 presentation contexts for every association** (``deepcopy(server.contexts)``):
  pydicom re-validates each of the 2 044 UIDs with a regular expression on a deep copy, ≈ 30 ms of
  GIL per association. :class:`SharedUidContext` copies a context without re-creating its UIDs
  (they are immutable strings); everything negotiation changes is still per association.
* **Handling every P-DATA-TF PDU of a data set in Python** (≈ 80 per 10 MB instance at 128 KiB): pynetdicom
  copies each PDU's bytes five times (reads, joins, decodes, slices) and runs it through events, the state
  machine and the DIMSE decoder only to append it to the C-STORE's temporary file; on a slow core that was
  ≈ 0.5 ms of GIL per PDU, most of the node's CPU. :class:`DataSetFragmentReader` reads such a PDU into a
  reused buffer and writes its fragments to that file itself — exactly the bytes pynetdicom would write —
  when nothing else could see the difference; every other PDU (commands, the last fragment, anything
  unusual) goes back to pynetdicom unchanged. It also starts the disk write of what it wrote
  (``start_writeback``): the node must fsync each instance before answering, and a disk that idles while
  the data arrive and then gets it all at once made that fsync the longest wait of the receive.

Everything else — negotiation, the state machine, DIMSE — is pynetdicom's own.
"""

import copy
import errno
import io
import logging
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import BinaryIO, cast

from pynetdicom import AE, evt
from pynetdicom._handlers import standard_pdu_recv_handler
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from common.association_io import WholePduSocket, sleep_until_work
from common.durable import start_writeback

LOG = logging.getLogger("dicom_node.transport")
P_DATA_TF = 0x04  # PDU type (PS3.8 9.3.5)
_PDU_HEADER = struct.Struct(">BBL")  # type, reserved, length
_PDV_HEADER = struct.Struct(">LBB")  # item length, presentation context ID, message control header
_ESTABLISHED = "Sta6"  # the association's state while DIMSE messages flow
WRITEBACK_BYTES = 1 << 20  # start the disk write of a received file every MiB (4 MiB or every PDU: slower)
READ_BYTES = 1 << 20  # the most one read of the socket takes (at least one PDU of the maximum length)
_IOV_MAX = 1024  # the most buffers one writev takes (Linux's UIO_MAXIOV)


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


class _ConnectionLost(Exception):
    """The socket failed while the reader was reading it."""


class DataSetFragmentReader:
    """Stands in for an association's ``dul._read_pdu_data``: writes a C-STORE's data set fragments to its file.

    Taken over: a P-DATA-TF PDU, read while the association is established with no event pending, whose
    presentation data values are all data set fragments, none the last, on the context of the C-STORE request
    whose file pynetdicom has opened (``STORE_RECV_CHUNKED_DATASET``). Its fragments are appended to that file
    as pynetdicom does (the value after its message control header), and nothing else happens: for such a PDU
    pynetdicom's state machine stays in Sta6 and its DIMSE decoder only appends. The PDU events pynetdicom
    would trigger are not: the reader steps aside while anything but pynetdicom's own (silent) log handler is
    bound to them. Every other PDU is given back to the socket and read by pynetdicom — all of them when the
    node announces no maximum PDU length (0): there is then no buffer size to read into.

    The socket is read in blocks of up to ``READ_BYTES`` (whatever has arrived: often several PDUs), and the
    fragments of the PDUs in a block are written with one ``writev`` before the next read: each system call
    releases and re-takes the GIL, which the other associations' threads of this process are waiting for.
    Bytes read past a PDU that is not taken over are given back with it; nothing stays in the reader's
    buffer when it returns.
    """

    def __init__(self, assoc: Association, max_pdu_bytes: int) -> None:
        self._assoc = assoc
        self._read_by_pynetdicom: Callable[[], None] = assoc.dul._read_pdu_data
        self._buffer = bytearray(max(READ_BYTES, _PDU_HEADER.size + max_pdu_bytes) if max_pdu_bytes > 0 else 0)
        self._start = self._end = 0  # the bytes read and not yet handled: self._buffer[self._start:self._end]
        self._spans: list[tuple[int, int]] = []
        self._unwritten: list[memoryview] = []  # fragments taken, for the data set file, in order
        self._file: BinaryIO | None = None  # the file they are for
        self._not_written_back = 0  # bytes written since the last start_writeback

    def read_pdu_data(self) -> None:
        """Take data set PDUs while they keep arriving; return once pynetdicom has read one, or none is waiting.

        pynetdicom's loop sleeps a millisecond after each turn that queued no event, and a PDU taken here
        queues none: so the next one is waited for here, as the loop's own ``ready`` would (up to
        ``IDLE_WAIT_S``, or until something is queued to send)."""
        association_socket = cast(WholePduSocket, self._assoc.dul.socket)
        while self._take_data_set_pdu(association_socket):
            self._assoc.dul._idle_timer.restart()  # as pynetdicom's loop does after each PDU
            if self._start == self._end:
                self._write_fragments()
                if not association_socket.ready:
                    return

    def _take_data_set_pdu(self, association_socket: WholePduSocket) -> bool:
        """Take the next PDU's fragments if it is one to take over (True); else have pynetdicom read it."""
        target = self._data_set_file()
        if target is None:
            return self._give_back(association_socket)
        try:
            if not self._fill(association_socket, _PDU_HEADER.size):
                return self._give_back(association_socket)
            pdu_type, _, length = _PDU_HEADER.unpack_from(self._buffer, self._start)
            size = _PDU_HEADER.size + length
            if pdu_type != P_DATA_TF or size > len(self._buffer) or not self._fill(association_socket, size):
                return self._give_back(association_socket)
        except _ConnectionLost as lost:  # as pynetdicom: the association ends
            LOG.error("connection lost while reading a P-DATA-TF PDU (%s)", type(lost.__cause__).__name__)
            self._start = self._end = 0
            self._assoc.dul.event_queue.put("Evt17")
            return False
        body = memoryview(self._buffer)[self._start + _PDU_HEADER.size : self._start + size]
        if not self._data_set_spans(body, target[1]):
            return self._give_back(association_socket)
        self._file = target[0]
        self._unwritten.extend(body[start:end] for start, end in self._spans)
        self._start += size
        return True

    def _fill(self, association_socket: WholePduSocket, size: int) -> bool:
        """Have at least ``size`` unhandled bytes in the buffer; False if the peer closes before they arrive.

        Fragments not yet written are written first: their bytes may be moved or overwritten."""
        if self._end - self._start >= size:
            return True
        self._write_fragments()
        kept = self._end - self._start
        self._buffer[:kept] = self._buffer[self._start : self._end]
        self._start, self._end = 0, kept
        view = memoryview(self._buffer)
        while self._end < size:
            try:
                received = association_socket.recv_some_into(view[self._end :])
            except OSError as error:  # the socket's, not a write's: those end the association as pynetdicom's do
                raise _ConnectionLost from error
            if received == 0:
                return False
            self._end += received
        return True

    def _write_fragments(self) -> None:
        """Append the fragments taken to their file (after what pynetdicom wrote to it), in one system call."""
        if not self._unwritten:
            return
        file = cast(BinaryIO, self._file)
        file.flush()  # pynetdicom's own writes go first
        written = write_all(file.fileno(), self._unwritten)
        file.seek(0, io.SEEK_END)  # the file object learns where its descriptor now is
        self._unwritten.clear()
        self._not_written_back += written
        if self._not_written_back >= WRITEBACK_BYTES:  # so the fsync before success finds the file mostly on disk
            start_writeback(file.fileno())
            self._not_written_back = 0

    def _give_back(self, association_socket: WholePduSocket) -> bool:
        """Write what was taken, return the bytes read beyond it to the socket and let pynetdicom read a PDU."""
        self._write_fragments()
        if self._end > self._start:
            association_socket.push_back(self._buffer[self._start : self._end])
        self._start = self._end = 0
        self._read_by_pynetdicom()
        return False

    def _data_set_file(self) -> tuple[BinaryIO, int] | None:
        """The open data set file of the C-STORE being received and its context ID; None when not to take over."""
        dul = self._assoc.dul
        message = self._assoc.dimse.message
        if message is None or message._data_set_file is None or message.context_id is None:
            return None
        if dul.state_machine.current_state != _ESTABLISHED or not dul.event_queue.empty():
            return None
        if self._assoc.get_handlers(evt.EVT_DATA_RECV):
            return None
        pdu_handlers = cast(list, self._assoc.get_handlers(evt.EVT_PDU_RECV))
        if any(handler is not standard_pdu_recv_handler for handler, _ in pdu_handlers):
            return None
        return cast(BinaryIO, message._data_set_file.file), message.context_id

    def _data_set_spans(self, body: memoryview, context_id: int) -> bool:
        """Fill ``self._spans`` with each fragment's value; False unless all are non-last data set fragments
        on ``context_id`` and the items fill the PDU exactly."""
        self._spans.clear()
        offset = 0
        while offset < len(body):
            if len(body) - offset < _PDV_HEADER.size:
                return False
            item_length, item_context, control = _PDV_HEADER.unpack_from(body, offset)
            end = offset + 4 + item_length  # the item length counts what follows its own 4 bytes
            if item_length < 2 or end > len(body) or item_context != context_id or control & 0b11:
                return False
            self._spans.append((offset + _PDV_HEADER.size, end))
            offset = end
        return bool(self._spans)


def write_all(descriptor: int, views: list[memoryview]) -> int:
    """Write ``views`` one after another at the descriptor's position, ``_IOV_MAX`` to a ``writev`` call (more
    calls only if one writes less than it was given); return the bytes written."""
    total, first = 0, 0
    pending = [view for view in views if len(view)]
    while first < len(pending):
        written = os.writev(descriptor, pending[first : first + _IOV_MAX])
        if written == 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        total += written
        while first < len(pending) and written >= len(pending[first]):
            written -= len(pending[first])
            first += 1
        if written:  # the call ended inside this view
            pending[first] = pending[first][written:]
    return total


class _RequestHandler(RequestHandler):
    def _create_association(self):
        assoc = super()._create_association()
        sleep_until_work(assoc)  # keeps the socket pynetdicom built: it has queued its "connection open" event
        reader = DataSetFragmentReader(assoc, self.ae.maximum_pdu_size)
        assoc.dul._read_pdu_data = reader.read_pdu_data  # type: ignore[method-assign]  # this association only
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
