"""`lungvision serve` and `lungvision demo` on embedded defaults: no Redis, no PACS, nothing lost."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_node.scu import Destination, send_datasets
from inference.sample_dicom import wrap_image
from tests.dicom_node.node_testkit import free_port
from tests.worker.conftest import chest_pixels

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_demo_shows_a_result_for_every_sample_study(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "lungvision", "demo", "--workdir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.split()[-1:] and line.split()[-1][:1].isdigit()]
    assert len(rows) == 5, result.stdout
    assert "NOT_ANALYSED" in next(line for line in rows if line.startswith("knee"))
    assert all(("POSITIVE" in line or "NEGATIVE" in line) for line in rows if not line.startswith("knee"))
    files = list((tmp_path / "demo" / "var" / "out").rglob("*.dcm"))
    assert len(files) == 4 * 2 + 1 + 1  # SC + SR per analysed image, SR for the lateral and the knee


class Serve:
    """``lungvision serve`` in a folder of its own (relative ./var paths land there)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> "Serve":
        environment = {**os.environ, "LUNGVISION_NODE__PORT": str(self.port),
                       "LUNGVISION_NODE__BIND_ADDRESS": "127.0.0.1", "LUNGVISION_SPOOL__STABLE_SECONDS": "3",
                       "LUNGVISION_SPOOL__MIN_FREE_BYTES": "0"}
        with open(self.folder / "serve.log", "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "lungvision", "serve"], cwd=self.folder,
                                            env=environment, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "serve.log").read_text()[-3000:]
            if '"event": "node.listening"' in (self.folder / "serve.log").read_text() \
                    and "ready." in (self.folder / "serve.log").read_text():
                return self
            time.sleep(0.3)
        raise AssertionError("serve did not start")

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=180)

    def results(self, study_uid: str) -> list[Path]:
        return sorted((self.folder / "var" / "out" / study_uid).glob("*.dcm"))


def test_sigterm_exits_cleanly_and_a_restart_loses_nothing(tmp_path) -> None:
    serve = Serve(tmp_path).start()
    study_uid = generate_uid()
    dataset = wrap_image(chest_pixels(), study_uid=study_uid)
    statuses = send_datasets(Destination("LUNGVISION", "127.0.0.1", serve.port), [dataset])
    assert statuses == [0x0000]
    assert serve.terminate() == 0  # stopped before the study was complete (stable_seconds = 3)
    assert serve.results(study_uid) == []

    serve.start()
    try:
        deadline = time.monotonic() + 120
        while len(serve.results(study_uid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(serve.results(study_uid)) == 2  # the heatmap SC and the SR
    finally:
        assert serve.terminate() == 0
