"""Audit trail — one JSON object per line, appended and fsync'd, never rewritten.

Events: ``received`` (node, one per stored instance), ``analysing`` / ``analysed`` (worker),
``delivered`` / ``failed`` (DICOM and HL7 deliveries; ``final`` tells a dead-lettered or given-up
job from a failure that will be retried), ``replayed`` (an operator replayed a dead letter) and
``reviewed`` (a radiologist marked a finding agree / disagree in the worklist) and ``requeued``
(the worker's sweeper sent a silent study round or delivery again).
Fields are UIDs, AE titles, destinations, model sha256, outcomes and timings — callers must never
pass patient names, ids or birth dates.

Node, worker processes and the web server all append to the same file: each line is written with
one ``write`` on a file opened in append mode (``O_APPEND``: the kernel puts it at the end,
whole), under an advisory ``flock`` so lines of different processes never interleave, then
fsync'd once the lock is released — a line is on disk before ``record`` returns, and the fsyncs of
threads and processes writing at the same time share the file system's journal commits (a group
commit) instead of waiting for each other's in turn (the node's "received" lines of 8 associations
were one fsync after the other). Until :func:`configure` is called (the commands do it
from ``audit.path``) nothing is written, so library use and unit tests leave no trail behind.
"""

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from common.durable import fsync_and_close

FORBIDDEN_FIELDS = frozenset(
    {"patient_name", "patient_id", "patient_birth_date", "PatientName", "PatientID", "PatientBirthDate"}
)

_lock = threading.Lock()
_path: Path | None = None
log = logging.getLogger("lungvision.audit")


def configure(path: Path | None) -> None:
    """Write the trail to ``path`` from now on (None = stop writing)."""
    global _path
    _path = None if path is None else Path(path)
    if _path is not None:
        _path.parent.mkdir(parents=True, exist_ok=True)


def configured_path() -> Path | None:
    return _path


def record(event: str, **fields: object) -> None:
    """Append one event; a no-op until :func:`configure`. An audit write that fails raises."""
    if _path is None:
        return
    leaked = FORBIDDEN_FIELDS.intersection(fields)
    if leaked:
        raise ValueError(f"patient fields must not be audited: {sorted(leaked)}")
    line = (
        json.dumps(
            {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event, **fields},
            default=str,
            separators=(",", ":"),
        )
        + "\n"
    )
    descriptor = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        with _lock:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                os.write(descriptor, line.encode())
            finally:
                fcntl.flock(descriptor, fcntl.LOCK_UN)
    except BaseException:
        os.close(descriptor)
        raise
    fsync_and_close(descriptor)


def read_events(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete events from byte ``offset`` on, and the offset after the last complete line."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:  # nothing has been audited yet: no events
        return [], 0
    end = data.rfind(b"\n") + 1  # a line still being written is left for the next read
    events = []
    position = offset
    for raw in data[:end].splitlines(keepends=True):
        if not raw.strip():  # an empty line carries no event
            position += len(raw)
            continue
        try:
            events.append(json.loads(raw))
        except ValueError as error:  # skipped, said once per reader; the line itself is not quoted
            log.warning(
                "audit trail %s: the line at byte %d is not a JSON event (%s); skipped",
                path,
                position,
                type(error).__name__,
            )
        position += len(raw)
    return events, offset + end


def iter_events(path: Path) -> Iterator[dict]:
    yield from read_events(path)[0]
