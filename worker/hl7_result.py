"""HL7 result — an analysed study becomes an HL7 v2.5 ORU^R01 message, sent over MLLP to a RIS.

The message carries the finding (OBX 1, SNOMED CT 233604007 "Pneumonia": Present/Absent) and the
calibrated probability (OBX 2, with the threshold as reference range), both with abnormal flag
``A`` for positives and ``N`` for negatives, the operating point (OBX "LV-OPPT": where it comes from
and the population of the study's finding, e.g. "shipped / adults (threshold 0.2000)"), the model
identity and the Study Instance UID.

Patient identity (PID-3, and PID-5 only when ``hl7.include_patient_name``, else a pseudo-name) is read from the
header of one of the study's result files in the outbox at send time — the outcome store holds
none — and is never logged or audited. Messages are built and parsed with python-hl7; MLLP
framing is the standard ``<VT> message <FS><CR>``.
"""

import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import hl7
from pydicom import dcmread

from common.outbox import result_file
from common.results import Finding
from config.settings import Hl7Endpoint, Hl7Settings

START_BLOCK, END_BLOCK, CARRIAGE_RETURN = b"\x0b", b"\x1c", b"\x0d"
# PID-5 is required in v2.5. When the name is withheld (or the image has none) it carries this
# pseudo-name, name type S ("coded pseudo-name to assure anonymity", HL7 table 0200) — not the HL7
# null "" , which tells a receiver to *delete* the name it holds for the patient.
WITHHELD_NAME = ("WITHHELD", "", "", "", "", "", "S")
# PID-3 is required too; an image without Patient ID gets this identifier, type U ("unspecified
# identifier", table 0203), so the result still reaches the RIS, which matches it by accession number.
UNKNOWN_PATIENT_ID = ("UNKNOWN", "", "", "", "U")
PNEUMONIA = ("233604007", "Pneumonia", "SCT")
PRESENT = ("52101004", "Present", "SCT")
ABSENT = ("2667000", "Absent", "SCT")
TRIAGE = ("LV-PNEU", "Chest X-ray pneumonia triage (AI)", "L")  # the order (OBR-4)
PROBABILITY = ("LV-PROB", "Pneumonia probability (calibrated)", "L")


class Hl7DeliveryError(Exception):
    """Sending failed; ``transient`` failures (no connection, timeout, AE/AR ACK) are retried."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Hl7Job:
    """Everything one HL7 result needs except patient identity — the argument of the HL7 task
    (built from the analysis itself, so the task does not depend on when the store row is written)."""

    message_id: str
    endpoint: str
    study_instance_uid: str
    finding: Finding
    probability: float | None  # None when not analysed
    threshold: float
    model_version: str
    model_sha256: str
    analysed_at: str  # ISO 8601
    accession_number: str | None = None
    output_uids: list[str] = field(default_factory=list)  # SR and SC SOP Instance UIDs in the outbox
    operating_point: str = "shipped"  # OperatingPoint.name: "shipped / children", "site profile <id> / adults"
    remark: str | None = None  # why not analysed, or why the result is outside the intended use

    def __post_init__(self) -> None:
        object.__setattr__(self, "finding", Finding(self.finding))  # a plain string after the queue's JSON


@dataclass(frozen=True)
class PatientHeader:
    """What the message needs from the DICOM header: read on demand, never stored or logged."""

    patient_id: str = ""
    issuer: str = ""
    name: str = ""
    accession_number: str = ""


def read_patient_header(outbox: Path, job: Hl7Job) -> PatientHeader:
    """Patient id, issuer, name and accession number from one of the job's result objects in the
    outbox (results copy these attributes from their source image)."""
    for uid in job.output_uids:
        path = result_file(outbox, job.study_instance_uid, uid)
        if path.exists():
            dataset = dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["PatientID", "IssuerOfPatientID", "PatientName", "AccessionNumber"],
            )
            return PatientHeader(
                str(dataset.get("PatientID", "") or ""),
                str(dataset.get("IssuerOfPatientID", "") or ""),
                str(dataset.get("PatientName", "") or ""),
                str(dataset.get("AccessionNumber", "") or ""),
            )
    return PatientHeader(accession_number=job.accession_number or "")


def _hl7_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


_escape = hl7.parse("MSH|^~\\&|").escape  # escapes | ^ ~ \ & in values


def _field(*components: str) -> str:
    """One field of escaped ``^``-separated components, without empty trailing components."""
    return "^".join(_escape(component) for component in components).rstrip("^")


def _segment(name: str, fields: dict[int, str]) -> str:
    """One segment from its fields by HL7 field number (``{3: ...}`` is PID-3), empty ones left out.

    MSH-1 is the field separator itself, so an MSH's first field is MSH-2."""
    last = max(number for number, value in fields.items() if value)
    first = 2 if name == "MSH" else 1
    return "|".join([name, *(fields.get(number, "") for number in range(first, last + 1))])


def _obx(
    value_type: str,
    identifier: tuple[str, ...],
    value: str,
    *,
    units: str = "",
    reference_range: str = "",
    flag: str = "",
    status: str = "F",
    observed: str = "",
) -> dict[int, str]:
    """OBX-2 to OBX-14 of one observation, ``value`` already escaped (OBX-1 is its place in the message)."""
    return {
        2: value_type,
        3: _field(*identifier),
        4: "1",  # observation sub-id
        5: value,
        6: units,
        7: reference_range,
        8: flag,
        11: status,
        14: observed,
    }


def _observations(job: Hl7Job, observed: str) -> list[dict[int, str]]:
    """The OBX rows: finding, probability (analysed rounds only), operating point, model, study."""
    if job.probability is None:  # not analysed: results cannot be obtained (HL7 v2.5 table 0085)
        rows = [_obx("CWE", PNEUMONIA, "", status="X", observed=observed)]
    else:
        positive = job.finding is Finding.POSITIVE
        finding, flag = (_field(*PRESENT), "A") if positive else (_field(*ABSENT), "N")
        probability, normal = f"{job.probability:.4f}", f"<{job.threshold:.4f}"  # normal: below the threshold
        rows = [
            _obx("CWE", PNEUMONIA, finding, flag=flag, observed=observed),
            _obx("NM", PROBABILITY, probability, units="1^^UCUM", reference_range=normal, flag=flag, observed=observed),
        ]
    operating_point = f"{job.operating_point} (threshold {job.threshold:.4f})"
    return [
        *rows,
        _obx("ST", ("LV-OPPT", "Operating point", "L"), _escape(operating_point)),
        _obx("ST", ("LV-MODEL", "Algorithm", "L"), _escape(f"{job.model_version} sha256 {job.model_sha256}")),
        _obx("ST", ("110180", "Study Instance UID", "DCM"), _escape(job.study_instance_uid)),
    ]


def _patient_name(patient: PatientHeader, settings: Hl7Settings) -> str:
    """PID-5: the patient's name where the site asks for it and the image has one, else the pseudo-name."""
    if settings.include_patient_name and patient.name.strip("^ "):
        family, given, middle, prefix, suffix = (patient.name.split("^") + [""] * 5)[:5]  # DICOM PN order
        return _field(family, given, middle, suffix, prefix)  # HL7 XPN order
    return _field(*WITHHELD_NAME)


def build_oru(
    job: Hl7Job,
    patient: PatientHeader,
    settings: Hl7Settings,
    endpoint: Hl7Endpoint,
    *,
    control_id: str,
    now: datetime | None = None,
) -> hl7.Message:
    """The ORU^R01 of one study round (parsed back by python-hl7, so it is well formed).

    A round with a finding carries it and the probability. A round with no analysed image (outside
    the intended use, or nothing analysable) gets an explicit result instead of silence, so the RIS
    never reads "no message" as "no pneumonia": the finding OBX with no value and result status
    ``X`` (HL7 v2.5 table 0085: results cannot be obtained for this observation), no probability,
    and the reason in a note. Every message names the operating point used.
    """
    observed = _hl7_time(datetime.fromisoformat(job.analysed_at))
    accession = _escape(patient.accession_number or job.accession_number or "")
    patient_id = (
        _field(patient.patient_id, "", "", patient.issuer, "PI") if patient.patient_id else _field(*UNKNOWN_PATIENT_ID)
    )
    notes = ["Lung Vision research software - NOT FOR DIAGNOSTIC USE; must be read by a radiologist"]
    if job.remark:
        notes.append(("Not analysed: " if job.probability is None else "Outside intended use: ") + job.remark)
    segments = [
        _segment(
            "MSH",
            {
                2: "^~\\&",
                3: _escape(settings.sending_application),
                4: _escape(settings.sending_facility),
                5: _escape(endpoint.receiving_application),
                6: _escape(endpoint.receiving_facility),
                7: _hl7_time(now or datetime.now(UTC)),
                9: "ORU^R01^ORU_R01",
                10: _escape(control_id),
                11: "P",  # production
                12: "2.5",
                15: "AL",  # accept acknowledgment: always
                16: "NE",  # application acknowledgment: never
                18: "UNICODE UTF-8",
            },
        ),
        _segment("PID", {1: "1", 3: patient_id, 5: _patient_name(patient, settings)}),
        _segment("OBR", {1: "1", 2: accession, 3: accession, 4: _field(*TRIAGE), 7: observed, 22: observed, 25: "F"}),
        *[
            _segment("OBX", {1: str(number), **fields})
            for number, fields in enumerate(_observations(job, observed), start=1)
        ],
        *[_segment("NTE", {1: str(number), 2: "L", 3: _escape(note)}) for number, note in enumerate(notes, start=1)],
    ]
    return hl7.parse("\r".join(segments))


def send_mllp(endpoint: Hl7Endpoint, message: hl7.Message, timeout_s: float) -> hl7.Message:
    """Send one message, wait for its ACK and return it; raise :class:`Hl7DeliveryError` unless
    the ACK accepts it (MSA-1 AA or CA)."""
    payload = START_BLOCK + str(message).encode("utf-8") + END_BLOCK + CARRIAGE_RETURN
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s) as connection:
            connection.settimeout(timeout_s)
            connection.sendall(payload)
            answer = b""
            while END_BLOCK not in answer:
                chunk = connection.recv(65536)
                if not chunk:
                    raise Hl7DeliveryError(f"{endpoint.name}: connection closed before the ACK", transient=True)
                answer += chunk
                if len(answer) > 1 << 20:
                    raise Hl7DeliveryError(f"{endpoint.name}: ACK too large", transient=False)
    except OSError as error:  # refused, unreachable, timeout
        raise Hl7DeliveryError(f"{endpoint.name}: {type(error).__name__}: {error}", transient=True) from None
    text = answer.split(START_BLOCK, 1)[-1].split(END_BLOCK, 1)[0].decode("utf-8", errors="replace")
    try:
        ack = hl7.parse(text)
        code, acked_id = str(ack.segment("MSA")[1]), str(ack.segment("MSA")[2])
    except (hl7.ParseException, KeyError, IndexError) as error:
        raise Hl7DeliveryError(f"{endpoint.name}: unreadable ACK: {error}", transient=True) from None
    if code not in ("AA", "CA"):
        raise Hl7DeliveryError(f"{endpoint.name}: ACK {code}", transient=code in ("AE", "CE"))
    if acked_id != str(message.segment("MSH")[10]):
        raise Hl7DeliveryError(f"{endpoint.name}: ACK for another message ({acked_id})", transient=True)
    return ack
