"""OFFIS dcmtk's command-line tools (storescu, echoscu, ...), found on PATH beside the venv's look-alikes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def dcmtk(tool: str) -> str:
    """Path of an OFFIS dcmtk tool; skips when absent (pynetdicom installs look-alikes into the venv)."""
    venv_bin = Path(sys.prefix, "bin").resolve()
    search = os.pathsep.join(
        entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry and Path(entry).resolve() != venv_bin
    )
    found = shutil.which(tool, path=search)
    if found is None:
        pytest.skip(f"dcmtk's {tool} not installed (apt-get install dcmtk)")
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=10).stdout
    if "dcmtk" not in version.lower():
        pytest.skip(f"{found} is not dcmtk's {tool}")
    return found
