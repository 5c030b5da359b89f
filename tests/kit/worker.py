"""The worker side of a test: a StudyReady message for files on disk, the settings of a test deployment
(embedded, or the worker's sections of one), and a real worker or deliverer process (``python -m lungvision
worker`` / ``deliverer``)."""

import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from common.messages import InstanceRef, StudyReady
from config.settings import Settings, load_settings
from tests.kit.data import REPO
from tests.kit.wait import wait_until


def make_message(paths, message_id: str | None = None) -> StudyReady:
    """The node's message for a study round made of ``paths`` (files of one study, in one folder)."""
    now = datetime.now(UTC)
    instances = []
    for path in paths:
        dataset = dcmread(path, stop_before_pixels=True)
        instances.append(
            InstanceRef(
                sop_class_uid=dataset.SOPClassUID,
                sop_instance_uid=dataset.SOPInstanceUID,
                series_instance_uid=dataset.SeriesInstanceUID,
                transfer_syntax_uid=dataset.file_meta.TransferSyntaxUID,
                path=str(path),
                calling_ae="STORESCU",
                received_at=now,
            )
        )
    study_uid = dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    return StudyReady(
        message_id=message_id or generate_uid(),
        study_instance_uid=study_uid,
        round=1,
        spool_dir=str(paths[0].parent),
        calling_ae="STORESCU",
        first_received_at=now,
        last_received_at=now,
        instances=instances,
    )


def embedded_settings(root: Path, **sections: object) -> Settings:
    """The settings of a deployment without servers in ``root``: SQLite store and broker, outbox and audit
    trail in the folder. ``sections`` add settings sections, or replace these ones whole."""
    embedded = {
        "store": {"url": f"sqlite:///{root / 'lv.db'}"},
        "broker": {
            "url": f"sqla+sqlite:///{root / 'broker.sqlite'}",
            "result_backend": f"db+sqlite:///{root / 'results.sqlite'}",
        },
        "worker": {"outbox_dir": str(root / "outbox")},
        "audit": {"path": str(root / "audit.jsonl")},
    }
    return load_settings(**{**embedded, **sections})


def worker_sections(folder: Path, *, visibility_timeout_s: float, dead_letter_key: str, max_attempts: int) -> dict:
    """The worker-side settings of a test deployment in ``folder``: one worker process, fast retries."""
    return {
        "worker": {
            "concurrency": 1,
            "outbox_dir": str(folder / "outbox"),
            "visibility_timeout_s": visibility_timeout_s,
            "soft_time_limit_s": 100,
            "time_limit_s": 120,
            "dead_letter_key": dead_letter_key,
        },
        "delivery": {"max_attempts": max_attempts, "retry_base_delay_s": 2, "retry_max_delay_s": 8},
        "store": {"url": f"sqlite:///{folder}/outcomes.db"},
        "audit": {"path": str(folder / "audit.jsonl")},
    }


class WorkerProcess:
    """The Celery worker (``command`` "worker", or "deliverer") in its own process group, so a test can
    SIGKILL all of it at once."""

    def __init__(self, config_path: Path, log_path: Path, command: str = "worker") -> None:
        self.config_path, self.log_path, self.command = config_path, log_path, command
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> "WorkerProcess":
        ready_before = self.log().count("ready.")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lungvision", "--config", str(self.config_path), self.command],
                cwd=REPO,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.wait_for_log("ready.", count=ready_before + 1, timeout_s=timeout_s)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, *, count: int = 1, timeout_s: float = 60.0) -> None:
        def logged() -> bool:
            if self.log().count(text) >= count:
                return True
            assert self.process is None or self.process.poll() is None, self._not_logged(text, count)
            return False

        wait_until(logged, timeout_s, message=lambda: self._not_logged(text, count))

    def _not_logged(self, text: str, count: int) -> str:
        return f"{self.command} log has not {count}× {text!r}; tail:\n{self.log()[-3000:]}"

    def kill_hard(self) -> None:
        """SIGKILL the whole worker (main process and pool children): nothing gets to clean up."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
