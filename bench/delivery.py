"""Benchmark — delivery of a study's SC + SR into a real Orthanc: kept associations (the worker's pool,
``delivery.association_idle_s``) vs a new association per study, same files, same run.

Run: ``.venv/bin/python bench/delivery.py [--studies 40] [--rounds 3]``. One 2500×2000 16-bit CR is
analysed once by the worker pipeline; its SC and SR are copied under fresh UIDs into ``--studies``
studies. Each round sends every study, one after another as a worker process does, through
``worker.deliver.send_files``: first with ``association_idle_s: 0`` (a new association per study),
then with the default idle time (one association for the whole burst); rounds alternate so drift in
the machine's load hits both alike. Prints the median and p95 per study of each mode and their ratio,
plus the CPU an idle kept association costs its process (pynetdicom polls its socket every ms) —
once into an Orthanc as configured by default, once into one with ``TCP_NODELAY=1`` in its
environment (DCMTK, on which Orthanc is built, leaves Nagle's algorithm on otherwise, and each
C-STORE response then waits for our delayed ACK). Nothing is asserted.
"""

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

# bench/ holds a worker.py that would hide the worker package: look for packages in the repo, not in bench/.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from common.ports import free_port
from config.settings import Settings, load_settings
from tests.kit.orthanc import Orthanc
from worker.deliver import association_pool, close_association_pool, send_files

IDLE_PROBE_S = 2.0  # how long the idle cost is measured


def result_files(folder: Path) -> list[Path]:
    """The SC and SR the worker pipeline writes for one generated study (bench/worker.py's input)."""
    from bench.worker import make_studies
    from inference.classifier import load_classifier
    from tests.kit.worker import make_message
    from worker.pipeline import analyse_study, device_uid_for

    classifier = load_classifier()
    folder.mkdir(parents=True)
    [study] = make_studies(folder, 1)
    outcome = analyse_study(
        make_message([study]),
        classifier,
        classifier.intended_use(),
        folder / "outbox",
        device_uid=device_uid_for("BENCH"),
        max_long_side=1024,
    )
    return outcome.files


def copies(files: list[Path], folder: Path, count: int) -> list[list[Path]]:
    """``count`` studies, each the given objects under a new Study and SOP Instance UID."""
    datasets = [dcmread(path) for path in files]
    studies = []
    for _study in range(count):
        study_uid, study = generate_uid(), []
        for number, dataset in enumerate(datasets):
            dataset.StudyInstanceUID = study_uid
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = folder / study_uid / f"{number}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            dataset.save_as(path, enforce_file_format=True)
            study.append(path)
        studies.append(study)
    return studies


def send_all(settings: Settings, studies: list[list[Path]]) -> list[float]:
    """Seconds per study, sent one after another; the pool is emptied afterwards."""
    seconds = []
    for files in studies:
        started = time.perf_counter()
        send_files(settings, "orthanc", files)
        seconds.append(time.perf_counter() - started)
    close_association_pool()
    return seconds


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def idle_cpu_share(settings: Settings, files: list[Path]) -> tuple[float, float]:
    """Share of one core this process uses over IDLE_PROBE_S with nothing open, then with one kept association."""
    shares = []
    for keep in (False, True):
        if keep:
            send_files(settings, "orthanc", files)
            assert association_pool(settings).idle_count() == 1
        started_cpu, started = cpu_s(), time.perf_counter()
        time.sleep(IDLE_PROBE_S)
        shares.append((cpu_s() - started_cpu) / (time.perf_counter() - started))
    close_association_pool()
    return shares[0], shares[1]


ORTHANCS = {
    "Orthanc as configured by default (Nagle's algorithm on)": None,
    "Orthanc with TCP_NODELAY=1 in its environment (DCMTK then turns Nagle off)": {"TCP_NODELAY": "1"},
}


def measure(folder: Path, environment: dict | None, files: list[Path], studies: int, rounds: int) -> None:
    """Print one table: both modes into one Orthanc started with ``environment``."""
    orthanc = Orthanc(folder / "orthanc", free_port(), free_port(), environment=environment).start()
    try:
        destination = {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
        fresh = load_settings(destinations=[destination], delivery={"association_idle_s": 0})
        kept = load_settings(destinations=[destination])
        send_all(fresh, copies(files, folder / "warm-up", 2))
        timings: dict[str, list[float]] = {"new association per study": [], "kept association": []}
        for round_number in range(rounds):
            for name, settings in (("new association per study", fresh), ("kept association", kept)):
                timings[name] += send_all(
                    settings, copies(files, folder / f"{round_number}-{len(timings[name])}", studies)
                )
        print(f"{'mode':>26} | {'median ms':>9} | {'p95 ms':>8} | {'studies/s':>9}")
        for name, seconds in timings.items():
            print(
                f"{name:>26} | {np.median(seconds) * 1000:>9.1f} | {np.percentile(seconds, 95) * 1000:>8.1f} | "
                f"{len(seconds) / sum(seconds):>9.1f}"
            )
        new, reused = (np.median(seconds) for seconds in timings.values())
        print(f"new / kept, median per study, same run: {new / reused:.2f}x")
        without, with_kept = idle_cpu_share(kept, files)
        print(
            f"idle process CPU over {IDLE_PROBE_S:.0f} s: {without * 100:.1f} % of a core with no association "
            f"open, {with_kept * 100:.1f} % with one kept (released after "
            f"delivery.association_idle_s = {kept.delivery.association_idle_s:g} s)"
        )
    finally:
        close_association_pool()
        orthanc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        files = result_files(folder / "source")
        sizes = ", ".join(f"{dcmread(path).SOPClassUID.name} {path.stat().st_size / 1e6:.2f} MB" for path in files)
        print(
            f"delivery of one study's {len(files)} objects ({sizes}) into Orthanc on loopback, "
            f"{arguments.studies} studies × {arguments.rounds} rounds per mode, sent one after another"
        )
        for number, (title, environment) in enumerate(ORTHANCS.items()):
            print(f"\n{title}")
            measure(folder / f"orthanc-{number}", environment, files, arguments.studies, arguments.rounds)


if __name__ == "__main__":
    main()
