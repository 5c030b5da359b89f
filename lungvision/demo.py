"""Demo — ``lungvision serve`` on embedded defaults, fed with bundled sample studies over C-STORE.

Sends five studies (chest radiographs wrapped as DICOM in several photometric interpretations and
transfer syntaxes, one with a lateral view, and one non-chest image), waits until their results
are delivered to the local folder destination, prints a table and the result files, and stops.
With ``keep`` (``lungvision demo --keep``) it leaves ``serve`` running after the table, so that the
worklist keeps answering, until SIGINT (Ctrl-C) or SIGTERM; then it stops ``serve`` cleanly.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, generate_uid

from common.ports import free_port, wait_until_listening
from common.scu import Destination, send_datasets
from inference.sample_dicom import wrap_image

SAMPLES = Path(__file__).with_name("samples")
START_TIMEOUT_S = 180.0
RESULTS_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0


@dataclass
class DemoStudy:
    """One sample study: what it is, and its datasets."""

    description: str
    datasets: list[Dataset]

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)


def _pixels(name: str) -> np.ndarray:
    return np.asarray(Image.open(next(SAMPLES.glob(f"{name}*.jpeg"))).convert("L"))


def sample_studies() -> list[DemoStudy]:
    """The bundled studies, each with its own patient and study UID."""

    def study(description: str, *images: tuple[str, dict], **header: str) -> DemoStudy:
        study_uid = generate_uid()
        patient = f"Demo^Patient{len(description)}"
        datasets = [
            wrap_image(
                _pixels(name), study_uid=study_uid, patient_name=patient, patient_id=f"DEMO-{study_uid[-6:]}", **options
            )
            for name, options in images
        ]
        for dataset in datasets:
            for keyword, value in header.items():
                setattr(dataset, keyword, value)
        return DemoStudy(description, datasets)

    return [
        study(
            "normal CR, MONOCHROME2 8-bit, explicit VR", ("normal-IM-0135", {"transfer_syntax": ExplicitVRLittleEndian})
        ),
        study(
            "pneumonia CR, MONOCHROME1 12-bit, JPEG 2000 + lateral",
            ("pneumonia-person101", {"photometric": "MONOCHROME1", "bits_stored": 12, "transfer_syntax": JPEG2000}),
            ("pneumonia-person101", {"view_position": "LL"}),
        ),
        study(
            "normal DX, 16-bit, RLE",
            ("normal-IM-0137", {"sop_class": "DX", "bits_stored": 16, "transfer_syntax": RLELossless}),
        ),
        study(
            "pneumonia SC, JPEG baseline",
            ("pneumonia-person1020", {"sop_class": "SC", "transfer_syntax": JPEGBaseline8Bit}),
        ),
        study("knee DX (not a chest)", ("normal-IM-0135", {"sop_class": "DX", "body_part": "KNEE"})),
        study("CR of a 12-year-old (no training data for that age)", ("normal-IM-0137", {}), PatientAge="012Y"),
    ]


def keep_serving(server: subprocess.Popen, url: str) -> int:
    """Keep ``server`` running until SIGINT or SIGTERM reaches this process; returns the exit code.

    0 after a signal; 1 if the server exits on its own first. The caller still stops the server.
    The previous signal handlers are restored before returning (this must run in the main thread).
    """
    stop = threading.Event()
    previous = {number: signal.signal(number, lambda *_: stop.set()) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"\nworklist at {url} — Ctrl-C to stop", flush=True)
        while not stop.is_set():
            if server.poll() is not None:
                print(
                    f"'lungvision serve' exited with status {server.returncode}; stopping", file=sys.stderr, flush=True
                )
                return 1
            stop.wait(0.5)
        print("stopping ...", flush=True)
        return 0
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def run_demo(workdir: Path, keep: bool = False) -> int:
    """Run the whole demo in ``workdir`` (emptied first); returns the exit code.

    With ``keep``, 'serve' (and so the worklist) stays up after the results until SIGINT or SIGTERM.
    """
    from common.store import Store

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    port = free_port()
    web_port = free_port()
    environment = {
        "LUNGVISION_NODE__PORT": str(port),
        "LUNGVISION_NODE__BIND_ADDRESS": "127.0.0.1",
        "LUNGVISION_SPOOL__STABLE_SECONDS": "2",
        "LUNGVISION_WEB__PORT": str(web_port),
    }
    log_path = workdir / "serve.log"
    print(f"starting 'lungvision serve' on embedded defaults in {workdir} (log: {log_path}) ...", flush=True)
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "lungvision", "serve"],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **environment},
        )
    try:
        wait_until_listening(port, server, START_TIMEOUT_S)
        studies = sample_studies()
        sent_at: dict[str, float] = {}
        for study in studies:
            sent_at[study.study_uid] = time.monotonic()
            send_datasets(Destination("LUNGVISION", "127.0.0.1", port), study.datasets, calling_ae="LV_DEMO")
        url = f"http://127.0.0.1:{web_port}/"
        print(f"worklist: {url} ({'kept after the results: --keep' if keep else 'while the demo runs'})", flush=True)
        print(
            f"sent {len(studies)} studies ({sum(len(s.datasets) for s in studies)} images); waiting for results ...",
            flush=True,
        )
        store = Store(f"sqlite:///{workdir / 'var' / 'lungvision.db'}")
        done: dict[str, float] = {}
        deadline = time.monotonic() + RESULTS_TIMEOUT_S
        while len(done) < len(studies) and time.monotonic() < deadline:
            for current in store.results():
                if current.status in ("delivered", "failed") and current.study_instance_uid not in done:
                    done[current.study_instance_uid] = time.monotonic()
            time.sleep(0.5)
        rows = {row.study_instance_uid: row for row in store.results()}
        print(f"\n{'study':<56} {'images':>6} {'probability':>11} {'finding':>12} {'seconds':>7}  not analysed")
        for study in studies:
            row = rows.get(study.study_uid)
            probability = "" if row is None or row.probability is None else f"{row.probability:.3f}"
            finding = "(no result)" if row is None else row.finding
            seconds = f"{done[study.study_uid] - sent_at[study.study_uid]:.1f}" if study.study_uid in done else ""
            reasons = "; ".join(
                image.not_analysed_reason for image in (row.images if row else []) if image.not_analysed_reason
            )
            print(
                f"{study.description:<56} {len(study.datasets):>6} {probability:>11} {finding:>12} {seconds:>7}  "
                f"{reasons}"
            )
        out = workdir / "var" / "out"
        files = sorted(out.rglob("*.dcm")) if out.exists() else []
        print(f"\n{len(files)} result files (Secondary Capture heatmaps and Structured Reports) under {out}:")
        for path in files:
            print(f"  {os.path.relpath(path)}")
        code = 0 if len(done) == len(studies) else 1
        if keep:
            wait_until_listening(web_port, server, START_TIMEOUT_S)
            code = keep_serving(server, url) or code
        return code
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"'lungvision serve' did not stop within {STOP_TIMEOUT_S:.0f} s; killed", file=sys.stderr, flush=True)
            server.kill()
