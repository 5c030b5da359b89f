"""Load before fork: a real ``lungvision worker`` (embedded SQLite broker, one or two pool processes) loads the
model in its parent; each pool process finds it already loaded before its first task, and analyses studies.
Parent and pool processes run torch on one thread (worker/preload.py), so no process forks or needs an
OpenMP thread pool (one forked from a parent that had started one would hang in its first forward pass)."""

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from pydicom.uid import generate_uid

from common.results import FINAL_STATUSES, StudyStatus
from common.store import Store
from dicom_node.enqueue import CeleryEnqueuer
from inference.sample_dicom import wrap_image, write_dataset
from tests.kit.data import chest_pixels
from tests.kit.wait import wait_until
from tests.kit.worker import WorkerProcess, make_message, worker_sections

pytestmark = pytest.mark.integration
INHERITED = "inherited from the parent (loaded before the fork)"
WARMED_UP = "warm-up study analysed and encoded before the fork"
SLOW_MACHINE_TIMEOUT_S = 900.0  # torch alone takes a minute to import on a busy two-core machine


def worker_config(folder: Path, concurrency: int) -> Path:
    settings = worker_sections(
        folder, visibility_timeout_s=600, dead_letter_key="lungvision:preload:dead", max_attempts=1
    )
    settings["worker"]["concurrency"] = concurrency
    settings["broker"] = {
        "url": f"sqla+sqlite:///{folder}/broker.sqlite",
        "result_backend": f"db+sqlite:///{folder}/results.sqlite",
    }
    settings["spool"] = {"dir": str(folder / "spool")}
    config = folder / "lungvision.yaml"
    config.write_text(yaml.safe_dump(settings))
    return config


def wait_for_final(store: Store, message_ids: list[str]) -> dict[str, StudyStatus]:
    rows: dict = {}

    def finished() -> bool:
        nonlocal rows
        rows = {message_id: store.result(message_id) for message_id in message_ids}
        return all(row is not None and row.status in FINAL_STATUSES for row in rows.values())

    wait_until(finished, SLOW_MACHINE_TIMEOUT_S, interval_s=0.5, message=lambda: f"every study finished: {rows}")
    return {message_id: row.status for message_id, row in rows.items()}


def successful_tasks_in_result_backend(path: Path) -> int:
    """Rows of successful tasks in Celery's SQLite result backend (none while it has no table yet)."""
    if not path.exists():
        return 0
    with closing(sqlite3.connect(path)) as connection:
        if not connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'celery_taskmeta'").fetchall():
            return 0
        return connection.execute("SELECT COUNT(*) FROM celery_taskmeta WHERE status = 'SUCCESS'").fetchone()[0]


@pytest.mark.parametrize("concurrency", [1, 2])
def test_pool_processes_have_the_model_before_their_first_task_and_analyse(tmp_path: Path, concurrency: int) -> None:
    config = worker_config(tmp_path, concurrency)
    worker = WorkerProcess(config, tmp_path / "worker.log").start(timeout_s=SLOW_MACHINE_TIMEOUT_S)
    try:
        worker.wait_for_log(INHERITED, count=concurrency, timeout_s=SLOW_MACHINE_TIMEOUT_S)
        worker.wait_for_log(WARMED_UP, count=concurrency, timeout_s=1)  # in the parent, before the pool forked
        round_dir = tmp_path / "round"
        round_dir.mkdir()
        messages = [
            make_message(
                [
                    write_dataset(
                        wrap_image(chest_pixels(index), study_uid=generate_uid()), round_dir / f"study-{index}.dcm"
                    )
                ]
            )
            for index in range(2)
        ]
        enqueuer = CeleryEnqueuer(yaml.safe_load(config.read_text())["broker"]["url"])
        for message in messages:
            enqueuer.send(message)
        enqueuer.close()
        statuses = wait_for_final(Store(f"sqlite:///{tmp_path}/outcomes.db"), [m.message_id for m in messages])
    finally:
        worker.stop()

    assert set(statuses.values()) == {StudyStatus.ANALYSED}
    assert successful_tasks_in_result_backend(tmp_path / "results.sqlite") == 0  # the worker has stopped: all written
    log = worker.log()
    assert "not inherited" not in log
    first_analysis = log.index(" analysed: ")
    assert log.count(INHERITED, 0, first_analysis) == concurrency  # every pool process had it before any task ran
