"""Benchmark — memory of each process of a running node, worker and deliverer, idle and after a few studies.

Run: ``nice -n 19 .venv/bin/python bench/memory.py [--studies 4] [--concurrency 1 2] [--baseline DIR]``
(needs dcmtk's ``storescu``). For each concurrency a deployment on the embedded defaults is started in
a temp folder — ``lungvision node``, ``worker`` and ``deliverer`` as real processes, the SQLite broker, the
SQLite store, a folder destination — and every process is measured twice: idle, once the worker is
ready and its pool processes have started; then after ``--studies`` one-image 2500×2000 CR studies
have been sent with ``storescu`` and their SC and SR written to the folder — a few seconds after the
last result (the pool processes still hold their heaps, as between studies under load), and once more
after ``worker.return_memory_after_idle_s``, when an idle worker has given back what its studies freed.

Per process, from ``/proc/PID/smaps_rollup``: RSS (every resident page it maps, shared or not),
PSS (each page divided by the number of processes mapping it) and Private (pages no other process
maps). Summing RSS counts a page the worker's parent shares with its pool once per process. PSS
sums are the usual honest total, but they also split pages with unrelated processes mapping the
same files (another torch process on the machine lowers the worker's PSS), so the worker's total
is also given exactly: its distinct physical pages, from ``/proc/PID/pagemap`` (needs root; else
"n/a"). The worker is its parent, its pool processes and its sweeper. "CUDA libs" is the PSS of
the CUDA libraries a CUDA build of torch maps (this development venv's); the Docker image's
CPU-only torch has none, and it also allocates less when imported (≈ 110 MiB less anonymous memory
in the parent, docs/worker.md), so it takes less than the "without the CUDA libraries' mappings"
figure; to measure it, put a CPU-only torch first on ``PYTHONPATH``.

``--baseline DIR``: also measure the checkout in DIR (e.g. a copy of the tree before a change),
same venv, same studies, in the same run, and print the ratios of the worker totals. Nothing is
asserted.
"""

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

# This script shares its folder with bench/worker.py: look for packages in the repo, not in bench/.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.deployment import Deployment, node_processes, worker_processes
from bench.worker import make_studies
from common.ports import free_port
from config.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
RESULTS_TIMEOUT_S = 900.0
SETTLE_S = 3.0  # after the last start-up line / the last result, for late allocations to show
IDLE_S = load_settings().worker.return_memory_after_idle_s + 1  # then until an idle worker has given memory back
CUDA_LIBRARIES = (
    "/nvidia/",
    "/torch/lib/libtorch_cuda",
    "/torch/lib/libc10_cuda",
    "/torch/lib/libcaffe2_nvrtc",
    "/cuda/bindings/",
    "/triton/",
)  # what a CUDA build of torch maps (path fragments)
PAGE = os.sysconf("SC_PAGE_SIZE")
PFN_MASK = (1 << 55) - 1  # /proc/PID/pagemap: bits 0-54 the page frame number, bit 63 "present"


@dataclass(frozen=True)
class Memory:
    """One process's memory in KiB."""

    role: str
    pid: int
    rss_kib: int
    pss_kib: int
    private_kib: int
    cuda_pss_kib: int  # of pss_kib: CUDA libraries (a CUDA build of torch only)


@dataclass(frozen=True)
class Snapshot:
    """Every process of a deployment at one moment, and the worker's distinct pages (None: unreadable)."""

    processes: list[Memory]
    worker_distinct_kib: int | None
    worker_distinct_without_cuda_kib: int | None  # the same, less the pages of the CUDA libraries' mappings

    def worker_total(self) -> Memory:
        worker = [row for row in self.processes if row.role.startswith("worker")]
        sums = [sum(getattr(row, field.name) for row in worker) for field in fields(Memory)[2:]]
        return Memory("worker total", 0, *sums)


def smaps_rollup(pid: int) -> dict[str, int]:
    """The KiB figures of /proc/PID/smaps_rollup by name (Rss, Pss, Private_Clean, ...)."""
    figures = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        figures[name.rstrip(":")] = int(value)
    return figures


def mappings(pid: int) -> list[tuple[int, int, str, dict[str, int]]]:
    """(start, end, path, KiB figures) per mapping of /proc/PID/smaps."""
    found = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if not parts[0].endswith(":"):  # a mapping's header: address range, perms, offset, device, inode, path
            start, end = (int(address, 16) for address in parts[0].split("-"))
            found.append((start, end, parts[5] if len(parts) > 5 else "", {}))
        elif len(parts) == 3 and parts[2] == "kB":
            found[-1][3][parts[0].rstrip(":")] = int(parts[1])
    return found


def cuda_library_pss(pid: int) -> int:
    return sum(figures["Pss"] for _, _, path, figures in mappings(pid) if is_cuda_library(path))


def is_cuda_library(path: str) -> bool:
    return any(part in path for part in CUDA_LIBRARIES)


def resident_frames(pid: int, without_cuda: bool = False) -> np.ndarray:
    """The physical page frame numbers of the process's resident pages (all 0 without CAP_SYS_ADMIN);
    ``without_cuda``: not those of the CUDA libraries' mappings."""
    frames = []
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for start, end, path, figures in mappings(pid):
            if figures.get("Rss", 0) == 0 or (without_cuda and is_cuda_library(path)):
                continue
            pagemap.seek(start // PAGE * 8)
            entries = np.frombuffer(pagemap.read((end - start) // PAGE * 8), dtype="<u8")
            frames.append(entries[(entries >> np.uint64(63)) == 1] & np.uint64(PFN_MASK))
    return np.concatenate(frames) if frames else np.empty(0, dtype="<u8")


def distinct_kib(pids: list[int], without_cuda: bool = False) -> int | None:
    """KiB of the distinct physical pages the processes hold together (None when the kernel hides frames)."""
    frames = np.unique(np.concatenate([resident_frames(pid, without_cuda) for pid in pids]))
    if frames.size and not frames.any():
        return None
    return int(frames.size) * PAGE // 1024


def memory_of(role: str, pid: int) -> Memory:
    figures = smaps_rollup(pid)
    return Memory(
        role,
        pid,
        figures["Rss"],
        figures["Pss"],
        figures["Private_Clean"] + figures["Private_Dirty"],
        cuda_library_pss(pid),
    )


def deployment_settings(folder: Path, concurrency: int) -> dict:
    """Embedded defaults (SQLite broker and store) in ``folder``, results written to a folder."""
    return {
        "log_level": "INFO",
        "node": {"port": free_port(), "bind_address": "127.0.0.1"},
        "spool": {"dir": str(folder / "spool"), "stable_seconds": 1, "min_free_bytes": 0},
        "broker": {
            "url": f"sqla+sqlite:///{folder}/broker.sqlite",
            "result_backend": f"db+sqlite:///{folder}/results.sqlite",
        },
        "worker": {"concurrency": concurrency, "outbox_dir": str(folder / "outbox")},
        "store": {"url": f"sqlite:///{folder}/outcomes.db"},
        "audit": {"path": str(folder / "audit.jsonl")},
        "destinations": [{"name": "out", "kind": "folder", "path": str(folder / "out")}],
    }


class FolderDeployment(Deployment):
    """A deployment whose results go to a folder destination."""

    def wait_for_results(self, count: int) -> float:
        """Seconds until the folder destination holds ``count`` files."""
        started = time.monotonic()
        while len(list((self.folder / "out").rglob("*.dcm"))) < count:
            self.check_alive()
            if time.monotonic() - started > RESULTS_TIMEOUT_S:
                raise RuntimeError(f"no {count} results after {RESULTS_TIMEOUT_S:.0f} s:\n{self.log('worker')[-3000:]}")
            time.sleep(0.2)
        return time.monotonic() - started

    def measure(self) -> Snapshot:
        worker = worker_processes(self.worker.pid)
        node = node_processes(self.node.pid)
        deliverer = [] if self.deliverer is None else [("deliverer", self.deliverer.pid)]
        processes = [memory_of(role, pid) for role, pid in node + worker + deliverer]
        pids = [pid for _, pid in worker]
        return Snapshot(processes, distinct_kib(pids), distinct_kib(pids, without_cuda=True))


def mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.0f}"


def print_table(title: str, snapshot: Snapshot) -> None:
    print(f"\n{title}")
    print(f"  {'process':<16} {'pid':>7} {'RSS MiB':>9} {'PSS MiB':>9} {'private MiB':>12} {'CUDA libs PSS':>14}")
    for row in [*snapshot.processes, snapshot.worker_total()]:
        print(
            f"  {row.role:<16} {row.pid or '':>7} {mib(row.rss_kib):>9} {mib(row.pss_kib):>9} "
            f"{mib(row.private_kib):>12} {mib(row.cuda_pss_kib):>14}"
        )
    print(
        f"  worker, distinct pages: {mib(snapshot.worker_distinct_kib)} MiB; without the CUDA libraries' "
        f"mappings: {mib(snapshot.worker_distinct_without_cuda_kib)} MiB (a CPU-only torch takes less still)"
    )


def run(concurrency: int, studies: list[Path], folder: Path, repo: Path, deliverer: bool) -> dict[str, Snapshot]:
    """Idle and after-studies snapshots of one deployment, printed as they are taken."""
    deployment = FolderDeployment(folder, deployment_settings(folder, concurrency), repo, deliverer=deliverer)
    snapshots = {}
    try:
        ready_s = deployment.wait_until_ready()
        time.sleep(SETTLE_S)
        snapshots["idle"] = deployment.measure()
        print_table(f"{repo}, concurrency {concurrency}, idle (ready after {ready_s:.1f} s)", snapshots["idle"])
        sent = time.monotonic()
        deployment.send(studies)
        deployment.wait_for_results(2 * len(studies))  # SC + SR per study
        done_s = time.monotonic() - sent
        time.sleep(SETTLE_S)
        snapshots["after studies"] = deployment.measure()
        print_table(
            f"{repo}, concurrency {concurrency}, {SETTLE_S:g} s after {len(studies)} studies "
            f"({done_s:.1f} s from sending)",
            snapshots["after studies"],
        )
        time.sleep(IDLE_S)
        snapshots["idle after studies"] = deployment.measure()
        print_table(
            f"{repo}, concurrency {concurrency}, {SETTLE_S + IDLE_S:g} s after the studies (idle)",
            snapshots["idle after studies"],
        )
    finally:
        deployment.stop()
    return snapshots


def print_ratios(concurrency: int, current: dict[str, Snapshot], baseline: dict[str, Snapshot]) -> None:
    for moment, snapshot in current.items():
        now, before = snapshot.worker_total(), baseline[moment].worker_total()
        distinct = (
            f"{snapshot.worker_distinct_kib / baseline[moment].worker_distinct_kib:.2f}"
            if snapshot.worker_distinct_kib and baseline[moment].worker_distinct_kib
            else "n/a"
        )
        print(
            f"concurrency {concurrency}, {moment}: worker RSS sum {now.rss_kib / before.rss_kib:.2f}×, "
            f"PSS sum {now.pss_kib / before.pss_kib:.2f}×, distinct pages {distinct}× the baseline"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to measure as the peer")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lv-memory-") as temporary:
        root = Path(temporary)
        studies = make_studies(root, arguments.studies)
        for concurrency in arguments.concurrency:
            measured = {}
            for label, repo, deliverer in (("baseline", arguments.baseline, False), ("current", REPO, True)):
                if repo is None:
                    continue
                folder = root / f"{label}-concurrency-{concurrency}"
                folder.mkdir()
                measured[label] = run(concurrency, studies, folder, repo.resolve(), deliverer)
            if "baseline" in measured:
                print()
                print_ratios(concurrency, measured["current"], measured["baseline"])


if __name__ == "__main__":
    main()
