"""Deliver stage (used by the worker): datasets → C-STORE to one destination over one association.

Every response status is checked; the first failure raises :class:`DeliveryError`, which names the
instance, the status and whether a later retry may help. Retrying is the caller's job.
"""

import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

MAX_PRESENTATION_CONTEXTS = 128  # PS3.8: context IDs are odd numbers 1..255
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


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


def send_datasets(
    destination: Destination,
    datasets: Sequence[Dataset],
    *,
    calling_ae: str = "LUNGVISION",
    timeouts: Timeouts = Timeouts(),
) -> list[int]:
    """Store every dataset at ``destination`` over one association; return their (success or warning) statuses.

    Each dataset needs ``file_meta.TransferSyntaxUID``. Proposed per SOP class: explicit and implicit
    VR little endian, plus each dataset's own transfer syntax when it is another (e.g. compressed).
    """
    if not datasets:
        return []
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeouts.connection_s
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    contexts = proposed_contexts(datasets)
    if len(contexts) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts needed, at most {MAX_PRESENTATION_CONTEXTS}")
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)

    statuses: list[int] = []
    delivered: list[str] = []
    with _association(ae, destination, first_sop_uid=str(datasets[0].SOPInstanceUID)) as assoc:
        for message_id, dataset in enumerate(datasets, start=1):
            sop_uid = str(dataset.SOPInstanceUID)
            try:
                response = assoc.send_c_store(dataset, msg_id=message_id % 65536)
            except ValueError as error:  # no accepted context for this SOP class / transfer syntax
                raise DeliveryError(
                    destination, sop_uid, None, str(error), transient=False, delivered=tuple(delivered)
                ) from error
            status = _checked_status(destination, sop_uid, response, tuple(delivered))
            statuses.append(status)
            delivered.append(sop_uid)
    return statuses


def proposed_contexts(datasets: Sequence[Dataset]) -> list[tuple[str, list[str]]]:
    """(SOP class, transfer syntaxes) to propose: uncompressed for every class, plus each other syntax on its own."""
    contexts: dict[tuple[str, tuple[str, ...]], None] = {}
    for dataset in datasets:
        sop_class = str(dataset.SOPClassUID)
        own_syntax = str(dataset.file_meta.TransferSyntaxUID)
        contexts[(sop_class, _UNCOMPRESSED)] = None
        if own_syntax not in _UNCOMPRESSED:
            contexts[(sop_class, (own_syntax,))] = None
    return [(sop_class, list(syntaxes)) for sop_class, syntaxes in contexts]


@contextmanager
def _association(ae: AE, destination: Destination, *, first_sop_uid: str) -> Iterator[Association]:
    """An established association, released afterwards (aborted if the caller failed mid-way)."""
    tls_args = _tls_args(destination.tls) if destination.tls is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        raise _association_error(destination, assoc, first_sop_uid)
    completed = False
    try:
        yield assoc
        completed = True
    finally:
        if assoc.is_established and completed:
            assoc.release()
        elif assoc.is_established:
            assoc.abort()


def _checked_status(
    destination: Destination, sop_uid: str, response: Dataset, delivered: tuple[str, ...]
) -> int:
    if "Status" not in response:
        raise DeliveryError(
            destination, sop_uid, None, "no response (timeout, abort or invalid reply)", transient=True,
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


__all__ = ["ClientTls", "DeliveryError", "Destination", "Timeouts", "proposed_contexts", "send_datasets"]
