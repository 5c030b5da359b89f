"""A real Lung Vision worker process (``python -m lungvision worker``) for integration tests."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def worker_sections(folder: Path, *, visibility_timeout_s: float, dead_letter_key: str, max_attempts: int) -> dict:
    """The worker-side settings of a test deployment in ``folder``: one worker process, fast retries."""
    return {
        "worker": {"concurrency": 1, "outbox_dir": str(folder / "outbox"), "visibility_timeout_s": visibility_timeout_s,
                   "soft_time_limit_s": 100, "time_limit_s": 120, "dead_letter_key": dead_letter_key},
        "delivery": {"max_attempts": max_attempts, "retry_base_delay_s": 2, "retry_max_delay_s": 8},
        "store": {"url": f"sqlite:///{folder}/outcomes.db"},
        "audit": {"path": str(folder / "audit.jsonl")},
    }


class WorkerProcess:
    """The Celery worker in its own process group, so a test can SIGKILL all of it at once."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path, self.log_path = config_path, log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> "WorkerProcess":
        ready_before = self.log().count("ready.")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lungvision", "--config", str(self.config_path), "worker"],
                cwd=REPO, stdout=log, stderr=log, start_new_session=True)
        self.wait_for_log("ready.", count=ready_before + 1, timeout_s=timeout_s)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, *, count: int = 1, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"worker log has not {count}× {text!r}; tail:\n{self.log()[-3000:]}")

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
