"""The outbox — where an analysis leaves its result files until every destination has them:
``<outbox>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``. The analysis writes there (worker/pipeline.py);
deliveries, the sweeper and HL7 results read from there by the UIDs the outcome store records."""

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the store's models only as a type: the analysis writes here without loading the store
    from common.store import StudyResult


def study_folder(outbox: Path, study_instance_uid: str) -> Path:
    """The folder of one study's result files."""
    return Path(outbox) / study_instance_uid


def result_file(outbox: Path, study_instance_uid: str, sop_instance_uid: str) -> Path:
    """The file of one result object."""
    return study_folder(outbox, study_instance_uid) / f"{sop_instance_uid}.dcm"


def result_files(outbox: Path, result: "StudyResult") -> list[Path]:
    """The SC and SR files of an analysed round, in the order the analysis wrote them."""
    return [
        result_file(outbox, result.study_instance_uid, uid)
        for image in result.images or []
        for uid in image.output_uids
    ]
