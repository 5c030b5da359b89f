"""Benchmark — instances/s received and spooled by the node vs dcmtk's storescp, same input, same run.

Run: ``.venv/bin/python bench/node.py [--instances 48]`` (needs dcmtk; the node sends nothing to Redis).
Input: generated uncompressed 16-bit CR images, 2000×2500 (≈10 MB each), every one with its own
SOP Instance UID. Sender: dcmtk's ``storescu``, 1 association, then 8 in parallel (the instances
split evenly). Receivers, each started fresh on a loopback port with an empty output folder:

* the node (``python -m dicom_node``, default settings: one receiving process per CPU): temp file + fsync +
  rename + arrival record per instance, stable_seconds set high so no dispatch runs during the measurement;
* ``storescp --fork`` (a child process per association), default mode (decodes, re-encodes, writes,
  no fsync) and ``+B`` bit-preserving mode (writes the bytes as received, no fsync).

Two more peers put the ratios in context, because the node must fsync every instance before success and
storescp does not (its files are still in the page cache when it answers): **storescp, durable** — the same
storescp run with the clock stopped only after ``sync`` has written its files to disk; and the **disk** — the
same bytes written to new files and fsynced by as many threads as there are associations, without network
or DICOM: no receiver that is durable before success can beat that. Where the disk is slower than storescp's
receive, the node's ratio to plain storescp is bounded by it.

``--baseline DIR``: the node of another checkout (e.g. one from before a change) is measured too, on
the same files in the same run, with its ratio. Both sides use a 128 KiB maximum PDU. dcmtk leaves
Nagle's algorithm on unless ``TCP_NODELAY=1`` is set in its environment; that setting changes both
the sender's and storescp's behaviour a lot on loopback, so the whole table is measured twice: dcmtk's
default, then ``TCP_NODELAY=1`` for every dcmtk process (sender and storescp). Prints the tables;
nothing is asserted.
"""

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import ComputedRadiographyImageStorage

# Run as a script, this file's folder comes first on the path: look for packages in the repo instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.deployment import wait_for_log_line
from common.ports import free_port, wait_until_listening

REPO = Path(__file__).resolve().parents[1]
ROWS, COLUMNS = 2500, 2000
MAX_PDU_BYTES = 131072  # storescp's upper limit; the node gets the same
REDIS_DB = 15
START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 600.0
NAGLE_MODES = {  # label → environment of every dcmtk process
    "dcmtk default (Nagle on)": dict(os.environ),
    "TCP_NODELAY=1 (Nagle off)": {**os.environ, "TCP_NODELAY": "1"},  # dcmtk's switch
}


def write_images(folder: Path, count: int, rows: int = ROWS, columns: int = COLUMNS) -> list[Path]:
    """``count`` CR files of ``rows``×``columns`` sharing one pixel array, each with its own UIDs."""
    pixels = (np.random.default_rng(0).integers(0, 4096, (rows, columns), dtype=np.uint16)).tobytes()
    study = generate_uid()
    paths = []
    for index in range(count):
        sop_uid = generate_uid()
        dataset = Dataset()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
        dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
        dataset.SOPClassUID, dataset.SOPInstanceUID = ComputedRadiographyImageStorage, sop_uid
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, generate_uid()
        dataset.Modality, dataset.PatientID = "CR", "BENCH"
        dataset.Rows, dataset.Columns, dataset.SamplesPerPixel = rows, columns, 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
        dataset.PixelData = pixels
        path = folder / f"{index:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def split(paths: list[Path], parts: int, folder: Path) -> list[Path]:
    """Hard-link the files into ``parts`` folders, one per association."""
    folder.mkdir(parents=True, exist_ok=True)
    folders = []
    for part in range(parts):
        target = folder / f"association-{parts}-{part}"
        target.mkdir()
        for path in paths[part::parts]:
            os.link(path, target / path.name)
        folders.append(target)
    return folders


def dcmtk(tool: str) -> str:
    """dcmtk's tool, not the pynetdicom look-alike in the virtual environment."""
    venv_bin = str(Path(sys.prefix, "bin"))
    path = os.pathsep.join(entry for entry in os.environ["PATH"].split(os.pathsep) if entry.rstrip("/") != venv_bin)
    found = shutil.which(tool, path=path)
    if found is None:
        raise SystemExit(f"dcmtk's {tool} not found (apt-get install dcmtk)")
    return found


def start_node(port: int, output: Path, repo: Path = REPO) -> subprocess.Popen:
    """The node of ``repo``, returned once it logs ``node.listening`` (all its receiving processes accept)."""
    config = output.parent / f"{output.name}.yaml"
    log_path = output.parent / f"{output.name}.log"
    config.write_text(
        yaml.safe_dump(
            {
                "log_level": "INFO",
                "node": {"port": port, "bind_address": "127.0.0.1", "max_pdu_bytes": MAX_PDU_BYTES},
                "spool": {"dir": str(output), "stable_seconds": 3600, "min_free_bytes": 0},
                "broker": {"url": f"redis://127.0.0.1:6379/{REDIS_DB}"},
            }
        )
    )
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node", "--config", str(config)], cwd=repo, stdout=log, stderr=log
        )
    wait_for_log_line(log_path, "node.listening", process, START_TIMEOUT_S)
    return process


def start_storescp(port: int, output: Path, bit_preserving: bool, env: dict) -> subprocess.Popen:
    mode = ["+B"] if bit_preserving else []
    return subprocess.Popen(
        [dcmtk("storescp"), "--fork", "-pdu", str(MAX_PDU_BYTES), "-od", str(output), *mode, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def spooled_instances(output: Path) -> int:
    return sum(1 for _ in (output / "studies").rglob("*.dcm"))


def storescp_files(output: Path) -> int:
    return sum(1 for path in output.iterdir() if path.is_file())


def measure(
    start,
    count_received,
    folders: list[Path],
    expected: int,
    workdir: Path,
    label: str,
    env: dict,
    *,
    until_durable: bool = False,
) -> float:
    """Instances/s from the first association request until every storescu has finished (``until_durable``:
    and ``sync`` has written everything to disk)."""
    output = workdir / f"out-{label}-{len(folders)}"
    output.mkdir()
    port = free_port()
    receiver = start(port, output)
    try:
        wait_until_listening(port, receiver, START_TIMEOUT_S)
        storescu = dcmtk("storescu")

        def send(folder: Path) -> int:
            command = [
                storescu,
                "-pdu",
                str(MAX_PDU_BYTES),
                "-aec",
                "LUNGVISION",
                "+sd",
                "127.0.0.1",
                str(port),
                str(folder),
            ]
            return subprocess.run(command, capture_output=True, timeout=RUN_TIMEOUT_S, env=env).returncode

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(folders)) as pool:
            codes = list(pool.map(send, folders))
        if until_durable:
            os.sync()
        elapsed = time.perf_counter() - started
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)
    count = count_received(output)
    if any(codes) or count != expected:
        raise SystemExit(f"{label}: storescu exit codes {codes}, {count} of {expected} instances received")
    shutil.rmtree(output)
    return expected / elapsed


def durable_write_rate(paths: list[Path], threads: int, workdir: Path) -> float:
    """Files/s for writing the same bytes to new files (128 KiB writes) and fsyncing each, ``threads`` at a time."""
    target = workdir / f"disk-{threads}"
    target.mkdir()
    contents = [path.read_bytes() for path in paths]

    def write(index: int) -> None:
        descriptor = os.open(target / f"{index:04d}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            with memoryview(contents[index]) as data:
                for start in range(0, len(data), MAX_PDU_BYTES):
                    os.write(descriptor, data[start : start + MAX_PDU_BYTES])
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(write, range(len(contents))))
    elapsed = time.perf_counter() - started
    shutil.rmtree(target)
    return len(contents) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=48, help="instances per measurement (multiple of 8)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout whose node is measured too (e.g. one from before a change)",
    )
    arguments = parser.parse_args()
    count, baseline = arguments.instances, arguments.baseline
    with tempfile.TemporaryDirectory(dir=REPO / "var" if (REPO / "var").is_dir() else None) as scratch:
        workdir = Path(scratch)
        source = workdir / "source"
        source.mkdir()
        paths = write_images(source, count)
        megabytes = paths[0].stat().st_size / 1e6
        print(
            f"{count} CR instances of {megabytes:.1f} MB ({COLUMNS}x{ROWS}, 16-bit, explicit VR LE), "
            f"max PDU {MAX_PDU_BYTES}, {os.cpu_count()} CPUs"
        )
        for mode, env in NAGLE_MODES.items():
            print(f"\n{mode}")
            print(
                f"{'associations':>12} | {'node inst/s':>11} | {'storescp inst/s':>15} | {'node/storescp':>13} | "
                f"{'storescp +B inst/s':>18} | {'node/storescp +B':>16} | {'storescp durable':>16} | "
                f"{'node/durable':>12} | {'disk files/s':>12} | {'node/disk':>9}"
                + (f" | {'baseline node':>13} | {'node/baseline':>13}" if baseline else "")
            )
            for associations in (1, 8):
                folders = split(paths, associations, workdir / f"nagle-{'off' if 'TCP_NODELAY' in env else 'on'}")
                node = measure(start_node, spooled_instances, folders, count, workdir, "node", env)
                plain, bit = (
                    measure(
                        functools.partial(start_storescp, bit_preserving=bit_preserving, env=env),
                        storescp_files,
                        folders,
                        count,
                        workdir,
                        label,
                        env,
                    )
                    for bit_preserving, label in ((False, "storescp"), (True, "storescp-B"))
                )
                durable = measure(
                    functools.partial(start_storescp, bit_preserving=False, env=env),
                    storescp_files,
                    folders,
                    count,
                    workdir,
                    "storescp-durable",
                    env,
                    until_durable=True,
                )
                disk = durable_write_rate(paths, associations, workdir)
                row = (
                    f"{associations:>12} | {node:>11.1f} | {plain:>15.1f} | {node / plain:>13.2f} | "
                    f"{bit:>18.1f} | {node / bit:>16.2f} | {durable:>16.1f} | {node / durable:>12.2f} | "
                    f"{disk:>12.1f} | {node / disk:>9.2f}"
                )
                if baseline is not None:
                    starter = functools.partial(start_node, repo=baseline.resolve())
                    before = measure(starter, spooled_instances, folders, count, workdir, "baseline", env)
                    row += f" | {before:>13.1f} | {node / before:>13.2f}"
                print(row)


if __name__ == "__main__":
    main()
