"""Dispatcher: one message per quiet study round, retries, restart without loss or duplicates, and the loop that
wakes at deadlines instead of scanning on a tick — no network."""

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from common.messages import BrokerUnavailable, StudyReady
from common.spool import ArrivalRecord, Spool
from dicom_node.completion import StudyCompletionTracker
from dicom_node.dispatcher import RETRY_FIRST_DELAY_S, Dispatcher, dispatch_until_stopped
from tests.kit.data import REPO
from tests.kit.dicom_fixtures import make_image, save

STABLE_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Broker:
    """Collects sent messages (and, given a clock, when each was sent); fails the next ``failures`` sends."""

    def __init__(self, failures: int = 0, clock: Clock | None = None) -> None:
        self.sent: list[StudyReady] = []
        self.sent_at: list[float] = []
        self.failures = failures
        self._clock = clock or time.monotonic

    def send(self, message: StudyReady) -> str:
        if self.failures:
            self.failures -= 1
            raise BrokerUnavailable("connection refused")
        self.sent.append(message)
        self.sent_at.append(self._clock())
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
    dispatcher.dispatch_due()
    assert broker.sent == []
    clock.now += STABLE_S
    dispatcher.dispatch_due()
    dispatcher.dispatch_due()
    [message] = broker.sent
    assert (message.study_instance_uid, message.round, message.calling_ae) == ("1.1", 1, "CR1")
    assert [item.sop_instance_uid for item in message.instances] == ["1.1.1", "1.1.2", "1.1.3"]
    assert all(
        Path(item.path).is_file() and Path(item.path).parent == Path(message.spool_dir) for item in message.instances
    )
    assert json.loads(Path(message.spool_dir, "queued.json").read_text())["task_id"] == message.message_id

    arrive(spool, tracker, clock, "1.1", "1.1.4")
    clock.now += STABLE_S
    dispatcher.dispatch_due()
    assert [(m.round, [i.sop_instance_uid for i in m.instances]) for m in broker.sent[1:]] == [(2, ["1.1.4"])]


def test_a_broker_outage_is_retried_with_the_same_message_id(spool: Spool) -> None:
    clock, broker = Clock(), Broker(failures=2)
    dispatcher, tracker = dispatcher_for(spool, broker, clock)
    arrive(spool, tracker, clock, "2.2", "2.2.1")
    clock.now += STABLE_S
    dispatcher.dispatch_due()
    assert broker.sent == [] and dispatcher.backlog == 1
    first_id = json.loads(next(spool.root.rglob("message.json")).read_text())["message_id"]
    for _ in range(10):
        clock.now += 5
        dispatcher.dispatch_due()
    assert [message.message_id for message in broker.sent] == [first_id]
    assert dispatcher.backlog == 0


def test_restart_dispatches_a_study_spooled_before_the_crash_once(spool: Spool) -> None:
    clock = Clock()
    arrive(spool, None, clock, "3.3", "3.3.1")  # spooled, then the node died before stable_seconds
    clock.now += 2
    broker = Broker()
    dispatcher, _ = dispatcher_for(spool, broker, clock)  # restart: the clock resumes from the arrival time
    dispatcher.dispatch_due()
    assert broker.sent == []
    clock.now += STABLE_S - 2
    dispatcher.dispatch_due()
    clock.now += 60
    dispatcher.dispatch_due()
    assert [message.study_instance_uid for message in broker.sent] == ["3.3"]
    restarted, _ = dispatcher_for(spool, broker, clock)
    restarted.dispatch_due()
    assert len(broker.sent) == 1


def test_restart_after_sealing_but_before_sending_sends_once(spool: Spool) -> None:
    clock = Clock()
    arrive(spool, None, clock, "4.4", "4.4.1")
    spool.seal_round("4.4")  # crash right after the rename
    broker = Broker()
    dispatcher, _ = dispatcher_for(spool, broker, clock)
    dispatcher.dispatch_due()
    dispatcher.dispatch_due()
    assert [(m.study_instance_uid, m.round) for m in broker.sent] == [("4.4", 1)]


def test_a_crash_between_send_and_mark_resends_with_the_same_task_id(spool: Spool) -> None:
    clock, broker = Clock(), Broker()
    dispatcher, tracker = dispatcher_for(spool, broker, clock)
    arrive(spool, tracker, clock, "5.5", "5.5.1")
    clock.now += STABLE_S
    dispatcher.dispatch_due()
    next(spool.root.rglob("queued.json")).unlink()  # as if the node died before recording "queued"
    restarted, _ = dispatcher_for(spool, broker, clock)
    restarted.dispatch_due()
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
    dispatcher.dispatch_due()
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
    dispatcher.dispatch_due()
    [args] = broker.sent[0].as_task_args()
    encoded = json.dumps(args)
    assert len(encoded) < 50 * 600
    assert StudyReady.model_validate_json(encoded) == broker.sent[0]


def test_dispatch_due_names_when_the_next_study_falls_quiet_or_the_next_retry_is_due(spool: Spool) -> None:
    clock, broker = Clock(), Broker(failures=1)
    dispatcher, tracker = dispatcher_for(spool, broker, clock)
    assert dispatcher.dispatch_due() == math.inf  # nothing waits: only a new study can change that
    arrive(spool, tracker, clock, "7.7", "7.7.1")
    clock.now += 1
    arrive(spool, tracker, clock, "7.7", "7.7.2")
    assert dispatcher.dispatch_due() == clock.now + STABLE_S
    clock.now += STABLE_S
    assert dispatcher.dispatch_due() == clock.now + RETRY_FIRST_DELAY_S  # the broker refused once
    clock.now += RETRY_FIRST_DELAY_S
    assert dispatcher.dispatch_due() == math.inf
    assert [len(message.instances) for message in broker.sent] == [2]


class SleepingWake:
    """Stands in for the loop's ``wake`` event with the fake clock: each ``wait`` is recorded, runs the next
    scripted happening (arrivals, a stop) and then lets the fake time pass — all of ``timeout`` unless
    the happening set the event, as a new study or a signal does."""

    def __init__(self, clock: Clock, happenings: list[Callable[[], None]]) -> None:
        self.clock, self.happenings = clock, happenings
        self.waits: list[float | None] = []
        self._set = False

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def wait(self, timeout: float | None) -> bool:
        self.waits.append(timeout)
        asleep_since = self.clock.now
        self.happenings.pop(0)()
        if not self._set:
            assert timeout is not None, "the loop would sleep for ever with something pending"
            self.clock.now = max(self.clock.now, asleep_since + timeout)
        return self._set


def test_a_study_is_sealed_when_its_quiet_period_ends_without_any_periodic_scan(spool: Spool) -> None:
    clock, stop = Clock(), threading.Event()
    broker = Broker(clock=clock)
    wake = SleepingWake(clock, [])
    tracker = StudyCompletionTracker(STABLE_S, on_new_study=wake.set)
    dispatcher = Dispatcher(spool, tracker, broker.send, monotonic_clock=clock, wall_clock=clock)
    dispatcher.resume()
    first_arrival = clock.now

    def second_instance_two_seconds_in() -> None:
        clock.now += 2
        arrive(spool, tracker, clock, "9.9", "9.9.2")

    def signal_stop() -> None:
        stop.set()
        wake.set()

    wake.happenings = [
        lambda: arrive(spool, tracker, clock, "9.9", "9.9.1"),  # idle → a new study wakes the loop
        second_instance_two_seconds_in,  # postpones the quiet period: the loop wakes at the old deadline...
        lambda: None,  # ...sleeps again until the new one...
        signal_stop,  # ...and, the study queued, sleeps until told otherwise
    ]
    dispatch_until_stopped(dispatcher, stop, wake, monotonic_clock=clock)  # type: ignore[arg-type]

    assert wake.waits == [None, STABLE_S, 2.0, None]  # slept from deadline to deadline, never in ticks
    assert broker.sent_at == [first_arrival + 2 + STABLE_S]  # queued the moment the study fell quiet, not before
    assert [i.sop_instance_uid for i in broker.sent[0].instances] == ["9.9.1", "9.9.2"]


def test_the_loop_on_real_threads_queues_after_the_quiet_period_and_stops_when_told(spool: Spool) -> None:
    stable_s, stop, wake, queued = 0.05, threading.Event(), threading.Event(), threading.Event()
    broker = Broker()

    def send_and_tell(message: StudyReady) -> str:
        task_id = broker.send(message)
        queued.set()
        return task_id

    tracker = StudyCompletionTracker(stable_s, on_new_study=wake.set)
    dispatcher = Dispatcher(spool, tracker, send_and_tell)
    dispatcher.resume()
    loop = threading.Thread(target=dispatch_until_stopped, args=(dispatcher, stop, wake), daemon=True)
    loop.start()
    arrive(spool, None, Clock(), "10.10", "10.10.1")
    arrived_at = time.monotonic()
    tracker.seen("10.10", arrived_at)  # as the intake does, from an association's thread
    assert queued.wait(timeout=30), "the quiet study was never queued"
    stop.set()
    wake.set()
    loop.join(timeout=30)
    assert not loop.is_alive()
    [sent_at] = broker.sent_at
    assert sent_at >= arrived_at + stable_s  # causality only: never before the quiet period


def test_track_pending_starts_the_clock_of_a_study_whose_arrival_was_never_reported(spool: Spool) -> None:
    """A receiving process died after storing but before reporting: the node re-tracks what is pending."""
    clock, broker = Clock(), Broker()
    dispatcher, tracker = dispatcher_for(spool, broker, clock)
    arrive(spool, None, clock, "1.7", "1.7.1")  # stored, never reported to the tracker
    clock.now += STABLE_S
    dispatcher.dispatch_due()
    assert broker.sent == []
    assert dispatcher.track_pending() == 1
    dispatcher.dispatch_due()  # it arrived STABLE_S ago (wall clock): quiet already
    assert [message.study_instance_uid for message in broker.sent] == ["1.7"]
    assert dispatcher.track_pending() == 0


WAIT_FOR_A_SIGNAL_ON_ANOTHER_THREAD = """
import signal, threading, time
from dicom_node.node import WakeEvent

wake = WakeEvent()
wake.receive_signals()
signal.signal(signal.SIGUSR1, lambda *_: wake.set())


def signal_this_thread():
    time.sleep(0.5)  # the main thread is waiting by then
    signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)


threading.Thread(target=signal_this_thread).start()
while not wake.is_set():
    wake.wait()  # no timeout: only the signal can end it
"""


def test_the_loops_wait_ends_for_a_signal_the_kernel_gave_another_thread() -> None:
    """With a threading.Event this script waits for ever (the main thread is never interrupted)."""
    finished = subprocess.run(
        [sys.executable, "-c", WAIT_FOR_A_SIGNAL_ON_ANOTHER_THREAD], cwd=REPO, timeout=20, capture_output=True
    )
    assert finished.returncode == 0, finished.stderr.decode()
