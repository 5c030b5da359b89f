"""A real Orthanc server for tests: its own configuration, storage and free loopback ports — or the very
configuration docker-compose mounts."""

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.kit.data import REPO
from tests.kit.wait import wait_until

ORTHANC_CONFIG = REPO / "config" / "orthanc" / "orthanc.json"  # what docker-compose.yml mounts
AUTOROUTE_SCRIPT = REPO / "config" / "orthanc" / "autoroute.lua"  # named by ORTHANC_CONFIG's "LuaScripts"
START_TIMEOUT_S = 60.0
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def resolve_config(path: Path, environment: Mapping[str, str]) -> dict:
    """A configuration file as Orthanc reads it: ``${NAME}`` / ``${NAME:-default}`` replaced from
    ``environment`` in the raw text (so unquoted ports and booleans work), then parsed as JSON."""

    def value(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in environment:
            return environment[name]
        if default is None:
            raise KeyError(f"{path}: ${{{name}}} has no default and is not in the environment")
        return default

    return json.loads(_VARIABLE.sub(value, Path(path).read_text()))


def orthanc_binary() -> str:
    """The Orthanc executable (Debian's package installs /usr/sbin/Orthanc); skips if absent."""
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    return found


class Orthanc:
    """An Orthanc process with a JSON configuration written from ``settings`` (merged over the base).

    Or, with ``config_file``, that very file (e.g. the one docker-compose mounts), its ``${VARIABLES}``
    taken from ``environment`` (Orthanc substitutes them itself; ``http_port``/``dicom_port`` must
    then be what the file resolves to).
    """

    def __init__(
        self,
        folder: Path,
        http_port: int,
        dicom_port: int,
        settings: dict | None = None,
        *,
        config_file: Path | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.folder, self.http_port, self.dicom_port = folder, http_port, dicom_port
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "orthanc.log"
        self.environment = dict(environment or {})
        self.process: subprocess.Popen | None = None
        if config_file is not None:
            assert settings is None, "settings are for a written configuration, not for config_file"
            self.config_path = Path(config_file)
            return
        self.config_path = folder / "orthanc.json"
        config = {
            "Name": "lungvision-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "StableAge": 2,
        }
        config.update(settings or {})
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "Orthanc":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [orthanc_binary(), str(self.config_path)],
                stdout=log,
                stderr=log,
                env={**os.environ, **self.environment},
            )
        wait_until(self._answers, START_TIMEOUT_S, message=lambda: f"Orthanc answering; log:\n{self.log_tail()}")
        return self

    def _answers(self) -> bool:
        assert self.process.poll() is None, f"Orthanc exited; log tail:\n{self.log_tail()}"
        try:
            self.get("/system")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict | bytes):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        with urllib.request.urlopen(
            urllib.request.Request(self.url + path, data=data, method="POST"), timeout=30
        ) as response:
            return json.loads(response.read())

    def study_instances(self, study_uid: str) -> list[dict]:
        """Simplified tags of every instance Orthanc holds for ``study_uid``."""
        ids = self.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
        return [self.get(f"/instances/{instance_id}/simplified-tags") for instance_id in ids]

    def wait_for_instances(self, study_uid: str, predicate, timeout_s: float) -> list[dict]:
        """Poll until ``predicate(instances)`` holds (bounded by ``timeout_s``); returns the instances."""
        instances: list[dict] = []

        def held() -> bool:
            nonlocal instances
            instances = self.study_instances(study_uid)
            return predicate(instances)

        wait_until(
            held,
            timeout_s,
            interval_s=0.5,
            message=lambda: (
                "the study's results; Orthanc holds "
                f"{[(i.get('Modality'), i.get('SOPInstanceUID')) for i in instances]}"
            ),
        )
        return instances
