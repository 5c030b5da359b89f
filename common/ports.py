"""Loopback ports — a free one to listen on, and waiting until a started process listens there."""

import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_listening(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; RuntimeError if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            command = process.args[-1] if isinstance(process.args, (list, tuple)) and process.args else "process"
            raise RuntimeError(f"{command!s} exited with status {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s:.0f} s")
