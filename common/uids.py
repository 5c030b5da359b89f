"""UIDs — checking a received one, and deriving the UIDs of what Lung Vision creates.

Check: a value from a dataset → the same value, proven safe to use as a spool path component.
Derive: (source UID, model sha256, output kind) always gives the same result UID, so analysing a
study again produces the same SOP Instance UIDs, and the PACS replaces the earlier results instead
of collecting duplicates.
"""

import re

from common.identity import UID_ROOT

MAX_UID_LENGTH = 64  # PS3.5 9.1
_UID_PATTERN = re.compile(r"[0-9]+(?:\.[0-9]+)*")


class InvalidUid(ValueError):
    """A UID that is empty, too long or not dot-separated digits; the message names the attribute."""


def checked_uid(value: object, attribute: str) -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidUid`.

    Only digits and single dots pass, so no value can contain ``/``, ``..``, NUL or spaces and
    every accepted UID is a harmless file or folder name. Leading zeros in a component are
    tolerated (some modalities emit them); they cannot form a path trick.
    """
    if not isinstance(value, str):
        raise InvalidUid(f"{attribute} is missing or not a single value")
    if not value:
        raise InvalidUid(f"{attribute} is empty")
    if len(value) > MAX_UID_LENGTH:
        raise InvalidUid(f"{attribute} is {len(value)} characters long (at most {MAX_UID_LENGTH})")
    if _UID_PATTERN.fullmatch(value) is None:
        raise InvalidUid(f"{attribute} {value[:MAX_UID_LENGTH]!r} is not dot-separated digits")
    return str(value)  # pydicom's UID subclass → plain str


def is_valid_uid(value: object) -> bool:
    """True when :func:`checked_uid` would accept ``value``."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and _UID_PATTERN.fullmatch(value) is not None


def derived_uid(*parts: str) -> str:
    """A UID under Lung Vision's root, derived only from ``parts`` (same parts → same UID)."""
    # Imported here, by the processes that create objects: the checks above serve the spool, which the
    # sweeper reads without pydicom and numpy (≈ 30 MB of a process that only compares records).
    from pydicom.uid import generate_uid

    return generate_uid(prefix=UID_ROOT, entropy_srcs=list(parts))


def output_instance_uid(source_sop_instance_uid: str, model_sha256: str, kind: str) -> str:
    """SOP Instance UID of the ``kind`` output ("sc", "sr") made from one source instance."""
    return derived_uid(source_sop_instance_uid, model_sha256, kind)


def output_series_uid(study_instance_uid: str, model_sha256: str, kind: str) -> str:
    """Series Instance UID holding all ``kind`` outputs of one study for one model."""
    return derived_uid(study_instance_uid, model_sha256, kind, "series")
