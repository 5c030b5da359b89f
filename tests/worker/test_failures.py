"""The exception boundaries (in-process worker, embedded broker): whatever the analysis raises, the round
ends as failed with a reason free of patient data, an audit event and a dead letter that replays it;
whatever sending raises, the delivery is dead-lettered."""

import json
from dataclasses import asdict

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from common import audit
from common.dead_letters import ANALYSIS_STAGE, AnalysisJob, DeadLetters, DeliveryJob
from common.publisher import Publisher
from common.results import DeliveryStatus, StudyStatus
from tests.kit.worker import embedded_settings, make_message
from worker.record import MODEL_UNAVAILABLE, Model

SECRET = "Secretname^Patient"  # what an exception message might quote from a DICOM header


@pytest.fixture
def worker(tmp_path):
    """The worker's task module on an embedded broker and store in ``tmp_path``."""
    from worker import celery_app, tasks

    settings = embedded_settings(
        tmp_path, destinations=[{"name": "files", "kind": "folder", "path": str(tmp_path / "out")}]
    )
    celery_app.configure(settings)
    tasks.store.cache_clear()
    yield tasks
    audit.configure(None)
    tasks.store.cache_clear()


def events(tasks, kind: str) -> list[dict]:
    lines = tasks.current_settings().audit.path.read_text().splitlines()
    return [event for event in map(json.loads, lines) if event["event"] == kind]


def analyse(tasks, message) -> dict:
    return tasks.analyse_study_task.apply(args=[message.model_dump(mode="json")]).get()


def dead_letters(tasks) -> DeadLetters:
    return DeadLetters(tasks.store())


def test_any_exception_in_the_analysis_ends_the_round_as_failed_and_replayable(
    worker, study_files, monkeypatch
) -> None:
    def explode(*_args, **_kwargs):
        raise ValueError(f"bad element value {SECRET!r}")

    message = make_message([study_files["frontal"]])
    monkeypatch.setattr(worker, "analyse_study", explode)
    answer = analyse(worker, message)

    assert answer["failed"] is True
    row = worker.store().result(message.message_id)
    reason = row.images[0].error
    assert row.status == StudyStatus.FAILED and reason.startswith("ValueError in worker/test_failures.py:")
    assert "(explode)" in reason and SECRET not in reason
    [event] = events(worker, "failed")
    assert (event["stage"], event["final"], event["outcome"]) == ("analysis", True, reason)
    assert SECRET not in worker.current_settings().audit.path.read_text()
    [letter] = dead_letters(worker).list()
    assert letter.id == event["dead_letter"] and isinstance(letter.job, AnalysisJob)
    assert (letter.job.destination, letter.job.message_id) == (ANALYSIS_STAGE, message.message_id)
    assert analyse(worker, message)["skipped"] is True  # a redelivered copy: failed is a final outcome

    monkeypatch.undo()  # the bug is fixed; the operator replays the dead letter
    publisher = Publisher(worker.current_settings().broker.url)
    assert dead_letters(worker).replay(letter.id, publisher) is not None
    publisher.close()
    assert worker.store().result(message.message_id).status == StudyStatus.REQUEUED
    assert dead_letters(worker).list() == []
    assert events(worker, "replayed")[0]["outcome"] == "queued for analysis"
    answer = analyse(worker, message)  # what the worker does with the replayed message
    assert answer["destinations"] == ["files"]
    assert worker.store().result(message.message_id).status == StudyStatus.ANALYSED


def test_the_soft_time_limit_and_a_model_that_cannot_load_are_failures_too(worker, study_files, monkeypatch) -> None:
    def too_slow(*_args, **_kwargs):
        raise SoftTimeLimitExceeded()

    slow = make_message([study_files["frontal"]])
    monkeypatch.setattr(worker, "analyse_study", too_slow)
    analyse(worker, slow)
    assert worker.store().result(slow.message_id).images[0].error == "analysis took longer than 300 s"

    def no_weights(*_args, **_kwargs):
        raise FileNotFoundError(2, "No such file or directory", "/weights/model.safetensors")

    broken = make_message([study_files["lateral"]])
    monkeypatch.setattr(worker, "load_model", no_weights)
    analyse(worker, broken)
    row = worker.store().result(broken.message_id)
    assert row.status == StudyStatus.FAILED and row.model_version == MODEL_UNAVAILABLE
    assert row.images[0].error.endswith("(no_weights): No such file or directory")
    assert len(dead_letters(worker).list()) == 2


def test_a_failure_never_overwrites_an_outcome_another_attempt_recorded(worker, study_files) -> None:
    message = make_message([study_files["lateral"]])
    analyse(worker, message)
    outcome = worker.store().result(message.message_id).status
    answer = worker.analysis_failed(message, Model.of(None), "a late failure of a duplicate attempt")
    assert answer["skipped"] is True and worker.store().result(message.message_id).status == outcome
    assert dead_letters(worker).list() == []


def test_an_unexpected_exception_while_sending_dead_letters_the_delivery(worker, monkeypatch) -> None:
    def broken_send(*_args, **_kwargs):
        raise ValueError(f"cannot encode {SECRET!r}")

    from worker import result_tasks

    monkeypatch.setattr(result_tasks, "send_files", broken_send)
    job = DeliveryJob("m1", "1.2.3", "files", ["/outbox/1.2.3/1.2.3.4.dcm"])
    worker.store().update_delivery("m1", "files", status=DeliveryStatus.PENDING, attempts=0)
    assert result_tasks.deliver_task.apply(args=[asdict(job)]).get() == "failed"  # no retry: the same would fail
    [letter] = dead_letters(worker).list()
    assert letter.job == job and letter.error.startswith("ValueError in worker/test_failures.py:")
    assert SECRET not in letter.error and SECRET not in worker.current_settings().audit.path.read_text()
    [delivery] = worker.store().deliveries("m1")
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.FAILED, 1)


def test_an_outbox_file_without_file_meta_dead_letters_its_delivery_naming_the_file(worker, tmp_path) -> None:
    from pydicom import Dataset
    from pynetdicom.dsutils import encode

    from worker import celery_app, result_tasks

    bare = tmp_path / "outbox" / "1.2.3" / "1.2.3.4.dcm"
    bare.parent.mkdir(parents=True)
    dataset = Dataset()
    dataset.PatientName = SECRET
    bare.write_bytes(encode(dataset, False, True))  # the data set alone: no preamble, no "DICM", no file meta
    pacs = {"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}  # never reached
    celery_app.configure(embedded_settings(tmp_path, destinations=[pacs]))
    job = DeliveryJob("m1", "1.2.3", "pacs", [str(bare)])
    worker.store().update_delivery("m1", "pacs", status=DeliveryStatus.PENDING, attempts=0)
    assert result_tasks.deliver_task.apply(args=[asdict(job)]).get() == "failed"  # no retry: the file stays as it is
    [letter] = dead_letters(worker).list()
    assert letter.error == f"{bare} cannot be sent: its file meta information lacks the DICM prefix"
    assert SECRET not in worker.current_settings().audit.path.read_text()
