"""Benchmark — end to end with a real Orthanc and Redis: how long after its quiet period a study's SC and SR
are in Orthanc, stage by stage, and studies/s, at worker concurrency 1 and 2.

Run: ``.venv/bin/python bench/end_to_end.py [--studies 20] [--burst 30] [--baseline DIR]`` (needs dcmtk,
redis-server and Orthanc: ``scripts/setup.sh --test``). For each concurrency a fresh deployment is
started in a temp folder: a redis-server and an Orthanc of its own on free loopback ports (Orthanc with
``TCP_NODELAY=1``, as docker-compose.yml runs it), ``lungvision node``, ``lungvision worker`` and
``lungvision deliverer`` as real processes on the Redis broker (as serve and docker compose run them),
Orthanc as the only destination. The input is bench/worker.py's: one
2500×2000 16-bit CR per study (≈ 10 MB).

* **Latency**: ``--studies`` studies sent one at a time with ``storescu`` (one association each), each
  once the previous one's results are in Orthanc. A study's latency is from ``storescu``'s return to
  the moment Orthanc counts its SC and SR (polled every 5 ms), minus ``stable_seconds``. Its stages,
  from the spool (arrival record, ``queued.json``) and the worker's log (timestamps in ms): seal and
  queue (the quiet period's end → the message is in the broker), wait (→ the worker takes it),
  analysis (→ the outcome is recorded: decode, model, SC + SR, routing), delivery (→ Orthanc counts both
  objects: the delivery task's queue, the C-STORE, Orthanc's storing).
* **Throughput**: ``--burst`` studies sent at once over 4 associations; studies/s from the end of the
  first study's quiet period to the last study's results in Orthanc (polled every 50 ms: polling every
  5 ms took a quarter of a core — Orthanc's answers ≈ 7 %, this script's requests ≈ 19 % — from the two
  cores the burst is measured on; every 50 ms ≈ 4 %, and the end is seen < 50 ms late, so the studies/s
  err low, by ≤ 2 % for a 3 s burst), and the CPU time each process took
  per study over the burst (each with the processes it started: the node's receiving processes, the
  worker's pool), the senders (``storescu``), Orthanc and Redis included — where the cores went.

``--baseline DIR``: the same for another checkout (e.g. one from before a change; without a deliverer, or
with one: ``--baseline-deliverer``), same studies, same run, and the ratios. ``--worker-delivers``: also the
current tree without a deliverer (the worker sends the results itself, before its next study), and the
ratios. ``--rounds N``: every run N times, the order of the runs reversed each round (a VM's speed drifts
by ±10 % over minutes: both sides then see the same drift), then the median studies/s of each and the
ratio round by round. Nothing is asserted.
"""

import argparse
import json
import re
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from pydicom import dcmread

# bench/ holds a worker.py that would hide the worker package: look for packages in the repo, not in bench/.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.deployment import Deployment, cpu_seconds
from bench.worker import make_studies
from common.ports import free_port
from tests.kit.orthanc import Orthanc
from tests.kit.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]
STABLE_SECONDS = 1.0
BURST_ASSOCIATIONS = 4
POLL_S = 0.005  # latency: one study at a time, a core to spare
BURST_POLL_S = 0.05  # throughput: every core busy (see the module's note)
RESULT_TIMEOUT_S = 300.0
STAGES = ("seal_queue", "wait", "analysis", "delivery")
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def deployment_settings(folder: Path, concurrency: int, redis_url: str, orthanc: Orthanc) -> dict:
    return {
        "log_level": "INFO",
        "node": {"port": free_port(), "bind_address": "127.0.0.1"},
        "spool": {"dir": str(folder / "spool"), "stable_seconds": STABLE_SECONDS, "min_free_bytes": 0},
        "broker": {"url": redis_url, "result_backend": redis_url},
        "worker": {"concurrency": concurrency, "outbox_dir": str(folder / "outbox")},
        "store": {"url": f"sqlite:///{folder}/outcomes.db"},
        "audit": {"path": str(folder / "audit.jsonl")},
        "destinations": [
            {"name": "orthanc", "kind": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
        ],
    }


class Stack(Deployment):
    """Redis and Orthanc of their own, then ``lungvision node``, ``worker`` and (with ``deliverer``)
    ``deliverer`` from the checkout ``repo`` in ``folder`` with Orthanc as the destination."""

    def __init__(self, folder: Path, concurrency: int, repo: Path, deliverer: bool) -> None:
        self.redis = RedisServer(folder / "redis").start()
        self.orthanc = Orthanc(folder / "orthanc", free_port(), free_port(), environment={"TCP_NODELAY": "1"}).start()
        settings = deployment_settings(folder, concurrency, self.redis.url, self.orthanc)
        super().__init__(folder, settings, repo, deliverer=deliverer)
        self.wait_until_ready()

    def results_in_orthanc(self) -> int:
        return int(self.orthanc.get("/statistics")["CountInstances"])

    def wait_for_results(self, count: int, poll_s: float = POLL_S) -> float:
        """Poll Orthanc every ``poll_s`` until it holds ``count`` instances; the wall-clock time it first did."""
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        while self.results_in_orthanc() < count:
            if time.monotonic() > deadline:
                self.check_alive()
                raise RuntimeError(
                    f"Orthanc holds {self.results_in_orthanc()} of {count} instances; worker log:\n"
                    f"{self.log('worker')[-3000:]}"
                )
            time.sleep(poll_s)
        return time.time()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds each process has used so far, by role; ``storescu``: this bench's finished children."""
        own = {
            "node": self.node.pid,
            "worker": self.worker.pid,
            "Orthanc": self.orthanc.process.pid,
            "Redis": self.redis.process.pid,
        }
        if self.deliverer is not None:
            own["deliverer"] = self.deliverer.pid
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {role: cpu_seconds(pid) for role, pid in own.items()} | {
            "storescu": children.ru_utime + children.ru_stime
        }

    def stop(self) -> None:
        super().stop()
        self.orthanc.stop()
        self.redis.stop()


def log_times(log: str, message_id: str) -> dict[str, float]:
    """POSIX times of the worker's log lines about ``message_id``: task received, analysis recorded."""
    patterns = {"received": f"analyse_study[{message_id}] received", "analysed": f"study round {message_id} analysed"}
    found = {}
    for line in log.splitlines():
        for name, text in patterns.items():
            match = LOG_TIME.match(line)
            if name not in found and text in line and match:
                found[name] = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return found


def round_dir(stack: Stack, study_uid: str) -> Path:
    return Path(stack.settings["spool"]["dir"]) / "studies" / study_uid / "rounds" / "0001"


def last_arrival(stack: Stack, study_uid: str) -> float:
    """POSIX time of the study's last instance's arrival (its arrival records in the spool)."""
    return max(
        json.loads(path.read_text())["received_at"]
        for path in round_dir(stack, study_uid).glob("*.json")
        if path.name not in ("message.json", "queued.json")
    )


def study_uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def stages(stack: Stack, study_uid: str, seen: float) -> dict[str, float]:
    """Seconds per stage of one study's single round (see the module's note)."""
    queued = json.loads((round_dir(stack, study_uid) / "queued.json").read_text())
    times = log_times(stack.log("worker"), queued["task_id"])
    marks = [
        last_arrival(stack, study_uid) + STABLE_SECONDS,
        datetime.fromisoformat(queued["queued_at"]).timestamp(),
        times.get("received"),
        times.get("analysed"),
        seen,
    ]
    if None in marks:
        raise RuntimeError(f"missing log lines for {queued['task_id']}: {times}")
    return {name: end - start for name, start, end in zip(STAGES, marks, marks[1:])}


def latency(stack: Stack, studies: list[Path]) -> list[dict[str, float]]:
    """Send the studies one at a time; per study its latency and stages (seconds)."""
    rows = []
    for path in studies:
        before = stack.results_in_orthanc()
        sent = stack.send([path])
        seen = stack.wait_for_results(before + 2)  # its SC and SR
        rows.append({"latency": seen - sent - STABLE_SECONDS, **stages(stack, study_uid_of(path), seen)})
    return rows


def throughput(stack: Stack, studies: list[Path]) -> tuple[float, dict[str, float]]:
    """Studies/s of a burst: from the end of the first study's quiet period to the last study's results;
    and the CPU ms each process took per study (from the start of sending to the last results)."""
    before = stack.results_in_orthanc()
    cpu_before = stack.cpu_seconds()
    parts = [studies[index::BURST_ASSOCIATIONS] for index in range(BURST_ASSOCIATIONS)]
    with ThreadPoolExecutor(BURST_ASSOCIATIONS) as pool:
        list(pool.map(stack.send, parts))
    done = stack.wait_for_results(before + 2 * len(studies), BURST_POLL_S)
    cpu = {role: (seconds - cpu_before[role]) * 1000 / len(studies) for role, seconds in stack.cpu_seconds().items()}
    first_quiet_end = min(last_arrival(stack, study_uid_of(path)) for path in studies) + STABLE_SECONDS
    return len(studies) / (done - first_quiet_end), cpu


def summary(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def measure(
    repo: Path, deliverer: bool, concurrency: int, latency_studies: list[Path], burst: list[Path], folder: Path
) -> dict:
    stack = Stack(folder, concurrency, repo, deliverer)
    try:
        latency(stack, latency_studies[:2])  # each pool process's first study, not counted
        rows = latency(stack, latency_studies[2:])
        studies_per_s, cpu_ms = throughput(stack, burst)
    finally:
        stack.stop()
    return {"rows": rows, "studies_per_s": studies_per_s, "cpu_ms": cpu_ms}


def print_result(label: str, concurrency: int, result: dict) -> None:
    print(f"\n{label}, worker concurrency {concurrency}: {len(result['rows'])} studies one at a time, then a burst")
    print(f"  {'stage':<12} | {'median ms':>9} | {'p95 ms':>7}")
    for name in ("latency", *STAGES):
        median, p95 = summary([row[name] for row in result["rows"]])
        print(f"  {name:<12} | {median * 1000:>9.1f} | {p95 * 1000:>7.1f}")
    print(f"  burst: {result['studies_per_s']:.2f} studies/s")
    cpu = result["cpu_ms"]
    shares = ", ".join(f"{role} {ms:.0f}" for role, ms in sorted(cpu.items(), key=lambda item: -item[1]))
    print(f"  burst CPU ms per study: {shares}; all {sum(cpu.values()):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20, help="studies sent one at a time (after 2 not counted)")
    parser.add_argument("--burst", type=int, default=30, help="studies sent at once")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to measure as the peer")
    parser.add_argument("--baseline-deliverer", action="store_true", help="run the baseline with a deliverer too")
    parser.add_argument("--worker-delivers", action="store_true", help="also measure without a deliverer")
    parser.add_argument("--rounds", type=int, default=1, help="measure every run this many times, alternating")
    arguments = parser.parse_args()
    runs = [("current", REPO, True)]  # (label, checkout, with a deliverer); the current tree last
    if arguments.worker_delivers:
        runs.insert(0, ("worker delivers", REPO, False))
    if arguments.baseline is not None:
        runs.insert(0, ("baseline", arguments.baseline, arguments.baseline_deliverer))
    with tempfile.TemporaryDirectory(prefix="lv-e2e-") as temporary:
        root = Path(temporary)
        (root / "latency").mkdir()
        (root / "burst").mkdir()
        latency_studies = make_studies(root / "latency", arguments.studies + 2)
        burst = make_studies(root / "burst", arguments.burst)
        for concurrency in arguments.concurrency:
            results: dict[str, list[dict]] = {label: [] for label, _, _ in runs}
            for round_number in range(arguments.rounds):
                for label, repo, deliverer in runs if round_number % 2 == 0 else runs[::-1]:
                    folder = root / f"{label.replace(' ', '-')}-concurrency-{concurrency}-round-{round_number}"
                    folder.mkdir()
                    result = measure(repo.resolve(), deliverer, concurrency, latency_studies, burst, folder)
                    results[label].append(result)
                    print_result(f"{label} ({repo.resolve()})", concurrency, result)
            print_comparison(concurrency, results)


def print_comparison(concurrency: int, results: dict[str, list[dict]]) -> None:
    """The current tree's latency p95 and studies/s against every other run's, round by round; with more
    than one round also each run's median studies/s."""
    now = results["current"]
    if len(now) > 1:
        medians = ", ".join(
            f"{label} {statistics.median(result['studies_per_s'] for result in rounds):.2f}"
            for label, rounds in results.items()
        )
        print(f"\nconcurrency {concurrency}: median studies/s over {len(now)} rounds: {medians}")
    for label, before in results.items():
        if label == "current":
            continue
        p95 = [
            summary([row["latency"] for row in mine["rows"]])[1]
            / summary([row["latency"] for row in theirs["rows"]])[1]
            for mine, theirs in zip(now, before)
        ]
        speed = [mine["studies_per_s"] / theirs["studies_per_s"] for mine, theirs in zip(now, before)]
        print(
            f"concurrency {concurrency}: latency p95 {', '.join(f'{ratio:.2f}' for ratio in p95)}× the {label} "
            f"run's, studies/s {', '.join(f'{ratio:.2f}' for ratio in speed)}× (round by round)"
        )


if __name__ == "__main__":
    main()
