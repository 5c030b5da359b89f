"""Serve — the node, the worker, the deliverer and the worklist web server under one command, stopped
together and cleanly.

``lungvision serve`` runs each as a child process with the same configuration; the worker leaves
sending results to the deliverer (``delivery.by_deliverer``), so a study's objects go out while the
next study is analysed. SIGTERM or Ctrl-C stops the node first (no new associations; what it accepted
is on disk), then the worker (Celery's warm shutdown finishes the study in hand or returns it to the
queue), then the deliverer (deliveries in hand finish; queued ones wait in the broker), then the web
server (so the worklist shows the last results until the end), then exits 0. If a child dies on its
own, the others are stopped and serve exits 1.

The children die with serve even when serve itself is killed (SIGKILL, OOM killer): each runs
through :func:`run_child` (``python -m lungvision.serve PARENT_PID GRACE_S ARGS...``), which asks
Linux for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``) — the same clean stop as
above — and keeps a watchdog thread that notices the parent is gone and, if the child has not
finished stopping within GRACE_S, kills the child's whole process group (the worker's pool too).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import logfilter
from common.processes import request_parent_death_signal
from config.settings import Settings, mask_secrets
from worker.preload import worker_environment

FOLDER_DESTINATION = {"name": "local-folder", "kind": "folder", "path": "./var/out"}
CHILDREN = ("node", "worker", "deliverer", "web")  # started in this order, and stopped in it: node first


def banner(settings: Settings, folder_fallback: bool) -> str:
    """The start-up summary an operator needs: who we are, where things go, which model answers."""
    from inference.model_card import WEIGHTS_DIR, ModelCard

    card = ModelCard.load(settings.model.weights_dir or WEIGHTS_DIR)
    if folder_fallback:
        destinations = f"{FOLDER_DESTINATION['path']} (folder; no PACS configured)"
    else:
        destinations = ", ".join(
            f"{d.name} → {d.path} (folder)" if d.kind == "folder" else f"{d.name} → {d.ae_title}@{d.host}:{d.port}"
            for d in settings.destinations
        )
    lines = [
        "Lung Vision — chest X-ray pneumonia triage (NOT FOR DIAGNOSTIC USE)",
        f"  DICOM node    AE title {settings.node.ae_title}, port {settings.node.port} on {settings.node.bind_address}",
        f"  broker        {mask_secrets(settings.broker.url)}",
        f"  store         {mask_secrets(settings.store.url)}",
        f"  spool         {settings.spool.dir}",
        f"  destinations  {destinations}",
        f"  worklist      http://{settings.web.bind_address}:{settings.web.port}/ (metrics at /metrics)",
        f"  HL7 results   {', '.join(f'{e.name} → {e.host}:{e.port}' for e in settings.hl7.endpoints) or 'none'}",
        f"  audit trail   {settings.audit.path}",
        f"  model         {card.name} {card.version}, sha256 {card.weights_sha256}",
    ]
    return "\n".join(lines)


def serve(settings: Settings, config_args: list[str]) -> int:
    """Run node, worker, deliverer and web server until a stop signal; return the exit code."""
    logfilter.install()  # warnings of this parent process too (the children install it in their own set-up)
    folder_fallback = not settings.destinations
    environment = worker_environment(dict(os.environ))  # huge pages for the worker's image buffers
    environment["LUNGVISION_DELIVERY__BY_DELIVERER"] = "true"  # the deliverer child sends the results
    if folder_fallback:
        environment["LUNGVISION_DESTINATIONS"] = json.dumps([FOLDER_DESTINATION])
    Path("var").mkdir(exist_ok=True)
    print(banner(settings, folder_fallback), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop_timeout_s = {name: settings.worker.time_limit_s + 30 if name == "worker" else 60 for name in CHILDREN}
    children = {
        name: subprocess.Popen(
            [sys.executable, "-m", "lungvision.serve", str(os.getpid()), str(stop_timeout_s[name]), *config_args, name],
            env=environment,
            start_new_session=True,  # our signals reach them only through us, in order
        )
        for name in CHILDREN
    }
    failed = None
    while not stop.is_set() and failed is None:
        failed = next((name for name, child in children.items() if child.poll() is not None), None)
        stop.wait(0.5)
    if failed is not None:
        print(f"serve: the {failed} exited with status {children[failed].returncode}; stopping", file=sys.stderr)
    for name in CHILDREN:  # node first: stop accepting before the worker goes
        _stop_child(children[name], timeout_s=stop_timeout_s[name])
    return 1 if failed is not None else 0


def _stop_child(child: subprocess.Popen, timeout_s: float) -> None:
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)  # the child leads its own group: this takes the worker's pool too
        child.wait()


# --- in each child ---------------------------------------------------------------------------------

WATCHDOG_INTERVAL_S = 0.5


def run_child(argv: list[str]) -> None:
    """``python -m lungvision.serve PARENT_PID GRACE_S ARGS...``: tie this process to serve, run ``lungvision ARGS``."""
    parent_pid, grace_s, lungvision_args = int(argv[0]), float(argv[1]), argv[2:]
    signal_on_parent_death = _request_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:  # serve died before the request took effect: nothing to serve for
        print(f"serve child: serve (pid {parent_pid}) is already gone; not starting", file=sys.stderr)
        raise SystemExit(1)
    threading.Thread(
        target=_watch_parent, args=(parent_pid, grace_s, not signal_on_parent_death), name="serve-watchdog", daemon=True
    ).start()
    from lungvision.cli import app

    app(args=lungvision_args, prog_name="lungvision")


def _request_parent_death_signal(signal_number: int) -> bool:
    """Ask Linux to send ``signal_number`` to this process when its parent dies; False where that is unavailable."""
    try:
        request_parent_death_signal(signal_number)
    except OSError as error:
        print(f"serve child: {error}; relying on the watchdog", file=sys.stderr)
        return False
    return True


def _watch_parent(parent_pid: int, grace_s: float, send_sigterm: bool) -> None:
    """Once serve is gone: stop this process cleanly (SIGTERM), and after ``grace_s`` kill its whole process group."""
    while os.getppid() == parent_pid:
        time.sleep(WATCHDOG_INTERVAL_S)
    print(f"serve child: serve (pid {parent_pid}) is gone; stopping", file=sys.stderr, flush=True)
    if send_sigterm:  # otherwise the kernel has already sent it (PR_SET_PDEATHSIG)
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    # Still running: the clean stop hangs. serve started us as a session (and group) leader, so the
    # group is us and what we started, e.g. the worker's pool processes.
    print(
        f"serve child: not stopped after {grace_s:.0f} s; killing process group {os.getpgrp()}",
        file=sys.stderr,
        flush=True,
    )
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    run_child(sys.argv[1:])
