"""Node → Redis → worker → deliverer → Orthanc, with real processes (as ``lungvision serve`` and docker compose
run them): results arrive in the same study, exactly once, through an Orthanc outage and a SIGKILLed worker
or deliverer; lateral and non-chest images get "not analysed" SRs; the deliverer loads no model and keeps
several deliveries to one destination in flight."""

import io
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, CTImageStorage, SecondaryCaptureImageStorage

from common.ports import free_port
from common.store import Store
from common.uids import output_instance_uid
from dicom_node.enqueue import CeleryEnqueuer
from inference.classifier import load_classifier
from inference.sample_dicom import wrap_image, write_dataset
from tests.kit.data import DICOM_SAMPLES, chest_pixels
from tests.kit.dcmtk import dcmtk
from tests.kit.dicom_checks import COMPREHENSIVE_SR_CLASS, SC_CLASS, results_complete, sr_values
from tests.kit.node import NodeProcess, node_settings
from tests.kit.orthanc import Orthanc
from tests.kit.redis_server import RedisServer
from tests.kit.wait import wait_until
from tests.kit.worker import WorkerProcess, make_message, worker_sections

pytestmark = pytest.mark.integration
RESULT_TIMEOUT_S = 120.0
STORESCU_PROPOSAL = {  # storescu option that proposes a compressed file's own transfer syntax
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    RLELossless: "-xr",
}


class Deployment:
    """Orthanc as the destination PACS, the node, a Redis of its own, a worker and a deliverer, sharing one config."""

    def __init__(self, folder) -> None:
        self.redis = RedisServer(folder / "redis")
        redis_url = self.redis.url
        settings = node_settings(folder, redis_url)
        self.archive_port = free_port()
        self.orthanc = Orthanc(
            folder / "orthanc",
            free_port(),
            free_port(),
            {"DicomModalities": {"lungvision": ["LUNGVISION", "127.0.0.1", settings["node"]["port"]]}},
        )
        settings.update(
            {
                "broker": {"url": redis_url, "result_backend": redis_url},
                **worker_sections(
                    folder, visibility_timeout_s=20, dead_letter_key="lungvision:test:dead", max_attempts=12
                ),
                "destinations": [
                    {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": self.orthanc.dicom_port},
                    {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": self.archive_port},
                ],
                "routing": [{"destinations": ["orthanc"]}, {"calling_ae": "TO_ARCHIVE", "destinations": ["archive"]}],
            }
        )
        settings["delivery"]["by_deliverer"] = True
        self.node = NodeProcess(folder, settings)
        self.worker = WorkerProcess(self.node.config_path, folder / "worker.log")
        self.deliverer = WorkerProcess(self.node.config_path, folder / "deliverer.log", command="deliverer")
        self.store_url = settings["store"]["url"]
        self.broker_url = redis_url
        self.folder = folder

    def send(self, *paths, calling_ae: str = "MODALITY1") -> None:
        """storescu → the node, one association per transfer syntax, proposing that syntax."""
        by_option: dict[str, list[str]] = {}
        for path in paths:
            syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
            by_option.setdefault(STORESCU_PROPOSAL.get(syntax, "-x="), []).append(str(path))
        for option, files in by_option.items():
            command = [
                dcmtk("storescu"),
                "-aet",
                calling_ae,
                "-aec",
                "LUNGVISION",
                option,
                "127.0.0.1",
                str(self.node.port),
                *files,
            ]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr

    def store(self) -> Store:
        return Store(self.store_url)

    def jobs(self, *arguments: str) -> subprocess.CompletedProcess:
        """``lungvision jobs ...`` with the deployment's config."""
        return subprocess.run(
            [sys.executable, "-m", "lungvision", "--config", str(self.node.config_path), "jobs", *arguments],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.folder,
        )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deployment")
    system = Deployment(folder)
    system.redis.start()
    system.orthanc.start()
    system.node.start()
    system.worker.start()
    system.deliverer.start()
    yield system
    system.deliverer.stop()
    system.worker.stop()
    system.node.stop()
    system.orthanc.stop()
    system.redis.stop()


def chest_study(folder, name: str, count: int = 1, **options) -> list:
    study_uid = generate_uid()
    paths = []
    for index in range(count):
        dataset = wrap_image(chest_pixels(index), study_uid=study_uid, **options)
        paths.append(write_dataset(dataset, folder / f"{name}-{index}.dcm"))
    return paths


def sr_of(orthanc: Orthanc, source_uid: str):
    """The SR about ``source_uid`` in Orthanc, found by its deterministic SOP Instance UID."""
    sr_uid = output_instance_uid(source_uid, load_classifier().card.weights_sha256, "sr")
    [instance_id] = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sr_uid}})
    with urllib.request.urlopen(f"{orthanc.url}/instances/{instance_id}/file", timeout=10) as response:
        return dcmread(io.BytesIO(response.read()))


def test_results_arrive_in_the_same_study_and_say_what_the_model_said(deployment, tmp_path) -> None:
    [path] = chest_study(tmp_path, "basic")
    source = dcmread(path, stop_before_pixels=True)
    deployment.send(path)
    instances = deployment.orthanc.wait_for_instances(source.StudyInstanceUID, results_complete(1, 1), RESULT_TIMEOUT_S)
    assert all(instance["PatientID"] == source.PatientID for instance in instances)
    [row] = [r for r in deployment.store().results() if r.study_instance_uid == source.StudyInstanceUID]
    values = sr_values(sr_of(deployment.orthanc, source.SOPInstanceUID))
    assert values["Pneumonia probability (calibrated)"][0] == pytest.approx(row.probability, abs=1e-4)
    assert values["Pneumonia"][0] == ("Present" if row.finding == "POSITIVE" else "Absent")

    # The same study sent again: the node stores each SOP Instance UID once, so nothing is re-queued.
    deployment.send(path)
    # Analysing it again (a replayed message, as after a crash): the outputs carry the same UIDs.
    replay = make_message(deployment.node.spooled(source.StudyInstanceUID), message_id=generate_uid())
    CeleryEnqueuer(deployment.broker_url).send(replay)

    def replay_analysed() -> bool:
        row = deployment.store().result(replay.message_id)
        return row is not None and row.status != "analysing"

    wait_until(replay_analysed, RESULT_TIMEOUT_S, interval_s=0.5, message="the replayed message analysed")
    rows = [r for r in deployment.store().results() if r.study_instance_uid == source.StudyInstanceUID]
    assert len(rows) == 2 and {r.round for r in rows} == {1}

    def all_delivered() -> bool:
        return all(d.status == "delivered" for r in rows for d in deployment.store().deliveries(r.message_id))

    wait_until(all_delivered, RESULT_TIMEOUT_S, interval_s=0.5, message="every delivery of both rounds delivered")
    classes = [i["SOPClassUID"] for i in deployment.orthanc.study_instances(source.StudyInstanceUID)]
    assert classes.count(SC_CLASS) == 1 and classes.count(COMPREHENSIVE_SR_CLASS) == 1

    # No patient name or id in any log or audit line of ours.
    logs = (
        deployment.worker.log() + deployment.node.log_path.read_text() + (deployment.folder / "audit.jsonl").read_text()
    )
    assert str(source.PatientName) not in logs and str(source.PatientID) not in logs


def test_lateral_and_non_chest_images_get_not_analysed_srs(deployment, tmp_path) -> None:
    study_uid = generate_uid()
    lateral = write_dataset(wrap_image(chest_pixels(3), view_position="LL", study_uid=study_uid), tmp_path / "lat.dcm")
    knee = write_dataset(
        wrap_image(chest_pixels(4), sop_class="DX", body_part="KNEE", study_uid=study_uid), tmp_path / "knee.dcm"
    )
    deployment.send(lateral, knee)
    deployment.orthanc.wait_for_instances(study_uid, results_complete(2, 0), RESULT_TIMEOUT_S)
    reasons = {
        path.name: sr_values(sr_of(deployment.orthanc, dcmread(path).SOPInstanceUID))["Image not analysed"]
        for path in (lateral, knee)
    }
    assert reasons == {"lat.dcm": ["lateral view (ViewPosition LL)"], "knee.dcm": ["body part KNEE is not the chest"]}


@pytest.mark.parametrize(
    "options",
    [
        {"photometric": "MONOCHROME1", "bits_stored": 12, "transfer_syntax": JPEG2000},
        {"photometric": "MONOCHROME1", "bits_stored": 15, "transfer_syntax": JPEGLSLossless},
        {"transfer_syntax": JPEGBaseline8Bit},
        {"bits_stored": 16, "transfer_syntax": RLELossless},
    ],
    ids=["mono1-j2k", "mono1-jpegls", "jpeg-baseline", "rle-16bit"],
)
def test_compressed_and_monochrome1_inputs(deployment, tmp_path, options) -> None:
    [path] = chest_study(tmp_path, "compressed", **options)
    study_uid = dcmread(path, stop_before_pixels=True).StudyInstanceUID
    deployment.send(path)
    deployment.orthanc.wait_for_instances(study_uid, results_complete(1, 1), RESULT_TIMEOUT_S)


def test_vendor_samples_are_decoded_and_analysed_as_adults(deployment) -> None:
    """The three real vendor files decode, and, being adult frontal chest films with an adult age, are
    inside the model's intended use: each gets an SC (heatmap) and an SR at the adults' operating point."""
    samples = sorted(DICOM_SAMPLES.glob("*.dcm")) if DICOM_SAMPLES.exists() else []
    if not samples:
        pytest.skip("no vendor samples in ../shared/data/dicom_samples")
    deployment.send(*samples)
    for path in samples:
        study_uid = dcmread(path, stop_before_pixels=True).StudyInstanceUID
        deployment.orthanc.wait_for_instances(study_uid, results_complete(1, 1), RESULT_TIMEOUT_S)
        [row] = [r for r in deployment.store().results() if r.study_instance_uid == study_uid]
        [image] = row.images
        assert image.intended_use is True and image.probability is not None and image.sc_uid
        assert image.population == "adults" and image.operating_point == "shipped / adults"


def test_results_arrive_after_a_30_second_orthanc_outage(deployment, tmp_path) -> None:
    [path] = chest_study(tmp_path, "outage")
    study_uid = dcmread(path, stop_before_pixels=True).StudyInstanceUID
    deployment.orthanc.stop()
    stopped_at = time.monotonic()
    try:
        deployment.send(path)

        def retrying() -> list:
            rows = [r for r in deployment.store().results() if r.study_instance_uid == study_uid]
            return [d for r in rows for d in deployment.store().deliveries(r.message_id) if d.status == "retrying"]

        wait_until(
            retrying,
            timeout_s=stopped_at + 25 - time.monotonic(),
            interval_s=0.5,
            message="the delivery retried while Orthanc was down",
        )
        time.sleep(max(0.0, 30 - (time.monotonic() - stopped_at)))
    finally:
        deployment.orthanc.start()
    deployment.orthanc.wait_for_instances(study_uid, results_complete(1, 1), RESULT_TIMEOUT_S)
    [row] = [r for r in deployment.store().results() if r.study_instance_uid == study_uid]
    wait_until(
        lambda: deployment.store().deliveries(row.message_id)[0].status == "delivered",
        timeout_s=30,
        interval_s=0.5,
        message="the delivery marked delivered",
    )  # just after the last C-STORE response
    [delivery] = deployment.store().deliveries(row.message_id)
    assert delivery.status == "delivered" and delivery.attempts > 1


def test_a_sigkilled_worker_still_delivers_exactly_once(deployment, tmp_path) -> None:
    paths = chest_study(tmp_path, "sigkill", count=6)
    study_uid = dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    received_before = deployment.worker.log().count("lungvision.analyse_study[")
    deployment.send(*paths)
    deployment.worker.wait_for_log("lungvision.analyse_study[", count=received_before + 1, timeout_s=60)
    deployment.worker.kill_hard()
    deployment.worker.start()
    deployment.orthanc.wait_for_instances(study_uid, results_complete(6, 6), RESULT_TIMEOUT_S)
    time.sleep(3)  # give a (wrong) duplicate delivery the chance to land
    instances = deployment.orthanc.study_instances(study_uid)
    classes = [instance["SOPClassUID"] for instance in instances]
    assert classes.count(SC_CLASS) == 6 and classes.count(COMPREHENSIVE_SR_CLASS) == 6


class ArchiveScp:
    """A pynetdicom storage SCP on ``port`` accepting only ``sop_classes``, answering each C-STORE after
    ``delay_s``; it keeps the received UIDs and the most C-STOREs it had in hand at once."""

    def __init__(self, port: int, sop_classes: list[str], delay_s: float = 0.0) -> None:
        self.received: list[str] = []
        self.started = 0  # C-STOREs that reached the handler
        self.in_hand = self.most_in_hand = 0
        self.delay_s = delay_s
        self.lock = threading.Lock()
        ae = AE(ae_title="ARCHIVE")
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        with self.lock:
            self.started += 1
            self.in_hand += 1
            self.most_in_hand = max(self.most_in_hand, self.in_hand)
        time.sleep(self.delay_s)
        with self.lock:
            self.in_hand -= 1
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def shutdown(self) -> None:
        """Stop listening and end the associations in progress (pynetdicom's shutdown alone leaves them up)."""
        for association in self.server.active_associations:
            association.abort()
        self.server.shutdown()


RESULT_CLASSES = [SecondaryCaptureImageStorage, ComprehensiveSRStorage]


def test_a_refused_delivery_is_dead_lettered_and_can_be_replayed(deployment, tmp_path) -> None:
    server = ArchiveScp(deployment.archive_port, [CTImageStorage])  # refuses SC and SR
    try:
        [path] = chest_study(tmp_path, "deadletter")
        deployment.send(path, calling_ae="TO_ARCHIVE")

        def failed_jobs() -> str:
            listing = deployment.jobs("failed").stdout
            return listing if "archive" in listing else ""

        listing = wait_until(
            failed_jobs, RESULT_TIMEOUT_S, interval_s=1, message="the refused delivery in `lungvision jobs failed`"
        )
    finally:
        server.shutdown()
    job_id = next(line.split()[0] for line in listing.splitlines() if "archive" in line)

    server = ArchiveScp(deployment.archive_port, RESULT_CLASSES)
    try:
        replay = deployment.jobs("retry", job_id)
        assert replay.returncode == 0, replay.stderr
        received = server.received
        wait_until(lambda: len(received) >= 2, RESULT_TIMEOUT_S, interval_s=0.5, message="the replayed SC and SR")
        assert len(received) == 2  # the SC and the SR
        assert job_id not in deployment.jobs("failed").stdout
        assert deployment.jobs("retry", job_id).returncode == 2  # gone from the list
    finally:
        server.shutdown()


def mapped_files(pid: int) -> str:
    """The files mapped into process ``pid`` (its shared libraries among them)."""
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_deliverer_sends_the_results_and_loads_no_model(deployment, tmp_path) -> None:
    [path] = chest_study(tmp_path, "deliverer")
    study_uid = dcmread(path, stop_before_pixels=True).StudyInstanceUID
    deployment.send(path)
    deployment.orthanc.wait_for_instances(study_uid, results_complete(1, 1), RESULT_TIMEOUT_S)
    [row] = [r for r in deployment.store().results() if r.study_instance_uid == study_uid]
    deployment.deliverer.wait_for_log(f"delivered {row.message_id} to orthanc", timeout_s=30)
    assert f"delivered {row.message_id}" not in deployment.worker.log()  # the worker left it to the deliverer
    assert deployment.deliverer.process is not None and deployment.worker.process is not None
    assert "libtorch" not in mapped_files(deployment.deliverer.process.pid)
    assert "libtorch" in mapped_files(deployment.worker.process.pid)  # (the check can see torch)


def test_the_next_study_is_sent_while_the_previous_is_acknowledged(deployment, tmp_path) -> None:
    """Each C-STORE is answered after 1.5 s: the second study's objects go out on a second association
    while the first study's wait for their answers."""
    server = ArchiveScp(deployment.archive_port, RESULT_CLASSES, delay_s=1.5)
    try:
        for name in ("overlap-1", "overlap-2"):
            deployment.send(*chest_study(tmp_path, name), calling_ae="TO_ARCHIVE")
        wait_until(
            lambda: len(server.received) >= 4, RESULT_TIMEOUT_S, interval_s=0.5, message="both studies' SC and SR"
        )
        assert server.most_in_hand == 2
    finally:
        server.shutdown()


def test_a_sigkilled_deliverer_still_delivers(deployment, tmp_path) -> None:
    """Killed while the destination holds its C-STORE: the delivery returns to the queue (acknowledged only
    once sent) and the restarted deliverer sends it."""
    server = ArchiveScp(deployment.archive_port, RESULT_CLASSES, delay_s=2.0)
    try:
        [path] = chest_study(tmp_path, "kill-deliverer")
        study_uid = dcmread(path, stop_before_pixels=True).StudyInstanceUID
        deployment.send(path, calling_ae="TO_ARCHIVE")
        wait_until(lambda: server.started >= 1, RESULT_TIMEOUT_S, interval_s=0.1, message="a C-STORE in hand")
        deployment.deliverer.kill_hard()
        deployment.deliverer.start()
        [row] = [r for r in deployment.store().results() if r.study_instance_uid == study_uid]

        def delivered() -> bool:
            deliveries = deployment.store().deliveries(row.message_id)
            return [d.status for d in deliveries if d.destination == "archive"] == ["delivered"]

        wait_until(delivered, RESULT_TIMEOUT_S, interval_s=0.5, message="the delivery sent by the new deliverer")
        sc_uid, sr_uid = row.images[0].output_uids
        assert {sc_uid, sr_uid} <= set(server.received)
    finally:
        server.shutdown()
