"""Review marks in the store and the labelled set built from them (worker/review.py)."""

import uuid
from datetime import UTC, datetime

import pytest

from common.results import Finding, ImageResult, StudyStatus, Verdict
from common.store import Store, StudyResult
from worker.review import SkipReason, reviewed_scores

WEIGHTS = "ab" * 32
OTHER_WEIGHTS = "cd" * 32


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'lungvision.db'}")


def image(logit: float | None) -> ImageResult:
    return ImageResult(
        sop_instance_uid=f"2.25.{uuid.uuid4().int}",
        probability=0.5,
        positive=True,
        logit=logit,
        sc_uid=f"2.25.{uuid.uuid4().int}",
        sr_uid=f"2.25.{uuid.uuid4().int}",
    )


def saved(
    store: Store,
    finding: Finding,
    logits: list[float | None],
    *,
    sha256: str = WEIGHTS,
    status: StudyStatus = StudyStatus.ANALYSED,
) -> StudyResult:
    result = StudyResult(
        message_id=uuid.uuid4().hex,
        study_instance_uid=f"2.25.{uuid.uuid4().int}",
        round=1,
        calling_ae="AE",
        modality="CR",
        accession_number=None,
        status=status,
        finding=finding,
        probability=None,
        threshold=0.06,
        model_version="m 1",
        model_sha256=sha256,
        images=[image(logit) for logit in logits],
        timings_ms={},
        received_at=datetime.now(UTC),
    )
    store.save_result(result)
    return result


def test_labels_follow_the_verdict_on_each_finding_and_the_score_is_the_highest_logit(store) -> None:
    cases = [
        (Finding.POSITIVE, Verdict.AGREE, 1),
        (Finding.POSITIVE, Verdict.DISAGREE, 0),
        (Finding.NEGATIVE, Verdict.AGREE, 0),
        (Finding.NEGATIVE, Verdict.DISAGREE, 1),
    ]
    expected = {}
    for index, (finding, verdict, label) in enumerate(cases):
        result = saved(store, finding, [-3.0 + index, 1.5 + index, None])
        store.save_review(result, verdict, "operator")
        expected[result.study_instance_uid] = (label, 1.5 + index)
    scores = reviewed_scores(store, WEIGHTS)
    assert dict(zip(scores.study_uids, zip(scores.labels, scores.logits))) == expected
    assert len(scores.study_uids) == 4 and scores.skipped == {}


def test_a_second_mark_of_the_same_round_replaces_the_first(store) -> None:
    result = saved(store, Finding.POSITIVE, [2.0])
    first = store.save_review(result, Verdict.AGREE, "operator")
    second = store.save_review(result, Verdict.DISAGREE, "second-reader")
    assert second.id == first.id
    current = store.review(result.message_id)
    assert (current.verdict, current.reviewer, current.finding, current.model_sha256) == (
        Verdict.DISAGREE,
        "second-reader",
        Finding.POSITIVE,
        WEIGHTS,
    )
    assert current.verdict.value == "disagree"
    assert [review.message_id for review in store.reviews()] == [result.message_id]
    assert reviewed_scores(store, WEIGHTS).labels == [0]


def test_reviews_with_other_weights_or_without_a_logit_are_skipped_and_counted(store) -> None:
    kept = saved(store, Finding.POSITIVE, [0.7])
    for result in (
        saved(store, Finding.POSITIVE, [1.0], sha256=OTHER_WEIGHTS),
        saved(store, Finding.NEGATIVE, [-1.0], sha256=OTHER_WEIGHTS),
        saved(store, Finding.NEGATIVE, [None]),
        kept,
    ):
        store.save_review(result, Verdict.AGREE, "operator")
    scores = reviewed_scores(store, WEIGHTS)
    assert scores.study_uids == [kept.study_instance_uid] and scores.logits == [0.7] and scores.labels == [1]
    assert scores.skipped == {SkipReason.OTHER_WEIGHTS.value: 2, SkipReason.NO_SCORE.value: 1}
    assert SkipReason.OTHER_WEIGHTS.value == "made with other weights"


@pytest.mark.parametrize(
    ("status", "finding"),
    [
        (StudyStatus.NOT_ANALYSED, Finding.NOT_ANALYSED),
        (StudyStatus.ANALYSING, Finding.PENDING),
        (StudyStatus.OUTSIDE_USE, Finding.NOT_ANALYSED),
    ],
)
def test_a_round_without_an_analysed_finding_cannot_be_reviewed(store, status, finding) -> None:
    result = saved(store, finding, [], status=status)
    with pytest.raises(ValueError, match="no analysed finding"):
        store.save_review(result, Verdict.AGREE, "operator")
    assert store.review(result.message_id) is None and store.reviews() == []


def test_the_verdict_is_stored_as_its_value(store) -> None:
    result = saved(store, Finding.NEGATIVE, [-2.0])
    store.save_review(result, Verdict.AGREE, "operator")
    with store.engine.connect() as connection:
        stored = connection.exec_driver_sql("SELECT verdict FROM reviews").scalar_one()
    assert stored == "agree"


def test_the_scored_images_population_comes_with_the_score(store) -> None:
    result = saved(store, Finding.POSITIVE, [1.0, 2.5])
    result.images = [
        result.images[0].model_copy(update={"population": "children"}),
        result.images[1].model_copy(update={"population": "adults"}),
    ]
    store.save_result(result)
    older = saved(store, Finding.NEGATIVE, [-1.0])  # recorded before populations were stored
    for reviewed in (result, older):
        store.save_review(reviewed, Verdict.AGREE, "operator")
    scores = reviewed_scores(store, WEIGHTS)
    assert dict(zip(scores.study_uids, zip(scores.logits, scores.populations))) == {
        result.study_instance_uid: (2.5, "adults"),
        older.study_instance_uid: (-1.0, None),
    }
