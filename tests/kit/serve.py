"""``lungvision serve`` and ``lungvision demo`` as real processes: a serve in a folder of its own, and
waiting for a line of a process's output."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from common.ports import free_port
from tests.kit.wait import wait_until


def output_lines(stream) -> "queue.Queue[str | None]":
    """The stream's lines, read by a thread, so that a test can wait for one with a timeout; None at its end."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def wait_for_line(lines: "queue.Queue[str | None]", text: str, timeout_s: float, seen: list[str] | None = None) -> str:
    """The first line with ``text``; AssertionError, with the lines seen, if none comes in ``timeout_s`` or the
    stream ends first. The lines read (up to and including that one) are appended to ``seen`` when given.
    """
    seen = [] if seen is None else seen
    try:
        while True:
            line = lines.get(timeout=timeout_s)
            if line is None:
                raise AssertionError(f"the output ended without a line with {text!r}; got: {''.join(seen)}")
            seen.append(line)
            if text in line:
                return line
    except queue.Empty:
        raise AssertionError(f"no line with {text!r} within {timeout_s} s; got: {''.join(seen)}") from None


def rest_of(lines: "queue.Queue[str | None]", timeout_s: float = 10) -> str:
    """The lines still to come, up to the stream's end (for a failure message, once the process has exited)."""
    rest = []
    try:
        while (line := lines.get(timeout=timeout_s)) is not None:
            rest.append(line)
    except queue.Empty:
        rest.append(f"(the output did not end within {timeout_s} s)")
    return "".join(rest)


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` now."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Serve:
    """``lungvision serve`` in a folder of its own (relative ./var paths land there)."""

    def __init__(self, folder: Path, **environment: str) -> None:
        self.folder, self.port, self.web_port = folder, free_port(), free_port()
        self.environment = environment
        self.process: subprocess.Popen | None = None

    def start(self) -> "Serve":
        environment = {
            **os.environ,
            "LUNGVISION_NODE__PORT": str(self.port),
            "LUNGVISION_NODE__BIND_ADDRESS": "127.0.0.1",
            "LUNGVISION_SPOOL__STABLE_SECONDS": "3",
            "LUNGVISION_SPOOL__MIN_FREE_BYTES": "0",
            "LUNGVISION_WEB__PORT": str(self.web_port),
            **self.environment,
        }
        log_path = self.folder / "serve.log"
        self.log_offset = log_path.stat().st_size if log_path.exists() else 0  # this run's lines start here
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lungvision", "serve"],
                cwd=self.folder,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._started, timeout_s=120, interval_s=0.3, message="serve started (node listening, worker ready)")
        return self

    def _started(self) -> bool:
        assert self.process.poll() is None, self.log()[-3000:]
        return '"event": "node.listening"' in self.log() and "ready." in self.log()

    def log(self) -> str:
        """What this run (since the last start) wrote to serve.log."""
        return (self.folder / "serve.log").read_bytes()[self.log_offset :].decode(errors="replace")

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=180)

    def results(self, study_uid: str) -> list[Path]:
        return sorted((self.folder / "var" / "out" / study_uid).glob("*.dcm"))
