"""Review — reviewers' verdicts in the store + the raw logits (and populations) of the rounds they
judged → a labelled set."""

import enum
from collections import Counter
from dataclasses import dataclass

from common.results import Finding, Verdict
from common.store import Review, Store, StudyResult


class SkipReason(str, enum.Enum):
    """Why a reviewed study round is left out of the labelled set."""

    NO_RESULT = "no result stored"
    OTHER_WEIGHTS = "made with other weights"
    NO_SCORE = "no score stored"


@dataclass(frozen=True)
class ReviewedScores:
    """Reference labels (1 = pneumonia), model scores (raw logits) and populations of reviewed study
    rounds, in the same order, plus how many reviews were skipped, by reason."""

    labels: list[int]
    logits: list[float]
    study_uids: list[str]
    skipped: dict[str, int]
    populations: list[str | None]  # the scored image's population; None: recorded before populations were


@dataclass(frozen=True)
class StudyScore:
    """The score of one study round: its image with the highest raw logit, and that image's population."""

    logit: float
    population: str | None


def label(review: Review) -> int:
    """1 when the reviewer confirmed a positive or contradicted a negative finding, else 0."""
    return int(
        (review.finding == Finding.POSITIVE and review.verdict == Verdict.AGREE)
        or (review.finding == Finding.NEGATIVE and review.verdict == Verdict.DISAGREE)
    )


def study_score(result: StudyResult) -> StudyScore | None:
    """The highest raw logit among the round's images with its image's population, or None when no
    image has a logit."""
    scores = [StudyScore(image.logit, image.population) for image in result.images or [] if image.logit is not None]
    if not scores:
        return None
    return max(scores, key=lambda score: score.logit)


def reviewed_scores(store: Store, weights_sha256: str) -> ReviewedScores:
    """The labelled set of every reviewed round scored by the weights ``weights_sha256``."""
    labels: list[int] = []
    logits: list[float] = []
    populations: list[str | None] = []
    study_uids: list[str] = []
    skipped: Counter[str] = Counter()
    for review in store.reviews():
        result = store.result(review.message_id)
        score = None if result is None else study_score(result)
        if result is None:
            skipped[SkipReason.NO_RESULT.value] += 1
        elif result.model_sha256 != weights_sha256:
            skipped[SkipReason.OTHER_WEIGHTS.value] += 1
        elif score is None:
            skipped[SkipReason.NO_SCORE.value] += 1
        else:
            labels.append(label(review))
            logits.append(score.logit)
            populations.append(score.population)
            study_uids.append(review.study_instance_uid)
    return ReviewedScores(labels, logits, study_uids, dict(skipped), populations)
