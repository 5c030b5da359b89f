"""A redis-server of the test's own, on a free loopback port (never the machine's Redis)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from common.ports import free_port, wait_until_listening


class RedisServer:
    """A redis-server of the test's own on a free loopback port, persistence off: a restart loses everything."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        with open(self.folder / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.folder),
                ],
                stdout=log,
                stderr=log,
            )
        wait_until_listening(self.port, self.process, timeout_s=30)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=10)
