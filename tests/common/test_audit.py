"""The audit trail (common/audit.py): what an event line holds, the patient fields it refuses, what
read_events returns (complete lines only, with the offset to go on from), failures that raise, and lines
synced before record returns without one writer's fsync holding up another's."""

import json
import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from common import audit
from tests.kit.group_commit import second_writer_is_not_held_up


@pytest.fixture(autouse=True)
def not_configured():
    """Every test starts and ends with the trail off (the module keeps its path process-wide)."""
    audit.configure(None)
    yield
    audit.configure(None)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_nothing_is_written_until_configured_nor_after_configure_none(tmp_path) -> None:
    trail = tmp_path / "audit.jsonl"
    audit.record("received", study_uid="1.2.3")
    assert audit.configured_path() is None and not trail.exists()

    audit.configure(trail)
    assert audit.configured_path() == trail
    audit.record("received", study_uid="1.2.3")
    audit.configure(None)
    audit.record("received", study_uid="1.2.4")
    assert [json.loads(line)["study_uid"] for line in lines(trail)] == ["1.2.3"]


def test_an_event_line_is_one_compact_json_object_with_time_event_and_the_fields(tmp_path) -> None:
    trail = tmp_path / "audit.jsonl"
    audit.configure(trail)
    before = datetime.now(UTC)
    audit.record(
        "analysed",
        message_id="m1",
        study_uid="1.2.3",
        probability=0.25,
        round=1,
        final=True,
        destination=None,
        folder=tmp_path,
    )
    after = datetime.now(UTC)

    text = trail.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    assert ", " not in text and ": " not in text  # compact separators
    event = json.loads(text)
    assert list(event)[:2] == ["ts", "event"]
    assert event == {
        "ts": event["ts"],
        "event": "analysed",
        "message_id": "m1",
        "study_uid": "1.2.3",
        "probability": 0.25,
        "round": 1,
        "final": True,
        "destination": None,
        "folder": str(tmp_path),
    }  # what JSON cannot hold is written as its str()
    stamp = datetime.fromisoformat(event["ts"])
    assert stamp.utcoffset() == timedelta(0)  # UTC, with its offset
    assert len(event["ts"].split("T")[1].split("+")[0]) == len("10:00:00.000")  # milliseconds
    assert before - timedelta(milliseconds=1) <= stamp <= after


def test_events_are_appended_never_rewritten(tmp_path) -> None:
    trail = tmp_path / "audit.jsonl"
    trail.write_text('{"event":"received","study_uid":"0"}\n')
    audit.configure(trail)
    for number in range(1, 4):
        audit.record("received", study_uid=str(number))
    assert [json.loads(line)["study_uid"] for line in lines(trail)] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("field", sorted(audit.FORBIDDEN_FIELDS))
def test_a_patient_field_is_refused_and_nothing_is_written(tmp_path, field) -> None:
    trail = tmp_path / "audit.jsonl"
    audit.configure(trail)
    with pytest.raises(ValueError, match=field):
        audit.record("received", study_uid="1.2.3", **{field: "Doe^Jane"})
    assert not trail.exists()


def test_patient_name_id_and_birth_date_are_refused_in_both_spellings() -> None:
    assert {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
    } <= audit.FORBIDDEN_FIELDS


def test_configure_makes_the_folder(tmp_path) -> None:
    trail = tmp_path / "var" / "log" / "audit.jsonl"
    audit.configure(trail)
    assert trail.parent.is_dir()
    audit.record("received", study_uid="1.2.3")
    assert len(lines(trail)) == 1


def test_a_folder_that_cannot_be_made_fails_configure(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        audit.configure(tmp_path / "file" / "audit.jsonl")


def test_a_write_that_fails_raises(tmp_path) -> None:
    trail = tmp_path / "audit.jsonl"
    trail.mkdir()  # a folder where the file should be: no process can open it for writing, root neither
    audit.configure(trail)
    with pytest.raises(OSError):
        audit.record("received", study_uid="1.2.3")


def test_read_events_of_a_missing_file_is_nothing_at_offset_0(tmp_path) -> None:
    assert audit.read_events(tmp_path / "never-written.jsonl") == ([], 0)
    assert list(audit.iter_events(tmp_path / "never-written.jsonl")) == []


def test_a_trail_that_cannot_be_read_raises(tmp_path) -> None:
    with pytest.raises(OSError):
        audit.read_events(tmp_path)  # a folder: only a missing file means "nothing audited yet"


def test_read_events_returns_what_record_wrote_and_where_to_go_on(tmp_path) -> None:
    trail = tmp_path / "audit.jsonl"
    audit.configure(trail)
    audit.record("received", study_uid="1")
    audit.record("queued", study_uid="1", round=1)
    events, offset = audit.read_events(trail)
    assert [(event["event"], event["study_uid"]) for event in events] == [("received", "1"), ("queued", "1")]
    assert offset == trail.stat().st_size

    assert audit.read_events(trail, offset) == ([], offset)  # nothing new
    audit.record("analysing", study_uid="1")
    later, next_offset = audit.read_events(trail, offset)
    assert [event["event"] for event in later] == ["analysing"] and next_offset == trail.stat().st_size
    assert [event["event"] for event in audit.iter_events(trail)] == ["received", "queued", "analysing"]


def test_a_line_still_being_written_is_left_for_the_next_read(tmp_path) -> None:
    trail = tmp_path / "audit.jsonl"
    complete = '{"event":"received","study_uid":"1"}\n'
    trail.write_text(complete + '{"event":"queu')
    events, offset = audit.read_events(trail)
    assert [event["event"] for event in events] == ["received"] and offset == len(complete)

    with open(trail, "a") as handle:
        handle.write('ed","study_uid":"1"}\n')
    events, offset = audit.read_events(trail, offset)
    assert [event["event"] for event in events] == ["queued"] and offset == trail.stat().st_size


def _append_many(path: str, writer: int, count: int) -> None:
    audit.configure(Path(path))
    for number in range(count):
        audit.record("received", writer=writer, number=number, padding="x" * 5000)


def test_lines_of_several_processes_never_interleave(tmp_path) -> None:
    trail = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each, as node, worker and web are
    writers = [context.Process(target=_append_many, args=(str(trail), writer, 50)) for writer in range(3)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
        assert process.exitcode == 0
    events, offset = audit.read_events(trail)
    assert offset == trail.stat().st_size and len(lines(trail)) == 150
    assert sorted((event["writer"], event["number"]) for event in events) == [
        (writer, number) for writer in range(3) for number in range(50)
    ]


def test_a_line_is_synced_before_record_returns_without_holding_up_other_writers(tmp_path, monkeypatch) -> None:
    """Writers appending together share journal commits (a group commit): while one line's fsync is held up,
    another thread writes and syncs its own line; neither returns before its fsync."""
    trail = tmp_path / "audit.jsonl"
    audit.configure(trail)
    in_file_at_fsync = second_writer_is_not_held_up(
        monkeypatch,
        lambda: audit.record("received", study_uid="1.1"),
        lambda: audit.record("received", study_uid="1.2"),
        seen=lambda _descriptor: lines(trail),
    )
    assert [json.loads(line)["study_uid"] for line in lines(trail)] == ["1.1", "1.2"]
    assert len(in_file_at_fsync) == 2 and len(in_file_at_fsync[0]) >= 1 and len(in_file_at_fsync[1]) == 2
