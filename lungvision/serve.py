"""Serve — the node, the worker and the worklist web server under one command, stopped together and cleanly.

``lungvision serve`` runs each as a child process with the same configuration. SIGTERM or Ctrl-C
stops the node first (no new associations; what it accepted is on disk), then the worker (Celery's
warm shutdown finishes the study in hand or returns it to the queue), then the web server (so the
worklist shows the last results until the end), then exits 0. If a child dies on its own, the
others are stopped and serve exits 1.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from config.settings import Settings, mask_secrets

FOLDER_DESTINATION = {"name": "local-folder", "kind": "folder", "path": "./var/out"}
CHILDREN = ("node", "worker", "web")  # started in this order, and stopped in it: node first


def banner(settings: Settings, folder_fallback: bool) -> str:
    """The start-up summary an operator needs: who we are, where things go, which model answers."""
    from inference.model_card import WEIGHTS_DIR, ModelCard

    card = ModelCard.load(settings.model.weights_dir or WEIGHTS_DIR)
    if folder_fallback:
        destinations = f"{FOLDER_DESTINATION['path']} (folder; no PACS configured)"
    else:
        destinations = ", ".join(
            f"{d.name} → {d.path} (folder)" if d.kind == "folder" else f"{d.name} → {d.ae_title}@{d.host}:{d.port}"
            for d in settings.destinations)
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
    """Run node, worker and web server until a stop signal; return the exit code."""
    folder_fallback = not settings.destinations
    environment = dict(os.environ)
    if folder_fallback:
        environment["LUNGVISION_DESTINATIONS"] = json.dumps([FOLDER_DESTINATION])
    Path("var").mkdir(exist_ok=True)
    print(banner(settings, folder_fallback), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    children = {
        name: subprocess.Popen([sys.executable, "-m", "lungvision", *config_args, name], env=environment,
                               start_new_session=True)  # our signals reach them only through us, in order
        for name in CHILDREN
    }
    failed = None
    while not stop.is_set() and failed is None:
        failed = next((name for name, child in children.items() if child.poll() is not None), None)
        stop.wait(0.5)
    if failed is not None:
        print(f"serve: the {failed} exited with status {children[failed].returncode}; stopping", file=sys.stderr)
    for name in CHILDREN:  # node first: stop accepting before the worker goes
        _stop_child(children[name], timeout_s=settings.worker.time_limit_s + 30 if name == "worker" else 60)
    return 1 if failed is not None else 0


def _stop_child(child: subprocess.Popen, timeout_s: float) -> None:
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if child.poll() is None:
        child.kill()
        child.wait()
