"""UID check: a value from a dataset → the same value, proven safe to use as a spool path component."""

import re

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
