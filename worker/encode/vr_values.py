"""VR values — one value copied from a received instance, checked against its Value Representation:
kept as it is, repaired into the form the standard asks for, or refused (``None``).

Sources in the wild carry Patient's Age ``58`` (AS needs ``058Y``), dates like ``1958-03-01``,
times like ``12:30:00``, names longer than a PN component group may be, control characters and
national characters in VRs that allow none. Our outputs copy these values, so each one goes
through :func:`clean_value` first. Every function here takes and returns decoded text (one value,
without the backslash that separates values); character sets are the caller's business.

Repairs are the unambiguous ones only: a missing age unit (years), a zero-padded age, date and
time separators, too many fraction digits, integral decimals for IS, a decimal too long for DS,
upper case for CS, control characters replaced by U+FFFD, and truncation of text and names to the
VR's maximum length. Lengths are counted in UTF-8 bytes (what ``dciodvfy`` checks; for ASCII text
that is the character count), so a value that fits here fits in any output. Whether a repaired
value may be used is the caller's decision (``source_header`` never uses a repaired identifier).
"""

import math
import re
from datetime import date

# PS3.5 Table 6.2-1: maximum length of one value (for PN: of one component group)
MAX_LENGTH = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UI": 64,
}
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})  # the VRs a Specific Character Set applies to
SINGLE_VALUE_TEXT_VRS = frozenset({"ST", "LT", "UT"})  # VM 1 always; a backslash is part of the text
REPLACEMENT = "\ufffd"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 control characters
_CONTROL_EXCEPT_LAYOUT = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")  # ST/LT/UT keep TAB, LF, FF, CR
_CODE_STRING = re.compile(r"[A-Z0-9 _]*")
_AGE = re.compile(r"(\d{1,3})\s*(D|DAYS?|W|WEEKS?|WKS?|M|MONTHS?|MOS?|Y|YEARS?|YRS?)?", re.IGNORECASE)
_DATE = re.compile(r"(\d{4})[-./]?(\d{2})[-./]?(\d{2})")
_TIME = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:[.,](\d+))?)?)?")
_DATETIME = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{1,6})?)?)?)?)?)?"
    r"(?:[+-](\d{2})(\d{2}))?"
)
_INTEGER = re.compile(r"[+-]?\d+(?:\.0*)?")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_IS_RANGE = (-(2**31), 2**31 - 1)


def clean_value(vr: str, value: str) -> str | None:
    """``value`` made valid for ``vr``, or None when it cannot be (the caller drops it).

    Leading and trailing spaces (padding) are removed — for ST, LT and UT only trailing ones.
    Binary VRs and VRs not listed here are refused: only text is copied from sources.
    """
    cleaner = _CLEANERS.get(vr)
    return None if cleaner is None else cleaner(vr, value)


def fit_text(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, on a character boundary, trailing spaces removed."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore").rstrip()


def replace_controls(text: str, *, keep_layout: bool = False) -> str:
    """Control characters replaced by U+FFFD (ST, LT and UT keep TAB, LF, FF and CR)."""
    return (_CONTROL_EXCEPT_LAYOUT if keep_layout else _CONTROL).sub(REPLACEMENT, text)


# --- one cleaner per VR ----------------------------------------------------------------------------


def _clean_text(vr: str, value: str) -> str | None:
    keep_layout = vr in SINGLE_VALUE_TEXT_VRS
    text = replace_controls(value.rstrip(" ") if keep_layout else value.strip(" "), keep_layout=keep_layout)
    if not keep_layout and "\\" in text:  # the value separator cannot be part of one value
        return None
    limit = MAX_LENGTH.get(vr)
    return text if limit is None else fit_text(text, limit)


def _clean_person_name(vr: str, value: str) -> str | None:
    """PN: at most 3 component groups (alphabetic=ideographic=phonetic) of at most 5 components,
    each group at most 64 bytes (truncated when longer)."""
    text = replace_controls(value.strip(" "))
    groups = text.split("=")
    if "\\" in text or len(groups) > 3 or any(len(group.split("^")) > 5 for group in groups):
        return None
    return "=".join(fit_text(group, MAX_LENGTH["PN"]) for group in groups)


def _clean_code_string(vr: str, value: str) -> str | None:
    text = value.strip(" ").upper()
    if not _CODE_STRING.fullmatch(text) or len(text) > MAX_LENGTH["CS"]:
        return None
    return text


def _clean_age(vr: str, value: str) -> str | None:
    """AS: ``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``; "58" → "058Y", "5 Y" → "005Y", "3 years" → "003Y"."""
    match = _AGE.fullmatch(value.strip(" "))
    if match is None:
        return None
    unit = (match.group(2) or "Y")[0].upper()
    return f"{int(match.group(1)):03d}{unit}"


def _clean_date(vr: str, value: str) -> str | None:
    """DA: ``YYYYMMDD`` of a real calendar day; "1958-03-01" and "1958.03.01" → "19580301"."""
    match = _DATE.fullmatch(value.strip(" "))
    if match is None:
        return None
    year, month, day = (int(part) for part in match.groups())
    try:
        date(year, month, day)
    except ValueError:  # 30 February, month 13, year 0: no such day, nothing to repair
        return None
    return f"{year:04d}{month:02d}{day:02d}"


def _clean_time(vr: str, value: str) -> str | None:
    """TM: ``HH[MM[SS[.F{1-6}]]]``; "12:30:00" → "123000", fractions beyond 6 digits cut."""
    match = _TIME.fullmatch(value.strip(" "))
    if match is None:
        return None
    hours, minutes, seconds, fraction = match.groups()
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:  # 60: a leap second
        return None
    text = hours + (minutes or "") + (seconds or "")
    return text + f".{fraction[:6]}" if fraction else text


def _clean_datetime(vr: str, value: str) -> str | None:
    """DT: ``YYYY[MM[DD[HH[MM[SS[.F{1-6}]]]]]][&ZZXX]`` with real ranges; anything else refused."""
    text = value.strip(" ")
    match = _DATETIME.fullmatch(text)
    if match is None:
        return None
    _, month, day, hours, minutes, seconds, offset_hours, offset_minutes = match.groups()
    limits = (
        (month, 1, 12),
        (day, 1, 31),
        (hours, 0, 23),
        (minutes, 0, 59),
        (seconds, 0, 60),
        (offset_hours, 0, 14),
        (offset_minutes, 0, 59),
    )
    if any(part is not None and not low <= int(part) <= high for part, low, high in limits):
        return None
    if day is not None and _clean_date("DA", text[:8]) is None:  # 31 February
        return None
    return text


def _clean_integer_string(vr: str, value: str) -> str | None:
    """IS: an integer in the signed 32-bit range; "12.0" → "12", "+7" → "7"."""
    text = value.strip(" ")
    if not _INTEGER.fullmatch(text):
        return None
    number = int(text.split(".")[0])
    return str(number) if _IS_RANGE[0] <= number <= _IS_RANGE[1] else None


def _clean_decimal_string(vr: str, value: str) -> str | None:
    """DS: a finite decimal in at most 16 characters (a longer one is rounded to fit)."""
    text = value.strip(" ")
    if not _DECIMAL.fullmatch(text) or not math.isfinite(float(text)):
        return None
    if len(text) <= MAX_LENGTH["DS"]:
        return text
    number = float(text)
    for digits in range(15, 0, -1):  # the most precise form that fits
        shorter = f"{number:.{digits}g}"
        if len(shorter) <= MAX_LENGTH["DS"]:
            return shorter
    return None


def _clean_uid(vr: str, value: str) -> str | None:
    """UI: kept as received, without padding. A UID names the study, series and instance our
    outputs belong to and refer to; changing it would detach them, so it is never rewritten."""
    return value.strip(" \x00")


_CLEANERS = {
    "SH": _clean_text,
    "LO": _clean_text,
    "ST": _clean_text,
    "LT": _clean_text,
    "UC": _clean_text,
    "UT": _clean_text,
    "PN": _clean_person_name,
    "CS": _clean_code_string,
    "AS": _clean_age,
    "DA": _clean_date,
    "TM": _clean_time,
    "DT": _clean_datetime,
    "IS": _clean_integer_string,
    "DS": _clean_decimal_string,
    "UI": _clean_uid,
}
