"""Dispatch stage: quiet studies → sealed rounds → one StudyReady task each, recorded as queued in the spool.

Crash safety, step by step (each step is durable before the next starts):

1. seal: the study's ``incoming/`` folder is renamed to ``rounds/NNNN`` (one atomic rename);
2. message: ``message.json`` is written with a fresh ``message_id`` (the future task id);
3. send: the message is published with ``task_id = message_id``;
4. mark: ``queued.json`` is written.

A restart re-runs whatever a round lacks: no message → write it (nothing was sent); message but no
``queued.json`` → send it again *with the same task id*. Only a crash between 3 and 4 sends twice,
and then both copies carry one task id, which the worker treats as one job (at-least-once delivery
made idempotent; no broker offers exactly-once publish).
"""

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from common import audit
from common.logs import log_event
from common.messages import BrokerUnavailable, InstanceRef, StudyReady
from common.spool import ArrivalRecord, SealedRound, Spool
from dicom_node.completion import StudyCompletionTracker
from dicom_node.header import UnreadableDataset, read_header

LOG = logging.getLogger("dicom_node.dispatch")
RETRY_FIRST_DELAY_S = 1.0
RETRY_MAX_DELAY_S = 60.0


@dataclass
class _Unqueued:
    sealed: SealedRound
    attempts: int = 0
    next_attempt: float = 0.0  # monotonic seconds


class Wake(Protocol):
    """What the dispatch loop waits on: a ``threading.Event`` or the node's ``WakeEvent``."""

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class Dispatcher:
    """Turns quiet studies into queued rounds; call :meth:`resume` once, then :meth:`dispatch_due` whenever
    the moment it returned arrives or a new study does (:func:`dispatch_until_stopped` does both)."""

    def __init__(
        self,
        spool: Spool,
        tracker: StudyCompletionTracker,
        send: Callable[[StudyReady], str],
        *,
        monotonic_clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._tracker = tracker
        self._send = send
        self._monotonic_clock = monotonic_clock
        self._wall_clock = wall_clock
        self._unqueued: dict[Path, _Unqueued] = {}

    def resume(self) -> None:
        """Pick up after a stop: restart the completion clock of pending studies, re-send unqueued rounds."""
        recovered = self._spool.recover()
        self._track(recovered.pending)
        for sealed in recovered.unqueued:
            self._unqueued[sealed.path] = _Unqueued(sealed)
        log_event(
            LOG, "spool.recovered", pending_studies=len(recovered.pending), unqueued_rounds=len(recovered.unqueued)
        )

    def track_pending(self) -> int:
        """Restart the completion clock of every study with undispatched instances; return how many. Safe beside
        the dispatch loop: run when a receiving process died, whose last arrivals may not have been reported."""
        pending = self._spool.pending()
        self._track(pending)
        return len(pending)

    def _track(self, pending: dict[str, float]) -> None:
        now, wall_now = self._monotonic_clock(), self._wall_clock()
        for study_uid, last_arrival in pending.items():
            self._tracker.seen(study_uid, now - max(0.0, wall_now - last_arrival))

    def dispatch_due(self) -> float:
        """Seal the studies that fell quiet, queue the rounds whose (re)try is due; return when something is
        next due (monotonic seconds; ``math.inf`` when nothing is waiting — then only a new study is)."""
        now = self._monotonic_clock()
        for study_uid, last_seen in self._tracker.due(now):
            self._seal(study_uid, last_seen, now)
        for item in list(self._unqueued.values()):
            if item.next_attempt <= now:
                self._queue(item, now)
        return min([self._tracker.next_deadline(), *(item.next_attempt for item in self._unqueued.values())])

    @property
    def backlog(self) -> int:
        """Rounds sealed but not yet accepted by the broker."""
        return len(self._unqueued)

    def _seal(self, study_uid: str, last_seen: float, now: float) -> None:
        try:
            sealed = self._spool.seal_round(study_uid)
        except OSError as error:
            log_event(LOG, "study.seal-failed", logging.ERROR, study_uid=study_uid, error=str(error))
            self._tracker.seen(study_uid, now)  # try again after another quiet period
            return
        self._tracker.settle(study_uid, last_seen)
        if sealed is not None:
            self._unqueued[sealed.path] = _Unqueued(sealed)

    def _queue(self, item: _Unqueued, now: float) -> None:
        sealed = item.sealed
        try:
            message = self._message_for(sealed)
            task_id = self._send(message)
            self._spool.mark_queued(
                sealed, json.dumps({"task_id": task_id, "queued_at": _iso(self._wall_clock())}).encode()
            )
        except (BrokerUnavailable, OSError, UnreadableDataset) as error:
            item.attempts += 1
            delay = min(RETRY_MAX_DELAY_S, RETRY_FIRST_DELAY_S * 2 ** (item.attempts - 1))
            item.next_attempt = now + delay
            log_event(
                LOG,
                "study.queue-failed",
                logging.ERROR,
                study_uid=sealed.study_uid,
                round=sealed.number,
                attempts=item.attempts,
                retry_in_s=delay,
                error=f"{type(error).__name__}: {error}",
            )
            return
        del self._unqueued[sealed.path]
        audit.record(
            "queued",
            study_uid=sealed.study_uid,
            round=sealed.number,
            message_id=message.message_id,
            instances=len(message.instances),
            calling_ae=message.calling_ae,
        )
        log_event(
            LOG,
            "study.queued",
            study_uid=sealed.study_uid,
            round=sealed.number,
            instances=len(message.instances),
            task_id=task_id,
            calling_ae=message.calling_ae,
        )

    def _message_for(self, sealed: SealedRound) -> StudyReady:
        """The round's message: the one written before (so a re-send is identical), or a new one."""
        existing = self._spool.read_message(sealed)
        if existing is not None:
            return StudyReady.model_validate_json(existing)
        records = {
            path: record if record is not None else _record_from_file(path)
            for path, record in self._spool.arrival_records(sealed).items()
        }
        message = build_study_ready(sealed, records, message_id=str(uuid.uuid4()))
        self._spool.write_message(sealed, message.model_dump_json(indent=1).encode())
        return message


def dispatch_until_stopped(
    dispatcher: Dispatcher,
    stop: threading.Event,
    wake: Wake,
    *,
    housekeeping: Callable[[], float] = lambda: math.inf,
    monotonic_clock: Callable[[], float] = time.monotonic,
) -> None:
    """Dispatch until ``stop`` is set, sleeping between times until the next study falls quiet, the next
    retry is due, ``housekeeping`` wants to run again (it returns when), or ``wake`` is set — the
    tracker's ``on_new_study`` and the signal handlers set it. No periodic tick."""
    while not stop.is_set():
        wake.clear()  # before looking: whatever arrives from here on ends the wait below at once
        wake_at = min(dispatcher.dispatch_due(), housekeeping())
        wake.wait(None if wake_at == math.inf else max(0.0, wake_at - monotonic_clock()))


def build_study_ready(sealed: SealedRound, records: dict[Path, ArrivalRecord], *, message_id: str) -> StudyReady:
    """The message for a sealed round: identifiers and paths only, instances in arrival order."""
    ordered_paths = sorted(records, key=lambda path: (records[path].received_at, records[path].sop_instance_uid))
    ordered = [records[path] for path in ordered_paths]
    return StudyReady(
        message_id=message_id,
        study_instance_uid=sealed.study_uid,
        round=sealed.number,
        spool_dir=str(sealed.path),
        calling_ae=ordered[0].calling_ae,
        first_received_at=_datetime(ordered[0].received_at),
        last_received_at=_datetime(ordered[-1].received_at),
        instances=[
            InstanceRef(
                sop_class_uid=record.sop_class_uid,
                sop_instance_uid=record.sop_instance_uid,
                series_instance_uid=record.series_instance_uid,
                transfer_syntax_uid=record.transfer_syntax_uid,
                path=str(path),
                calling_ae=record.calling_ae,
                received_at=_datetime(record.received_at),
            )
            for path, record in zip(ordered_paths, ordered)
        ],
    )


def _record_from_file(path: Path) -> ArrivalRecord:
    """Rebuild a lost arrival record from the instance itself (the calling AE is then unknown)."""
    header = read_header(path)
    return ArrivalRecord(
        sop_instance_uid=str(header.sop_instance_uid),
        sop_class_uid=str(header.sop_class_uid),
        series_instance_uid=str(header.series_instance_uid),
        transfer_syntax_uid=header.transfer_syntax_uid or "",
        calling_ae=None,
        received_at=path.stat().st_mtime,
    )


def _datetime(posix_seconds: float) -> datetime:
    return datetime.fromtimestamp(posix_seconds, UTC)


def _iso(posix_seconds: float) -> str:
    return _datetime(posix_seconds).isoformat(timespec="milliseconds")
