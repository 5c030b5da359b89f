"""The outcome store (common/store.py): typed rows that read what earlier versions wrote, and its schema
creation racing another process."""

import json
import sqlite3
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError

from common import store as store_module
from common.results import DeliveryStatus, Finding, GateReason, ImageResult, StudyStatus, Verdict
from common.store import Store
from tests.kit.postgresql import postgresql_url
from tests.kit.records import study_result


def test_every_value_is_the_string_earlier_versions_stored() -> None:
    assert [status.value for status in StudyStatus] == [
        "analysing",
        "requeued",
        "analysed",
        "not_analysed",
        "outside_use",
        "delivered",
        "failed",
    ]
    assert [finding.value for finding in Finding] == ["POSITIVE", "NEGATIVE", "NOT_ANALYSED", "PENDING"]
    assert [status.value for status in DeliveryStatus] == ["pending", "retrying", "delivered", "failed"]
    assert [reason.value for reason in GateReason] == ["modality", "body_part", "view", "age", "image_check"]
    assert [verdict.value for verdict in Verdict] == ["agree", "disagree"]


def test_a_row_written_by_an_earlier_version_reads_back_typed(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path}/outcomes.db")
    images = [
        {
            "sop_instance_uid": "1.2.3.4",
            "probability": 0.8,
            "positive": True,
            "sc_uid": "1.2.3.5",
            "sr_uid": "1.2.3.6",
            "gate_reason": "age",
            "intended_use": False,
        },  # no logit, no population
        {"error": "analysis took longer than 300 s"},
    ]
    with store.engine.begin() as connection:  # plain strings and dicts, as the store held them before
        connection.execute(
            text(
                "INSERT INTO study_results (message_id, study_instance_uid, round, status, finding, threshold, "
                "model_version, model_sha256, images, timings_ms, received_at, analysed_at) VALUES ('m1', "
                "'1.2.3', 1, 'outside_use', 'NOT_ANALYSED', 0.5, 'm 1', 'ab', :images, '{}', "
                "'2026-01-01 00:00:00', '2026-01-01 00:00:01')"
            ),
            {"images": json.dumps(images)},
        )
    row = store.result("m1")
    assert (row.status, row.finding) == (StudyStatus.OUTSIDE_USE, Finding.NOT_ANALYSED)
    assert row.images[0] == ImageResult(
        sop_instance_uid="1.2.3.4",
        probability=0.8,
        positive=True,
        sc_uid="1.2.3.5",
        sr_uid="1.2.3.6",
        gate_reason=GateReason.AGE,
        intended_use=False,
    )
    assert row.images[0].logit is None and row.images[0].output_uids == ["1.2.3.5", "1.2.3.6"]
    assert row.images[1].error == "analysis took longer than 300 s" and not row.images[1].analysed


def test_what_is_written_is_the_plain_value(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path}/outcomes.db")
    store.save_result(
        study_result(
            "m1",
            status=StudyStatus.NOT_ANALYSED,
            finding=Finding.NOT_ANALYSED,
            images=[ImageResult(sop_instance_uid="1.2.3.4", gate_reason="view")],
        )
    )
    with store.engine.connect() as connection:
        status, finding, images = connection.execute(text("SELECT status, finding, images FROM study_results")).one()
    assert (status, finding) == ("not_analysed", "NOT_ANALYSED")
    assert json.loads(images)[0]["gate_reason"] == "view"


def test_a_value_outside_its_enum_is_refused(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path}/outcomes.db")
    with pytest.raises(StatementError):
        store.update_delivery("m1", "pacs", status="sent", attempts=1)
    with pytest.raises(ValidationError):
        ImageResult(gate_reason="elbow")


def test_creating_the_schema_survives_another_process_creating_it_at_once(tmp_path, monkeypatch) -> None:
    real_create_all, calls = store_module.Base.metadata.create_all, []

    def collide_once(engine) -> None:
        calls.append(engine)
        if len(calls) == 1:
            real_create_all(engine)  # "the other process" wins...
            raise OperationalError("CREATE TABLE study_results", {}, Exception("table study_results already exists"))
        real_create_all(engine)

    monkeypatch.setattr(store_module.Base.metadata, "create_all", collide_once)
    store = Store(f"sqlite:///{tmp_path}/fresh.db")
    assert len(calls) == 2 and store.results() == []


def _record_each_round_at_once(url: str, rounds: list[str]) -> None:
    """For each round, the worker records its outcome while the deliverer, which was faster, records the
    delivery — each process with a store (an engine) of its own, started together."""
    worker, deliverer = Store(url), Store(url)
    together = threading.Barrier(2, timeout=30)

    def as_worker() -> None:
        for message_id in rounds:
            together.wait()
            worker.save_outcome(study_result(message_id, status=StudyStatus.ANALYSED), ["pacs"])

    def as_deliverer() -> None:
        for message_id in rounds:
            together.wait()
            deliverer.update_delivery(message_id, "pacs", status=DeliveryStatus.DELIVERED, attempts=1)

    for message_id in rounds:  # the worker's placeholder, written when it started the round
        worker.save_result(study_result(message_id))
    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(as_worker), pool.submit(as_deliverer)]:
            done.result(timeout=120)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_round_recorded_by_worker_and_deliverer_at_once_has_one_delivery_and_is_delivered(kind, tmp_path) -> None:
    """The demo once left a round "analysed" for ever: two rows for its one destination, pending and delivered."""
    url = f"sqlite:///{tmp_path}/outcomes.db" if kind == "sqlite" else postgresql_url()
    run = uuid.uuid4().hex[:8]
    rounds = [f"{run}-{number}" for number in range(150)]
    _record_each_round_at_once(url, rounds)
    store = Store(url)
    for message_id in rounds:
        assert [(d.destination, d.status) for d in store.deliveries(message_id)] == [
            ("pacs", DeliveryStatus.DELIVERED)
        ], message_id
        assert store.result(message_id).status == StudyStatus.DELIVERED, message_id


def test_a_store_of_an_earlier_version_loses_its_doubled_deliveries_and_its_stuck_rounds(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/outcomes.db"
    store = Store(url)
    with store.engine.begin() as connection:  # as earlier versions left it: no unique index, two rows
        connection.execute(text(f"DROP INDEX {store_module.ONE_DELIVERY_PER_DESTINATION.name}"))
    store.save_outcome(study_result("m1", status=StudyStatus.ANALYSED), ["pacs", "archive"])
    store.save_outcome(study_result("m2", status=StudyStatus.ANALYSED), ["pacs"])
    store.update_delivery("m2", "pacs", status=DeliveryStatus.DELIVERED, attempts=1)
    with store.engine.begin() as connection:
        for message_id, destination, status, attempts in [
            ("m1", "pacs", "delivered", 1),  # the deliverer's row beside the worker's "pending"
            ("m1", "archive", "retrying", 2),
            ("m1", "archive", "failed", 5),
        ]:
            connection.execute(
                text(
                    "INSERT INTO deliveries (message_id, destination, status, attempts, updated_at) "
                    "VALUES (:message_id, :destination, :status, :attempts, '2026-01-01 00:00:00')"
                ),
                {"message_id": message_id, "destination": destination, "status": status, "attempts": attempts},
            )
    assert len(store.deliveries("m1")) == 5 and store.result("m1").status == StudyStatus.ANALYSED

    upgraded = Store(url)
    assert sorted((d.destination, d.status, d.attempts) for d in upgraded.deliveries("m1")) == [
        ("archive", DeliveryStatus.FAILED, 5),
        ("pacs", DeliveryStatus.DELIVERED, 1),
    ]
    assert [(d.destination, d.status) for d in upgraded.deliveries("m2")] == [("pacs", DeliveryStatus.DELIVERED)]
    assert (upgraded.result("m1").status, upgraded.result("m2").status) == (StudyStatus.FAILED, StudyStatus.DELIVERED)
    with pytest.raises(IntegrityError), upgraded.engine.begin() as connection:  # the index is back
        connection.execute(
            text(
                "INSERT INTO deliveries (message_id, destination, status, attempts, updated_at) "
                "VALUES ('m2', 'pacs', 'pending', 0, '2026-01-01 00:00:00')"
            )
        )


def test_a_sqlite_store_journals_ahead_and_a_reader_is_not_held_up_by_an_open_write(tmp_path) -> None:
    """WAL mode (kept in the file): a commit is one fsync of the log, and the worklist reads while a worker
    writes — in the rollback-journal mode of before, the open write below made the read fail."""
    path = tmp_path / "store.db"
    writer = Store(f"sqlite:///{path}")
    writer.save_result(study_result("before"))
    with sqlite3.connect(path) as database:
        assert database.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    holding = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        holding.execute("BEGIN EXCLUSIVE")  # a writer in the middle of its transaction
        holding.execute("DELETE FROM study_results")
        reader = Store(f"sqlite:///{path}")
        assert [result.message_id for result in reader.results()] == ["before"]  # the last committed state
    finally:
        holding.execute("ROLLBACK")
        holding.close()


def test_stores_opened_together_on_a_fresh_sqlite_file_take_turns_creating_the_tables(tmp_path, caplog) -> None:
    """Node, worker, deliverer and web start together: each creates the missing tables. pysqlite commits
    each CREATE TABLE alone, so they collided table after table (a worker exited after three collisions);
    on a SQLite file they now take turns, and none collides."""
    for trial in range(10):
        url = f"sqlite:///{tmp_path}/fresh-{trial}.db"
        together = threading.Barrier(4, timeout=30)

        def open_store(url: str = url, together: threading.Barrier = together) -> Store:
            together.wait()
            return Store(url)

        with ThreadPoolExecutor(4) as pool:
            stores = [done.result(timeout=60) for done in [pool.submit(open_store) for _ in range(4)]]
        assert all(store.results() == [] for store in stores)
    assert "collided" not in caplog.text
