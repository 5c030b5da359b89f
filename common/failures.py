"""Failures — what went wrong, said without patient data, for the store, the audit trail and the logs."""

import traceback
from pathlib import Path


def describe_failure(error: BaseException) -> str:
    """The exception's type and the code line that raised it — never its message, which may quote a DICOM
    value (a patient's name) — plus the operating system's words for an OSError ("No space left on
    device")."""
    frames = traceback.extract_tb(error.__traceback__)
    where = ""
    if frames:
        frame = frames[-1]
        where = f" in {'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno} ({frame.name})"
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    detail = f": {error.strerror}" if isinstance(error, OSError) and error.strerror else ""
    return f"{name}{where}{detail}"
