"""Receive stage: one received Part-10 file and its C-STORE request → spooled or refused, with a named status."""

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Protocol

from common import audit
from common.identity import is_lung_vision_object
from common.spool import ArrivalRecord, Spool
from common.uids import InvalidUid, checked_uid
from dicom_node.header import UnreadableDataset, read_header


class StoreStatus(IntEnum):
    """C-STORE response statuses the node uses (PS3.4 B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    CANNOT_UNDERSTAND_UID = 0xC001  # an identifying UID is missing or unsafe


class Disposition(StrEnum):
    """What happened to one instance; each maps to exactly one status."""

    STORED = "stored"
    STORED_OWN_OBJECT = "stored-own-object"  # created by Lung Vision: kept, never queued
    DUPLICATE = "duplicate"  # this SOP Instance UID is already spooled
    IGNORED_SOP_CLASS = "ignored-sop-class"  # a storage class we do not analyse (policy "ignore")
    DISK_LOW = "disk-low"
    WRITE_FAILED = "write-failed"
    UNREADABLE = "unreadable"
    NO_PIXEL_DATA = "no-pixel-data"
    INCOMPLETE_PIXEL_DATA = "incomplete-pixel-data"  # fewer pixel bytes than promised, or an unterminated stream
    INVALID_UID = "invalid-uid"
    SOP_CLASS_MISMATCH = "sop-class-mismatch"
    SOP_INSTANCE_MISMATCH = "sop-instance-mismatch"


_STATUS = {
    Disposition.STORED: StoreStatus.SUCCESS,
    Disposition.STORED_OWN_OBJECT: StoreStatus.SUCCESS,
    Disposition.DUPLICATE: StoreStatus.SUCCESS,
    Disposition.IGNORED_SOP_CLASS: StoreStatus.SUCCESS,
    Disposition.DISK_LOW: StoreStatus.OUT_OF_RESOURCES,
    Disposition.WRITE_FAILED: StoreStatus.OUT_OF_RESOURCES,
    Disposition.UNREADABLE: StoreStatus.CANNOT_UNDERSTAND,
    Disposition.NO_PIXEL_DATA: StoreStatus.CANNOT_UNDERSTAND,
    Disposition.INCOMPLETE_PIXEL_DATA: StoreStatus.CANNOT_UNDERSTAND,
    Disposition.INVALID_UID: StoreStatus.CANNOT_UNDERSTAND_UID,
    Disposition.SOP_CLASS_MISMATCH: StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    Disposition.SOP_INSTANCE_MISMATCH: StoreStatus.CANNOT_UNDERSTAND,
}


@dataclass(frozen=True)
class Received:
    """A complete C-STORE payload on disk plus what the request said about it."""

    path: Path  # Part-10 file written by the network layer, on the spool's file system
    calling_ae: str
    sop_class_uid: str  # Affected SOP Class UID of the request
    sop_instance_uid: str  # Affected SOP Instance UID of the request
    transfer_syntax_uid: str  # of the presentation context it arrived on


@dataclass(frozen=True)
class Outcome:
    disposition: Disposition
    study_uid: str | None = None
    detail: str = ""

    @property
    def status(self) -> StoreStatus:
        return _STATUS[self.disposition]


class Arrivals(Protocol):
    """Where stored arrivals are reported: the completion tracker, or (in a receiving process) the pipe to it."""

    def seen(self, study_uid: str, at: float) -> None: ...


class Intake:
    """Checks one instance and spools it; the study's completion clock restarts on every stored instance."""

    def __init__(
        self,
        spool: Spool,
        tracker: Arrivals,
        analysed_sop_classes: frozenset[str],
        *,
        wall_clock: Callable[[], float] = time.time,
        monotonic_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._spool = spool
        self._tracker = tracker
        self._analysed = analysed_sop_classes
        self._wall_clock = wall_clock
        self._monotonic_clock = monotonic_clock

    def receive(self, item: Received) -> Outcome:
        if item.sop_class_uid not in self._analysed:
            return Outcome(Disposition.IGNORED_SOP_CLASS)
        try:
            has_room = self._spool.has_room()
        except OSError as error:
            return Outcome(Disposition.WRITE_FAILED, detail=f"free space unknown: {error}")
        if not has_room:
            return Outcome(Disposition.DISK_LOW, detail=f"free space below {self._spool.min_free_bytes} bytes")
        try:
            header = read_header(item.path)
        except UnreadableDataset as error:
            return Outcome(Disposition.UNREADABLE, detail=str(error))
        try:
            study_uid = checked_uid(header.study_instance_uid, "StudyInstanceUID")
            series_uid = checked_uid(header.series_instance_uid, "SeriesInstanceUID")
            sop_uid = checked_uid(header.sop_instance_uid, "SOPInstanceUID")
            sop_class_uid = checked_uid(header.sop_class_uid, "SOPClassUID")
        except InvalidUid as error:
            return Outcome(Disposition.INVALID_UID, detail=str(error))
        if sop_class_uid != item.sop_class_uid:
            return Outcome(Disposition.SOP_CLASS_MISMATCH, study_uid, f"dataset says {sop_class_uid}")
        if sop_uid != item.sop_instance_uid:
            return Outcome(Disposition.SOP_INSTANCE_MISMATCH, study_uid, f"dataset says {sop_uid}")
        if not header.has_pixel_data:
            return Outcome(Disposition.NO_PIXEL_DATA, study_uid, "no Pixel Data element")
        if header.pixel_data_problem is not None:  # verified before success: a PACS never resends what we acknowledged
            return Outcome(Disposition.INCOMPLETE_PIXEL_DATA, study_uid, header.pixel_data_problem)

        own = is_lung_vision_object(
            sop_instance_uid=sop_uid, series_instance_uid=series_uid, manufacturer=header.manufacturer
        )
        record = ArrivalRecord(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            series_instance_uid=series_uid,
            transfer_syntax_uid=item.transfer_syntax_uid,
            calling_ae=item.calling_ae,
            received_at=self._wall_clock(),
        )
        try:
            stored = self._spool.store(study_uid, record, item.path, own=own)
        except OSError as error:
            return Outcome(Disposition.WRITE_FAILED, study_uid, f"{type(error).__name__}: {error}")
        if not stored:
            return Outcome(Disposition.DUPLICATE, study_uid)
        if own:
            return Outcome(Disposition.STORED_OWN_OBJECT, study_uid)
        self._tracker.seen(study_uid, self._monotonic_clock())
        audit.record(
            "received",
            study_uid=study_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            calling_ae=item.calling_ae,
            received_at=record.received_at,
        )
        return Outcome(Disposition.STORED, study_uid)
