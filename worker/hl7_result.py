"""HL7 result — an analysed study becomes an HL7 v2.5 ORU^R01 message, sent over MLLP to a RIS.

The message carries the finding (OBX 1, SNOMED CT 233604007 "Pneumonia": Present/Absent) and the
calibrated probability (OBX 2, with the threshold as reference range), both with abnormal flag
``A`` for positives and ``N`` for negatives, the model identity and the Study Instance UID.

Patient identity (PID-3, and PID-5 only when ``hl7.include_patient_name``) is read from the
header of one of the study's result files in the outbox at send time — the outcome store holds
none — and is never logged or audited. Messages are built and parsed with python-hl7; MLLP
framing is the standard ``<VT> message <FS><CR>``.
"""

import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import hl7
from pydicom import dcmread

from config.settings import Hl7Endpoint, Hl7Settings

START_BLOCK, END_BLOCK, CARRIAGE_RETURN = b"\x0b", b"\x1c", b"\x0d"
PNEUMONIA = ("233604007", "Pneumonia", "SCT")
PRESENT = ("52101004", "Present", "SCT")
ABSENT = ("2667000", "Absent", "SCT")


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
    finding: str  # POSITIVE | NEGATIVE
    probability: float
    threshold: float
    model_version: str
    model_sha256: str
    analysed_at: str  # ISO 8601
    accession_number: str | None = None
    output_uids: list[str] = field(default_factory=list)  # SR and SC SOP Instance UIDs in the outbox


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
        path = outbox / job.study_instance_uid / f"{uid}.dcm"
        if path.exists():
            dataset = dcmread(path, stop_before_pixels=True,
                              specific_tags=["PatientID", "IssuerOfPatientID", "PatientName", "AccessionNumber"])
            return PatientHeader(str(dataset.get("PatientID", "") or ""), str(dataset.get("IssuerOfPatientID", "") or ""),
                                 str(dataset.get("PatientName", "") or ""), str(dataset.get("AccessionNumber", "") or ""))
    return PatientHeader(accession_number=job.accession_number or "")


def _hl7_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S+0000")


def build_oru(job: Hl7Job, patient: PatientHeader, settings: Hl7Settings, endpoint: Hl7Endpoint, *,
              control_id: str, now: datetime | None = None) -> hl7.Message:
    """The ORU^R01 of one analysed study round (parsed back by python-hl7, so it is well formed)."""
    now = now or datetime.now(timezone.utc)
    escape = hl7.parse("MSH|^~\\&|").escape  # escapes | ^ ~ \ & in values

    def field(*components: str) -> str:
        return "^".join(escape(component) for component in components).rstrip("^")  # no empty trailing parts

    positive = job.finding == "POSITIVE"
    flag = "A" if positive else "N"
    observed = _hl7_time(datetime.fromisoformat(job.analysed_at))
    name = ""
    if settings.include_patient_name and patient.name:
        family, given, middle, prefix, suffix = (patient.name.split("^") + [""] * 5)[:5]  # DICOM PN order
        name = field(family, given, middle, suffix, prefix)  # HL7 XPN order
    accession = escape(patient.accession_number or job.accession_number or "")
    probability = f"{job.probability:.4f}"
    segments = [
        "|".join(["MSH", "^~\\&", escape(settings.sending_application), escape(settings.sending_facility),
                  escape(endpoint.receiving_application), escape(endpoint.receiving_facility), _hl7_time(now), "",
                  "ORU^R01^ORU_R01", escape(control_id), "P", "2.5", "", "", "AL", "NE", "", "UNICODE UTF-8"]),
        "|".join(["PID", "1", "", field(patient.patient_id, "", "", patient.issuer, "PI") if patient.patient_id else "",
                  "", name]),
        "|".join(["OBR", "1", accession, accession, field("LV-PNEU", "Chest X-ray pneumonia triage (AI)", "L"), "", "",
                  observed, *[""] * 14, observed, "", "", "F"]),
        "|".join(["OBX", "1", "CWE", field(*PNEUMONIA), "1", field(*(PRESENT if positive else ABSENT)), "", "", flag,
                  "", "", "F", "", "", observed]),
        "|".join(["OBX", "2", "NM", field("LV-PROB", "Pneumonia probability (calibrated)", "L"), "1", probability,
                  field("1", "", "UCUM"), f"<{job.threshold:.4f}", flag, "", "", "F", "", "", observed]),
        "|".join(["OBX", "3", "ST", field("LV-MODEL", "Algorithm", "L"), "1",
                  escape(f"{job.model_version} sha256 {job.model_sha256}"), "", "", "", "", "", "F"]),
        "|".join(["OBX", "4", "ST", field("110180", "Study Instance UID", "DCM"), "1",
                  escape(job.study_instance_uid), "", "", "", "", "", "F"]),
        "|".join(["NTE", "1", "L", escape("Lung Vision research software - NOT FOR DIAGNOSTIC USE; "
                                          "must be read by a radiologist")]),
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
