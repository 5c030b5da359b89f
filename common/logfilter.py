"""Log filter — library warnings and exceptions reach the logs without patient data.

pydicom and highdicom quote the values they complain about (``Invalid value for VR DA:
'19580230'``, ``The string "DOE" is unlikely to represent the intended person name``), and
exceptions carry such messages into tracebacks. Patient names, ids and birth dates must never
reach a log file, so every log record of a process is scrubbed as it is made, before any handler
sees it:

* the message is formatted with its arguments — a pydicom object among them (a dataset, an
  element, a person name…) becomes ``<Dataset>`` etc. first: printing a dataset prints every
  value in it — and then everything from its first opening quote to its last quote becomes
  ``<redacted>``;
* an exception keeps its traceback frames (file, line, code) and type; its message is redacted
  the same way;
* extra attributes of the record (``log_event``'s ``fields``, Celery's ``data``) likewise.

Our own messages name events, UIDs and counts; they need no quotes, so nothing they say is lost.
Python warnings are routed through logging (``logging.captureWarnings``), and so are exceptions
nobody caught (``sys.excepthook``, ``threading.excepthook``), so they are scrubbed too.

This module imports nothing of the project, so the node, the worker and the web server can all
use it. Call :func:`install` once in each process's logging set-up: ``common.logs.
configure_logging`` (node, web), ``worker.celery_app`` (Celery's logging signals), ``lungvision.
serve``. It is idempotent.
"""

import logging
import re
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from types import TracebackType

REDACTED = "<redacted>"
# An opening quote: not inside a word ("don't", "model's"), optionally after a b/r/u/f string prefix (b'…').
_OPENING_QUOTE = re.compile(r"""(?<![A-Za-z0-9])(?:[bBrRuUfF]{1,2}(?=['"]))?['"]""")
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_SCRUBBED = "_lungvision_scrubbed"


def redact(text: str) -> str:
    """``text`` with everything from its first opening quote to its last quote replaced by
    ``<redacted>`` (to its end when that quote is the last one)."""
    opening = _OPENING_QUOTE.search(text)
    if opening is None:
        return text
    closing = max(text.rfind("'"), text.rfind('"'))
    end = closing + 1 if closing > opening.end() - 1 else len(text)
    return text[: opening.start()] + REDACTED + text[end:]


def safe_traceback(error: BaseException, tb: TracebackType | None) -> str:
    """The traceback of ``error`` as Python prints it, each exception message redacted."""
    return "".join(_format_safely(traceback.TracebackException(type(error), error, tb))).rstrip("\n")


def scrub(record: logging.LogRecord) -> logging.LogRecord:
    """Make ``record`` safe to write, in place (see the module docstring); returns it."""
    if getattr(record, _SCRUBBED, False):
        return record
    # Logging must never raise into the code that logs: what cannot be formatted is said, not hidden.
    try:
        message = _message(record)
    except Exception as error:
        template = record.msg if isinstance(record.msg, str) else f"<{type(record.msg).__name__}>"
        message = f"{template} (could not be formatted with its arguments: {type(error).__name__})"
    record.msg, record.args = redact(message), ()
    if record.exc_info:
        _, exception, tb = record.exc_info
        if exception is not None:
            try:
                record.exc_text = safe_traceback(exception, tb)
            except Exception as failure:
                record.exc_text = (
                    redact(f"{type(exception).__name__}: {exception}")
                    + f" (traceback not shown: {type(failure).__name__} while formatting it)"
                )
        record.exc_info = None  # formatters print exc_text instead
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    for name in set(vars(record)) - _STANDARD_ATTRIBUTES:
        setattr(record, name, _scrub_value(getattr(record, name)))
    setattr(record, _SCRUBBED, True)
    return record


class PhiFilter(logging.Filter):
    """A handler filter that scrubs each record (for records not made through the record factory,
    e.g. ``logging.makeLogRecord``); never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub(record)
        return True


class _ScrubbingFactory:
    """A log record factory that scrubs every record it makes."""

    def __init__(self, make: Callable[..., logging.LogRecord]) -> None:
        self.make = make

    def __call__(self, *args: object, **kwargs: object) -> logging.LogRecord:
        return scrub(self.make(*args, **kwargs))


def install(logger: logging.Logger | None = None) -> None:
    """Scrub every log record of this process; route Python warnings and uncaught exceptions
    through logging.

    Also puts :class:`PhiFilter` on the handlers of ``logger`` (default: the root logger).
    """
    logging.captureWarnings(True)
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _ScrubbingFactory):
        logging.setLogRecordFactory(_ScrubbingFactory(factory))
    if sys.excepthook is not _log_uncaught:
        _previous_hooks["sys"] = sys.excepthook
        sys.excepthook = _log_uncaught
    if threading.excepthook is not _log_uncaught_in_thread:
        _previous_hooks["threading"] = threading.excepthook
        threading.excepthook = _log_uncaught_in_thread
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(existing, PhiFilter) for existing in handler.filters):
            handler.addFilter(PhiFilter())


def uninstall() -> None:
    """Undo :func:`install` (for tests): the previous record factory and exception hooks, no
    PhiFilter on the root's handlers."""
    factory = logging.getLogRecordFactory()
    if isinstance(factory, _ScrubbingFactory):
        logging.setLogRecordFactory(factory.make)
    if sys.excepthook is _log_uncaught:
        sys.excepthook = _previous_hooks.pop("sys")
    if threading.excepthook is _log_uncaught_in_thread:
        threading.excepthook = _previous_hooks.pop("threading")
    for handler in logging.getLogger().handlers:
        for existing in [f for f in handler.filters if isinstance(f, PhiFilter)]:
            handler.removeFilter(existing)


_previous_hooks: dict[str, Callable] = {}
_UNCAUGHT = logging.getLogger("lungvision.uncaught")


def _log_uncaught(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """sys.excepthook: an exception nobody caught, logged (so scrubbed) instead of printed."""
    if issubclass(kind, KeyboardInterrupt):  # Ctrl-C: no message to scrub, the usual hook prints it
        _previous_hooks["sys"](kind, error, tb)
        return
    _UNCAUGHT.critical("uncaught exception; the process ends", exc_info=(kind, error, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: an exception that ended a thread, logged (so scrubbed) instead of printed."""
    if args.exc_type is SystemExit:  # a thread's normal way out, silent in Python too
        return
    name = args.thread.name if args.thread is not None else "unknown"
    _UNCAUGHT.error(
        "uncaught exception ended thread %s",
        name,
        # logging prints a None value too; typeshed's exc_info tuple wants an exception
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )


# --- helpers -----------------------------------------------------------------------------------------


def _is_pydicom_object(value: object) -> bool:
    """A dataset, element, person name or other pydicom value (a UID excepted: it names no one)."""
    kinds = type(value).__mro__
    return any((kind.__module__ or "").split(".")[0] == "pydicom" for kind in kinds) and type(value).__name__ != "UID"


class _Placeholder:
    """Stands for a pydicom object in a message: ``<Dataset>`` with %s and %r alike."""

    def __init__(self, value: object) -> None:
        self.text = f"<{type(value).__name__}>"

    def __repr__(self) -> str:
        return self.text


def _placeholder(value: object) -> object:
    return _Placeholder(value) if _is_pydicom_object(value) else value


def _message(record: logging.LogRecord) -> str:
    """The record's message formatted with its arguments, pydicom objects replaced first."""
    message = str(_placeholder(record.msg))
    args = record.args
    if not args:
        return message
    if isinstance(args, dict):
        return message % {key: _placeholder(value) for key, value in args.items()}
    return message % tuple(_placeholder(value) for value in args)


def _scrub_value(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _scrub_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_value(item) for item in value]
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return repr(_Placeholder(value)) if _is_pydicom_object(value) else value


def _format_safely(exception: traceback.TracebackException) -> Iterator[str]:
    """TracebackException.format() with each exception's own message redacted (chains included)."""
    if exception.__cause__ is not None:
        yield from _format_safely(exception.__cause__)
        yield "\nThe above exception was the direct cause of the following exception:\n\n"
    elif exception.__context__ is not None and not exception.__suppress_context__:
        yield from _format_safely(exception.__context__)
        yield "\nDuring handling of the above exception, another exception occurred:\n\n"
    if exception.stack:
        yield "Traceback (most recent call last):\n"
        yield from exception.stack.format()
    yield redact("".join(exception.format_exception_only()))
