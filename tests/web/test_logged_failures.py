"""Failures that are handled rather than raised are still said in the log (once, without patient data)."""

import json
import logging
from datetime import UTC

from common.audit import read_events
from web.metrics import LungVisionCollector
from web.worklist import AuditIndex


def _names(collector: LungVisionCollector) -> set[str]:
    return {family.name for family in collector.collect()}


def test_metrics_scrape_survives_a_down_broker_and_store_and_logs_it_once(tmp_path, caplog) -> None:
    def broker_down():
        raise ConnectionRefusedError(111, "Connection refused")

    def store_down():
        raise RuntimeError("could not reach the outcome store for Doe^Jane")  # a message is never logged

    collector = LungVisionCollector(AuditIndex(tmp_path / "audit.jsonl"), broker_down, store_down)
    with caplog.at_level(logging.INFO, logger="lungvision.web.metrics"):
        for _ in range(3):  # scrapes go on; the log says it once
            names = _names(collector)
            assert "lungvision_broker_up" in names
            assert "lungvision_queue_depth" not in names and "lungvision_dead_letters" not in names
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert any("broker" in message and "ConnectionRefusedError" in message for message in warnings)
    assert any("dead letters" in message and "RuntimeError" in message for message in warnings)
    assert "Doe^Jane" not in caplog.text

    caplog.clear()
    collector.queue_depth, collector.dead_letter_count = (lambda: 4), (lambda: 0)
    with caplog.at_level(logging.INFO, logger="lungvision.web.metrics"):
        assert {"lungvision_queue_depth", "lungvision_dead_letters"} <= _names(collector)
    assert sum("answers again" in record.getMessage() for record in caplog.records) == 2


def test_an_audit_line_that_is_not_json_is_skipped_and_logged_without_quoting_it(tmp_path, caplog) -> None:
    trail = tmp_path / "audit.jsonl"
    good = json.dumps({"event": "received", "study_uid": "1.2.3"}) + "\n"
    trail.write_text(good + "\n" + '{"event": "recei Doe^Jane\n' + good)
    with caplog.at_level(logging.WARNING, logger="lungvision.audit"):
        events, offset = read_events(trail)
    assert [event["event"] for event in events] == ["received", "received"]
    assert offset == trail.stat().st_size
    assert len(caplog.records) == 1  # the empty line is no event, and no warning either
    assert f"byte {len(good) + 1}" in caplog.text and "Doe^Jane" not in caplog.text


def test_an_audit_event_with_an_unreadable_time_is_logged_and_still_shown(caplog) -> None:
    from datetime import datetime

    from web.worklist import _parse_time

    with caplog.at_level(logging.WARNING, logger="lungvision.web.worklist"):
        parsed = _parse_time("Doe^Jane 31/02")
    assert abs((parsed - datetime.now(UTC)).total_seconds()) < 60
    assert "unreadable time" in caplog.text and "Doe" not in caplog.text
    assert _parse_time("2026-11-30T10:00:00+00:00") == datetime(2026, 11, 30, 10, tzinfo=UTC)
