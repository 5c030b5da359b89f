"""Observability: node events with fields → one JSON object per log line on stderr.

Callers pass UIDs, AE titles, statuses and timings only — never patient names, ids or birth dates.
Library warnings and exceptions, which may quote header values, pass ``common.logfilter`` first.
"""

import json
import logging
import sys
from datetime import UTC, datetime

from common import logfilter


class JsonLineFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "event", ...fields}`` per record."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}))
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # logfilter keeps the (redacted) traceback here
            payload["exception"] = record.exc_text
        return json.dumps(payload, default=str)


def configure_logging(level: str) -> None:
    """JSON lines on stderr, Python warnings included; pynetdicom's chatter only from WARNING up.
    Every record is scrubbed of quoted values first (``common.logfilter``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # pydicom's parse warnings become JSON lines too ("py.warnings")
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # it logs each warning a second time
    logfilter.install()


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: object) -> None:
    """Log ``event`` with structured ``fields``."""
    logger.log(level, event, extra={"fields": fields})
