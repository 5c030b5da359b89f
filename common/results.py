"""Results — the words every process uses for a study round's outcome: its status, its finding, why an
image is outside the intended use, a reviewer's verdict, and what is kept about each image.

Each enum's values are the strings earlier versions stored, so existing stores and API clients read
them unchanged."""

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class StudyStatus(StrEnum):
    """Where one study round stands in the outcome store."""

    ANALYSING = "analysing"  # a worker process is analysing it (placeholder row written when it starts)
    REQUEUED = "requeued"  # an operator replayed its failed analysis: queued again, no worker has it yet
    ANALYSED = "analysed"  # results written; deliveries pending, or no destination
    NOT_ANALYSED = "not_analysed"  # no image could be analysed (each image's reason is in its ImageResult)
    OUTSIDE_USE = "outside_use"  # no image analysed: the intended-use gate refused them
    DELIVERED = "delivered"  # every destination has the results
    FAILED = "failed"  # the analysis failed, or a delivery ran out of attempts (both are dead letters)


# A round with one of these statuses is done: the analysis task skips it, the sweeper leaves it alone.
FINAL_STATUSES = frozenset(
    {StudyStatus.ANALYSED, StudyStatus.NOT_ANALYSED, StudyStatus.OUTSIDE_USE, StudyStatus.DELIVERED, StudyStatus.FAILED}
)


class DeliveryStatus(StrEnum):
    """Where sending one round's outputs to one destination stands."""

    PENDING = "pending"  # queued, not tried yet
    RETRYING = "retrying"  # an attempt failed transiently; the next one waits its back-off delay
    DELIVERED = "delivered"
    FAILED = "failed"  # dead-lettered


class Finding(StrEnum):
    """A study round's finding."""

    POSITIVE = "POSITIVE"
    NEGATIVE = "NEGATIVE"
    NOT_ANALYSED = "NOT_ANALYSED"  # no image could be analysed
    PENDING = "PENDING"  # no outcome yet (received, queued, analysing, requeued)

    @property
    def reviewable(self) -> bool:
        """A finding the model actually made, which a reviewer can agree or disagree with."""
        return self in (Finding.POSITIVE, Finding.NEGATIVE)


class GateReason(StrEnum):
    """Which rule put an image outside the intended use."""

    MODALITY = "modality"
    BODY_PART = "body_part"
    VIEW = "view"
    AGE = "age"
    IMAGE_CHECK = "image_check"


class GateAction(StrEnum):
    """What the intended-use gate did with an image outside the intended use."""

    REFUSED = "refused"  # not analysed
    FLAGGED = "flagged"  # analysed and marked


class Verdict(StrEnum):
    """A reviewer's judgement of a study's finding."""

    AGREE = "agree"
    DISAGREE = "disagree"


class ImageResult(BaseModel):
    """What is kept about one source image of a round (no patient data). Every field may be missing in
    rows of earlier versions, so each has a default."""

    model_config = ConfigDict(frozen=True)

    sop_instance_uid: str | None = None
    probability: float | None = None  # None: not analysed (the reason says why)
    positive: bool | None = None
    logit: float | None = None  # raw network output (site calibration refits from it)
    not_analysed_reason: str | None = None
    intended_use: bool | None = None  # False: outside it (refused, or analysed and flagged); None: unchecked
    gate_reason: GateReason | None = None  # the intended-use gate's rule when it said no
    gate_text: str | None = None  # ...and its sentence for people
    population: str | None = None  # whose operating point: by the header's patient age, else the image check
    operating_point: str | None = None  # e.g. "shipped / adults" or "site profile ward-7 / children"
    threshold: float | None = None  # the operating point's threshold
    sc_uid: str | None = None  # the heatmap Secondary Capture made of it
    sr_uid: str | None = None  # the findings SR made of it
    error: str | None = None  # the one "image" of a round whose analysis failed: why (no patient data)

    @property
    def analysed(self) -> bool:
        return self.probability is not None

    @property
    def output_uids(self) -> list[str]:
        """SOP Instance UIDs of the SC and SR made of this image, in the order they were written."""
        return [uid for uid in (self.sc_uid, self.sr_uid) if uid]


def study_image(images: list[ImageResult]) -> ImageResult | None:
    """The analysed image the study's finding comes from — positive first, then the highest probability,
    as the worker chose it — or None when no image was analysed."""
    analysed = [image for image in images if image.analysed]
    return max(analysed, key=lambda image: (bool(image.positive), image.probability)) if analysed else None
