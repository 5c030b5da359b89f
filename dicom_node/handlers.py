"""Network adapters: pynetdicom events → Admission / Intake calls, answered with named statuses and logged.

Dependencies arrive as handler arguments (pynetdicom's ``(event, handler, args)`` binding), not globals.
"""

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from common.logs import log_event
from dicom_node.application_entity import Admission
from dicom_node.intake import Intake, Outcome, Received, StoreStatus

LOG = logging.getLogger("dicom_node.scp")
ERROR_COMMENT_MAX = 64  # Error Comment is LO


def handle_requested(event: Event, admission: Admission, journal: "AssociationJournal") -> None:
    """A-ASSOCIATE-RQ: reject peers the admission rule refuses."""
    request = event.assoc.requestor.primitive  # the A-ASSOCIATE-RQ; negotiation has not run yet
    assert request is not None  # EVT_REQUESTED comes with it
    calling_ae = request.calling_ae_title.strip()
    refusal = admission.refusal(
        calling_ae=calling_ae, called_ae=request.called_ae_title, host=event.assoc.requestor.address
    )
    journal.requested(event, calling_ae, refusal.reason if refusal else None)
    if refusal is not None:
        event.assoc.acse.send_reject(refusal.result, refusal.source, refusal.diagnostic)
        event.assoc.kill()  # as pynetdicom's own rejections do: lets the A-ASSOCIATE-RJ leave before the socket closes


def handle_store(event: Event, intake: Intake, journal: "AssociationJournal") -> Dataset:
    """C-STORE-RQ: hand the payload (already on disk) to the intake; answer its status (and why, on failure)."""
    started = time.perf_counter()
    request = cast(C_STORE, event.request)  # EVT_C_STORE: a C-STORE request
    received = Received(
        path=event.dataset_path,
        calling_ae=event.assoc.requestor.ae_title.strip(),
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        transfer_syntax_uid=str(event.context.transfer_syntax),
    )
    outcome = intake.receive(received)
    journal.instance(event, received, outcome, milliseconds=(time.perf_counter() - started) * 1000)
    return store_response(outcome)


def store_response(outcome: Outcome) -> Dataset:
    """The C-STORE-RSP status; a failure also carries Error Comment (0000,0902): outcome and detail, ≤ 64 characters."""
    response = Dataset()
    response.Status = int(outcome.status)
    if outcome.status != StoreStatus.SUCCESS:
        comment = f"{outcome.disposition.value}: {outcome.detail}" if outcome.detail else outcome.disposition.value
        text = " ".join(comment.replace("\\", "/").split())  # LO: no backslash, no control characters
        response.ErrorComment = text[:ERROR_COMMENT_MAX]
    return response


def handle_echo(event: Event, journal: "AssociationJournal") -> int:
    """C-ECHO-RQ: always success."""
    journal.echo(event)
    return int(StoreStatus.SUCCESS)


@dataclass
class _AssociationStats:
    number: int  # association sequence number since start, for joining log lines
    opened: float
    peer: str
    calling_ae: str = ""
    refused: str | None = None
    instances: int = 0
    failures: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


class AssociationJournal:
    """One structured log line per instance, and one per association when its connection closes."""

    def __init__(self, receiver: int = 0) -> None:
        self._receiver = receiver  # which receiving process (dicom_node/receivers.py) writes these lines
        self._stats: dict[int, _AssociationStats] = {}
        self._lock = threading.Lock()
        self._count = 0

    def opened(self, event: Event) -> None:
        address, port = event.address  # type: ignore[attr-defined]  # EVT_CONN_OPEN's attribute, set at run time
        with self._lock:
            self._count += 1
            self._stats[id(event.assoc)] = _AssociationStats(self._count, time.perf_counter(), f"{address}:{port}")

    def requested(self, event: Event, calling_ae: str, refusal: str | None) -> None:
        stats = self._get(event)
        if stats is not None:
            stats.calling_ae = calling_ae
            stats.refused = refusal

    def echo(self, event: Event) -> None:
        stats = self._get(event)
        log_event(
            LOG,
            "echo",
            receiver=self._receiver,
            association=stats.number if stats else None,
            calling_ae=event.assoc.requestor.ae_title.strip(),
            status="0x0000",
        )

    def instance(self, event: Event, received: Received, outcome: Outcome, *, milliseconds: float) -> None:
        status = f"0x{int(outcome.status):04X}"
        stats = self._get(event)
        if stats is not None:
            stats.instances += 1
            stats.failures += outcome.status != StoreStatus.SUCCESS
            stats.statuses[outcome.disposition] = stats.statuses.get(outcome.disposition, 0) + 1
        log_event(
            LOG,
            "instance",
            logging.INFO if outcome.status == StoreStatus.SUCCESS else logging.WARNING,
            receiver=self._receiver,
            association=stats.number if stats else None,
            calling_ae=received.calling_ae,
            sop_class=received.sop_class_uid,
            sop_class_name=UID(received.sop_class_uid).name,
            transfer_syntax=received.transfer_syntax_uid,
            sop_instance_uid=received.sop_instance_uid,
            study_uid=outcome.study_uid,
            status=status,
            outcome=outcome.disposition.value,
            detail=outcome.detail or None,
            ms=round(milliseconds, 1),
        )

    def closed(self, event: Event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        assoc = event.assoc
        if stats.refused is not None or assoc.is_rejected:
            result = "rejected"
        elif assoc.is_aborted:
            result = "aborted"
        elif assoc.is_released:
            result = "released"
        else:
            result = "closed"
        log_event(
            LOG,
            "association",
            logging.WARNING if result in ("rejected", "aborted") else logging.INFO,
            receiver=self._receiver,
            association=stats.number,
            calling_ae=stats.calling_ae or None,
            peer=stats.peer,
            result=result,
            reason=stats.refused,
            instances=stats.instances,
            failures=stats.failures,
            outcomes=stats.statuses,
            ms=round((time.perf_counter() - stats.opened) * 1000, 1),
        )

    def _get(self, event: Event) -> _AssociationStats | None:
        with self._lock:
            return self._stats.get(id(event.assoc))


def bindings(intake: Intake, admission: Admission, journal: AssociationJournal) -> Sequence[tuple]:
    """The ``evt_handlers`` list for ``AE.start_server``."""
    return [
        (evt.EVT_CONN_OPEN, journal.opened),
        (evt.EVT_REQUESTED, handle_requested, [admission, journal]),
        (evt.EVT_C_ECHO, handle_echo, [journal]),
        (evt.EVT_C_STORE, handle_store, [intake, journal]),
        (evt.EVT_CONN_CLOSE, journal.closed),
    ]
