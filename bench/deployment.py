"""A deployment for the benches: ``lungvision node``, ``lungvision worker`` and (as ``lungvision serve`` and
docker compose run them; not in checkouts from before it existed) ``lungvision deliverer`` of one checkout
as real processes on one configuration, each in its own process group, with the environment ``lungvision
serve`` and the Docker image give them. Used by bench/memory.py and bench/end_to_end.py (and its log wait by
bench/node.py and bench/seal.py)."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from worker.preload import worker_environment

START_TIMEOUT_S = 900.0  # generous: on a busy machine (nice 19) torch alone takes a minute to import


def wait_for_log_line(log_path: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Poll ``log_path`` until it holds ``text`` (e.g. the node's ``node.listening``, logged once all its
    receiving processes accept); RuntimeError with the log's tail if ``process`` exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while text not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {text!r} in {log_path}:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(child) for child in (task / "children").read_text().split())
    return sorted(found)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and all its descendants, living or exited: its own and
    its reaped children's times (/proc/PID/stat), plus those of its living children's trees."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own_and_reaped = sum(int(value) for value in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime
    living = 0.0
    for child in children_of(pid):
        with contextlib.suppress(FileNotFoundError):  # it exited meanwhile: its parent's reaped times hold it
            living += cpu_seconds(child)
    return own_and_reaped + living


def worker_processes(parent_pid: int) -> list[tuple[str, int]]:
    """(role, pid) of the worker's parent, its sweeper and each pool process."""
    processes = [("worker parent", parent_pid)]
    pool = 0
    for child in children_of(parent_pid):
        command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"worker.reconcile" in command:
            processes.append(("worker sweeper", child))
        else:
            pool += 1
            processes.append((f"worker child {pool}", child))
    return processes


def node_processes(node_pid: int) -> list[tuple[str, int]]:
    """(role, pid) of the node and the processes it started: receiving processes, multiprocessing's tracker."""
    processes = [("node", node_pid)]
    receivers = 0
    for child in children_of(node_pid):
        if b"resource_tracker" in Path(f"/proc/{child}/cmdline").read_bytes():
            processes.append(("node mp tracker", child))
        else:
            receivers += 1
            processes.append((f"node receiver {receivers}", child))
    return processes


class Deployment:
    """Node, worker and, with ``deliverer``, a deliverer from the checkout ``repo`` on ``settings`` (written to
    ``folder``/lungvision.yaml; with a deliverer, the worker leaves the results to it)."""

    def __init__(self, folder: Path, settings: dict, repo: Path, *, deliverer: bool) -> None:
        if deliverer:
            settings = {**settings, "delivery": {**settings.get("delivery", {}), "by_deliverer": True}}
        self.folder, self.settings, self.repo = folder, settings, repo
        self.concurrency = settings["worker"]["concurrency"]
        self.config = folder / "lungvision.yaml"
        self.config.write_text(yaml.safe_dump(settings))
        self.node = self._start("node")
        self.worker = self._start("worker")
        self.deliverer = self._start("deliverer") if deliverer else None

    def _start(self, command: str) -> subprocess.Popen:
        with open(self.folder / f"{command}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "lungvision", "--config", str(self.config), command],
                cwd=self.repo,
                stdout=log,
                stderr=log,
                env=worker_environment(dict(os.environ)),
                start_new_session=True,
            )

    def log(self, command: str) -> str:
        return (self.folder / f"{command}.log").read_text(errors="replace")

    def wait_until_ready(self) -> float:
        """Seconds until the node listens, the worker is ready and its pool processes and sweeper run, and the
        deliverer is ready."""
        started = time.monotonic()
        while not (
            "node.listening" in self.log("node")
            and "ready." in self.log("worker")
            and len(worker_processes(self.worker.pid)) == self.concurrency + 2
            and (self.deliverer is None or "ready." in self.log("deliverer"))
        ):
            self.check_alive()
            if time.monotonic() - started > START_TIMEOUT_S:
                raise RuntimeError(f"not ready after {START_TIMEOUT_S:.0f} s:\n{self.log('worker')[-3000:]}")
            time.sleep(0.1)
        return time.monotonic() - started

    def send(self, studies: list[Path]) -> float:
        """C-STORE ``studies`` over one association with dcmtk's storescu; the wall-clock time it returned."""
        port = str(self.settings["node"]["port"])
        command = ["storescu", "-aet", "BENCH", "-aec", "LUNGVISION", "127.0.0.1", port, *map(str, studies)]
        subprocess.run(command, check=True, timeout=300, capture_output=True)
        return time.time()

    def processes(self) -> dict[str, subprocess.Popen]:
        """The deployment's processes by command."""
        started = {"node": self.node, "worker": self.worker, "deliverer": self.deliverer}
        return {name: process for name, process in started.items() if process is not None}

    def check_alive(self) -> None:
        for name, process in self.processes().items():
            if process.poll() is not None:
                raise RuntimeError(f"the {name} exited ({process.returncode}):\n{self.log(name)[-3000:]}")

    def stop(self) -> None:
        for process in self.processes().values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes().values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
