"""Spool stage: received Part-10 files → durable per-study folders, sealed into rounds, marked queued; no pynetdicom.

Layout under the spool root (every name below ``studies/`` is a checked UID or a round number)::

    .receiving/                      half-received network payloads (the SCP's temporary files)
    .locks/                          one empty file per lock stripe (see StudyLocks)
    studies/<study>/incoming/        <sop>.dcm + <sop>.json (arrival record), not yet dispatched
    studies/<study>/rounds/0001/     a sealed round: the incoming folder renamed in one step,
                                     plus message.json (what is sent) and queued.json (sent)
    studies/<study>/own/             objects Lung Vision created: kept for the record, never queued

Durability: a file is written to a temporary name, fsynced, renamed into place and its folder
fsynced, so after a crash a name either points at complete data or does not exist.
"""

import errno
import fcntl
import json
import os
import shutil
import threading
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from common.durable import fsync_and_close, fsync_dir, open_dir
from common.uids import checked_uid, is_valid_uid

RECEIVING = ".receiving"
LOCKS = ".locks"
STUDIES = "studies"
INCOMING = "incoming"
ROUNDS = "rounds"
OWN = "own"
MESSAGE_FILE = "message.json"
QUEUED_FILE = "queued.json"
DICOM_SUFFIX = ".dcm"
RECORD_SUFFIX = ".json"
TEMP_SUFFIX = ".tmp"
_LOCK_STRIPES = 64


@dataclass(frozen=True)
class ArrivalRecord:
    """How one instance arrived; stored beside it as ``<sop>.json``. No patient attributes."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str | None
    received_at: float  # POSIX seconds

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ArrivalRecord":
        return cls(**json.loads(data))


@dataclass(frozen=True)
class SealedRound:
    """A batch of a study's instances, frozen in its own folder."""

    study_uid: str
    number: int
    path: Path

    @property
    def message_path(self) -> Path:
        return self.path / MESSAGE_FILE

    @property
    def queued_path(self) -> Path:
        return self.path / QUEUED_FILE

    def instance_paths(self) -> list[Path]:
        return sorted(self.path.glob(f"*{DICOM_SUFFIX}"))


@dataclass(frozen=True)
class QueuedRound:
    """A round whose message the broker took: its ``queued.json`` exists (read by the worker's sweeper)."""

    sealed: SealedRound
    queued_at: float  # POSIX seconds: when queued.json was written
    marker: bytes  # queued.json as the dispatcher wrote it: {"task_id": …, "queued_at": …}

    @property
    def message_id(self) -> str:
        """The task id the broker took (the message's ``message_id``); ValueError if queued.json is unreadable."""
        try:
            return str(json.loads(self.marker)["task_id"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"no task_id in {self.sealed.queued_path}") from error


@dataclass(frozen=True)
class Recovered:
    """What a restart found: studies still collecting instances, and rounds sealed but never queued."""

    pending: dict[str, float]  # study UID → last arrival (POSIX seconds)
    unqueued: list[SealedRound]


@dataclass(frozen=True)
class SweepReport:
    rounds_removed: int
    own_removed: int
    studies_removed: int
    partials_removed: int


class Spool:
    """The on-disk spool. Safe across threads and processes: receiving processes and their association
    threads store while the node's dispatcher seals and sweeps."""

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = Path(root).resolve()
        self.min_free_bytes = min_free_bytes  # reassigned on configuration reload
        self._studies = self.root / STUDIES
        self._locks = StudyLocks(self.root / LOCKS)

    @property
    def receiving_dir(self) -> Path:
        """Where the network layer writes payloads while they arrive (same file system as the spool)."""
        return self.root / RECEIVING

    def prepare(self) -> int:
        """Create the layout and delete leftovers of receives interrupted by a stop; return how many."""
        _ensure_dir(self._studies)
        _ensure_dir(self.receiving_dir)
        _ensure_dir(self.root / LOCKS)
        removed = 0
        for leftover in self.receiving_dir.iterdir():
            leftover.unlink()
            removed += 1
        return removed

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_room(self) -> bool:
        """False while free space is below the watermark; re-evaluated on every call, so it recovers by itself."""
        return self.free_bytes() >= self.min_free_bytes

    # --- receive -------------------------------------------------------------------------------

    def store(self, study_uid: str, record: ArrivalRecord, source: Path, *, own: bool = False) -> bool:
        """Move the received file ``source`` into the study; False when that SOP Instance UID is already here.

        Returns only after the file, its arrival record and both names are on stable storage. The
        fsyncs run outside the study's lock, so parallel associations sending one study are not
        serialised on them: the payload's and the record's before it, the folder's after it — through a
        descriptor taken under the lock, so it is that folder's even if a seal renames it meanwhile (the
        seal's own message write then fsyncs the round's folder, ``write_message``). Concurrent fsyncs of
        one folder share the file system's journal commits (a group commit) instead of waiting for each
        other in turn: what bounds 8 associations sending one study to a disk whose fsyncs are slow.
        """
        study_dir = self._study_dir(study_uid)
        sop_uid = checked_uid(record.sop_instance_uid, "SOPInstanceUID")
        target_dir = study_dir / (OWN if own else INCOMING)
        if self._already_stored(study_dir, sop_uid):
            return False
        _fsync_file(source)
        record_file = source.with_name(source.name + RECORD_SUFFIX)
        _write_synced(record_file, record.to_bytes())
        try:
            with self._lock(study_uid):
                if self._already_stored(study_dir, sop_uid):  # a parallel association was faster
                    return False
                _ensure_dir(target_dir)
                _move_into(record_file, target_dir / f"{sop_uid}{RECORD_SUFFIX}")
                _move_into(source, target_dir / f"{sop_uid}{DICOM_SUFFIX}")
                folder = open_dir(target_dir)
        finally:
            record_file.unlink(missing_ok=True)
        fsync_and_close(folder)
        return True

    def _already_stored(self, study_dir: Path, sop_uid: str) -> bool:
        name = f"{sop_uid}{DICOM_SUFFIX}"
        if (study_dir / INCOMING / name).exists() or (study_dir / OWN / name).exists():
            return True
        return any((round_dir / name).exists() for round_dir in _round_dirs(study_dir))

    # --- complete and queue --------------------------------------------------------------------

    def seal_round(self, study_uid: str) -> SealedRound | None:
        """Freeze the study's incoming instances as its next round (one rename); None when there are none."""
        study_dir = self._study_dir(study_uid)
        incoming = study_dir / INCOMING
        with self._lock(study_uid):
            if not incoming.is_dir() or not any(incoming.glob(f"*{DICOM_SUFFIX}")):
                return None
            rounds = study_dir / ROUNDS
            _ensure_dir(rounds)
            number = max((int(path.name) for path in _round_dirs(study_dir)), default=0) + 1
            target = rounds / f"{number:04d}"
            os.rename(incoming, target)
            fsync_dir(rounds)
            fsync_dir(study_dir)
        return SealedRound(study_uid, number, target)

    def arrival_records(self, sealed: SealedRound) -> dict[Path, ArrivalRecord | None]:
        """Each instance file of the round with its arrival record (None when the record was lost)."""
        return {path: _read_record(path.with_suffix(RECORD_SUFFIX)) for path in sealed.instance_paths()}

    def write_message(self, sealed: SealedRound, payload: bytes) -> None:
        _write_atomically(sealed.message_path, payload)

    def read_message(self, sealed: SealedRound) -> bytes | None:
        return sealed.message_path.read_bytes() if sealed.message_path.exists() else None

    def mark_queued(self, sealed: SealedRound, payload: bytes) -> None:
        """Record that the round's message reached the broker."""
        _write_atomically(sealed.queued_path, payload)

    def queued_rounds(self) -> Iterator[QueuedRound]:
        """Every round marked queued, study by study (a read-only scan; no lock, so a round that retention
        deletes meanwhile is simply not listed)."""
        for study_uid, study_dir in self._study_dirs():
            try:
                round_dirs = _round_dirs(study_dir)
            except FileNotFoundError:  # the study was deleted by retention meanwhile
                continue
            for round_dir in round_dirs:
                sealed = SealedRound(study_uid, int(round_dir.name), round_dir)
                try:
                    queued_at = sealed.queued_path.stat().st_mtime
                    marker = sealed.queued_path.read_bytes()
                except FileNotFoundError:  # not queued yet, or deleted by retention meanwhile
                    continue
                yield QueuedRound(sealed, queued_at, marker)

    # --- restart and retention -----------------------------------------------------------------

    def recover(self) -> Recovered:
        """Scan the spool after a start: studies with undispatched instances, rounds never queued."""
        unqueued: list[SealedRound] = []
        for study_uid, study_dir in self._study_dirs():
            incoming = study_dir / INCOMING
            if incoming.is_dir():
                _remove_temporaries(incoming)
            for round_dir in _round_dirs(study_dir):
                _remove_temporaries(round_dir)
                sealed = SealedRound(study_uid, int(round_dir.name), round_dir)
                if not sealed.queued_path.exists():
                    unqueued.append(sealed)
        return Recovered(self.pending(), unqueued)

    def pending(self) -> dict[str, float]:
        """Studies with undispatched instances → their latest arrival (POSIX seconds). Read-only, so it may run
        while instances arrive (a study being sealed meanwhile is simply not listed)."""
        pending: dict[str, float] = {}
        for study_uid, study_dir in self._study_dirs():
            try:
                arrivals = [_arrival_time(path) for path in (study_dir / INCOMING).glob(f"*{DICOM_SUFFIX}")]
            except FileNotFoundError:  # sealed or deleted meanwhile
                continue
            if arrivals:
                pending[study_uid] = max(arrivals)
        return pending

    def sweep(self, now: float, retention_s: float, stale_partial_s: float) -> SweepReport:
        """Delete queued rounds and own objects older than ``retention_s``, emptied studies, stale partial receives."""
        partials = 0
        for partial in self.receiving_dir.iterdir():
            if _age(partial, now) > stale_partial_s:
                partial.unlink(missing_ok=True)
                partials += 1
        rounds = owns = studies = 0
        for study_uid, study_dir in self._study_dirs():
            with self._lock(study_uid):
                for round_dir in _round_dirs(study_dir):
                    queued = round_dir / QUEUED_FILE
                    if queued.exists() and _age(queued, now) > retention_s:
                        shutil.rmtree(round_dir)
                        rounds += 1
                own = study_dir / OWN
                if own.is_dir():
                    for path in own.glob(f"*{DICOM_SUFFIX}"):
                        if _age(path, now) > retention_s:
                            path.with_suffix(RECORD_SUFFIX).unlink(missing_ok=True)
                            path.unlink()
                            owns += 1
                if _is_empty_study(study_dir):
                    shutil.rmtree(study_dir)
                    studies += 1
        return SweepReport(rounds, owns, studies, partials)

    # --- paths and locks -----------------------------------------------------------------------

    def _study_dir(self, study_uid: str) -> Path:
        return self._studies / checked_uid(study_uid, "StudyInstanceUID")

    def _study_dirs(self) -> Iterator[tuple[str, Path]]:
        if not self._studies.is_dir():
            return
        for entry in sorted(self._studies.iterdir()):
            if entry.is_dir() and is_valid_uid(entry.name):
                yield entry.name, entry

    def _lock(self, study_uid: str) -> AbstractContextManager[None]:
        return self._locks.hold(study_uid)


class StudyLocks:
    """Mutual exclusion per study for the threads *and* processes sharing a spool.

    A study maps to one of 64 stripes; a stripe is a thread lock (``flock`` does not exclude threads that
    share an open file) plus an ``flock`` on the stripe's file, opened once per process.
    """

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._thread_locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._descriptors: dict[int, int] = {}
        self._pid = os.getpid()

    @contextmanager
    def hold(self, study_uid: str) -> Iterator[None]:
        stripe = zlib.crc32(study_uid.encode()) % _LOCK_STRIPES
        with self._thread_locks[stripe]:
            descriptor = self._descriptor(stripe)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(descriptor, fcntl.LOCK_UN)

    def _descriptor(self, stripe: int) -> int:
        if self._pid != os.getpid():  # a forked copy: an inherited descriptor would share the parent's lock
            self._descriptors, self._pid = {}, os.getpid()
        if stripe not in self._descriptors:
            self._folder.mkdir(exist_ok=True)
            self._descriptors[stripe] = os.open(self._folder / f"{stripe:02d}", os.O_RDWR | os.O_CREAT, 0o640)
        return self._descriptors[stripe]


def _round_dirs(study_dir: Path) -> list[Path]:
    rounds = study_dir / ROUNDS
    if not rounds.is_dir():
        return []
    return sorted(path for path in rounds.iterdir() if path.is_dir() and path.name.isdigit())


def _is_empty_study(study_dir: Path) -> bool:
    incoming, own = study_dir / INCOMING, study_dir / OWN
    return (
        not _round_dirs(study_dir)
        and not (incoming.is_dir() and any(incoming.glob(f"*{DICOM_SUFFIX}")))
        and not (own.is_dir() and any(own.glob(f"*{DICOM_SUFFIX}")))
    )


def _read_record(path: Path) -> ArrivalRecord | None:
    """The arrival record, or None when it is missing or unreadable (the instance itself is intact)."""
    try:
        return ArrivalRecord.from_bytes(path.read_bytes())
    except FileNotFoundError:  # the record is lost: callers fall back on the instance file (its mtime)
        return None
    except (ValueError, TypeError):  # half-written before a crash, or an older format
        return None


def _arrival_time(dicom_path: Path) -> float:
    record = _read_record(dicom_path.with_suffix(RECORD_SUFFIX))
    return record.received_at if record is not None else dicom_path.stat().st_mtime


def _age(path: Path, now: float) -> float:
    return now - path.stat().st_mtime


def _remove_temporaries(folder: Path) -> None:
    """Delete files a crash left half-written, and arrival records whose instance never landed."""
    for path in folder.glob(f"*{TEMP_SUFFIX}"):
        path.unlink()
    for record in folder.glob(f"*{RECORD_SUFFIX}"):
        if record.name not in (MESSAGE_FILE, QUEUED_FILE) and not record.with_suffix(DICOM_SUFFIX).exists():
            record.unlink()


def _ensure_dir(path: Path) -> None:
    """mkdir -p, fsyncing each parent whose listing changed."""
    if path.is_dir():
        return
    _ensure_dir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:  # made by a concurrent caller meanwhile, which fsyncs the parent itself
        return
    fsync_dir(path.parent)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + TEMP_SUFFIX)
    _write_synced(temporary, data)
    os.replace(temporary, path)
    fsync_dir(path.parent)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _move_into(source: Path, target: Path) -> None:
    """Rename ``source`` (already fsynced) to ``target``; copy when they are on different file systems."""
    try:
        os.rename(source, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        temporary = target.with_name(target.name + TEMP_SUFFIX)
        shutil.copyfile(source, temporary)
        _fsync_file(temporary)
        os.replace(temporary, target)


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
