"""Deterministic UIDs — (source UID, model sha256, output kind) always gives the same result UID.

Analysing a study again therefore produces the same SOP Instance UIDs, and the PACS replaces the
earlier results instead of collecting duplicates.
"""

from pydicom.uid import generate_uid

from dicom_node.identity import UID_ROOT


def derived_uid(*parts: str) -> str:
    """A UID under Lung Vision's root, derived only from ``parts`` (same parts → same UID)."""
    return generate_uid(prefix=UID_ROOT, entropy_srcs=list(parts))


def output_instance_uid(source_sop_instance_uid: str, model_sha256: str, kind: str) -> str:
    """SOP Instance UID of the ``kind`` output ("sc", "sr") made from one source instance."""
    return derived_uid(source_sop_instance_uid, model_sha256, kind)


def output_series_uid(study_instance_uid: str, model_sha256: str, kind: str) -> str:
    """Series Instance UID holding all ``kind`` outputs of one study for one model."""
    return derived_uid(study_instance_uid, model_sha256, kind, "series")
