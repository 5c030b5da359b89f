"""The HL7 ORU^R01 result: built by the worker task, sent over MLLP to a real listener, parsed here."""

import json
from dataclasses import asdict

import pytest

from common import audit
from common.ports import free_port
from config.settings import Hl7Endpoint
from tests.kit.mllp import MllpListener
from worker.hl7_result import Hl7Job, PatientHeader, build_oru


@pytest.fixture
def hl7_worker(site, monkeypatch):
    """The worker's task module configured for ``site`` with the given HL7 endpoints."""
    from worker import celery_app, tasks

    def configure(port: int, *, include_name: bool = False, max_attempts: int = 5):
        settings = site.settings.model_copy(
            update={
                "hl7": site.settings.hl7.model_copy(
                    update={
                        "endpoints": [
                            Hl7Endpoint(name="ris", host="127.0.0.1", port=port, receiving_application="RIS")
                        ],
                        "include_patient_name": include_name,
                        "timeout_s": 3.0,
                    }
                ),
                "delivery": site.settings.delivery.model_copy(
                    update={"max_attempts": max_attempts, "retry_base_delay_s": 0.01}
                ),
            }
        )
        celery_app.configure(settings)
        tasks.store.cache_clear()
        return tasks

    yield configure
    celery_app.configure(site.settings)
    tasks.store.cache_clear()
    audit.configure(None)


def assert_strict_v25(message) -> None:
    """The message passes hl7apy's strict HL7 v2.5 validation (required fields, data types, structure)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    parse_message(str(message), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()


def job_for(site, accession: str) -> dict:
    """The HL7 task's argument for a seeded study, as the analysis task builds it."""
    [row] = site.store.study_results(site.studies[accession].study_uid)
    return asdict(
        Hl7Job(
            row.message_id,
            "ris",
            row.study_instance_uid,
            row.finding,
            row.probability,
            row.threshold,
            row.model_version,
            row.model_sha256,
            row.analysed_at.isoformat(),
            row.accession_number,
            [uid for image in row.images for uid in (image.sr_uid, image.sc_uid) if uid],
        )
    )


def test_positive_study_gives_an_oru_with_abnormal_flag_and_patient_id(site, hl7_worker) -> None:
    with MllpListener() as listener:
        tasks = hl7_worker(listener.port)
        job = job_for(site, "ACC-POS-HIGH")
        message_id = job["message_id"]
        outcome = tasks.send_hl7_task.apply(args=[job]).get()
    assert outcome == "delivered"
    (message,) = listener.messages
    assert_strict_v25(message)
    assert str(message.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(message.segment("MSH")[12]) == "2.5"
    pid = message.segment("PID")
    assert str(pid[3][0][0]) == site.studies["ACC-POS-HIGH"].patient_id
    assert str(pid[5]) == "WITHHELD^^^^^^S"  # no patient name unless the site asks for it: a pseudo-name
    assert str(message.segment("OBR")[3]) == "ACC-POS-HIGH" and str(message.segment("OBR")[25]) == "F"
    finding, probability = message.segments("OBX")[:2]
    assert str(finding[3][0][0]) == "233604007" and str(finding[5][0][1]) == "Present" and str(finding[8]) == "A"
    assert float(str(probability[5])) == pytest.approx(0.93) and str(probability[8]) == "A"
    assert str(message.segments("OBX")[2][5]) == f"shipped (threshold {job['threshold']:.4f})"  # operating point
    assert str(message.segments("OBX")[4][5]) == site.studies["ACC-POS-HIGH"].study_uid
    events = [json.loads(line) for line in site.settings.audit.path.read_text().splitlines()]
    sent = [e for e in events if e["event"] == "delivered" and e.get("destination") == "hl7:ris"]
    assert sent and sent[-1]["message_id"] == message_id
    trail = site.settings.audit.path.read_text()
    assert site.studies["ACC-POS-HIGH"].patient_id not in trail  # never audited


def test_negative_study_has_normal_flag_and_optional_patient_name(site, hl7_worker) -> None:
    with MllpListener() as listener:
        tasks = hl7_worker(listener.port, include_name=True)
        tasks.send_hl7_task.apply(args=[job_for(site, "ACC-NEG")]).get()
    (message,) = listener.messages
    assert_strict_v25(message)
    finding, probability = message.segments("OBX")[:2]
    assert str(finding[5][0][1]) == "Absent" and str(finding[8]) == "N" and str(probability[8]) == "N"
    assert str(message.segment("PID")[5]) == site.studies["ACC-NEG"].patient_name  # Doe^Patient0


def test_unreachable_or_rejecting_endpoint_is_retried_then_given_up(site, hl7_worker) -> None:
    tasks = hl7_worker(free_port(), max_attempts=2)  # nobody listens there
    job = job_for(site, "ACC-POS-LOW")
    assert tasks.send_hl7_task.apply(args=[job]).get() == "failed"
    with MllpListener(ack_code="AR") as listener:  # an application reject is permanent: one attempt
        tasks = hl7_worker(listener.port, max_attempts=3)
        assert tasks.send_hl7_task.apply(args=[job]).get() == "failed"
    assert len(listener.messages) == 1
    events = [json.loads(line) for line in site.settings.audit.path.read_text().splitlines()]
    failures = [(e["attempts"], e["final"]) for e in events if e["event"] == "failed" and e.get("stage") == "hl7"]
    assert failures[-3:] == [(1, False), (2, True), (1, True)]


def test_a_study_outside_the_intended_use_gets_an_explicit_not_analysed_result(site, hl7_worker) -> None:
    job = {
        **job_for(site, "ACC-NEG"),
        "finding": "NOT_ANALYSED",
        "probability": None,
        "operating_point": "site profile ward-7",
        "remark": "patient age 58 years, model's population 1 to <6 years",
    }
    with MllpListener() as listener:
        tasks = hl7_worker(listener.port)
        assert tasks.send_hl7_task.apply(args=[job]).get() == "delivered"
    (message,) = listener.messages
    assert_strict_v25(message)
    finding, operating_point = message.segments("OBX")[:2]
    assert str(finding[3][0][0]) == "233604007" and str(finding[5]) == "" and str(finding[11]) == "X"
    assert str(finding[8]) == ""  # no abnormal flag without a finding
    assert "LV-PROB" not in str(message)  # never a probability
    assert str(operating_point[5]).startswith("site profile ward-7")
    notes = [str(note[3]) for note in message.segments("NTE")]
    assert notes[1] == "Not analysed: patient age 58 years, model's population 1 to <6 years"


@pytest.mark.parametrize("finding", ["POSITIVE", "NEGATIVE", "NOT_ANALYSED"])
@pytest.mark.parametrize(
    "patient",
    [
        PatientHeader("PID-1", "HOSP", "Doe^Jane^Q^Dr^III", "ACC-9"),
        PatientHeader("", "", "", ""),  # Type 2 attributes left empty in the image
        PatientHeader("A|B^C&D~E\\F", "", "MARKERNAME", "ACC|1"),
    ],
)  # separators, one-part name
@pytest.mark.parametrize("include_name", [False, True])
def test_every_oru_passes_strict_v25_validation(finding, patient, include_name) -> None:
    from config.settings import Hl7Settings

    analysed = finding != "NOT_ANALYSED"
    job = Hl7Job(
        "m-1",
        "ris",
        "1.2.826.0.1.3680043.10.1514.1",
        finding,
        0.42 if analysed else None,
        0.1956,
        "lungvision-resnet18 1.1",
        "ab" * 32,
        "2026-11-30T10:00:00+00:00",
        "ACC-9",
        ["1.2.3"],
        "site profile ward-7",
        None if analysed else "patient age 58 years",
    )
    message = build_oru(
        job,
        patient,
        Hl7Settings(include_patient_name=include_name),
        Hl7Endpoint(name="ris", host="127.0.0.1", port=2575),
        control_id="c0ffee",
    )
    assert_strict_v25(message)
    pid = message.segment("PID")
    if not patient.patient_id:
        assert str(pid[3]) == "UNKNOWN^^^^U"
    if not include_name or not patient.name:
        assert str(pid[5]) == "WITHHELD^^^^^^S"


@pytest.mark.parametrize("operating_point", ["shipped / adults", "site profile ward-7 / children"])
def test_the_operating_point_obx_names_the_population(operating_point) -> None:
    from config.settings import Hl7Settings

    job = Hl7Job(
        "m-1",
        "ris",
        "1.2.826.0.1.3680043.10.1514.1",
        "POSITIVE",
        0.81,
        0.7,
        "lungvision-resnet18 1.2",
        "ab" * 32,
        "2026-11-30T10:00:00+00:00",
        "ACC-9",
        ["1.2.3"],
        operating_point,
    )
    message = build_oru(
        job,
        PatientHeader("PID-1", "", "", "ACC-9"),
        Hl7Settings(),
        Hl7Endpoint(name="ris", host="127.0.0.1", port=2575),
        control_id="c0ffee",
    )
    assert_strict_v25(message)
    point = next(obx for obx in message.segments("OBX") if str(obx[3][0][0]) == "LV-OPPT")
    assert str(point[5]) == f"{operating_point} (threshold 0.7000)"
    assert str(message.segments("OBX")[1][7]) == "<0.7000"  # the population's threshold is the reference range


_MSH = "MSH|^~\\&|LUNGVISION||RIS||20261201083000+0000||ORU^R01^ORU_R01|c0ffee|P|2.5|||AL|NE||UNICODE UTF-8"
_OBR = (
    "OBR|1|ACC\\F\\9|ACC\\F\\9|LV-PNEU^Chest X-ray pneumonia triage (AI)^L|||20261130100000+0000"
    "|||||||||||||||20261130100000+0000|||F"
)
_TAIL = [
    "ST|LV-OPPT^Operating point^L|1|site profile ward-7 / adults (threshold 0.1956)||||||F",
    "ST|LV-MODEL^Algorithm^L|1|lungvision-resnet18 1.1 sha256 " + "ab" * 32 + "||||||F",
    "ST|110180^Study Instance UID^DCM|1|1.2.826.0.1.3680043.10.1514.1||||||F",
]
_NOTE = "NTE|1|L|Lung Vision research software - NOT FOR DIAGNOSTIC USE; must be read by a radiologist"


@pytest.mark.parametrize(
    ("finding", "probability", "patient", "include_name", "expected"),
    [
        (
            "POSITIVE",
            0.8123,
            PatientHeader("PID-1", "HOSP", "Doe^Jane^Q^Dr^III", ""),
            True,
            [
                _MSH,
                "PID|1||PID-1^^^HOSP^PI||Doe^Jane^Q^III^Dr",
                _OBR,
                "OBX|1|CWE|233604007^Pneumonia^SCT|1|52101004^Present^SCT|||A|||F|||20261130100000+0000",
                "OBX|2|NM|LV-PROB^Pneumonia probability (calibrated)^L|1|0.8123|1^^UCUM|<0.1956|A|||F|||"
                "20261130100000+0000",
                *[f"OBX|{number}|{row}" for number, row in enumerate(_TAIL, start=3)],
                _NOTE,
                "NTE|2|L|Outside intended use: patient remark",
            ],
        ),
        (
            "NEGATIVE",
            0.0456,
            PatientHeader("", "", "Doe^Jane", ""),
            False,
            [
                _MSH,
                "PID|1||UNKNOWN^^^^U||WITHHELD^^^^^^S",
                _OBR,
                "OBX|1|CWE|233604007^Pneumonia^SCT|1|2667000^Absent^SCT|||N|||F|||20261130100000+0000",
                "OBX|2|NM|LV-PROB^Pneumonia probability (calibrated)^L|1|0.0456|1^^UCUM|<0.1956|N|||F|||"
                "20261130100000+0000",
                *[f"OBX|{number}|{row}" for number, row in enumerate(_TAIL, start=3)],
                _NOTE,
                "NTE|2|L|Outside intended use: patient remark",
            ],
        ),
        (
            "NOT_ANALYSED",
            None,
            PatientHeader("PID-1", "HOSP", "Doe^Jane^Q^Dr^III", ""),
            True,
            [
                _MSH,
                "PID|1||PID-1^^^HOSP^PI||Doe^Jane^Q^III^Dr",
                _OBR,
                "OBX|1|CWE|233604007^Pneumonia^SCT|1|||||||X|||20261130100000+0000",
                *[f"OBX|{number}|{row}" for number, row in enumerate(_TAIL, start=2)],
                _NOTE,
                "NTE|2|L|Not analysed: patient remark",
            ],
        ),
    ],
)
def test_the_full_oru_message_is_pinned(finding, probability, patient, include_name, expected) -> None:
    from datetime import UTC, datetime

    from config.settings import Hl7Settings

    job = Hl7Job(
        "m-1",
        "ris",
        "1.2.826.0.1.3680043.10.1514.1",
        finding,
        probability,
        0.1956,
        "lungvision-resnet18 1.1",
        "ab" * 32,
        "2026-11-30T10:00:00+00:00",
        "ACC|9",
        ["1.2.3"],
        "site profile ward-7 / adults",
        "patient remark",
    )
    message = build_oru(
        job,
        patient,
        Hl7Settings(include_patient_name=include_name),
        Hl7Endpoint(name="ris", host="127.0.0.1", port=2575, receiving_application="RIS"),
        control_id="c0ffee",
        now=datetime(2026, 12, 1, 8, 30, tzinfo=UTC),
    )
    assert str(message) == "\r".join(expected) + "\r"
