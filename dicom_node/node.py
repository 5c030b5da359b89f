"""Node runtime: Settings → the storage SCP (in ``node.receivers`` processes) plus the dispatch loop, running
until SIGTERM or SIGINT.

SIGHUP re-reads the configuration and applies ``spool.min_free_bytes`` (the free-space watermark)
without dropping associations; other changes are logged as needing a restart.
"""

import logging
import select
import signal
import threading
import time
from collections.abc import Callable

from common import audit
from common.association_io import Wakeup
from common.logs import configure_logging, log_event
from common.spool import Spool
from config.settings import ConfigError, Settings
from dicom_node.completion import StudyCompletionTracker
from dicom_node.dispatcher import Dispatcher, dispatch_until_stopped
from dicom_node.enqueue import CeleryEnqueuer
from dicom_node.receivers import ReceiverPool, receiver_count, serve_instances

LOG = logging.getLogger("dicom_node")
SWEEP_INTERVAL_S = 3600.0  # retention and stale-partial clean-up; also once at start
RELOADABLE = ("spool.min_free_bytes",)


def run_node(settings: Settings, reload_settings: Callable[[], Settings] | None = None) -> None:
    """Run until SIGTERM/SIGINT. ``reload_settings`` (for SIGHUP) re-reads the same configuration sources."""
    configure_logging(settings.log_level)
    audit.configure(settings.audit.path)  # 'received' events (dicom_node.intake)
    spool = Spool(settings.spool.dir, settings.spool.min_free_bytes)
    partials = spool.prepare()

    wake = WakeEvent()  # ends the dispatch loop's wait: a new study, a signal
    tracker = StudyCompletionTracker(settings.spool.stable_seconds, on_new_study=wake.set)
    enqueuer = CeleryEnqueuer(settings.broker.url)
    dispatcher = Dispatcher(spool, tracker, enqueuer.send)
    dispatcher.resume()

    stop, reload_requested = _signal_events(wake)
    server = serve_instances(settings, spool, tracker)
    count = receiver_count(settings.node)
    receivers = ReceiverPool(
        settings,  # the others accept on this process's listening socket: they bind nothing themselves
        server.listener,
        count - 1,
        on_arrival=tracker.seen,
        on_exit=dispatcher.track_pending,
    )
    receivers.start()
    node = settings.node
    log_event(
        LOG,
        "node.listening",
        ae_title=node.ae_title,
        address=node.bind_address,
        port=server.server_address[1],
        tls=node.tls.enabled,
        spool=str(spool.root),
        partials_removed=partials,
        stable_seconds=settings.spool.stable_seconds,
        max_associations=node.max_associations,
        receivers=count,
    )

    housekeeping = _Housekeeping(settings, reload_settings, spool, reload_requested, receivers.set_min_free_bytes)
    try:
        dispatch_until_stopped(dispatcher, stop, wake, housekeeping=housekeeping)
    finally:
        receivers.stop()
        server.shutdown()
        enqueuer.close()
        log_event(LOG, "node.stopped", unqueued_rounds=dispatcher.backlog, pending_studies=len(tracker))


def _signal_events(wake: "WakeEvent") -> tuple[threading.Event, threading.Event]:
    """(stop: SIGTERM/SIGINT, reload: SIGHUP), installed before the port opens; each also sets ``wake``."""
    stop, reload_requested = threading.Event(), threading.Event()
    wake.receive_signals()

    def request(event: threading.Event) -> Callable[..., None]:
        def handler(*_: object) -> None:
            event.set()
            wake.set()

        return handler

    signal.signal(signal.SIGTERM, request(stop))
    signal.signal(signal.SIGINT, request(stop))
    signal.signal(signal.SIGHUP, request(reload_requested))
    return stop, reload_requested


class WakeEvent:
    """``threading.Event``'s set / clear / wait for the dispatch loop, on a socket pair that signals also write
    to (``signal.set_wakeup_fd``). The kernel may hand SIGTERM or SIGHUP to any of the node's threads, and a
    ``threading.Event.wait`` in the main thread ends only for a signal the main thread got — the node could
    then miss a stop until its next hourly sweep. Here the signal's byte ends the wait wherever it landed, and
    Python runs the handler in the main thread as soon as it does."""

    def __init__(self) -> None:
        self._pipe = Wakeup()
        self._flag = False

    def receive_signals(self) -> None:
        """Let every signal of this process end :meth:`wait` (main thread only, as signal handlers are)."""
        signal.set_wakeup_fd(self._pipe.write_fileno(), warn_on_full_buffer=False)

    def set(self) -> None:
        self._flag = True
        self._pipe.notify()

    def clear(self) -> None:
        self._flag = False
        self._pipe.drain()

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        if not self._flag:
            select.select([self._pipe], [], [], timeout)
        return self._flag


class _Housekeeping:
    """Run between dispatches: apply a requested reload (SIGHUP), sweep the spool at start and hourly."""

    def __init__(
        self,
        settings: Settings,
        reload_settings: Callable[[], Settings] | None,
        spool: Spool,
        reload_requested: threading.Event,
        watermark_changed: Callable[[int], None],
    ) -> None:
        self._settings = settings
        self._watermark_changed = watermark_changed
        self._reload_settings = reload_settings
        self._spool = spool
        self._reload_requested = reload_requested
        self._next_sweep = 0.0  # monotonic seconds

    def __call__(self) -> float:
        """Do what is due; return when the next sweep is (monotonic seconds)."""
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self._settings = _reload(self._settings, self._reload_settings, self._spool)
            self._watermark_changed(self._spool.min_free_bytes)
        if time.monotonic() >= self._next_sweep:
            _sweep(self._spool, self._settings)
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        return self._next_sweep


def _sweep(spool: Spool, settings: Settings) -> None:
    report = spool.sweep(time.time(), settings.spool.retention_days * 86400.0, settings.spool.stale_partial_s)
    log_event(LOG, "spool.swept", **vars(report))


def _reload(current: Settings, reload_settings: Callable[[], Settings] | None, spool: Spool) -> Settings:
    """Apply the reloadable settings from a fresh read; keep running on the old ones if it fails."""
    if reload_settings is None:
        log_event(LOG, "config.reload-unavailable", logging.WARNING)
        return current
    try:
        fresh = reload_settings()
    except ConfigError as error:
        log_event(LOG, "config.reload-failed", logging.ERROR, error=str(error))
        return current
    spool.min_free_bytes = fresh.spool.min_free_bytes
    changed = _changed_keys(current.model_dump(), fresh.model_dump())
    log_event(
        LOG,
        "config.reloaded",
        min_free_bytes=spool.min_free_bytes,
        needs_restart=[key for key in changed if key not in RELOADABLE],
    )
    return current.model_copy(
        update={"spool": current.spool.model_copy(update={"min_free_bytes": spool.min_free_bytes})}
    )


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            keys.extend(_changed_keys(before, after, f"{prefix}{key}."))
        elif before != after:
            keys.append(f"{prefix}{key}")
    return keys
