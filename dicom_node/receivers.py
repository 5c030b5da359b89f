"""Receive stage: the storage SCP, run by the node process and by ``node.receivers - 1`` more processes.

pynetdicom runs every association as threads of one interpreter, so one process receives on one core at
most (``bench/node.py``: with 8 associations its CPU time equals the wall time). So the node binds the port
and serves it, and spawns more receiving processes that accept on the same listening socket; the kernel
hands each connection to whichever process accepts first. Each process stores instances itself (the spool
is safe across processes) and, before it answers success, reports the arrival to the node's completion
tracker over a pipe: an :class:`Arrival` record, never pixel data.

Faults: the node restarts a receiving process that dies and re-tracks every pending study, so an instance
stored but not reported is still sealed. A receiving process dies with the node (``PR_SET_PDEATHSIG``):
a node killed with SIGKILL leaves nothing holding its port, and what was acknowledged is on disk for the
restart to find.
"""

import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from pydicom import config as pydicom_config
from pynetdicom import _config as pynetdicom_config

from common import audit
from common.logs import configure_logging, log_event
from common.processes import request_parent_death_signal
from common.spool import Spool
from config.settings import NodeSettings, Settings
from dicom_node.application_entity import ANALYSED_SOP_CLASSES, Admission, build_ae, server_ssl_context
from dicom_node.handlers import AssociationJournal, bindings
from dicom_node.intake import Arrivals, Intake
from dicom_node.transport import SharedListenerServer, start_server

LOG = logging.getLogger("dicom_node.receivers")
AUTO_RECEIVERS_MAX = 4  # with node.receivers 0: one receiving process per CPU, at most this many
FOLLOW_POLL_S = 0.5  # how often a waiting loop looks at its stop flag
START_TIMEOUT_S = 60.0  # a receiving process not accepting by then is logged (and restarted if it died)
STOP_TIMEOUT_S = 10.0  # a receiving process that has not stopped by then is killed
RESTART_FIRST_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 30.0
QUICK_EXIT_S = 10.0  # a process that dies sooner than this after its start waits twice as long to restart


@dataclass(frozen=True)
class Arrival:
    """Receiving process → node: an instance of ``study_uid`` was stored at ``at``."""

    study_uid: str
    at: float  # time.monotonic(): one clock for all processes of the machine


@dataclass(frozen=True)
class Ready:
    """Receiving process → node: it accepts associations now."""

    pid: int


@dataclass(frozen=True)
class FreeSpaceWatermark:
    """Node → receiving process: the reloaded ``spool.min_free_bytes``."""

    min_free_bytes: int


@dataclass(frozen=True)
class Stop:
    """Node → receiving process: close the port and exit."""


def receiver_count(node: NodeSettings) -> int:
    """How many processes receive (the node's own included): ``node.receivers``; 0 means one per usable CPU, at
    most ``AUTO_RECEIVERS_MAX`` (each costs ≈ 50 MiB, and a big server's cores are better left to the worker)."""
    return node.receivers or min(AUTO_RECEIVERS_MAX, len(os.sched_getaffinity(0)))


def serve_instances(
    settings: Settings,
    spool: Spool,
    arrivals: Arrivals,
    *,
    listener: socket.socket | None = None,
    receiver: int = 0,
) -> SharedListenerServer:
    """Start the storage SCP of this process: instances through the intake into ``spool``, arrivals reported."""
    # Large payloads are streamed to disk by pynetdicom rather than held in memory, and into the
    # spool's own file system, so that spooling them is a rename, not a copy.
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    # Nothing this process does relies on pydicom's checks of values as they are read: the node checks what it
    # uses itself (common/uids.checked_uid, dicom_node/header.py) and keeps invalid DICOM it can still spool.
    # Those checks ran a regular expression on every UID of every association request, up to three times
    # (pynetdicom makes a UID of each one, then again to validate it): ≈ 8 ms of CPU for the 128 contexts
    # dcmtk's storescu proposes (issue 12) — per association, which is per study for most modalities.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    tempfile.tempdir = str(spool.receiving_dir)
    node = settings.node
    intake = Intake(spool, arrivals, ANALYSED_SOP_CLASSES)
    return start_server(
        build_ae(node),
        (node.bind_address, node.port),
        ssl_context=server_ssl_context(node.tls),
        evt_handlers=list(bindings(intake, Admission(node), AssociationJournal(receiver))),
        listener=listener,
    )


# --- in a receiving process ---------------------------------------------------------------------


def receive(settings: Settings, number: int, listener: socket.socket, pipe: Connection, node_pid: int) -> None:
    """A receiving process: serve ``listener`` until the node says stop, goes away, or SIGTERM comes."""
    _die_with(node_pid)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the node decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the node re-reads the configuration and passes it on
    configure_logging(settings.log_level)
    audit.configure(settings.audit.path)  # 'received' events (dicom_node.intake)
    spool = Spool(settings.spool.dir, settings.spool.min_free_bytes)
    server = serve_instances(settings, spool, _PipeArrivals(pipe, stop), listener=listener, receiver=number)
    log_event(LOG, "receiver.started", receiver=number, pid=os.getpid())
    pipe.send(Ready(os.getpid()))
    try:
        _follow_node(pipe, spool, stop)
    finally:
        server.shutdown()
        log_event(LOG, "receiver.stopped", receiver=number)


def _die_with(node_pid: int) -> None:
    """Have the kernel SIGKILL this process when the node's process ends, however it ends."""
    request_parent_death_signal(signal.SIGKILL)
    if os.getppid() != node_pid:  # the node died before the request took effect
        raise SystemExit("the node is gone")


def _follow_node(pipe: Connection, spool: Spool, stop: threading.Event) -> None:
    while not stop.is_set():
        if not pipe.poll(FOLLOW_POLL_S):
            continue
        try:
            message = pipe.recv()
        except EOFError:  # the node closed its end: it is stopping or gone
            return
        if isinstance(message, Stop):
            return
        if isinstance(message, FreeSpaceWatermark):
            spool.min_free_bytes = message.min_free_bytes
            log_event(LOG, "receiver.reloaded", min_free_bytes=message.min_free_bytes)


class _PipeArrivals:
    """The receiving process's side of :class:`Arrivals`: one record per stored instance, to the node."""

    def __init__(self, pipe: Connection, stop: threading.Event) -> None:
        self._pipe = pipe
        self._stop = stop
        self._lock = threading.Lock()  # association threads send concurrently

    def seen(self, study_uid: str, at: float) -> None:
        try:
            with self._lock:
                self._pipe.send(Arrival(study_uid, at))
        except OSError as error:  # the node is gone; the instance is on disk and pending at its next start
            log_event(LOG, "receiver.node-gone", logging.ERROR, study_uid=study_uid, error=str(error))
            self._stop.set()


# --- in the node process ------------------------------------------------------------------------


@dataclass
class _Receiver:
    number: int
    process: BaseProcess
    pipe: Connection
    started: float  # monotonic
    quick_exits: int = 0  # how many times in a row its predecessors died within QUICK_EXIT_S of starting
    pipe_ended: bool = False


class ReceiverPool:
    """The node's extra receiving processes: started, restarted when one dies, told of reloads, stopped.

    ``on_arrival(study_uid, at)`` gets every reported arrival; ``on_exit()`` runs after a process died (the
    node re-tracks pending studies then). Both run on the pool's own thread.
    """

    def __init__(
        self,
        settings: Settings,
        listener: socket.socket,
        count: int,
        *,
        on_arrival: Callable[[str, float], None],
        on_exit: Callable[[], object],
    ) -> None:
        self._settings = settings
        self._listener = listener
        self._count = count
        self._on_arrival = on_arrival
        self._on_exit = on_exit
        self._context = multiprocessing.get_context("spawn")  # the node has threads: never fork it
        self._receivers: dict[int, _Receiver] = {}
        self._restarts: dict[int, tuple[float, int]] = {}  # number → (monotonic time due, quick exits so far)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dicom-node-receivers", daemon=True)

    def start(self) -> None:
        """Start the processes and wait (up to ``START_TIMEOUT_S``) until each accepts associations."""
        for number in range(1, self._count + 1):
            self._start(number, quick_exits=0)
        for receiver in list(self._receivers.values()):
            self._await_ready(receiver)
        self._thread.start()

    def _await_ready(self, receiver: _Receiver) -> None:
        """Wait for the process's Ready; one that does not come up is left to the pool's thread (restart)."""
        if receiver.pipe.poll(START_TIMEOUT_S):
            try:
                if isinstance(receiver.pipe.recv(), Ready):
                    return
            except EOFError:
                receiver.pipe_ended = True
        log_event(LOG, "receiver.not-ready", logging.ERROR, receiver=receiver.number, timeout_s=START_TIMEOUT_S)

    def set_min_free_bytes(self, value: int) -> None:
        self._tell_all(FreeSpaceWatermark(value))

    def stop(self) -> None:
        """Ask every receiving process to stop, wait for them (killing any that hang), end the pool's thread."""
        self._stopping.set()
        self._tell_all(Stop())
        with self._lock:
            receivers = list(self._receivers.values())
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for receiver in receivers:
            receiver.process.join(max(0.0, deadline - time.monotonic()))
            if receiver.process.is_alive():
                log_event(LOG, "receiver.killed", logging.WARNING, receiver=receiver.number)
                receiver.process.kill()
                receiver.process.join()
        if self._thread.is_alive():
            self._thread.join()

    def _start(self, number: int, *, quick_exits: int) -> None:
        pipe, child_pipe = self._context.Pipe()
        process = self._context.Process(
            target=receive,
            args=(self._settings, number, self._listener, child_pipe, os.getpid()),
            name=f"dicom-node-receiver-{number}",
            daemon=True,
        )
        process.start()
        child_pipe.close()
        with self._lock:
            self._receivers[number] = _Receiver(number, process, pipe, time.monotonic(), quick_exits)

    def _tell_all(self, message: FreeSpaceWatermark | Stop) -> None:
        with self._lock:
            receivers = list(self._receivers.values())
        for receiver in receivers:
            try:
                receiver.pipe.send(message)
            except OSError as error:  # it died meanwhile; the pool's thread restarts it
                log_event(LOG, "receiver.unreachable", logging.WARNING, receiver=receiver.number, error=str(error))

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                receivers = list(self._receivers.values())
            by_handle: dict[object, _Receiver] = {}
            for receiver in receivers:
                by_handle[receiver.process.sentinel] = receiver
                if not receiver.pipe_ended:
                    by_handle[receiver.pipe] = receiver
            ready = wait(list(by_handle), timeout=FOLLOW_POLL_S)  # type: ignore[arg-type]  # pipes, sentinels
            for handle in ready:  # arrivals first: a process that died may have reported some just before
                if handle is by_handle[handle].pipe:
                    self._read(by_handle[handle])
            for handle in ready:
                if handle is by_handle[handle].process.sentinel and not self._stopping.is_set():
                    self._exited(by_handle[handle])
            self._restart_due()

    def _read(self, receiver: _Receiver) -> None:
        """Pass on a reported arrival (a restarted process's Ready needs nothing), or note the end of the pipe."""
        try:
            message = receiver.pipe.recv()
        except EOFError:
            receiver.pipe_ended = True
            return
        if isinstance(message, Arrival):
            self._on_arrival(message.study_uid, message.at)

    def _exited(self, receiver: _Receiver) -> None:
        while not receiver.pipe_ended and receiver.pipe.poll():  # what it reported before it died
            self._read(receiver)
        receiver.process.join()
        receiver.pipe.close()
        quick_exits = receiver.quick_exits + 1 if time.monotonic() - receiver.started < QUICK_EXIT_S else 0
        delay = min(RESTART_MAX_DELAY_S, RESTART_FIRST_DELAY_S * 2 ** max(0, quick_exits - 1))
        with self._lock:
            del self._receivers[receiver.number]
        self._restarts[receiver.number] = (time.monotonic() + delay, quick_exits)
        log_event(
            LOG,
            "receiver.exited",
            logging.ERROR,
            receiver=receiver.number,
            exit_code=receiver.process.exitcode,
            restart_in_s=delay,
        )
        self._on_exit()

    def _restart_due(self) -> None:
        now = time.monotonic()
        for number, (due, quick_exits) in list(self._restarts.items()):
            if due <= now and not self._stopping.is_set():
                del self._restarts[number]
                try:
                    self._start(number, quick_exits=quick_exits)
                except OSError as error:  # e.g. out of processes or memory: try again later
                    log_event(LOG, "receiver.start-failed", logging.ERROR, receiver=number, error=str(error))
                    self._restarts[number] = (now + RESTART_MAX_DELAY_S, quick_exits)
