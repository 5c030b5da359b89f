"""The analysis task end to end (eager, embedded broker): shadow mode keeps results out of PACS and
RIS; a study the intended-use gate refuses is recorded as outside the intended use and still gets
its explicit results."""

import json

import pytest

from common import audit
from common.results import Finding, StudyStatus
from tests.kit.worker import embedded_settings, make_message


@pytest.fixture
def run_task(tmp_path):
    """Run the analysis task on files with the given delivery settings; returns (result, settings)."""
    from worker import celery_app, tasks

    def run(paths, model: dict | None = None, **delivery):
        settings = embedded_settings(
            tmp_path,
            model=model or {},
            destinations=[{"name": "files", "kind": "folder", "path": str(tmp_path / "out")}],
            hl7={"endpoints": [{"name": "ris", "host": "127.0.0.1", "port": 9}]},
            delivery=delivery,
        )
        celery_app.configure(settings)
        tasks.store.cache_clear()
        message = make_message(paths)
        answer = tasks.analyse_study_task.apply(args=[message.model_dump(mode="json")]).get()
        return answer, tasks.store().result(message.message_id), settings

    yield run
    audit.configure(None)

    tasks.store.cache_clear()


def analysed_event(settings) -> dict:
    events = [json.loads(line) for line in settings.audit.path.read_text().splitlines()]
    return next(event for event in events if event["event"] == "analysed")


def test_shadow_mode_sends_nothing_but_records_everything(study_files, run_task) -> None:
    answer, result, settings = run_task([study_files["frontal"]], shadow_mode=True)
    assert answer["destinations"] == []
    assert result.status is StudyStatus.ANALYSED and result.finding in (Finding.POSITIVE, Finding.NEGATIVE)
    assert result.images[0].logit is not None and result.images[0].operating_point == "shipped / children"
    event = analysed_event(settings)
    assert event["shadow_mode"] is True and event["destinations"] == []


def test_without_shadow_mode_the_destination_is_chosen(study_files, run_task) -> None:
    answer, _, _ = run_task([study_files["frontal"]], shadow_mode=False)
    assert answer["destinations"] == ["files"]


def test_a_refused_study_is_outside_use_and_audited_by_rule(study_files, run_task) -> None:
    answer, result, settings = run_task([study_files["lateral"]], shadow_mode=True)
    assert answer["finding"] == Finding.NOT_ANALYSED
    assert result.status is StudyStatus.OUTSIDE_USE and result.probability is None
    assert analysed_event(settings)["outside_intended_use"] == {"refused": {"view": 1}, "flagged": {}}


def test_the_task_records_the_population_and_point_of_each_image(two_population_weights, tmp_path, run_task) -> None:
    from inference.sample_dicom import wrap_image, write_dataset
    from tests.kit.data import chest_pixels

    adult = wrap_image(chest_pixels(5))
    adult.PatientAge = "052Y"
    answer, result, settings = run_task(
        [write_dataset(adult, tmp_path / "adult.dcm")],
        model={"weights_dir": str(two_population_weights)},
        shadow_mode=True,
    )
    (image,) = result.images
    assert (image.population, image.operating_point, image.threshold) == ("adults", "shipped / adults", 0.7)
    assert result.threshold == 0.7 and analysed_event(settings)["operating_point"] == "shipped / adults"
