"""The DICOM node in tests: a raw pynetdicom sender, the queue reader, node processes and their settings."""

import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from common.ports import free_port
from tests.kit.data import REPO
from tests.kit.wait import wait_until

NODE_START_TIMEOUT_S = 45.0


def store_statuses(port: int, items: list[Dataset | Path], *, ae_title: str = "PYSCU", tls_args=None) -> list[int]:
    """Send ``items`` over one pynetdicom association; Paths are sent raw (their bytes after the file meta).

    Returns each response status (-1 when no response came).
    """
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for sop_class in sorted({_sop_class_of(item) for item in items}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGVISION", tls_args=tls_args)
    assert assoc.is_established, "association not established"
    statuses = []
    try:
        for item in items:
            with _raw_send(isinstance(item, Path)):
                response = assoc.send_c_store(item)
            statuses.append(int(response.Status) if "Status" in response else -1)
    finally:
        assoc.release()
    return statuses


def _sop_class_of(item: Dataset | Path) -> str:
    if isinstance(item, Dataset):
        return str(item.SOPClassUID)
    from pydicom.filereader import read_file_meta_info

    return str(read_file_meta_info(item).MediaStorageSOPClassUID)


@contextmanager
def _raw_send(enabled: bool) -> Iterator[None]:
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = enabled
    try:
        yield
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous


class QueueReader:
    """The Celery messages of queue "lungvision" as kombu stores them in Redis (a list of JSON envelopes)."""

    def __init__(self, client) -> None:
        self.client = client

    def tasks(self) -> list[tuple[str, str, dict]]:
        """(task id, task name, StudyReady dict) per queued message, oldest first."""
        found = []
        for raw in reversed(self.client.lrange("lungvision", 0, -1)):  # kombu LPUSHes, workers BRPOP
            envelope = json.loads(raw)
            args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            found.append((envelope["headers"]["id"], envelope["headers"]["task"], args[0]))
        return found

    def for_studies(self, study_uids: set[str]) -> list[dict]:
        return [message for _id, _name, message in self.tasks() if message["study_instance_uid"] in study_uids]

    def wait_for(self, study_uids: set[str], count: int, timeout_s: float) -> list[dict]:
        """Poll until ``count`` messages for ``study_uids`` are queued (or the deadline passes)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            messages = self.for_studies(study_uids)
            if len(messages) >= count:
                return messages
            time.sleep(0.2)
        return self.for_studies(study_uids)


class NodeProcess:
    """``python -m dicom_node`` as a real subprocess with its own config, spool and log file."""

    def __init__(self, folder: Path, settings: dict) -> None:
        self.folder = folder
        self.config_path = folder / "node.yaml"
        self.log_path = folder / "node.log"
        self.settings = settings
        self.spool = Path(settings["spool"]["dir"])
        self.port = settings["node"]["port"]
        self.process: subprocess.Popen | None = None
        self.write_config()

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.settings))

    def start(self) -> "NodeProcess":
        starts_before = len(self.events("node.listening"))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicom_node", "--config", str(self.config_path)],
                cwd=REPO,
                stdout=log,
                stderr=log,
            )
        self.wait_for_event("node.listening", count=starts_before + 1, timeout_s=NODE_START_TIMEOUT_S)
        return self

    def wait_for_event(self, name: str, *, count: int = 1, timeout_s: float = 20.0) -> list[dict]:
        def logged() -> list[dict]:
            found = self.events(name)
            if len(found) >= count:
                return found
            assert self.process is None or self.process.poll() is None, self._not_logged(name, count)
            return []

        return wait_until(logged, timeout_s, interval_s=0.1, message=lambda: self._not_logged(name, count))

    def _not_logged(self, name: str, count: int) -> str:
        return f"no {count}× {name!r} from the node; log tail:\n{self.log_tail()}"

    def events(self, name: str | None = None) -> list[dict]:
        if not self.log_path.exists():
            return []
        lines = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if name is None or record.get("event") == name:
                    lines.append(record)
        return lines

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:]) if self.log_path.exists() else ""

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the node's own process (not its receiving processes): only those accept meanwhile."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def receivers(self) -> int:
        """How many processes receive, as the node's latest start logged it."""
        return self.events("node.listening")[-1]["receivers"]

    def kill_hard(self) -> None:
        """kill -9: no clean-up runs."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def spooled(self, study_uid: str) -> list[Path]:
        """The study's instance files, wherever they are in the spool."""
        return sorted((self.spool / "studies" / study_uid).rglob("*.dcm"))


def node_settings(folder: Path, broker_url: str, **overrides: dict) -> dict:
    """Test defaults for a node in ``folder`` queueing to ``broker_url`` (a Redis of the test's own) + ``overrides``."""
    settings = {
        "log_level": "INFO",
        "node": {"port": free_port(), "bind_address": "127.0.0.1", "acse_timeout_s": 10, "dimse_timeout_s": 20},
        "spool": {"dir": str(folder / "spool"), "stable_seconds": 2, "min_free_bytes": 0},
        "broker": {"url": broker_url},
        "audit": {"path": str(folder.parent / f"{folder.name}.audit.jsonl")},  # beside, not in, the node's folder
    }
    for section, values in overrides.items():
        settings[section].update(values)
    return settings
