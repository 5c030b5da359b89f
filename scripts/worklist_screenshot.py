"""Make docs/worklist.png from a real run: 'lungvision serve' in a scratch folder, the demo's sample
studies sent over C-STORE, the worklist photographed in headless Chromium (Debian's chromium).

    .venv/bin/python scripts/worklist_screenshot.py [OUTPUT.png]
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.ports import free_port, wait_until_listening
from common.scu import Destination, send_datasets
from lungvision.demo import START_TIMEOUT_S, sample_studies
from tests.kit.browser import launch_chromium


def main(output: Path) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        port, web_port = free_port(), free_port()
        environment = {
            **os.environ,
            "LUNGVISION_NODE__PORT": str(port),
            "LUNGVISION_NODE__BIND_ADDRESS": "127.0.0.1",
            "LUNGVISION_SPOOL__STABLE_SECONDS": "2",
            "LUNGVISION_WEB__PORT": str(web_port),
            "LUNGVISION_WEB__REFRESH_S": "0",
        }
        with open(Path(folder) / "serve.log", "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "lungvision", "serve"],
                cwd=folder,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until_listening(port, server, START_TIMEOUT_S)
            studies = sample_studies()
            for number, study in enumerate(studies, start=1):
                for dataset in study.datasets:
                    dataset.AccessionNumber = f"A2026{number:04d}"
                send_datasets(Destination("LUNGVISION", "127.0.0.1", port), study.datasets, calling_ae="CR_ROOM1")
            url = f"http://127.0.0.1:{web_port}"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"{url}/api/studies", timeout=5) as answer:
                        rows = json.loads(answer.read())
                    if len(rows) == len(studies) and all(
                        r["status"] in ("delivered", "failed", "not analysed") for r in rows
                    ):
                        break
                except OSError:
                    pass
                time.sleep(1)
            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                page = browser.new_page(viewport={"width": 1280, "height": 560})
                page.goto(f"{url}/", wait_until="networkidle")
                page.screenshot(path=str(output))
                browser.close()
            print(f"wrote {output}")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "worklist.png")
