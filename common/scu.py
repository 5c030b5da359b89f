"""Deliver stage (used by the worker): datasets or DICOM files → C-STORE to one destination over one association.

A file (:class:`InstanceFile`) is sent as it is on disk, read in PDU-sized pieces, when the destination
accepted its transfer syntax — not decoded and encoded again (for a study's SC and SR that was ≈ a sixth
of the deliverer's CPU, issue 12); otherwise it is read and converted to a syntax the destination accepted.

Every response status is checked; the first failure raises :class:`DeliveryError`, which names the
instance, the status and whether a later retry may help. Retrying is the caller's job.

An :class:`AssociationPool` keeps an association open after a delivery, for the next one to the same
destination (the TCP and A-ASSOCIATE set-up is then paid once per burst, not once per study), and
releases it after a few idle seconds. A failed association is aborted, never used again.
"""

import contextlib
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from common.association_io import sleep_until_work

MAX_PRESENTATION_CONTEXTS = 128  # PS3.8: context IDs are odd numbers 1..255
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
log = logging.getLogger("lungvision.scu")


class _StreamingFiles:
    """pynetdicom's process-wide switch ``STORE_SEND_CHUNKED_DATASET``, which makes ``send_c_store(path)`` stream
    the file's data set from disk as it is, turned on only while one of our sends of a file runs (``with
    STREAMING_FILES:``; counted, as deliveries run in several threads): another caller in the process — a
    test posing as a PACS — keeps pynetdicom's default (the file read, then encoded again)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._before = False

    def __enter__(self) -> None:
        with self._lock:
            if self._running == 0:
                self._before = _config.STORE_SEND_CHUNKED_DATASET
                _config.STORE_SEND_CHUNKED_DATASET = True
            self._running += 1

    def __exit__(self, *_exception: object) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                _config.STORE_SEND_CHUNKED_DATASET = self._before


STREAMING_FILES = _StreamingFiles()


@dataclass(frozen=True)
class ClientTls:
    """TLS towards the destination."""

    ca_file: Path | None = None  # CA to verify the destination's certificate; None = the system store
    cert_file: Path | None = None  # our certificate, when the destination requires mutual TLS
    key_file: Path | None = None
    server_hostname: str | None = None  # name the destination's certificate must carry; None = not checked


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    tls: ClientTls | None = None


@dataclass(frozen=True)
class Timeouts:
    connection_s: float = 10.0
    acse_s: float = 30.0
    dimse_s: float = 60.0
    network_s: float = 60.0


class DeliveryError(Exception):
    """Sending to ``destination`` failed at ``sop_instance_uid``; ``delivered`` lists what got through before."""

    def __init__(
        self,
        destination: Destination,
        sop_instance_uid: str,
        status: int | None,
        reason: str,
        *,
        transient: bool,
        delivered: tuple[str, ...] = (),
    ) -> None:
        self.destination = destination
        self.sop_instance_uid = sop_instance_uid
        self.status = status
        self.reason = reason
        self.transient = transient  # True: no answer / out of resources / network; worth a later retry
        self.delivered = delivered
        status_text = "no status" if status is None else f"status 0x{status:04X}"
        super().__init__(
            f"C-STORE to {destination.ae_title}@{destination.host}:{destination.port} failed for "
            f"{sop_instance_uid}: {reason} ({status_text})"
        )


class UnsendableFile(ValueError):
    """A file that cannot be sent as it is: not a DICOM Part-10 file, or its file meta lacks what a C-STORE
    needs. The message names the file and what it lacks (no header values)."""


@dataclass(frozen=True)
class InstanceFile:
    """A DICOM Part-10 file to send, known by its file meta information (the data set is not read)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str

    @classmethod
    def read(cls, path: Path) -> "InstanceFile":
        """``path``'s file meta; :class:`UnsendableFile` naming the file when it lacks what a C-STORE needs."""
        try:
            meta = read_file_meta_info(path)
        except InvalidDicomError as error:  # no preamble and "DICM": not a Part-10 file
            raise UnsendableFile(f"{path} cannot be sent: its file meta information lacks the DICM prefix") from error
        missing = [
            keyword
            for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
            if not meta.get(keyword)
        ]
        if missing:
            raise UnsendableFile(f"{path} cannot be sent: its file meta information lacks {', '.join(missing)}")
        return cls(
            Path(path),
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
        )


Instance = Dataset | InstanceFile  # what send_datasets sends


def _sop_class(instance: Instance) -> str:
    return instance.sop_class_uid if isinstance(instance, InstanceFile) else str(instance.SOPClassUID)


def _sop_instance(instance: Instance) -> str:
    return instance.sop_instance_uid if isinstance(instance, InstanceFile) else str(instance.SOPInstanceUID)


def _transfer_syntax(instance: Instance) -> str:
    return (
        instance.transfer_syntax_uid
        if isinstance(instance, InstanceFile)
        else str(instance.file_meta.TransferSyntaxUID)
    )


def send_datasets(
    destination: Destination,
    datasets: Sequence[Instance],
    *,
    calling_ae: str = "LUNGVISION",
    timeouts: Timeouts = Timeouts(),
    pool: "AssociationPool | None" = None,
) -> list[int]:
    """Store every dataset (or file) at ``destination`` over one association; return their (success or
    warning) statuses.

    Each dataset needs ``file_meta.TransferSyntaxUID``. Proposed per SOP class: explicit and implicit
    VR little endian, plus each dataset's own transfer syntax when it is another (e.g. compressed) and
    each file's own on its own (``proposed_contexts``).

    With ``pool``: over an association an earlier call left open when there is one, kept open afterwards.
    If that kept association turns out to be gone (the peer released or dropped it while it was idle)
    before the first dataset got through, the datasets go once more over a new association. Without a
    pool: a new association, released afterwards.
    """
    if not datasets:
        return []
    contexts = proposed_contexts(datasets)
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts needed, at most {MAX_PRESENTATION_CONTEXTS}")
    request = AssociationRequest(
        destination, calling_ae, timeouts, tuple((sop_class, tuple(syntaxes)) for sop_class, syntaxes in contexts)
    )
    if pool is None:
        pool = AssociationPool(idle_s=0)  # keeps nothing: this one association is released afterwards
    first_sop_uid = _sop_instance(datasets[0])
    kept = pool.acquire(request, first_sop_uid=first_sop_uid)
    try:
        return _send_over(pool, kept, datasets)
    except DeliveryError as error:
        if not (kept.reused and error.transient and error.status is None and not error.delivered):
            raise
        log.info(
            "the association to %s@%s:%d kept from an earlier delivery is gone (%s); sending over a new one",
            destination.ae_title,
            destination.host,
            destination.port,
            error.reason,
        )
    return _send_over(pool, pool.open(request, first_sop_uid=first_sop_uid), datasets)


def _send_over(pool: "AssociationPool", kept: "KeptAssociation", datasets: Sequence[Instance]) -> list[int]:
    """C-STORE every dataset over ``kept``; give it back to the pool, or abort it if anything failed."""
    try:
        statuses = _store_all(kept, datasets)
    except BaseException:
        pool.discard(kept)
        raise
    pool.give_back(kept)
    return statuses


def _store_all(kept: "KeptAssociation", datasets: Sequence[Instance]) -> list[int]:
    destination = kept.request.destination
    statuses: list[int] = []
    delivered: list[str] = []
    for dataset in datasets:
        sop_uid = _sop_instance(dataset)
        payload = _payload(kept.association, dataset)
        try:
            with STREAMING_FILES if isinstance(payload, Path) else contextlib.nullcontext():
                response = kept.association.send_c_store(payload, msg_id=kept.next_message_id())
        except ValueError as error:  # no accepted context for this SOP class / transfer syntax
            raise DeliveryError(
                destination, sop_uid, None, str(error), transient=False, delivered=tuple(delivered)
            ) from error
        except RuntimeError as error:  # pynetdicom: "must be established": the peer released or aborted it
            raise DeliveryError(
                destination,
                sop_uid,
                None,
                "association closed by the peer",
                transient=True,
                delivered=tuple(delivered),
            ) from error
        status = _checked_status(destination, sop_uid, response, tuple(delivered))
        statuses.append(status)
        delivered.append(sop_uid)
    return statuses


def _payload(assoc: Association, instance: Instance) -> Dataset | Path:
    """What ``send_c_store`` gets for ``instance``: a dataset as it is; a file's path when ``assoc`` accepted
    the file's own transfer syntax for its SOP class (streamed from disk as it is, within ``STREAMING_FILES``),
    else the file read — its pixels decompressed when they are compressed (e.g. a JPEG heatmap SC for a
    destination that accepts uncompressed images only; the SOP Instance UID stays) — and pynetdicom converts
    it to an uncompressed syntax the peer accepted."""
    if isinstance(instance, Dataset):
        return instance
    accepted = any(
        context.abstract_syntax == instance.sop_class_uid and context.transfer_syntax[0] == instance.transfer_syntax_uid
        for context in assoc.accepted_contexts
    )
    if accepted:
        return instance.path
    dataset = dcmread(instance.path)
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        dataset.decompress(generate_instance_uid=False)  # colour: to RGB (pydicom's default)
    return dataset


def proposed_contexts(datasets: Sequence[Instance]) -> list[tuple[str, list[str]]]:
    """(SOP class, transfer syntaxes) to propose: uncompressed for every class, plus each other syntax on its
    own — and a file's syntax on its own even when uncompressed, so that an acceptor that prefers the other
    one (pynetdicom picks implicit VR from the pair) can still take the file as it lies on disk."""
    contexts: dict[tuple[str, tuple[str, ...]], None] = {}
    for dataset in datasets:
        sop_class = _sop_class(dataset)
        own_syntax = _transfer_syntax(dataset)
        contexts[(sop_class, _UNCOMPRESSED)] = None
        if own_syntax not in _UNCOMPRESSED or isinstance(dataset, InstanceFile):
            contexts[(sop_class, (own_syntax,))] = None
    return [(sop_class, list(syntaxes)) for sop_class, syntaxes in contexts]


@dataclass(frozen=True)
class AssociationRequest:
    """What an association is negotiated for; the pool keeps idle associations apart by it."""

    destination: Destination
    calling_ae: str
    timeouts: Timeouts
    contexts: tuple[tuple[str, tuple[str, ...]], ...]  # (SOP class, transfer syntaxes) proposed


@dataclass(eq=False)
class KeptAssociation:
    """An established association, lent by an :class:`AssociationPool` to one caller at a time."""

    request: AssociationRequest
    association: Association
    reused: bool = False  # True: an earlier delivery opened it
    idle_since: float = 0.0  # time.monotonic() when it was last given back
    _message_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def next_message_id(self) -> int:
        """A Message ID unique among this association's requests (PS3.7 9.3.1.1)."""
        return next(self._message_ids) % 65536


class AssociationPool:
    """Associations kept open between deliveries, apart by :class:`AssociationRequest` (destination,
    calling AE title, timeouts, presentation contexts).

    :meth:`acquire` lends an idle one that is still established (else opens a new one) to one caller;
    :meth:`give_back` keeps it for ``idle_s`` seconds, after which a reaper thread releases it;
    :meth:`discard` aborts one that failed. ``idle_s == 0`` keeps nothing. Thread-safe (a lent association
    belongs to its caller alone); not to be shared across processes: each process needs its own.
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._idle: dict[AssociationRequest, list[KeptAssociation]] = {}
        self._changed = threading.Condition()
        self._closed = False
        self._reaper: threading.Thread | None = None

    def acquire(self, request: AssociationRequest, *, first_sop_uid: str) -> KeptAssociation:
        """An established association for ``request``: an idle one, else a new one (raises DeliveryError,
        naming ``first_sop_uid``, when none comes up)."""
        while (kept := self._take_idle(request)) is not None:
            if kept.association.is_established:  # else the peer released or aborted it while it was idle
                kept.reused = True
                return kept
        return self.open(request, first_sop_uid=first_sop_uid)

    def open(self, request: AssociationRequest, *, first_sop_uid: str) -> KeptAssociation:
        """A new association for ``request`` (raises DeliveryError, naming ``first_sop_uid``, when none comes up)."""
        return KeptAssociation(request, _associate(request, first_sop_uid))

    def give_back(self, kept: KeptAssociation) -> None:
        """``kept`` served its caller: keep it for the next one, or release it (pool closed, keeping nothing,
        or no longer established)."""
        with self._changed:
            keep = not self._closed and self.idle_s > 0 and kept.association.is_established
            if keep:
                kept.idle_since = time.monotonic()
                self._idle.setdefault(kept.request, []).append(kept)
                self._start_reaper()
                self._changed.notify()
        if not keep:
            _close(kept)

    def discard(self, kept: KeptAssociation) -> None:
        """``kept`` failed: abort it; it is never lent again."""
        if kept.association.is_established:
            kept.association.abort()

    def idle_count(self) -> int:
        """How many associations are kept open, idle, right now."""
        with self._changed:
            return sum(len(kept) for kept in self._idle.values())

    def close(self) -> None:
        """Release every idle association and keep none from now on (associations still lent are
        released when given back)."""
        with self._changed:
            self._closed = True
            idle = self._take_all()
            self._changed.notify()
        for kept in idle:
            _close(kept)

    def _take_idle(self, request: AssociationRequest) -> KeptAssociation | None:
        with self._changed:
            kept = self._idle.get(request)
            return kept.pop() if kept else None  # the most recently used: the likeliest to be still open

    def _take_all(self) -> list[KeptAssociation]:
        idle = [kept for kept_for_request in self._idle.values() for kept in kept_for_request]
        self._idle.clear()
        return idle

    def _take_expired(self, now: float) -> list[KeptAssociation]:
        expired: list[KeptAssociation] = []
        for kept in self._take_all():
            if now - kept.idle_since >= self.idle_s:
                expired.append(kept)
            else:
                self._idle.setdefault(kept.request, []).append(kept)  # (order kept: oldest first)
        return expired

    def _seconds_to_next_expiry(self, now: float) -> float | None:
        idle_since = [kept.idle_since for kept_for_request in self._idle.values() for kept in kept_for_request]
        return max(0.0, min(idle_since) + self.idle_s - now) if idle_since else None

    def _start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name="association-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Release associations idle for ``idle_s``, until the pool is closed."""
        while True:
            with self._changed:
                if self._closed:
                    return
                self._changed.wait(timeout=self._seconds_to_next_expiry(time.monotonic()))
                expired = self._take_expired(time.monotonic())
            for kept in expired:
                _close(kept)


def _associate(request: AssociationRequest, first_sop_uid: str) -> Association:
    """A new established association for ``request``; DeliveryError (naming ``first_sop_uid``) if none comes up."""
    ae = AE(ae_title=request.calling_ae)
    ae.connection_timeout = request.timeouts.connection_s
    ae.acse_timeout = request.timeouts.acse_s
    ae.dimse_timeout = request.timeouts.dimse_s
    ae.network_timeout = request.timeouts.network_s
    for sop_class, syntaxes in request.contexts:
        ae.add_requested_context(sop_class, list(syntaxes))
    destination = request.destination
    tls_args = _tls_args(destination.tls) if destination.tls is not None else None
    # pynetdicom passes the server hostname to wrap_socket, which takes None too (its type says str)
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=tls_args,  # type: ignore[arg-type]
    )
    if not assoc.is_established:
        raise _association_error(destination, assoc, first_sop_uid)
    _without_nagle(assoc)
    sleep_until_work(assoc)  # a kept association then waits for the next delivery without polling
    return assoc


def _without_nagle(assoc: Association) -> None:
    """Send each write at once: a C-STORE is several writes (command PDU, data PDUs), and with Nagle's
    algorithm a short one waits for the peer's delayed ACK (≈ 40 ms on Linux) — per object sent."""
    transport = assoc.dul.socket
    assert transport is not None and transport.socket is not None  # an established association has its socket
    transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _close(kept: KeptAssociation) -> None:
    """Release ``kept`` if it is still established (A-RELEASE; pynetdicom aborts if the peer does not answer)."""
    if kept.association.is_established:
        kept.association.release()


def _checked_status(destination: Destination, sop_uid: str, response: Dataset, delivered: tuple[str, ...]) -> int:
    if "Status" not in response:
        raise DeliveryError(
            destination,
            sop_uid,
            None,
            "no response (timeout, abort or invalid reply)",
            transient=True,
            delivered=delivered,
        )
    status = int(response.Status)
    category = code_to_category(status)
    if category in ("Success", "Warning"):
        return status
    comment = response.get("ErrorComment")
    reason = f"{category}" + (f": {comment}" if comment else "")
    out_of_resources = 0xA700 <= status <= 0xA7FF
    raise DeliveryError(destination, sop_uid, status, reason, transient=out_of_resources, delivered=delivered)


def _association_error(destination: Destination, assoc: Association, sop_uid: str) -> DeliveryError:
    """Why no association came up; names the first instance, as none was delivered."""
    if assoc.is_rejected:
        rejection = assoc.acceptor.primitive  # the A-ASSOCIATE-RJ
        assert rejection is not None  # a rejected association has it
        reason = f"association rejected: {rejection.result_str}, {rejection.reason_str}"
        # a permanent rejection (unknown AE title, not allowed) will not heal by retrying
        return DeliveryError(destination, sop_uid, None, reason, transient=rejection.result == 0x02)
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        refused = sorted({str(context.abstract_syntax) for context in assoc.rejected_contexts})
        reason = f"no proposed presentation context was accepted (refused: {', '.join(refused)})"
        return DeliveryError(destination, sop_uid, None, reason, transient=False)
    if assoc.is_aborted:
        return DeliveryError(destination, sop_uid, None, "association aborted during negotiation", transient=True)
    return DeliveryError(destination, sop_uid, None, "could not connect", transient=True)


def _tls_args(tls: ClientTls) -> tuple[ssl.SSLContext, str | None]:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.server_hostname is not None
    if tls.cert_file is not None:
        context.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
    return context, tls.server_hostname


__all__ = [
    "AssociationPool",
    "AssociationRequest",
    "ClientTls",
    "DeliveryError",
    "Destination",
    "Instance",
    "InstanceFile",
    "KeptAssociation",
    "Timeouts",
    "UnsendableFile",
    "proposed_contexts",
    "send_datasets",
]
