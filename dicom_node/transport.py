"""The listening server: pynetdicom's threaded association server with three costs taken out of its hot paths,
on a listening socket that several receiving processes may share.

Measured with ``bench/node.py`` (8 associations, 10 MB instances) and py-spy, pynetdicom 3.0.4 spends
the node's time in three places that have nothing to do with DICOM:

* **Reading a PDU 4 KiB at a time** (``AssociationSocket.recv``): 2 500 ``recv`` calls per 10 MB
  instance, each releasing and re-taking the GIL, so with several associations every call can queue
  behind the other threads; and **polling every millisecond**: two threads per association wake
  1 000 times a second to look for work. Both are taken out by ``common/association_io.py``
  (:func:`sleep_until_work`), which the delivery pool uses too.
* **Copying 171 presentation contexts for every association** (``deepcopy(server.contexts)``):
  pydicom re-validates each of the 2 044 UIDs with a regular expression on a deep copy, ≈ 30 ms of
  GIL per association. :class:`SharedUidContext` copies a context without re-creating its UIDs
  (they are immutable strings); everything negotiation changes is still per association.

Everything else — negotiation, the state machine, DIMSE — is pynetdicom's own.
"""

import copy
import socket
import ssl
import threading

from pynetdicom import AE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from common.association_io import sleep_until_work


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
        sleep_until_work(assoc)  # keeps the socket pynetdicom built: it has queued its "connection open" event
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
