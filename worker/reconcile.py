"""Reconciliation — every study round the node queued ends in one visible outcome, whatever happened to
the broker or to the processes in between.

The node writes ``queued.json`` into a round's spool folder once the broker has taken the round's
message (dicom_node/dispatcher.py); the worker records each round's outcome in the store. In between a
message can be lost: the embedded SQLite broker keeps a message that a killed worker had taken
invisible for good, a Redis restarted without persistence forgets its queue, a worker dies in the
middle of an analysis. Two mechanisms close the gap, both built on the store's ``round_attempts``:

* **The claim** (:func:`claim_round`, called by the analysis task before it starts): a round with a
  final outcome is skipped; a round another live process is analysing right now is skipped; a round
  started ``worker.max_analysis_attempts`` times without finishing (its worker died each time) is
  given up as failed; otherwise this process records itself as the round's analyser and starts.
* **The sweeper** (:class:`Sweeper`, a process ``lungvision worker`` starts): every
  ``worker.reconcile_interval_s`` it compares the spool's queued rounds with the store and sends the
  message of every round that has gone silent (:func:`sweep_decision`) again — by task name, the same
  message, the same task id — and does the same for deliveries without news for too long.

Sending a round twice is harmless: the claim skips the second copy, and output UIDs are derived from
the sources, so a second analysis replaces its results in PACS instead of duplicating them.

Decisions compare wall-clock times written by different hosts (the node's ``queued.json``, the
workers' claims): keep the hosts' clocks in sync (NTP).
"""

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from common import audit, logfilter
from common.dead_letters import DeliveryJob
from common.failures import describe_failure
from common.messages import ANALYSE_STUDY_TASK, DELIVER_TASK, BrokerUnavailable, StudyReady
from common.outbox import result_files
from common.publisher import Publisher
from common.results import FINAL_STATUSES, StudyStatus
from common.spool import QueuedRound, Spool
from common.store import Delivery, RoundState, Store, StudyResult
from config.settings import DEFAULTS_FILE, ConfigError, Settings, load_settings

log = logging.getLogger("lungvision.reconcile")
CLAIM_TRIES = 3  # a claim lost to another process is re-read and decided again this often
STOP_TIMEOUT_S = 10.0


class Claim(StrEnum):
    """What the analysis task does with the round it received."""

    START = "start"  # analyse it: this process is now recorded as its analyser
    DONE = "done"  # skip it: it has a final outcome
    RUNNING = "running"  # skip it: another live process is analysing it right now
    GIVE_UP = "give_up"  # record it as failed: started max_analysis_attempts times, never finished


class Action(StrEnum):
    """What the sweeper does with a queued round."""

    SETTLED = "settled"  # it has a final outcome: not looked at again
    WAIT = "wait"  # not silent for long enough (yet)
    REQUEUE = "requeue"  # send its message again


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""  # why a round is sent again (audit trail and log)


@dataclass(frozen=True)
class Limits:
    """The settings the decisions use, in seconds."""

    requeue_after_s: float  # worker.requeue_after_s
    time_limit_s: float  # worker.time_limit_s: an analysis running longer has been killed
    max_attempts: int  # worker.max_analysis_attempts
    retry_max_delay_s: float  # delivery.retry_max_delay_s: the longest quiet wait of a retrying delivery

    @classmethod
    def of(cls, settings: Settings) -> "Limits":
        return cls(
            settings.worker.requeue_after_s,
            settings.worker.time_limit_s,
            settings.worker.max_analysis_attempts,
            settings.delivery.retry_max_delay_s,
        )


# --- who is analysing a round, and is it still there? ----------------------------------------------


def process_identity(pid: int | None = None) -> str:
    """ "host/pid-namespace/pid" of this process (or of ``pid`` on this host): recorded as a round's
    analyser, so that a process on the same host can later tell whether the analyser still exists."""
    return f"{socket.gethostname()}/{_pid_namespace()}/{os.getpid() if pid is None else pid}"


def _pid_namespace() -> str:
    """Containers on one host may share a host name but not their pids; "" where /proc does not say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: pids are then compared within the host name alone
        return ""


def owner_alive(owner: str | None) -> bool:
    """False only when ``owner`` is known to be gone: a process of this host (and pid namespace) that no
    longer runs. A process elsewhere cannot be checked and counts as alive; the time limit decides."""
    if owner is None:
        return False
    place, _, pid = owner.rpartition("/")
    if place != process_identity(0).rpartition("/")[0] or not pid.isdigit():
        return True
    return _runs(int(pid))


def _runs(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:  # no /proc entry: no such process
            return False
        return state != "Z"  # a zombie has exited; only its parent has not collected its status yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


# --- the decisions ---------------------------------------------------------------------------------


def claim_decision(
    state: RoundState, me: str, now: float, limits: Limits, is_alive: Callable[[str | None], bool] = owner_alive
) -> Claim:
    """What the analysis task does with a round in ``state`` (``me``: this process's identity)."""
    if state.status in FINAL_STATUSES:
        return Claim.DONE
    if (
        state.status == StudyStatus.ANALYSING
        and state.owner != me
        and is_alive(state.owner)
        and now - (state.started_at or 0.0) < limits.time_limit_s
    ):
        return Claim.RUNNING
    if state.attempts >= limits.max_attempts:
        return Claim.GIVE_UP
    return Claim.START


def sweep_decision(
    queued_at: float,
    state: RoundState,
    now: float,
    limits: Limits,
    is_alive: Callable[[str | None], bool] = owner_alive,
) -> Decision:
    """Whether the sweeper sends a round queued at ``queued_at`` (POSIX seconds) again.

    A round is silent when it has no final outcome and either nobody took it for
    ``requeue_after_s`` (since it was queued or last sent again), or it is "analysing" but its analyser
    is gone: a process of this host that no longer runs, or any process after the hard time limit.
    """
    if state.status in FINAL_STATUSES:
        return Decision(Action.SETTLED)
    if state.status == StudyStatus.ANALYSING:
        started = state.started_at if state.started_at is not None else queued_at
        if state.requeued_at is not None and state.requeued_at >= started:  # already sent again since it started
            silent_s = now - state.requeued_at
            if silent_s > limits.requeue_after_s:
                return Decision(Action.REQUEUE, f"no worker took it in the {silent_s:.0f} s since it was sent again")
            return Decision(Action.WAIT)
        if not is_alive(state.owner):
            return Decision(Action.REQUEUE, "the worker process analysing it is gone")
        if now - started > limits.time_limit_s:
            return Decision(
                Action.REQUEUE, f"analysing for longer than the hard time limit ({limits.time_limit_s:.0f} s)"
            )
        return Decision(Action.WAIT)
    last_sent = max(queued_at, state.requeued_at or 0.0)
    silent_s = now - last_sent
    if silent_s > limits.requeue_after_s:
        since = "sent again" if last_sent > queued_at else "queued"
        return Decision(Action.REQUEUE, f"no outcome {silent_s:.0f} s after it was {since}")
    return Decision(Action.WAIT)


def claim_round(
    store: Store,
    placeholder: StudyResult,
    limits: Limits,
    *,
    clock: Callable[[], float] = time.time,
    me: str | None = None,
    is_alive: Callable[[str | None], bool] = owner_alive,
) -> Claim:
    """Decide what the analysis task does with its round; to start it, claim it in the store, which shows
    ``placeholder`` ("analysing"). Of two processes claiming one round at once, one wins; the other
    reads the round again and then sees it running."""
    me = me or process_identity()
    for _ in range(CLAIM_TRIES):
        state = store.round_state(placeholder.message_id)
        now = clock()
        decision = claim_decision(state, me, now, limits, is_alive)
        if decision is not Claim.START:
            return decision
        if store.start_attempt(placeholder, me, _utc(now), state):
            return Claim.START
    return Claim.RUNNING  # other processes kept changing the round meanwhile: one of them has it


# --- the sweeper -----------------------------------------------------------------------------------


@dataclass
class SweepReport:
    rounds_requeued: int = 0
    rounds_waiting: int = 0  # queued rounds without a final outcome, not silent (yet)
    deliveries_requeued: int = 0


class Sweeper:
    """Compares the spool's queued rounds, and the store's pending deliveries, with the outcome store;
    :meth:`sweep` sends the silent ones again. Several sweepers (one per ``lungvision worker``) may
    run at once: the store's conditional updates let only one of them send a given round."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        spool: Spool,
        publisher: Publisher,
        *,
        clock: Callable[[], float] = time.time,
        is_alive: Callable[[str | None], bool] = owner_alive,
    ) -> None:
        self.settings, self.store, self.spool, self.publisher = settings, store, spool, publisher
        self.limits = Limits.of(settings)
        self.clock, self.is_alive = clock, is_alive
        self._settled: set[Path] = set()  # round folders with a final outcome: not read again
        self._unreadable: set[Path] = set()  # round folders whose queued.json could not be read (reported once)

    def sweep(self) -> SweepReport:
        report = SweepReport()
        self._sweep_rounds(report)
        self._sweep_deliveries(report)
        return report

    def _sweep_rounds(self, report: SweepReport) -> None:
        rounds: dict[str, QueuedRound] = {}
        for queued in self.spool.queued_rounds():
            path = queued.sealed.path
            if path in self._settled or path in self._unreadable:
                continue
            try:
                rounds[queued.message_id] = queued
            except ValueError as error:
                self._unreadable.add(path)
                log.error(
                    "round %s/%04d: queued.json unreadable (%s); it cannot be reconciled",
                    queued.sealed.study_uid,
                    queued.sealed.number,
                    type(error).__name__,
                )
        states = self.store.round_states(rounds)
        now = self.clock()
        for message_id, queued in rounds.items():
            decision = sweep_decision(queued.queued_at, states[message_id], now, self.limits, self.is_alive)
            if decision.action is Action.SETTLED:
                if states[message_id].status != StudyStatus.FAILED:  # a failed round may be replayed: keep looking
                    self._settled.add(queued.sealed.path)
            elif decision.action is Action.WAIT:
                report.rounds_waiting += 1
            else:
                try:
                    report.rounds_requeued += self._requeue_round(queued, states[message_id], decision.reason, now)
                except Exception as error:  # one round's problem must not stop the others' reconciliation
                    log.error("study round %s could not be sent again: %s", message_id, describe_failure(error))

    def _requeue_round(self, queued: QueuedRound, state: RoundState, reason: str, now: float) -> bool:
        message_id = queued.message_id
        if not self.store.mark_requeued(message_id, _utc(now), state):
            return False  # a worker started it meanwhile, or another sweeper is sending it
        message = StudyReady.model_validate_json(self.spool.read_message(queued.sealed) or b"")
        try:
            self.publisher.send(ANALYSE_STUDY_TASK, message.as_task_args(), task_id=message.message_id)
        except BrokerUnavailable as error:
            log.error(
                "study round %s not sent again, the broker is unavailable (%s); tried again in %.0f s",
                message_id,
                error,
                self.limits.requeue_after_s,
            )
            return False
        audit.record(
            "requeued",
            stage="analysis",
            message_id=message_id,
            study_uid=message.study_instance_uid,
            round=message.round,
            reason=reason,
            requeues=state.requeues + 1,
        )
        log.warning("study round %s sent again: %s", message_id, reason)
        return True

    def _sweep_deliveries(self, report: SweepReport) -> None:
        now = self.clock()
        pending_before = _utc(now - self.limits.requeue_after_s)
        retrying_before = _utc(now - self.limits.requeue_after_s - self.limits.retry_max_delay_s)
        for delivery, result in self.store.silent_deliveries(pending_before, retrying_before):
            try:
                report.deliveries_requeued += self._requeue_delivery(delivery, result, now)
            except Exception as error:  # one delivery's problem must not stop the others' reconciliation
                log.error(
                    "delivery of %s to %s could not be sent again: %s",
                    delivery.message_id,
                    delivery.destination,
                    describe_failure(error),
                )

    def _requeue_delivery(self, delivery: Delivery, result: StudyResult, now: float) -> bool:
        if not self.store.mark_delivery_requeued(delivery, _utc(now)):
            return False  # it made progress meanwhile, or another sweeper is sending it
        files = [str(path) for path in result_files(self.settings.worker.outbox_dir, result)]
        job = DeliveryJob(delivery.message_id, result.study_instance_uid, delivery.destination, files)
        try:  # the same task id as the first time; the attempt count goes on where it stopped
            self.publisher.send(
                DELIVER_TASK,
                [asdict(job)],
                task_id=f"{delivery.message_id}:{delivery.destination}",
                retries=delivery.attempts,
            )
        except BrokerUnavailable as error:
            log.error(
                "delivery of %s to %s not sent again, the broker is unavailable (%s); tried again in %.0f s",
                delivery.message_id,
                delivery.destination,
                error,
                self.limits.requeue_after_s,
            )
            return False
        reason = f"{delivery.status} without news for more than {(now - _posix(delivery.updated_at)):.0f} s"
        audit.record(
            "requeued",
            stage="delivery",
            message_id=delivery.message_id,
            study_uid=result.study_instance_uid,
            destination=delivery.destination,
            attempts=delivery.attempts,
            reason=reason,
        )
        log.warning("delivery of %s to %s sent again: %s", delivery.message_id, delivery.destination, reason)
        return True


def _utc(posix_seconds: float) -> datetime:
    return datetime.fromtimestamp(posix_seconds, UTC)


def _posix(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


# --- the sweeper process ---------------------------------------------------------------------------


def run(settings: Settings, stop: threading.Event, parent_pid: int | None = None) -> None:
    """Sweep every ``worker.reconcile_interval_s`` until ``stop`` is set or the parent process is gone."""

    def parent_gone() -> bool:
        return parent_pid is not None and os.getppid() != parent_pid

    store = Store(settings.store.url)
    publisher = Publisher(settings.broker.url)
    sweeper = Sweeper(settings, store, Spool(settings.spool.dir, min_free_bytes=0), publisher)
    interval = settings.worker.reconcile_interval_s
    log.info(
        "sweeper started: every %.0f s, a round without outcome for %.0f s is sent again",
        interval,
        settings.worker.requeue_after_s,
    )
    try:
        while not stop.is_set() and not parent_gone():
            try:
                report = sweeper.sweep()
                if report.rounds_requeued or report.deliveries_requeued:
                    log.info(
                        "sweep: %d round(s) and %d delivery(ies) sent again, %d round(s) in progress",
                        report.rounds_requeued,
                        report.deliveries_requeued,
                        report.rounds_waiting,
                    )
            except Exception as error:  # the store or the spool unavailable: say so, try again next time
                log.error("sweep failed, tried again in %.0f s: %s", interval, describe_failure(error))
            deadline = time.monotonic() + interval
            while not stop.is_set() and not parent_gone() and time.monotonic() < deadline:
                stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        publisher.close()
        store.engine.dispose()
    log.info("sweeper stopped")


def start_sweeper() -> subprocess.Popen:
    """Start the sweeper as a child process with this process's configuration file (``load_settings``
    records it in ``Settings.config_files``; the environment is inherited). It stops when told to
    (:func:`stop_sweeper`) or, within a second, when this process is gone."""
    config = [arg for path in Settings.config_files if Path(path) != DEFAULTS_FILE for arg in ("--config", str(path))]
    return subprocess.Popen([sys.executable, "-m", "worker.reconcile", *config, "--parent-pid", str(os.getpid())])


def stop_sweeper(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("sweeper (pid %d) did not stop within %.0f s of SIGTERM; killed", process.pid, STOP_TIMEOUT_S)
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.reconcile",
        description="Run the Lung Vision sweeper alone ('lungvision worker' starts one).",
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML file overriding the defaults")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process is no longer the parent")
    arguments = parser.parse_args(argv)
    try:
        settings = load_settings(arguments.config)
    except ConfigError as error:
        parser.error(str(error))
    logging.basicConfig(
        level=settings.log_level, stream=sys.stderr, format="[%(asctime)s: %(levelname)s/sweeper] %(name)s: %(message)s"
    )
    logfilter.install()  # library messages may quote DICOM values: scrubbed like every process's logs
    audit.configure(settings.audit.path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run(settings, stop, arguments.parent_pid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
