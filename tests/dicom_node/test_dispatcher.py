"""Dispatcher: one message per quiet study round, retries, and restart without loss or duplicates — no network."""

import json
from pathlib import Path

import pytest

from dicom_node.completion import StudyCompletionTracker
from dicom_node.dispatcher import Dispatcher
from dicom_node.enqueue import BrokerUnavailable
from dicom_node.messages import StudyReady
from dicom_node.spool import ArrivalRecord, Spool
from node_testkit import make_image, save

STABLE_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Broker:
    """Collects sent messages; fails the next ``failures`` sends."""

    def __init__(self, failures: int = 0) -> None:
        self.sent: list[StudyReady] = []
        self.failures = failures

    def send(self, message: StudyReady) -> str:
        if self.failures:
            self.failures -= 1
            raise BrokerUnavailable("connection refused")
        self.sent.append(message)
        return message.message_id


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    spool.prepare()
    return spool


def arrive(spool: Spool, tracker: StudyCompletionTracker | None, clock: Clock, study: str, sop: str) -> None:
    source = spool.receiving_dir / sop
    source.write_bytes(b"instance")
    record = ArrivalRecord(sop, "1.2.840.10008.5.1.4.1.1.1", f"{study}.1", "1.2.840.10008.1.2.1", "CR1", clock.now)
    assert spool.store(study, record, source)
    if tracker is not None:
        tracker.seen(study, clock.now)


def dispatcher_for(spool: Spool, broker: Broker, clock: Clock) -> tuple[Dispatcher, StudyCompletionTracker]:
    tracker = StudyCompletionTracker(STABLE_S)
    dispatcher = Dispatcher(spool, tracker, broker.send, monotonic_clock=clock, wall_clock=clock)
    dispatcher.resume()
    return dispatcher, tracker


def test_one_message_per_quiet_study_and_later_arrivals_make_a_new_round(spool: Spool) -> None:
    clock, broker = Clock(), Broker()
    dispatcher, tracker = dispatcher_for(spool, broker, clock)
    for sop in ("1.1.1", "1.1.2", "1.1.3"):
        arrive(spool, tracker, clock, "1.1", sop)
        clock.now += 1
    dispatcher.tick()
    assert broker.sent == []
    clock.now += STABLE_S
    dispatcher.tick()
    dispatcher.tick()
    [message] = broker.sent
    assert (message.study_instance_uid, message.round, message.calling_ae) == ("1.1", 1, "CR1")
    assert [item.sop_instance_uid for item in message.instances] == ["1.1.1", "1.1.2", "1.1.3"]
    assert all(Path(item.path).is_file() and Path(item.path).parent == Path(message.spool_dir) for item in message.instances)
    assert json.loads(Path(message.spool_dir, "queued.json").read_text())["task_id"] == message.message_id

    arrive(spool, tracker, clock, "1.1", "1.1.4")
    clock.now += STABLE_S
    dispatcher.tick()
    assert [(m.round, [i.sop_instance_uid for i in m.instances]) for m in broker.sent[1:]] == [(2, ["1.1.4"])]


def test_a_broker_outage_is_retried_with_the_same_message_id(spool: Spool) -> None:
    clock, broker = Clock(), Broker(failures=2)
    dispatcher, tracker = dispatcher_for(spool, broker, clock)
    arrive(spool, tracker, clock, "2.2", "2.2.1")
    clock.now += STABLE_S
    dispatcher.tick()
    assert broker.sent == [] and dispatcher.backlog == 1
    first_id = json.loads(next(spool.root.rglob("message.json")).read_text())["message_id"]
    for _ in range(10):
        clock.now += 5
        dispatcher.tick()
    assert [message.message_id for message in broker.sent] == [first_id]
    assert dispatcher.backlog == 0


def test_restart_dispatches_a_study_spooled_before_the_crash_once(spool: Spool) -> None:
    clock = Clock()
    arrive(spool, None, clock, "3.3", "3.3.1")  # spooled, then the node died before stable_seconds
    clock.now += 2
    broker = Broker()
    dispatcher, _ = dispatcher_for(spool, broker, clock)  # restart: the clock resumes from the arrival time
    dispatcher.tick()
    assert broker.sent == []
    clock.now += STABLE_S - 2
    dispatcher.tick()
    clock.now += 60
    dispatcher.tick()
    assert [message.study_instance_uid for message in broker.sent] == ["3.3"]
    restarted, _ = dispatcher_for(spool, broker, clock)
    restarted.tick()
    assert len(broker.sent) == 1


def test_restart_after_sealing_but_before_sending_sends_once(spool: Spool) -> None:
    clock = Clock()
    arrive(spool, None, clock, "4.4", "4.4.1")
    spool.seal_round("4.4")  # crash right after the rename
    broker = Broker()
    dispatcher, _ = dispatcher_for(spool, broker, clock)
    dispatcher.tick()
    dispatcher.tick()
    assert [(m.study_instance_uid, m.round) for m in broker.sent] == [("4.4", 1)]


def test_a_crash_between_send_and_mark_resends_with_the_same_task_id(spool: Spool) -> None:
    clock, broker = Clock(), Broker()
    dispatcher, tracker = dispatcher_for(spool, broker, clock)
    arrive(spool, tracker, clock, "5.5", "5.5.1")
    clock.now += STABLE_S
    dispatcher.tick()
    next(spool.root.rglob("queued.json")).unlink()  # as if the node died before recording "queued"
    restarted, _ = dispatcher_for(spool, broker, clock)
    restarted.tick()
    assert len(broker.sent) == 2
    assert broker.sent[0] == broker.sent[1]  # same message, same task id: the worker runs it once


def test_a_lost_arrival_record_is_rebuilt_from_the_instance(spool: Spool) -> None:
    clock, broker = Clock(), Broker()
    dataset = make_image(study_uid="6.6")
    source = save(dataset, spool.receiving_dir / "rx.dcm")
    sop_uid = str(dataset.SOPInstanceUID)
    record = ArrivalRecord(sop_uid, str(dataset.SOPClassUID), str(dataset.SeriesInstanceUID), "x", "CR1", clock.now)
    spool.store("6.6", record, source)
    next(spool.root.rglob(f"{sop_uid}.json")).unlink()
    spool.seal_round("6.6")
    dispatcher, _ = dispatcher_for(spool, broker, clock)
    dispatcher.tick()
    [instance] = broker.sent[0].instances
    assert (instance.sop_instance_uid, instance.calling_ae) == (sop_uid, None)
    assert instance.series_instance_uid == str(dataset.SeriesInstanceUID)
    assert instance.transfer_syntax_uid == "1.2.840.10008.1.2.1"


def test_the_message_is_small_and_json_only(spool: Spool) -> None:
    clock, broker = Clock(), Broker()
    dispatcher, tracker = dispatcher_for(spool, broker, clock)
    for index in range(50):
        arrive(spool, tracker, clock, "8.8", f"8.8.{index}")
    clock.now += STABLE_S
    dispatcher.tick()
    [args] = broker.sent[0].as_task_args()
    encoded = json.dumps(args)
    assert len(encoded) < 50 * 600
    assert StudyReady.model_validate_json(encoded) == broker.sent[0]
