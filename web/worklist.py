"""Worklist data — the outcome store (results, reviews) and the audit trail → study rows, details, pictures.

Nothing here stores patient data: patient name, id and birth date are read on demand from the
header of a study's result objects in the outbox (they copy them from the source image) and only
for authenticated requests.
"""

import functools
import io
import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread

from common.audit import read_events
from common.outbox import result_file
from common.results import Finding, StudyStatus, Verdict, study_image
from common.store import Store, StudyResult
from config.settings import Settings

log = logging.getLogger("lungvision.web.worklist")


class WorklistStatus(StrEnum):
    """The status the worklist shows: the store's (common.results.StudyStatus) in words, and before the
    store has a row, what the audit trail says."""

    RECEIVED = "received"  # instances arrived, the round is not sealed yet
    QUEUED = "queued"  # sealed and queued, no worker has it yet
    REQUEUED = "requeued"
    ANALYSING = "analysing"
    ANALYSED = "analysed"
    DELIVERED = "delivered"
    FAILED = "failed"
    NOT_ANALYSED = "not analysed"
    OUTSIDE_INTENDED_USE = "outside intended use"


SHOWN_AS = {  # what each stored status shows (see display_status for rounds without a finding)
    StudyStatus.ANALYSING: WorklistStatus.ANALYSING,
    StudyStatus.REQUEUED: WorklistStatus.REQUEUED,
    StudyStatus.ANALYSED: WorklistStatus.ANALYSED,
    StudyStatus.NOT_ANALYSED: WorklistStatus.NOT_ANALYSED,
    StudyStatus.OUTSIDE_USE: WorklistStatus.OUTSIDE_INTENDED_USE,
    StudyStatus.DELIVERED: WorklistStatus.DELIVERED,
    StudyStatus.FAILED: WorklistStatus.FAILED,
}


@dataclass
class Arrival:
    """What the audit trail says about a study's instances before the worker recorded anything."""

    study_uid: str
    first_at: datetime
    last_at: datetime
    calling_ae: str | None
    instances: int = 0
    queued_at: datetime | None = None


@dataclass
class AuditIndex:
    """The audit trail, read incrementally (only the lines appended since the last read)."""

    path: Path
    offset: int = 0
    arrivals: dict[str, Arrival] = field(default_factory=dict)
    events_by_study: dict[str, list[dict]] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    durations_s: list[float] = field(default_factory=list)
    inference_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def refresh(self) -> "AuditIndex":
        with self.lock:
            if self.path.exists() and self.path.stat().st_size < self.offset:  # truncated or rotated: start over
                fresh = AuditIndex(self.path)
                self.offset, self.arrivals, self.events_by_study = 0, fresh.arrivals, fresh.events_by_study
                self.counts, self.durations_s, self.inference_ms = fresh.counts, fresh.durations_s, fresh.inference_ms
            events, self.offset = read_events(self.path, self.offset)
            for event in events:
                self._add(event)
        return self

    def _add(self, event: dict) -> None:
        kind, study = event.get("event"), event.get("study_uid")
        at = _parse_time(event.get("ts"))
        key = str(kind)
        if kind == "failed":
            key = f"failed:{event.get('stage')}:{'final' if event.get('final') else 'retry'}"
        elif kind == "delivered":
            key = f"delivered:{'hl7' if str(event.get('destination', '')).startswith('hl7:') else 'dicom'}"
        elif kind == "reviewed":
            key = f"reviewed:{event.get('verdict')}"
        elif kind == "analysed":
            key = f"analysed:{event.get('finding')}"
            for action, rules in (event.get("outside_intended_use") or {}).items():  # images refused / flagged
                for rule, count in rules.items():
                    self.counts[f"gate:{action}:{rule}"] = self.counts.get(f"gate:{action}:{rule}", 0) + count
            if event.get("duration_ms") is not None:
                self.durations_s.append(float(event["duration_ms"]) / 1000)
            if event.get("inference_ms") is not None:
                self.inference_ms.append(float(event["inference_ms"]))
        self.counts[key] = self.counts.get(key, 0) + 1
        if not study:
            return
        if kind == "received":
            arrival = self.arrivals.get(study) or Arrival(study, at, at, event.get("calling_ae"))
            arrival.last_at, arrival.instances = at, arrival.instances + 1
            self.arrivals[study] = arrival
        elif kind == "queued" and study in self.arrivals:
            self.arrivals[study].queued_at = at
        if kind != "received":
            self.events_by_study.setdefault(study, []).append(event)


def _parse_time(value: object) -> datetime:
    """An audit event's ISO time; an unreadable one (a hand-edited or damaged trail) is logged — without
    the value — and read as now, so the study still shows."""
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        log.warning("audit event with an unreadable time; shown with the current time")
        return datetime.now(UTC)


@dataclass
class StudyRow:
    """One line of the worklist (no patient data)."""

    study_instance_uid: str
    arrival_time: datetime
    status: WorklistStatus
    finding: Finding
    message_id: str | None = None
    round: int | None = None
    accession_number: str | None = None
    modality: str | None = None
    calling_ae: str | None = None
    probability: float | None = None
    threshold: float | None = None
    population: str | None = None  # the population of the study's finding (whose operating point judged it)
    operating_point: str | None = None  # e.g. "shipped / adults"
    has_heatmap: bool = False
    result: StudyResult | None = None
    review: Verdict | None = None  # the current reviewer verdict on this round's finding

    @property
    def outside_intended_use(self) -> bool:
        """Any image of the round is outside the intended use (refused, or analysed and flagged)."""
        return self.result is not None and outside_intended_use(self.result)

    @property
    def priority(self) -> tuple:
        """Sort key: positives first, then higher probability, then earlier arrival."""
        probability = -1.0 if self.probability is None else self.probability
        return (0 if self.finding == Finding.POSITIVE else 1, -probability, self.arrival_time.timestamp())


def outside_intended_use(result: StudyResult) -> bool:
    return any(image.intended_use is False for image in result.images or [])


def display_status(result: StudyResult) -> WorklistStatus:
    if result.status in (StudyStatus.ANALYSING, StudyStatus.FAILED):
        return SHOWN_AS[result.status]
    # a delivery rolls the stored status up to "delivered": the refused images still say why nothing was analysed
    not_analysed = result.finding == Finding.NOT_ANALYSED
    if result.status == StudyStatus.OUTSIDE_USE or (not_analysed and outside_intended_use(result)):
        return WorklistStatus.OUTSIDE_INTENDED_USE
    if not_analysed:
        return WorklistStatus.NOT_ANALYSED
    return SHOWN_AS[result.status]  # analysed (delivery pending or no destination) | delivered | requeued


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Worklist:
    """Reads the store and the audit trail; one per web app."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store
        self.audit = AuditIndex(Path(settings.audit.path))

    def rows(self, *, status: WorklistStatus | None = None, finding: Finding | None = None) -> list[StudyRow]:
        latest: dict[str, StudyResult] = {}
        for result in self.store.results():
            current = latest.get(result.study_instance_uid)
            if current is None or result.round >= current.round:
                latest[result.study_instance_uid] = result
        reviews = {review.message_id: review.verdict for review in self.store.reviews()}
        rows = [self._row(result, reviews.get(result.message_id)) for result in latest.values()]
        for arrival in self.audit.refresh().arrivals.values():
            if arrival.study_uid not in latest:
                queued = arrival.queued_at is not None and arrival.queued_at >= arrival.last_at
                status_now = WorklistStatus.QUEUED if queued else WorklistStatus.RECEIVED
                rows.append(
                    StudyRow(
                        arrival.study_uid,
                        _aware(arrival.first_at),
                        status_now,
                        Finding.PENDING,
                        calling_ae=arrival.calling_ae,
                    )
                )
        rows = [
            row
            for row in rows
            if (status is None or row.status == status) and (finding is None or row.finding == finding)
        ]
        return sorted(rows, key=lambda row: row.priority)[: self.settings.web.page_size]

    def _row(self, result: StudyResult, review: Verdict | None) -> StudyRow:
        image = study_image(result.images or [])
        return StudyRow(
            result.study_instance_uid,
            _aware(result.received_at),
            display_status(result),
            result.finding,
            message_id=result.message_id,
            round=result.round,
            accession_number=result.accession_number,
            modality=result.modality,
            calling_ae=result.calling_ae,
            probability=result.probability,
            threshold=result.threshold,
            population=image.population if image else None,
            operating_point=image.operating_point if image else None,
            has_heatmap=top_sc_uid(result) is not None,
            result=result,
            review=review,
        )

    def row(self, study_uid: str) -> StudyRow | None:
        """The worklist row of one study (its latest round), or None."""
        results = self.store.study_results(study_uid)
        if results:
            latest = max(results, key=lambda result: result.round)
            review = self.store.review(latest.message_id)
            return self._row(latest, review.verdict if review else None)
        return next((row for row in self.rows() if row.study_instance_uid == study_uid), None)

    def events(self, study_uid: str) -> list[dict]:
        return list(self.audit.refresh().events_by_study.get(study_uid, []))

    def output_path(self, study_uid: str, sop_instance_uid: str) -> Path:
        return result_file(self.settings.worker.outbox_dir, study_uid, sop_instance_uid)


def top_sc_uid(result: StudyResult) -> str | None:
    """The heatmap SC of the image the study's finding comes from."""
    image = study_image(result.images or [])
    return None if image is None else image.sc_uid


def patient_fields(outbox: Path, result: StudyResult | None) -> dict[str, str] | None:
    """Patient name, id and birth date from a result object's header (None when there is none)."""
    if result is None:
        return None
    for image in result.images or []:
        for uid in (image.sr_uid, image.sc_uid):
            if not uid:
                continue
            path = result_file(outbox, result.study_instance_uid, uid)
            if path.exists():
                dataset = dcmread(
                    path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID", "PatientBirthDate"]
                )
                return {
                    "patient_name": str(dataset.get("PatientName", "") or ""),
                    "patient_id": str(dataset.get("PatientID", "") or ""),
                    "patient_birth_date": str(dataset.get("PatientBirthDate", "") or ""),
                }
    return None


def sr_summary(path: Path, limit: int = 40) -> list[str]:
    """The SR's content tree as indented "concept: value" lines (no patient module)."""
    if not path.exists():
        return []
    dataset = dcmread(path)
    lines: list[str] = []

    def walk(items, depth: int) -> None:
        for item in items:
            if len(lines) >= limit:
                return
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            kind = item.get("ValueType", "")
            value = ""
            if kind == "TEXT":
                value = str(item.get("TextValue", ""))
            elif kind == "CODE" and "ConceptCodeSequence" in item:
                value = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif kind == "NUM" and "MeasuredValueSequence" in item:
                measured = item.MeasuredValueSequence[0]
                value = f"{measured.NumericValue} {measured.MeasurementUnitsCodeSequence[0].CodeValue}"
            elif kind == "UIDREF":
                value = str(item.get("UID", ""))
            elif kind == "IMAGE":
                value = "image reference"
            if name or value:
                lines.append(f"{'  ' * depth}{name}{': ' if value else ''}{value}")
            if "ContentSequence" in item:
                walk(item.ContentSequence, depth + 1)

    walk(dataset.get("ContentSequence", []), 0)
    return lines


@functools.lru_cache(maxsize=512)
def _png(path: str, mtime_ns: int, size: int, max_side: int) -> bytes:
    dataset = dcmread(path)
    pixels = dataset.pixel_array
    if pixels.dtype != np.uint8:
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB" if pixels.ndim == 3 else "L")
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def render_png(path: Path, max_side: int) -> bytes:
    """The picture of a Secondary Capture file as PNG, longest side ≤ ``max_side`` (cached in memory
    per file version)."""
    stat = path.stat()
    return _png(str(path), stat.st_mtime_ns, stat.st_size, max_side)
