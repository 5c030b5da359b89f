"""Reconciliation: the claim and sweeper decisions (fake clock), the claim and the sweeper on a real
SQLite store and spool (fake publisher), kombu's Redis restore options."""

import json
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event

from common import audit
from common.messages import ANALYSE_STUDY_TASK, DELIVER_TASK, BrokerUnavailable
from common.results import DeliveryStatus, ImageResult, StudyStatus
from common.spool import ArrivalRecord, Spool
from common.store import RoundState, Store
from config.settings import load_settings
from dicom_node.dispatcher import build_study_ready
from tests.kit.imports import loaded_after
from tests.kit.records import study_result
from worker.reconcile import (
    Action,
    Claim,
    Limits,
    Sweeper,
    claim_decision,
    claim_round,
    owner_alive,
    process_identity,
    sweep_decision,
)

LIMITS = Limits(requeue_after_s=60, time_limit_s=300, max_attempts=3, retry_max_delay_s=120)
ME, OTHER = "host/ns/1", "host/ns/2"
NOW = 1_000_000.0


def alive(_owner) -> bool:
    return True


def dead(_owner) -> bool:
    return False


# --- the decisions, with a fake clock --------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "is_alive", "expected"),
    [
        (RoundState(), alive, Claim.START),  # never seen: start
        (RoundState(status=StudyStatus.DELIVERED, attempts=1), alive, Claim.DONE),
        (RoundState(status=StudyStatus.FAILED, attempts=1), alive, Claim.DONE),  # replay resets it first
        (RoundState(status=StudyStatus.ANALYSING, attempts=1, owner=OTHER, started_at=NOW - 10), alive, Claim.RUNNING),
        (RoundState(status=StudyStatus.ANALYSING, attempts=1, owner=OTHER, started_at=NOW - 10), dead, Claim.START),
        (RoundState(status=StudyStatus.ANALYSING, attempts=1, owner=OTHER, started_at=NOW - 301), alive, Claim.START),
        (RoundState(status=StudyStatus.ANALYSING, attempts=1, owner=ME, started_at=NOW - 10), alive, Claim.START),
        (RoundState(status=StudyStatus.ANALYSING, attempts=3, owner=OTHER, started_at=NOW - 10), dead, Claim.GIVE_UP),
        (RoundState(status=StudyStatus.ANALYSING, attempts=3, owner=OTHER, started_at=NOW - 10), alive, Claim.RUNNING),
        (RoundState(status=StudyStatus.REQUEUED, attempts=0, requeued_at=NOW - 5), alive, Claim.START),
    ],
    ids=[
        "new",
        "delivered",
        "failed",
        "running-elsewhere",
        "owner-dead",
        "past-time-limit",
        "own-pid",
        "attempts-used-up",
        "last-attempt-running",
        "replayed",
    ],
)
def test_claim_decision(state, is_alive, expected) -> None:
    assert claim_decision(state, ME, NOW, LIMITS, is_alive) is expected


@pytest.mark.parametrize(
    ("queued_ago", "state", "is_alive", "expected"),
    [
        (10, RoundState(), alive, Action.WAIT),  # queued, not taken yet: a busy queue
        (61, RoundState(), alive, Action.REQUEUE),  # silent longer than requeue_after_s: lost by the broker
        (61, RoundState(requeues=1, requeued_at=NOW - 30), alive, Action.WAIT),  # sent again lately
        (500, RoundState(requeues=1, requeued_at=NOW - 61), alive, Action.REQUEUE),  # lost again
        (500, RoundState(status=StudyStatus.ANALYSED), alive, Action.SETTLED),
        (500, RoundState(status=StudyStatus.OUTSIDE_USE), alive, Action.SETTLED),
        (500, RoundState(status=StudyStatus.ANALYSING, owner=OTHER, started_at=NOW - 100), alive, Action.WAIT),
        (500, RoundState(status=StudyStatus.ANALYSING, owner=OTHER, started_at=NOW - 100), dead, Action.REQUEUE),
        (500, RoundState(status=StudyStatus.ANALYSING, owner=OTHER, started_at=NOW - 301), alive, Action.REQUEUE),
        (
            500,
            RoundState(status=StudyStatus.ANALYSING, owner=OTHER, started_at=NOW - 100, requeued_at=NOW - 30),
            dead,
            Action.WAIT,
        ),  # its copy was sent 30 s ago: give a worker time to take it
        (500, RoundState(status=StudyStatus.REQUEUED, requeued_at=NOW - 10), alive, Action.WAIT),  # just replayed
    ],
    ids=[
        "queued-recently",
        "queued-silent",
        "requeued-recently",
        "requeued-silent",
        "analysed",
        "outside-use",
        "analysing",
        "analyser-gone",
        "analysing-past-time-limit",
        "analyser-gone-already-requeued",
        "replayed",
    ],
)
def test_sweep_decision(queued_ago, state, is_alive, expected) -> None:
    assert sweep_decision(NOW - queued_ago, state, NOW, LIMITS, is_alive).action is expected


def test_owner_alive_tells_a_gone_process_of_this_host_only() -> None:
    assert owner_alive(process_identity())
    finished = subprocess.Popen(["true"])
    finished.wait()
    assert not owner_alive(process_identity(finished.pid))
    assert owner_alive(f"another-host/pid:[1]/{finished.pid}")  # cannot be checked: the time limit decides
    assert not owner_alive(None)


# --- the claim on a real store ---------------------------------------------------------------------


def test_of_two_processes_claiming_one_round_one_analyses_it(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path}/outcomes.db")
    assert claim_round(store, study_result("m1"), LIMITS, me=ME, is_alive=alive) is Claim.START
    assert claim_round(store, study_result("m1"), LIMITS, me=OTHER, is_alive=alive) is Claim.RUNNING
    assert store.result("m1").status == StudyStatus.ANALYSING
    state = store.round_state("m1")
    assert (state.attempts, state.owner) == (1, ME)

    # A claim decided on a state another process has changed since loses instead of claiming twice.
    stale = RoundState(attempts=0)
    assert not store.start_attempt(study_result("m1"), OTHER, datetime.now(UTC), stale)


def test_a_claim_that_loses_the_race_to_create_the_attempt_row_is_lost(tmp_path) -> None:
    """Two processes claim a round the store has no attempt row for: the second insert fails, and its
    claim is lost (not an error), so it reads the round again and sees it running."""
    store, other = Store(f"sqlite:///{tmp_path}/outcomes.db"), Store(f"sqlite:///{tmp_path}/outcomes.db")
    seen = store.round_state("m1")
    raced = []

    def the_other_process_first(connection, cursor, statement, *_) -> None:
        if statement.startswith("INSERT INTO round_attempts") and not raced:
            raced.append(other.start_attempt(study_result("m1"), OTHER, datetime.now(UTC), seen))

    event.listen(store.engine, "before_cursor_execute", the_other_process_first)
    assert not store.start_attempt(study_result("m1"), ME, datetime.now(UTC), seen)
    assert raced == [True]
    assert (store.round_state("m1").attempts, store.round_state("m1").owner) == (1, OTHER)
    assert claim_round(store, study_result("m1"), LIMITS, me=ME, is_alive=alive) is Claim.RUNNING


def test_a_round_whose_worker_keeps_dying_is_given_up(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path}/outcomes.db")
    for attempt in range(1, LIMITS.max_attempts + 1):
        assert claim_round(store, study_result("m1"), LIMITS, me=f"host/ns/{attempt}", is_alive=dead) is Claim.START
    assert claim_round(store, study_result("m1"), LIMITS, me="host/ns/9", is_alive=dead) is Claim.GIVE_UP


# --- the sweeper on a real spool and store ---------------------------------------------------------


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list, str, int]] = []
        self.broker_down = False

    def send(self, task_name: str, args: list, *, task_id: str, retries: int = 0) -> None:
        if self.broker_down:
            raise BrokerUnavailable("connection refused")
        self.sent.append((task_name, args, task_id, retries))

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def site(tmp_path):
    """A spool, a store, settings with requeue_after_s = 60, a fake publisher and clock, the audit trail."""
    settings = load_settings(
        spool={"dir": str(tmp_path / "spool")},
        store={"url": f"sqlite:///{tmp_path}/lv.db"},
        worker={"requeue_after_s": 60, "time_limit_s": 300, "outbox_dir": str(tmp_path / "out")},
        delivery={"retry_max_delay_s": 120},
        audit={"path": str(tmp_path / "audit.jsonl")},
    )
    audit.configure(settings.audit.path)
    spool = Spool(settings.spool.dir, min_free_bytes=0)
    spool.prepare()
    clock = Clock()

    class Site:
        pass

    site = Site()
    site.settings, site.spool, site.store, site.clock = settings, spool, Store(settings.store.url), clock
    site.publisher = FakePublisher()
    site.tmp = tmp_path
    site.sweeper = lambda is_alive=alive: Sweeper(
        settings, site.store, spool, site.publisher, clock=clock, is_alive=is_alive
    )
    yield site
    audit.configure(None)


def queued_round(site, study_uid: str = "1.2.3.4", queued_ago_s: float = 0.0):
    """A round as the node leaves it: one instance spooled and sealed, message.json, queued.json."""
    source = site.tmp / f"{study_uid}.incoming"
    source.write_bytes(b"DICOM bytes")
    record = ArrivalRecord(
        f"{study_uid}.1",
        "1.2.840.10008.5.1.4.1.1.1",
        f"{study_uid}.2",
        "1.2.840.10008.1.2.1",
        "MODALITY",
        site.clock.now,
    )
    site.spool.store(study_uid, record, source)
    sealed = site.spool.seal_round(study_uid)
    message = build_study_ready(sealed, site.spool.arrival_records(sealed), message_id=f"message-{study_uid}")
    site.spool.write_message(sealed, message.model_dump_json().encode())
    site.spool.mark_queued(sealed, json.dumps({"task_id": message.message_id, "queued_at": "…"}).encode())
    queued_at = site.clock.now - queued_ago_s
    os.utime(sealed.queued_path, (queued_at, queued_at))
    return message


def audit_events(site, event: str) -> list[dict]:
    return [e for e in map(json.loads, site.settings.audit.path.read_text().splitlines()) if e["event"] == event]


def test_a_round_lost_by_the_broker_is_sent_again_with_the_same_message(site) -> None:
    message = queued_round(site, queued_ago_s=10)
    sweeper = site.sweeper()
    assert sweeper.sweep().rounds_waiting == 1 and site.publisher.sent == []  # still within requeue_after_s

    site.clock.now += 51
    assert sweeper.sweep().rounds_requeued == 1
    [(task, args, task_id, _)] = site.publisher.sent
    assert (task, task_id) == (ANALYSE_STUDY_TASK, message.message_id)
    assert args == message.as_task_args()
    [event] = audit_events(site, "requeued")
    assert event["message_id"] == message.message_id and event["reason"] == "no outcome 61 s after it was queued"

    sweeper.sweep()  # sent again just now: not again
    assert len(site.publisher.sent) == 1
    site.clock.now += 61  # lost again
    sweeper.sweep()
    assert len(site.publisher.sent) == 2 and site.store.round_state(message.message_id).requeues == 2


def test_two_sweepers_send_a_round_once(site) -> None:
    queued_round(site, queued_ago_s=100)
    first, second = site.sweeper(), site.sweeper()
    first.sweep()
    second.sweep()
    assert len(site.publisher.sent) == 1


def test_a_round_with_an_outcome_is_settled_and_not_read_again(site) -> None:
    message = queued_round(site, queued_ago_s=1000)
    result = study_result(message.message_id, status=StudyStatus.NOT_ANALYSED)
    site.store.save_result(result)
    sweeper = site.sweeper()
    sweeper.sweep()
    assert site.publisher.sent == [] and len(sweeper._settled) == 1


def test_a_round_whose_analyser_is_gone_is_sent_again_at_once(site) -> None:
    message = queued_round(site, queued_ago_s=5)
    assert (
        claim_round(
            site.store,
            study_result(message.message_id),
            Limits.of(site.settings),
            me=OTHER,
            clock=site.clock,
            is_alive=alive,
        )
        is Claim.START
    )
    site.sweeper(is_alive=alive).sweep()
    assert site.publisher.sent == []  # its analyser runs
    site.sweeper(is_alive=dead).sweep()
    assert [task_id for _, _, task_id, _ in site.publisher.sent] == [message.message_id]
    assert audit_events(site, "requeued")[0]["reason"] == "the worker process analysing it is gone"


def test_a_replayed_round_whose_message_was_lost_is_sent_again(site) -> None:
    message = queued_round(site, queued_ago_s=1000)
    site.store.save_result(study_result(message.message_id, status=StudyStatus.FAILED))
    sweeper = site.sweeper()
    sweeper.sweep()
    assert site.publisher.sent == []  # failed is an outcome; but failed rounds stay watched: they may be replayed
    site.store.mark_replayed(message.message_id, datetime.fromtimestamp(site.clock.now, UTC))
    sweeper.sweep()
    assert site.publisher.sent == []  # the replay's own message may still be on its way
    site.clock.now += 61
    sweeper.sweep()
    assert [task_id for _, _, task_id, _ in site.publisher.sent] == [message.message_id]


def test_a_delivery_whose_task_ran_before_the_outcome_was_recorded_keeps_its_state(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path}/outcomes.db")
    store.update_delivery("m1", "pacs", status=DeliveryStatus.DELIVERED, attempts=1)  # the task was faster
    store.save_outcome(study_result("m1", status=StudyStatus.ANALYSED), ["pacs", "archive"])
    assert {(d.destination, d.status) for d in store.deliveries("m1")} == {
        ("pacs", DeliveryStatus.DELIVERED),
        ("archive", DeliveryStatus.PENDING),
    }
    assert store.result("m1").status == StudyStatus.ANALYSED
    store.save_outcome(study_result("m2", status=StudyStatus.ANALYSED), [])  # no destination
    store.update_delivery("m3", "pacs", status=DeliveryStatus.DELIVERED, attempts=1)
    store.save_outcome(study_result("m3", status=StudyStatus.ANALYSED), ["pacs"])
    assert (store.result("m2").status, store.result("m3").status) == (StudyStatus.ANALYSED, StudyStatus.DELIVERED)


def test_a_send_that_finds_the_broker_down_is_tried_again_later(site) -> None:
    queued_round(site, queued_ago_s=100)
    site.publisher.broker_down = True
    sweeper = site.sweeper()
    assert sweeper.sweep().rounds_requeued == 0
    assert not site.settings.audit.path.exists() or audit_events(site, "requeued") == []
    site.publisher.broker_down = False
    site.clock.now += 61
    assert sweeper.sweep().rounds_requeued == 1


def test_a_silent_delivery_is_sent_again_where_its_attempts_stopped(site) -> None:
    result = study_result("m1", status=StudyStatus.ANALYSED)
    result.images = [ImageResult(sc_uid="1.2.3.10", sr_uid="1.2.3.11"), ImageResult(sr_uid="1.2.3.12")]
    site.store.save_result(result)
    site.store.update_delivery("m1", "pacs", status=DeliveryStatus.RETRYING, attempts=2, error="timeout")
    site.store.update_delivery("m1", "archive", status=DeliveryStatus.PENDING, attempts=0)
    sweeper = site.sweeper()
    sweeper.sweep()
    assert site.publisher.sent == []

    site.clock.now += 61  # the pending one is silent; the retrying one may still wait for its back-off
    sweeper.sweep()
    [(task, [job], task_id, retries)] = site.publisher.sent
    outbox = Path(site.settings.worker.outbox_dir) / "1.2.3"
    assert (task, task_id, retries) == (DELIVER_TASK, "m1:archive", 0)
    assert job["files"] == [str(outbox / f"{uid}.dcm") for uid in ("1.2.3.10", "1.2.3.11", "1.2.3.12")]

    site.clock.now += 120  # now the retrying one is silent too (and the first is still silent since its re-send)
    sweeper.sweep()
    assert {(task_id, retries) for _, _, task_id, retries in site.publisher.sent[1:]} == {
        ("m1:pacs", 2),
        ("m1:archive", 0),
    }


# --- kombu's Redis restore -------------------------------------------------------------------------


def test_redis_is_told_to_return_a_dead_workers_task_within_visibility_timeout_plus_restore_interval(tmp_path) -> None:
    """kombu's defaults look for such tasks every 10 s but scan only every 10th time (measured: back after
    101 s with visibility_timeout 10 s; with these options: 10.7 s)."""
    from worker import celery_app

    trail = {"path": str(tmp_path / "audit.jsonl")}
    redis_broker = load_settings(
        broker={"url": "redis://127.0.0.1:1/0", "result_backend": "redis://127.0.0.1:1/0"},
        worker={"visibility_timeout_s": 30, "unacked_restore_interval_s": 2},
        audit=trail,
    )
    embedded = load_settings(
        broker={"url": f"sqla+sqlite:///{tmp_path}/b.sqlite", "result_backend": f"db+sqlite:///{tmp_path}/r.sqlite"},
        audit=trail,
    )
    try:
        options = celery_app.configure(redis_broker).conf.broker_transport_options
        assert options == {
            "visibility_timeout": 30,
            "unacked_restore_interval": 2,
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": celery_app.UNACKED_MUTEX_EXPIRE_S,
            "queue_order_strategy": "priority",
        }
        assert celery_app.configure(embedded).conf.broker_transport_options == {}  # create_engine() would get them
    finally:
        celery_app.configure(embedded)
        audit.configure(None)


def test_the_sweeper_process_loads_no_dicom_network_or_array_library() -> None:
    # It compares store records with spool folders and sends messages: pynetdicom, pydicom and numpy would be
    # ≈ 30 MiB of private memory in a process every worker runs (issue 12).
    assert loaded_after("import worker.reconcile", ("pynetdicom", "pydicom", "numpy", "torch"), timeout_s=120) == []
