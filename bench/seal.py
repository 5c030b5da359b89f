"""Benchmark — how late the node seals and queues a study after its quiet period, against a peer checkout.

Run: ``nice -n 19 .venv/bin/python bench/seal.py [--studies 20] [--baseline DIR]``. A node
(``lungvision node``, embedded SQLite broker, ``spool.stable_seconds`` 1) receives one-image studies,
one at a time at irregular intervals, over pynetdicom. For each study the delay is read from the
spool afterwards: ``queued_at`` in its round's ``queued.json`` (written once the broker took the
message) minus ``last_received_at`` in its ``message.json`` minus ``stable_seconds`` — the seal,
the message and the publish, plus any wait for the node to notice the quiet period. With
``--baseline DIR`` the checkout in DIR (e.g. the previous version) is measured in the same run and
the ratios printed. Nothing is asserted.
"""

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

# This script shares its folder with bench/worker.py: look for packages in the repo, not in bench/.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.deployment import wait_for_log_line
from common.ports import free_port
from tests.kit.dicom_fixtures import make_image
from tests.kit.node import store_statuses

REPO = Path(__file__).resolve().parents[1]
STABLE_S = 1.0
START_TIMEOUT_S = 300.0
QUEUE_TIMEOUT_S = 120.0


def node_settings(folder: Path) -> dict:
    return {
        "log_level": "INFO",
        "node": {"port": free_port(), "bind_address": "127.0.0.1"},
        "spool": {"dir": str(folder / "spool"), "stable_seconds": STABLE_S, "min_free_bytes": 0},
        "broker": {"url": f"sqla+sqlite:///{folder}/broker.sqlite"},
        "audit": {"path": str(folder / "audit.jsonl")},
    }


def start_node(folder: Path, repo: Path) -> tuple[subprocess.Popen, int]:
    settings = node_settings(folder)
    config = folder / "lungvision.yaml"
    config.write_text(yaml.safe_dump(settings))
    log_path = folder / "node.log"
    with open(log_path, "ab") as log:
        node = subprocess.Popen(
            [sys.executable, "-m", "lungvision", "--config", str(config), "node"], cwd=repo, stdout=log, stderr=log
        )
    wait_for_log_line(log_path, "node.listening", node, START_TIMEOUT_S)
    return node, settings["node"]["port"]


def delays_ms(spool: Path) -> list[float]:
    """Per queued round: queued_at − last_received_at − stable_seconds, in milliseconds."""
    delays = []
    for queued in spool.glob("studies/*/rounds/*/queued.json"):
        message = json.loads(queued.with_name("message.json").read_text())
        queued_at = datetime.fromisoformat(json.loads(queued.read_text())["queued_at"])
        last_received = datetime.fromisoformat(message["last_received_at"])
        delays.append(((queued_at - last_received).total_seconds() - STABLE_S) * 1000)
    return delays


def measure(repo: Path, folder: Path, studies: int, pauses: list[float]) -> list[float]:
    node, port = start_node(folder, repo)
    try:
        for index in range(studies):
            assert store_statuses(port, [make_image()]) == [0]
            time.sleep(pauses[index])
        deadline = time.monotonic() + QUEUE_TIMEOUT_S
        while len(delays := delays_ms(folder / "spool")) < studies:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(delays)} of {studies} studies were queued")
            time.sleep(0.2)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
    return delays


def summary(delays: list[float]) -> dict[str, float]:
    ordered = sorted(delays)
    return {
        "p50": statistics.median(ordered),
        "p95": ordered[max(0, round(0.95 * len(ordered)) - 1)],
        "max": ordered[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to measure as the peer")
    arguments = parser.parse_args()
    rng = random.Random(12)
    pauses = [rng.uniform(0.05, 0.6) for _ in range(arguments.studies)]  # the same irregular pattern for both
    results = {}
    with tempfile.TemporaryDirectory(prefix="lv-seal-") as temporary:
        for label, repo in (("baseline", arguments.baseline), ("current", REPO)):
            if repo is None:
                continue
            folder = Path(temporary) / label
            folder.mkdir()
            results[label] = summary(measure(repo.resolve(), folder, arguments.studies, pauses))
            print(
                f"{label:<9} {repo}: seal + queue after the quiet period, {arguments.studies} studies: "
                + ", ".join(f"{key} {value:.1f} ms" for key, value in results[label].items())
            )
    if "baseline" in results:
        print(
            "current / baseline: "
            + ", ".join(
                f"{key} {results['current'][key] / results['baseline'][key]:.2f}×" for key in results["current"]
            )
        )


if __name__ == "__main__":
    main()
