"""PHI-safe logging, by construction: library warnings and exceptions cannot print patient fields.

Studies whose names, ids and birth dates carry marker strings — single-component names (no ``^``,
which highdicom warns about, quoting the name) and invalid birth dates (which pydicom warns about,
quoting the date) — go through the analysis task with every warning enabled and every log record
captured; no marker may appear in the logs, the audit trail or the outcome store. They do appear in
the SC/SR (that is where they belong), which shows the test data really went through.
"""

import io
import json
import logging
import sqlite3
import sys
import threading
import warnings

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from common import audit, logfilter
from common.logs import JsonLineFormatter, configure_logging
from tests.kit.dicom_fixtures import radiograph, write_broken
from tests.kit.serve import Serve
from tests.kit.wait import wait_until
from tests.kit.worker import embedded_settings, make_message

MARKER = "MARKER"  # in every name, id and description below; nothing else in a test run says it in capitals
INVALID_BIRTH_DATE = "20200231"  # 31 February: a date pydicom refuses, quoting it

# --- the redaction itself ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "safe"),
    [
        ("Invalid value for VR DA: '20200231'.", "Invalid value for VR DA: <redacted>."),
        (
            'The string "MARKERNAME" is unlikely to represent the intended person name',
            "The string <redacted> is unlikely to represent the intended person name",
        ),
        ('The string "O\'Brien" is unlikely', "The string <redacted> is unlikely"),  # a quote inside the value
        ("Unable to convert b'MARKER\\xfc' to 'DA' object", "Unable to convert <redacted> object"),
        ("value 'MARKER never closed", "value <redacted>"),
        (
            "patient age 58 years, model's population 1 to <6 years",
            "patient age 58 years, model's population 1 to <6 years",
        ),  # apostrophes in words stay
        ("study round 1.2.3 analysed: POSITIVE", "study round 1.2.3 analysed: POSITIVE"),
    ],
)
def test_quoted_values_are_redacted_and_plain_messages_kept(message, safe) -> None:
    assert logfilter.redact(message) == safe


@pytest.fixture
def captured_logs():
    """Every record of this process, as JSON lines (the node's and web's format) and plain lines
    (Celery's), with the filter installed and every Python warning shown."""
    stream = io.StringIO()
    handlers = [logging.StreamHandler(stream), logging.StreamHandler(stream)]
    handlers[0].setFormatter(JsonLineFormatter())
    handlers[1].setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logfilter.install()
        try:
            yield stream
        finally:
            logfilter.uninstall()
            logging.captureWarnings(False)
            for handler in handlers:
                root.removeHandler(handler)
            root.setLevel(level)


def test_an_exception_keeps_its_traceback_but_not_the_value(captured_logs) -> None:
    from pydicom.valuerep import DA

    marked_date = "2020" + MARKER  # (a traceback shows code lines: this one names no marker)
    try:
        DA(marked_date)
    except ValueError:
        logging.getLogger("lungvision.worker").exception("study round 1.2.3 failed")
    text = captured_logs.getvalue()
    assert MARKER not in text
    assert "Traceback (most recent call last)" in text and "ValueError: Unable to convert <redacted>" in text
    assert "study round 1.2.3 failed" in text


def test_a_dataset_is_never_formatted_into_a_message(captured_logs) -> None:
    dataset = radiograph(PatientName=f"{MARKER}NAME", PatientID=f"{MARKER}ID")
    logging.getLogger("some.library").warning("could not handle %s (%r)", dataset, dataset["PatientName"])
    logging.getLogger("celery.app.trace").error(
        "Task %(name)s raised unexpected: %(exc)s",
        {"name": "analyse", "exc": f"ValueError('{MARKER}')"},
        extra={"data": {"exc": f"ValueError('{MARKER}')"}},
    )
    text = captured_logs.getvalue()
    assert MARKER not in text
    assert "could not handle <Dataset> (<DataElement>)" in text and "raised unexpected: ValueError(<redacted>)" in text


def test_uncaught_exceptions_are_logged_scrubbed(captured_logs) -> None:
    marked_name = MARKER + "NAME"
    thread = threading.Thread(target=int, args=(marked_name,), name="association-7")
    thread.start()
    thread.join()
    try:
        int(marked_name)
    except ValueError:
        sys.excepthook(*sys.exc_info())  # what Python calls when the exception ends the program
    text = captured_logs.getvalue()
    assert MARKER not in text
    assert "uncaught exception ended thread association-7" in text and "uncaught exception; the process ends" in text
    assert text.count("ValueError: invalid literal for int() with base 10: <redacted>") == 4  # JSON and plain, twice


def test_a_record_that_cannot_be_formatted_is_logged_not_raised(captured_logs) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    logging.getLogger("some.library").warning("two values %s %s", "one")
    logging.getLogger("some.library").warning(Unprintable())
    text = captured_logs.getvalue()
    assert "two values %s %s (could not be formatted with its arguments: TypeError)" in text
    assert "<Unprintable> (could not be formatted with its arguments: RuntimeError)" in text


# --- studies with marked patient fields through the analysis task ---------------------------------


@pytest.fixture
def marked_study(tmp_path):
    """Four images of one study: single-component and two-component names, an invalid and a non-date
    birth date, an over-long id, national characters without a character set, a 12-year-old (refused: no
    shipped population covers that age)."""
    study_uid = generate_uid()
    files = [
        write_broken(
            radiograph(
                0,
                study_uid=study_uid,
                PatientName=f"{MARKER}NAME",
                PatientID=f"{MARKER}ID01",
                ReferringPhysicianName=f"{MARKER}DOCTOR",
            ),
            tmp_path / "a.dcm",
            values={"PatientBirthDate": INVALID_BIRTH_DATE.encode()},
        ),
        write_broken(
            radiograph(
                1, study_uid=study_uid, PatientName=f"{MARKER}FAMILY^{MARKER}GIVEN", OtherPatientNames=f"{MARKER}OTHER"
            ),
            tmp_path / "b.dcm",
            values={"PatientBirthDate": f"{MARKER}DOB".encode(), "PatientID": (f"{MARKER}ID" * 9).encode()},
        ),
        write_broken(
            radiograph(2, study_uid=study_uid),
            tmp_path / "c.dcm",
            without=("SpecificCharacterSet",),
            values={"PatientName": f"{MARKER}ÜMLAUT".encode("latin-1"), "PatientID": b"MARKERID03"},
        ),
        write_broken(
            radiograph(3, study_uid=study_uid, PatientName=f"{MARKER}ADULT", PatientAge="012Y"),
            tmp_path / "d.dcm",
            values={"PatientBirthDate": INVALID_BIRTH_DATE.encode()},
        ),
    ]
    return files


def test_marked_patient_fields_reach_neither_logs_nor_audit_nor_store(marked_study, captured_logs, tmp_path) -> None:
    from worker import celery_app, tasks

    settings = embedded_settings(tmp_path, delivery={"shadow_mode": True})
    celery_app.configure(settings)
    tasks.store.cache_clear()
    try:
        message = make_message(marked_study)
        answer = tasks.analyse_study_task.apply(args=[message.model_dump(mode="json")]).get()
        for path in marked_study:  # what pydicom says when code copies such a birth date ("Invalid value…")
            Dataset().PatientBirthDate = dcmread(path).get("PatientBirthDate", "")
        store = tasks.store().result(message.message_id)
    finally:
        audit.configure(None)
        tasks.store.cache_clear()

    logs = captured_logs.getvalue()
    assert MARKER not in logs and INVALID_BIRTH_DATE not in logs, _lines_with_markers(logs)
    # the warnings that used to leak were raised, and redacted
    assert "is unlikely to represent the intended person name" in logs  # highdicom, single-component names
    assert "Invalid value for VR DA: <redacted>" in logs  # pydicom, invalid birth dates
    assert "dropped (PatientBirthDate" in logs  # the dropped birth dates and id are counted, not quoted

    trail = (tmp_path / "audit.jsonl").read_text()
    assert [json.loads(line)["event"] for line in trail.splitlines()] == ["analysing", "analysed"]
    assert MARKER not in trail and INVALID_BIRTH_DATE not in trail
    with sqlite3.connect(tmp_path / "lv.db") as database:
        dump = "\n".join(database.iterdump())
    assert MARKER not in dump and INVALID_BIRTH_DATE not in dump
    assert MARKER.encode() not in (tmp_path / "lv.db").read_bytes()

    assert answer["finding"] in ("POSITIVE", "NEGATIVE") and store.status == "analysed"
    names = {str(dcmread(path).PatientName) for path in (tmp_path / "outbox" / message.study_instance_uid).iterdir()}
    assert {f"{MARKER}NAME", f"{MARKER}FAMILY^{MARKER}GIVEN", f"{MARKER}ÜMLAUT", f"{MARKER}ADULT"} <= names


def _lines_with_markers(text: str) -> list[str]:
    return [line[:300] for line in text.splitlines() if MARKER in line or INVALID_BIRTH_DATE in line][:5]


# --- each process installs the filter -------------------------------------------------------------


@pytest.fixture
def fresh_logging():
    """Undo what a process's logging set-up does to this (test) process."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logfilter.uninstall()
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_node_and_web_logging_set_up_installs_the_filter(fresh_logging) -> None:
    configure_logging("INFO")  # dicom_node.node and web.commands call this
    assert isinstance(logging.getLogRecordFactory(), logfilter._ScrubbingFactory)
    assert all(
        any(isinstance(f, logfilter.PhiFilter) for f in handler.filters) for handler in logging.getLogger().handlers
    )


def test_celery_logging_set_up_installs_the_filter(fresh_logging) -> None:
    from celery.signals import after_setup_logger, after_setup_task_logger

    import worker.celery_app  # noqa: F401  (connects the signal receivers)

    for signal, name in ((after_setup_logger, None), (after_setup_task_logger, "celery.task")):
        logger = logging.getLogger(name)
        handler = logging.StreamHandler(io.StringIO())
        logger.addHandler(handler)
        try:
            signal.send(sender=None, logger=logger, loglevel=logging.INFO, logfile=None, format="", colorize=False)
            assert any(isinstance(f, logfilter.PhiFilter) for f in handler.filters)
            assert isinstance(logging.getLogRecordFactory(), logfilter._ScrubbingFactory)
        finally:
            logger.removeHandler(handler)


# --- end to end: a real `lungvision serve` ---------------------------------------------------------


@pytest.mark.integration
def test_serve_logs_no_patient_fields(tmp_path) -> None:
    """Marked studies over C-STORE into `lungvision serve`: its log (node, worker and web), audit trail
    and store name no marked patient field."""
    from common.scu import Destination, send_datasets

    study_uid = generate_uid()
    datasets = [
        radiograph(
            0,
            study_uid=study_uid,
            PatientName=f"{MARKER}NAME",
            PatientID=f"{MARKER}ID01",
            ReferringPhysicianName=f"{MARKER}DOCTOR",
        ),
        radiograph(1, study_uid=study_uid, PatientName=f"{MARKER}ADULT", PatientAge="12"),  # no population: refused
    ]
    for dataset in datasets:
        dataset["PatientBirthDate"].value = INVALID_BIRTH_DATE
    serve = Serve(tmp_path, LUNGVISION_LOG_LEVEL="INFO", PYTHONWARNINGS="always").start()
    try:
        assert send_datasets(Destination("LUNGVISION", "127.0.0.1", serve.port), datasets) == [0, 0]
        wait_until(
            lambda: len(serve.results(study_uid)) >= 3,
            timeout_s=180,
            interval_s=0.5,
            message="SC + SR, and the adult's SR",
        )
        assert len(serve.results(study_uid)) == 3
    finally:
        assert serve.terminate() == 0
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "unlikely to represent the intended person name" in log  # highdicom warned, through the filter
    for name, text in [
        ("serve.log", log),
        ("audit", (tmp_path / "var" / "audit.jsonl").read_text()),
        ("store", (tmp_path / "var" / "lungvision.db").read_bytes().decode("latin-1")),
    ]:
        assert MARKER not in text and INVALID_BIRTH_DATE not in text, (name, _lines_with_markers(text))
