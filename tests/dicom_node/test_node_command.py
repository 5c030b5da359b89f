"""The ``lungvision node`` and ``python -m dicom_node`` entry points exist and fail clearly on bad settings."""

import subprocess
import sys

from typer.testing import CliRunner

from lungvision.cli import app
from tests.kit.data import REPO


def test_lungvision_has_a_node_command() -> None:
    result = CliRunner().invoke(app, ["node", "--help"])
    assert result.exit_code == 0
    assert "DICOM node" in result.output


def test_python_m_dicom_node_names_a_bad_setting(tmp_path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("node:\n  port: 99999\n")
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "node.port" in result.stderr
