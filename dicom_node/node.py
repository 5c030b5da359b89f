"""Node runtime: Settings → the storage SCP plus the dispatch loop, running until SIGTERM or SIGINT.

SIGHUP re-reads the configuration and applies ``spool.min_free_bytes`` (the free-space watermark)
without dropping associations; other changes are logged as needing a restart.
"""

import logging
import signal
import tempfile
import threading
import time
from collections.abc import Callable

from pynetdicom import _config as pynetdicom_config

from config.settings import ConfigError, Settings
from lungvision import audit
from dicom_node.application_entity import ANALYSED_SOP_CLASSES, Admission, build_ae, server_ssl_context
from dicom_node.completion import StudyCompletionTracker
from dicom_node.dispatcher import Dispatcher
from dicom_node.enqueue import CeleryEnqueuer
from dicom_node.handlers import AssociationJournal, bindings
from dicom_node.intake import Intake
from dicom_node.logs import configure_logging, log_event
from dicom_node.spool import Spool

LOG = logging.getLogger("dicom_node")
TICK_S = 0.25  # how often the dispatch loop looks for quiet studies
SWEEP_INTERVAL_S = 3600.0  # retention and stale-partial clean-up; also once at start
RELOADABLE = ("spool.min_free_bytes",)


def run_node(settings: Settings, reload_settings: Callable[[], Settings] | None = None) -> None:
    """Run until SIGTERM/SIGINT. ``reload_settings`` (for SIGHUP) re-reads the same configuration sources."""
    configure_logging(settings.log_level)
    audit.configure(settings.audit.path)  # 'received' events (dicom_node.intake)
    spool = Spool(settings.spool.dir, settings.spool.min_free_bytes)
    partials = spool.prepare()
    # Large payloads are streamed to disk by pynetdicom rather than held in memory, and into the
    # spool's own file system, so that spooling them is a rename, not a copy.
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool.receiving_dir)

    tracker = StudyCompletionTracker(settings.spool.stable_seconds)
    enqueuer = CeleryEnqueuer(settings.broker.url)
    dispatcher = Dispatcher(spool, tracker, enqueuer.send)
    dispatcher.resume()

    stop, reload_requested = _signal_events()
    node = settings.node
    intake = Intake(spool, tracker, ANALYSED_SOP_CLASSES)
    journal = AssociationJournal()
    server = build_ae(node).start_server(
        (node.bind_address, node.port),
        block=False,
        ssl_context=server_ssl_context(node.tls),
        evt_handlers=list(bindings(intake, Admission(node), journal)),
    )
    log_event(
        LOG, "node.listening", ae_title=node.ae_title, address=node.bind_address, port=server.server_address[1],
        tls=node.tls.enabled, spool=str(spool.root), partials_removed=partials,
        stable_seconds=settings.spool.stable_seconds, max_associations=node.max_associations,
    )

    next_sweep = 0.0
    try:
        while not stop.is_set():
            dispatcher.tick()
            if reload_requested.is_set():
                reload_requested.clear()
                settings = _reload(settings, reload_settings, spool)
            if time.monotonic() >= next_sweep:
                _sweep(spool, settings)
                next_sweep = time.monotonic() + SWEEP_INTERVAL_S
            stop.wait(TICK_S)
    finally:
        server.shutdown()
        enqueuer.close()
        log_event(LOG, "node.stopped", unqueued_rounds=dispatcher.backlog, pending_studies=len(tracker))


def _signal_events() -> tuple[threading.Event, threading.Event]:
    """(stop: SIGTERM/SIGINT, reload: SIGHUP), installed before the port opens."""
    stop, reload_requested = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    return stop, reload_requested


def _sweep(spool: Spool, settings: Settings) -> None:
    report = spool.sweep(
        time.time(), settings.spool.retention_days * 86400.0, settings.spool.stale_partial_s
    )
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
        LOG, "config.reloaded", min_free_bytes=spool.min_free_bytes,
        needs_restart=[key for key in changed if key not in RELOADABLE],
    )
    return current.model_copy(update={"spool": current.spool.model_copy(update={"min_free_bytes": spool.min_free_bytes})})


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            keys.extend(_changed_keys(before, after, f"{prefix}{key}."))
        elif before != after:
            keys.append(f"{prefix}{key}")
    return keys
