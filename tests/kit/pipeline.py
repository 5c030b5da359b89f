"""The analysis pipeline run in this process on one study round, as the worker runs it."""

from pathlib import Path

from common.messages import StudyReady
from config.settings import ScCompression
from inference.classifier import Classifier
from inference.intended_use import IntendedUse
from worker.pipeline import StudyOutcome, analyse_study, device_uid_for


def run_pipeline(
    message: StudyReady,
    classifier: Classifier,
    outbox: Path,
    *,
    gate: IntendedUse | None = None,
    max_long_side: int = 512,
    sc_compression: ScCompression = "jpeg",
) -> StudyOutcome:
    """Analyse ``message``'s files as the worker of the AE LUNGVISION would, writing SC and SR into
    ``outbox``; ``gate`` is the classifier's own intended use unless given."""
    return analyse_study(
        message,
        classifier,
        gate if gate is not None else classifier.intended_use(),
        outbox,
        device_uid=device_uid_for("LUNGVISION"),
        max_long_side=max_long_side,
        sc_compression=sc_compression,
    )
