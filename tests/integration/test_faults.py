"""Faults with real components: every study the node accepted ends in exactly one visible outcome, and
Orthanc (the PACS) holds every result exactly once — after a SIGKILL of `lungvision serve` (embedded
SQLite broker) while it analyses, a Redis restarted without persistence while a study is queued, an
exception inside the analysis, and a burst on a fresh store with two worker processes.

Each test prints one ``FAULT`` line (scenario, studies sent / delivered / lost / duplicated, time to
recovery); ``pytest -s`` shows them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from common.ports import free_port, wait_until_listening
from common.results import StudyStatus
from common.store import Store
from inference.sample_dicom import wrap_image, write_dataset
from tests.kit.data import REPO, chest_pixels
from tests.kit.dcmtk import dcmtk
from tests.kit.dicom_checks import COMPREHENSIVE_SR_CLASS, SC_CLASS
from tests.kit.node import NodeProcess, QueueReader, node_settings
from tests.kit.orthanc import Orthanc
from tests.kit.redis_server import RedisServer
from tests.kit.wait import wait_until
from tests.kit.worker import WorkerProcess, worker_sections

pytestmark = pytest.mark.integration
RESULT_TIMEOUT_S = 240.0
LEGACY_DEAD_LETTER_KEY = "lungvision:faults:dead"
FAST = {"requeue_after_s": 4, "reconcile_interval_s": 1, "unacked_restore_interval_s": 1}  # worker settings


def report(scenario: str, sent: int, delivered: int, duplicated: int, recovery_s: float) -> None:
    print(
        f"\nFAULT | {scenario} | sent {sent} | delivered {delivered} | lost {sent - delivered} | "
        f"duplicated {duplicated} | recovery {recovery_s:.1f} s"
    )


def chest_study(folder: Path, name: str, count: int = 1) -> list[Path]:
    study_uid = generate_uid()
    return [
        write_dataset(wrap_image(chest_pixels(index), study_uid=study_uid), folder / f"{name}-{index}.dcm")
        for index in range(count)
    ]


def study_uid_of(paths: list[Path]) -> str:
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def storescu(port: int, paths: list[Path], calling_ae: str = "MODALITY1") -> None:
    result = subprocess.run(
        [dcmtk("storescu"), "-aet", calling_ae, "-aec", "LUNGVISION", "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


def result_counts(orthanc: Orthanc, study_uid: str) -> tuple[int, int]:
    """(Secondary Captures, SRs) Orthanc holds in the study."""
    classes = [instance["SOPClassUID"] for instance in orthanc.study_instances(study_uid)]
    return classes.count(SC_CLASS), classes.count(COMPREHENSIVE_SR_CLASS)


def wait_for_results(orthanc: Orthanc, expected: dict[str, int], timeout_s: float = RESULT_TIMEOUT_S) -> float:
    """Wait until every study holds one SC and one SR per source image; returns when (monotonic)."""
    missing = dict(expected)

    def complete() -> bool:
        nonlocal missing
        missing = {uid: n for uid, n in missing.items() if result_counts(orthanc, uid) != (n, n)}
        return not missing

    def counts() -> str:
        held = {uid: result_counts(orthanc, uid) for uid in missing}
        return f"one SC and one SR per image; (SC, SR) held now {held}"

    wait_until(complete, timeout_s, interval_s=0.5, message=counts)
    return time.monotonic()


def delivered_and_duplicated(orthanc: Orthanc, expected: dict[str, int]) -> tuple[int, int]:
    """Studies whose results are all in Orthanc, and result objects beyond one SC + one SR per image."""
    counts = {uid: result_counts(orthanc, uid) for uid in expected}
    delivered = sum(1 for uid, n in expected.items() if min(counts[uid]) >= n)
    duplicated = sum(max(0, sc - n) + max(0, sr - n) for (sc, sr), n in zip(counts.values(), expected.values()))
    return delivered, duplicated


def wait_for_status(store: Store, study_uids: set[str], statuses: set[str], timeout_s: float = 60.0) -> dict:
    """Wait until every study's (only) round has one of ``statuses``; returns study UID → row."""
    rows: dict = {}

    def settled() -> bool:
        nonlocal rows
        rows = {uid: store.study_results(uid) for uid in study_uids}
        return all(len(found) == 1 and found[0].status in statuses for found in rows.values())

    def rounds() -> str:
        found = {uid: [(row.round, row.status) for row in results] for uid, results in rows.items()}
        return f"one round per study, status in {statuses}; (round, status) now {found}"

    wait_until(settled, timeout_s, interval_s=0.5, message=rounds)
    return {uid: found[0] for uid, found in rows.items()}


def audit_events(path: Path, event: str) -> list[dict]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == event] if path.exists() else []


# --- SIGKILL of `lungvision serve` on the embedded SQLite broker ----------------------------------


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except FileNotFoundError:  # ended while we listed: not part of any tree any more
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2 :].split()[0] == "Z"


class Serve:
    """``lungvision serve`` in a folder of its own, sending results to Orthanc."""

    def __init__(self, folder: Path, orthanc: Orthanc) -> None:
        self.folder, self.port = folder, free_port()
        self.log_path = folder / "serve.log"
        self.environment = {
            **os.environ,
            "LUNGVISION_NODE__PORT": str(self.port),
            "LUNGVISION_NODE__BIND_ADDRESS": "127.0.0.1",
            "LUNGVISION_SPOOL__STABLE_SECONDS": "1",
            "LUNGVISION_SPOOL__MIN_FREE_BYTES": "0",
            "LUNGVISION_WEB__PORT": str(free_port()),
            "LUNGVISION_DESTINATIONS": json.dumps(
                [{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}]
            ),
            **{f"LUNGVISION_WORKER__{key.upper()}": str(value) for key, value in FAST.items()},
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> "Serve":
        ready_before = self.log().count("ready.")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lungvision", "serve"],
                cwd=self.folder,
                env=self.environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until_listening(self.port, self.process, timeout_s=120)

        def ready() -> bool:
            assert self.process.poll() is None, self.log()[-3000:]
            return self.log().count("ready.") > ready_before

        wait_until(ready, timeout_s=120, interval_s=0.3, message=lambda: f"worker ready; log:\n{self.log()[-3000:]}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill_everything(self) -> None:
        """SIGKILL serve and all its descendants at the same moment, as a power cut would."""
        tree = process_tree(self.process.pid)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended by itself in the meantime
                continue
        self.process.wait(timeout=30)
        wait_until(lambda: all(gone(pid) for pid in tree), timeout_s=30, message="every process of serve's tree gone")

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=180)


def test_sigkill_of_serve_while_analysing_loses_and_duplicates_nothing(tmp_path) -> None:
    """Issue 10, item 1: the embedded broker keeps the message a killed worker had taken invisible for
    good; after the restart the sweeper sends the round again, and every result arrives once."""
    orthanc = Orthanc(tmp_path / "orthanc", free_port(), free_port()).start()
    serve = Serve(tmp_path / "site", orthanc)
    serve.folder.mkdir()
    try:
        serve.start()
        big, small = chest_study(tmp_path, "big", count=10), chest_study(tmp_path, "small")
        expected = {study_uid_of(big): 10, study_uid_of(small): 1}
        storescu(serve.port, big + small)
        audit = serve.folder / "var" / "audit.jsonl"
        wait_until(
            lambda: any(e["study_uid"] == study_uid_of(big) for e in audit_events(audit, "analysing")),
            timeout_s=120,
            interval_s=0.1,
            message=lambda: f"the big study analysing; log:\n{serve.log()[-3000:]}",
        )
        serve.kill_everything()
        before = result_counts(orthanc, study_uid_of(big))
        assert before != (10, 10), "the big study was complete before the kill: nothing was tested"

        restarted = time.monotonic()
        serve.start()
        recovered = wait_for_results(orthanc, expected)
        rows = wait_for_status(
            Store(f"sqlite:///{serve.folder}/var/lungvision.db"), set(expected), {StudyStatus.DELIVERED}
        )
        time.sleep(3)  # a (wrong) duplicate delivery would land now
        delivered, duplicated = delivered_and_duplicated(orthanc, expected)
        assert (delivered, duplicated) == (2, 0)
        assert any(e["message_id"] == rows[study_uid_of(big)].message_id for e in audit_events(audit, "requeued"))
        report(
            "SIGKILL serve while analysing (SQLite broker), restart",
            len(expected),
            delivered,
            duplicated,
            recovered - restarted,
        )
        assert serve.terminate() == 0
    finally:
        if serve.process is not None and serve.process.poll() is None:
            serve.kill_everything()
        orthanc.stop()


# --- node + Redis of our own + worker -------------------------------------------------------------


class Deployment:
    """Orthanc (the PACS), a Redis of our own, the node and a worker (not started: each test starts it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.redis = RedisServer(folder / "redis")
        self.orthanc = Orthanc(folder / "orthanc", free_port(), free_port())
        self.settings = node_settings(folder, self.redis.url, spool={"stable_seconds": 1})
        sections = worker_sections(
            folder, visibility_timeout_s=60, dead_letter_key=LEGACY_DEAD_LETTER_KEY, max_attempts=2
        )
        sections["worker"].update({"concurrency": 2, **FAST})
        sections["delivery"].update({"retry_base_delay_s": 1, "retry_max_delay_s": 2})
        self.settings.update(
            {
                "broker": {"url": self.redis.url, "result_backend": self.redis.url},
                **sections,
                "destinations": [
                    {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": self.orthanc.dicom_port},
                    {
                        "name": "nowhere",
                        "ae_title": "NOWHERE",
                        "host": "127.0.0.1",
                        "port": free_port(),
                    },  # nobody listens
                ],
                "routing": [{"destinations": ["orthanc"]}, {"calling_ae": "TO_NOWHERE", "destinations": ["nowhere"]}],
            }
        )
        self.node = NodeProcess(folder, self.settings)
        self.worker = WorkerProcess(self.node.config_path, folder / "worker.log")
        self.store_path = folder / "outcomes.db"
        self.audit_path = Path(self.settings["audit"]["path"])

    def store(self) -> Store:
        return Store(f"sqlite:///{self.store_path}")

    def jobs(self, *arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lungvision", "--config", str(self.node.config_path), "jobs", *arguments],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )

    def queued_rounds(self, study_uid: str) -> list[Path]:
        return sorted((self.node.spool / "studies" / study_uid / "rounds").glob("*/queued.json"))

    def wait_until_queued(self, study_uid: str, timeout_s: float = 60.0) -> None:
        wait_until(
            lambda: self.queued_rounds(study_uid),
            timeout_s,
            message=lambda: f"a queued round of the study; node log:\n{self.node.log_tail()}",
        )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    system = Deployment(tmp_path_factory.mktemp("faults"))
    system.redis.start()
    legacy = {
        "id": "legacy0001",
        "job": {"message_id": "m-legacy", "study_instance_uid": "1.2.3", "destination": "orthanc", "files": []},
        "error": "association rejected",
        "attempts": 5,
        "failed_at": "2026-01-01T00:00:00+00:00",
    }
    system.redis.client().hset(LEGACY_DEAD_LETTER_KEY, "legacy0001", json.dumps(legacy))  # as older versions kept it
    system.orthanc.start()
    system.node.start()
    yield system
    system.worker.stop()
    system.node.stop()
    system.orthanc.stop()
    system.redis.stop()


def test_a_burst_on_a_fresh_store_with_two_worker_processes_is_delivered_completely(deployment, tmp_path) -> None:
    """Issue 10, item 9: the store's tables are created once, before the pool forks."""
    assert not deployment.store_path.exists()
    deployment.worker.start()
    try:
        studies = [chest_study(tmp_path, f"burst{index}") for index in range(16)]
        expected = {study_uid_of(paths): 1 for paths in studies}
        sent = time.monotonic()
        storescu(deployment.node.port, [path for paths in studies for path in paths])
        done = wait_for_results(deployment.orthanc, expected)
        wait_for_status(deployment.store(), set(expected), {StudyStatus.DELIVERED})
        time.sleep(3)
        delivered, duplicated = delivered_and_duplicated(deployment.orthanc, expected)
        assert (delivered, duplicated) == (16, 0)
        assert "already exists" not in deployment.worker.log()
        requeued = [e for e in audit_events(deployment.audit_path, "requeued") if e["study_uid"] in expected]
        report(
            f"burst, fresh store, concurrency 2 ({len(requeued)} re-sent while queued, skipped)",
            len(expected),
            delivered,
            duplicated,
            done - sent,
        )
    finally:
        deployment.worker.stop()


def test_a_redis_restart_loses_no_queued_study_and_no_dead_letter(deployment, tmp_path) -> None:
    """Issue 10, item 2: the sweeper sends the lost round again; dead letters live in the store."""
    deployment.worker.start()
    try:
        nowhere = chest_study(tmp_path, "nowhere")
        storescu(deployment.node.port, nowhere, calling_ae="TO_NOWHERE")

        def failed_jobs() -> str:
            listing = deployment.jobs("failed").stdout
            return listing if "nowhere" in listing else ""

        listing = wait_until(
            failed_jobs,
            RESULT_TIMEOUT_S,
            interval_s=1,
            message="the dead letter of the study sent nowhere in `lungvision jobs failed`",
        )
        assert "nowhere" in listing and "legacy0001" in listing, listing  # the old Redis hash was moved in
    finally:
        deployment.worker.stop()

    queued = chest_study(tmp_path, "queued", count=2)
    study_uid = study_uid_of(queued)
    storescu(deployment.node.port, queued)
    deployment.wait_until_queued(study_uid)
    assert QueueReader(deployment.redis.client()).for_studies({study_uid})  # in Redis, waiting for a worker

    deployment.redis.stop()
    deployment.redis.start()
    assert deployment.redis.client().dbsize() == 0  # the queue is gone
    listing = deployment.jobs("failed").stdout
    assert "nowhere" in listing and "legacy0001" in listing, listing  # not "no failed jobs"

    started = time.monotonic()
    deployment.worker.start()
    try:
        recovered = wait_for_results(deployment.orthanc, {study_uid: 2})
        [row] = wait_for_status(deployment.store(), {study_uid}, {StudyStatus.DELIVERED}).values()
        assert any(e["message_id"] == row.message_id for e in audit_events(deployment.audit_path, "requeued"))
        time.sleep(3)
        delivered, duplicated = delivered_and_duplicated(deployment.orthanc, {study_uid: 2})
        assert (delivered, duplicated) == (1, 0)
        report(
            "Redis restarted (no persistence) while a study was queued; worker started after",
            1,
            delivered,
            duplicated,
            recovered - started,
        )

        letter_id = next(line.split()[0] for line in listing.splitlines() if "  nowhere  " in line)
        replay = deployment.jobs("retry", letter_id)  # still replayable after the restart
        assert replay.returncode == 0, replay.stderr
    finally:
        deployment.worker.stop()


def cut_in_pixel_data_header(path: Path) -> bytes:
    """The file's bytes up to the middle of the Pixel Data element's length field: pydicom's parser then
    raises struct.error (a file cut elsewhere is mostly read as "no Pixel Data": not analysed)."""
    data = path.read_bytes()
    implicit = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_implicit_VR
    tag = data.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010), little endian
    return data[: tag + (6 if implicit else 10)]  # tag, [VR, reserved,] then 2 of the 4 length bytes


def test_an_exception_inside_the_analysis_is_failed_audited_and_replayable(deployment, tmp_path) -> None:
    """Issue 10, item 3: a spooled file cut short makes pydicom's parser raise struct.error."""
    paths = chest_study(tmp_path, "corrupt", count=2)
    study_uid = study_uid_of(paths)
    storescu(deployment.node.port, paths)
    deployment.wait_until_queued(study_uid)
    spooled = deployment.node.spooled(study_uid)[0]
    intact = spooled.read_bytes()
    spooled.write_bytes(cut_in_pixel_data_header(spooled))  # what a disk fault might leave

    started = time.monotonic()
    deployment.worker.start()
    try:
        [row] = wait_for_status(deployment.store(), {study_uid}, {StudyStatus.FAILED}).values()
        failed_after = time.monotonic() - started
        reason = row.images[0].error
        assert reason.startswith("struct.error in "), reason
        [event] = [e for e in audit_events(deployment.audit_path, "failed") if e.get("message_id") == row.message_id]
        assert (event["stage"], event["final"], event["outcome"]) == ("analysis", True, reason)
        logs = deployment.worker.log() + deployment.audit_path.read_text()
        assert "Secretname" not in logs and "PID-SECRET" not in logs
        listing = deployment.jobs("failed").stdout
        [line] = [line for line in listing.splitlines() if row.message_id in line]
        assert "(analysis)" in line, listing

        spooled.write_bytes(intact)  # the fault is repaired; the operator replays the round
        replayed = time.monotonic()
        assert deployment.jobs("retry", line.split()[0]).returncode == 0
        recovered = wait_for_results(deployment.orthanc, {study_uid: 2})
        wait_for_status(deployment.store(), {study_uid}, {StudyStatus.DELIVERED})
        delivered, duplicated = delivered_and_duplicated(deployment.orthanc, {study_uid: 2})
        assert (delivered, duplicated) == (1, 0)
        report(
            f"exception in the analysis (truncated spool file): failed + dead letter after {failed_after:.1f} s; "
            f"replayed",
            1,
            delivered,
            duplicated,
            recovered - replayed,
        )
    finally:
        deployment.worker.stop()
