"""End to end through a PACS: storescu → Orthanc → Orthanc's own Lua auto-routing → node → broker → worker
→ SC + SR back into the same study in Orthanc — and nothing routed twice, nothing of ours routed at all.

Orthanc runs with the very files docker-compose mounts (``config/orthanc/orthanc.json`` and the
``autoroute.lua`` it names); only its ``${VARIABLES}`` (ports, storage, node address) differ.
The broker is a fixture parameter: add an entry to ``BROKERS`` to run the same tests on another transport.
"""

import re
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from common.identity import UID_ROOT
from common.ports import free_port
from common.store import Store
from inference.sample_dicom import wrap_image, write_dataset
from tests.kit.data import chest_pixels
from tests.kit.dcmtk import dcmtk
from tests.kit.dicom_checks import COMPREHENSIVE_SR_CLASS, SC_CLASS, results_complete
from tests.kit.dicom_fixtures import make_image, save
from tests.kit.node import NodeProcess, node_settings
from tests.kit.orthanc import ORTHANC_CONFIG, Orthanc, resolve_config
from tests.kit.redis_server import RedisServer
from tests.kit.wait import wait_until
from tests.kit.worker import WorkerProcess, worker_sections

pytestmark = pytest.mark.integration

STABLE_AGE_S = 2
RESULT_TIMEOUT_S = 90.0
ROUTING_TIMEOUT_S = 30.0


@contextmanager
def redis_broker(folder: Path) -> Iterator[tuple[str, str]]:
    """A redis-server of the test's own (never the machine's Redis)."""
    with RedisServer(folder / "redis") as server:
        yield server.url, server.url


@contextmanager
def embedded_broker(folder: Path) -> Iterator[tuple[str, str]]:
    """The no-server transport of the embedded defaults: SQLite files in the test folder."""
    yield f"sqla+sqlite:///{folder}/broker.sqlite", f"db+sqlite:///{folder}/results.sqlite"


# name → (folder → context giving (broker URL, result backend URL))
BROKERS: dict[str, Callable[[Path], AbstractContextManager[tuple[str, str]]]] = {
    "redis": redis_broker,
    "embedded": embedded_broker,
}


def orthanc_environment(folder: Path, http_port: int, dicom_port: int, node_port: int) -> dict[str, str]:
    """The ``${VARIABLES}`` of ORTHANC_CONFIG for a loopback test (docker-compose sets the same names)."""
    return {
        "ORTHANC_NAME": "lungvision-autoroute-test",
        "ORTHANC_STORAGE_DIR": str(folder / "storage"),
        "ORTHANC_HTTP_PORT": str(http_port),
        "ORTHANC_DICOM_PORT": str(dicom_port),
        "ORTHANC_REMOTE_ACCESS_ALLOWED": "false",
        "ORTHANC_STABLE_AGE": str(STABLE_AGE_S),
        "ORTHANC_LUNGVISION_HOST": "127.0.0.1",
        "ORTHANC_LUNGVISION_PORT": str(node_port),
    }


class AutorouteStack:
    """Orthanc (the shared config), the node and one worker on ``broker`` (URL, result backend)."""

    def __init__(self, folder: Path, broker: tuple[str, str]) -> None:
        settings = node_settings(folder, broker[0])
        http_port, dicom_port = free_port(), free_port()
        environment = orthanc_environment(folder / "orthanc", http_port, dicom_port, settings["node"]["port"])
        self.orthanc_config = resolve_config(ORTHANC_CONFIG, environment)
        self.orthanc = Orthanc(
            folder / "orthanc", http_port, dicom_port, config_file=ORTHANC_CONFIG, environment=environment
        )
        settings.update(
            {
                "broker": {"url": broker[0], "result_backend": broker[1]},
                "destinations": [
                    {
                        "name": "orthanc",
                        "ae_title": self.orthanc_config["DicomAet"],
                        "host": "127.0.0.1",
                        "port": dicom_port,
                    }
                ],
                **worker_sections(
                    folder, visibility_timeout_s=60, dead_letter_key="lungvision:autoroute:dead", max_attempts=5
                ),
            }
        )
        self.node = NodeProcess(folder, settings)
        self.worker = WorkerProcess(self.node.config_path, folder / "worker.log")
        self.store_url = settings["store"]["url"]

    def start(self) -> "AutorouteStack":
        self.node.start()
        self.worker.start()
        self.orthanc.start()
        return self

    def stop(self) -> None:
        self.orthanc.stop()
        self.worker.stop()
        self.node.stop()

    def send_to_orthanc(self, *paths: Path) -> None:
        """storescu → Orthanc (not to us), as a modality would."""
        command = [
            dcmtk("storescu"),
            "-aet",
            "MODALITY1",
            "-aec",
            self.orthanc_config["DicomAet"],
            "127.0.0.1",
            str(self.orthanc.dicom_port),
            *map(str, paths),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr

    def orthanc_study_id(self, study_uid: str) -> str:
        [study_id] = self.orthanc.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        return study_id

    def routing_lines(self, study_uid: str) -> list[str]:
        """The routing script's log lines about the study, oldest first."""
        marker = f"lungvision-autoroute: study {self.orthanc_study_id(study_uid)}: "
        return [line.split(marker, 1)[1] for line in self.orthanc.log().splitlines() if marker in line]

    def wait_for_routing(self, study_uid: str, pattern: str, timeout_s: float = ROUTING_TIMEOUT_S) -> list[str]:
        """Poll until the script logged a line about the study matching ``pattern``; returns all its lines."""
        lines: list[str] = []

        def decided() -> bool:
            nonlocal lines
            lines = self.routing_lines(study_uid)
            return any(re.search(pattern, line) for line in lines)

        wait_until(
            decided,
            timeout_s,
            interval_s=0.5,
            message=lambda: f"a routing decision matching {pattern!r}: {lines}\n{self.orthanc.log_tail()}",
        )
        return lines

    def node_instances(self, study_uid: str) -> list[dict]:
        """The node's ``instance`` log events for the study: every C-STORE it received, in order."""
        return [event for event in self.node.events("instance") if event.get("study_uid") == study_uid]

    def rounds(self, study_uid: str) -> list[int]:
        return sorted(row.round for row in Store(self.store_url).results() if row.study_instance_uid == study_uid)


@pytest.fixture(scope="module", params=sorted(BROKERS))
def stack(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"autoroute-{request.param}")
    with BROKERS[request.param](folder) as broker:
        system = AutorouteStack(folder, broker)
        try:
            system.start()
            yield system
        finally:
            system.stop()


def radiograph(folder: Path, name: str, study_uid: str, index: int = 0, **options) -> Path:
    return write_dataset(wrap_image(chest_pixels(index), study_uid=study_uid, **options), folder / f"{name}.dcm")


def test_orthanc_routes_a_chest_study_once_and_never_our_results(stack, tmp_path) -> None:
    study_uid = generate_uid()
    sources = [
        radiograph(tmp_path, "pa", study_uid, 0),
        radiograph(tmp_path, "lateral", study_uid, 1, view_position="LL"),
    ]
    source_uids = sorted(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in sources)
    stack.send_to_orthanc(*sources)

    # Orthanc's script sends the study to the node; the worker's SC + 2 SRs come back into the study.
    instances = stack.orthanc.wait_for_instances(study_uid, results_complete(2, 1), RESULT_TIMEOUT_S)
    # The study became stable again with our results in it: the script ran again and sent nothing.
    lines = stack.wait_for_routing(study_uid, r"nothing to send \(Lung Vision objects: 3, sent before: 2\b")
    assert [line for line in lines if "sent to lungvision" in line] == [lines[0]], lines
    assert lines[0].startswith("2 instance(s) sent to lungvision")

    # The node received each source exactly once, and never one of our objects.
    received = stack.node_instances(study_uid)
    assert sorted(event["sop_instance_uid"] for event in received) == source_uids
    assert {event["outcome"] for event in received} == {"stored"}
    assert {event["calling_ae"] for event in received} == {stack.orthanc_config["DicomAet"]}
    assert not [
        event
        for event in stack.node.events("instance")
        if event["sop_instance_uid"].startswith(UID_ROOT) or event["outcome"] == "stored-own-object"
    ]
    assert [event["round"] for event in stack.node.events("study.queued") if event["study_uid"] == study_uid] == [1]
    assert stack.rounds(study_uid) == [1]

    # Orthanc holds the sources and one SC + one SR per source, no duplicates, in the same patient/study.
    instances = stack.orthanc.study_instances(study_uid)
    classes = sorted(instance["SOPClassUID"] for instance in instances)
    assert classes.count(SC_CLASS) == 1 and classes.count(COMPREHENSIVE_SR_CLASS) == 2 and len(classes) == 5
    assert {instance["PatientID"] for instance in instances} == {"LV-TEST"}
    ours = [instance for instance in instances if instance["SOPInstanceUID"].startswith(UID_ROOT)]
    assert len(ours) == 3 and {instance["Manufacturer"] for instance in ours} == {"Lung Vision"}


def test_a_chest_image_added_later_is_routed_alone(stack, tmp_path) -> None:
    study_uid = generate_uid()
    first = radiograph(tmp_path, "first", study_uid, 2)
    stack.send_to_orthanc(first)
    stack.orthanc.wait_for_instances(study_uid, results_complete(1, 1), RESULT_TIMEOUT_S)
    stack.wait_for_routing(study_uid, r"nothing to send \(Lung Vision objects: 2, sent before: 1\b")

    # A chest Secondary Capture joins the analysed study: only it is sent, as the node's round 2.
    later = radiograph(tmp_path, "later-sc", study_uid, 3, sop_class="SC", photometric="RGB")
    stack.send_to_orthanc(later)
    stack.orthanc.wait_for_instances(study_uid, results_complete(2, 2), RESULT_TIMEOUT_S)
    lines = stack.wait_for_routing(study_uid, r"nothing to send \(Lung Vision objects: 4, sent before: 2\b")
    assert [line.split(" (")[0] for line in lines if "sent to lungvision" in line] == [
        "1 instance(s) sent to lungvision"
    ] * 2, lines

    received = stack.node_instances(study_uid)
    assert [event["sop_instance_uid"] for event in received] == [
        str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in (first, later)
    ]
    assert stack.rounds(study_uid) == [1, 2]


def test_studies_that_are_not_chest_radiographs_or_only_ours_are_not_routed(stack, tmp_path) -> None:
    knee_study, other_sc_study, ours_study = generate_uid(), generate_uid(), generate_uid()
    knee = radiograph(tmp_path, "knee", knee_study, 4, sop_class="DX", body_part="KNEE")
    other_sc = radiograph(tmp_path, "other-sc", other_sc_study, 4, sop_class="SC", body_part="")
    ours = save(
        make_image(study_uid=ours_study, manufacturer="Lung Vision", sop_uid=generate_uid(prefix=UID_ROOT)),
        tmp_path / "ours.dcm",
    )
    stack.send_to_orthanc(knee, other_sc, ours)

    stack.wait_for_routing(knee_study, r"nothing to send \(Lung Vision objects: 0, sent before: 0, not chest: 1\)")
    stack.wait_for_routing(other_sc_study, r"nothing to send \(Lung Vision objects: 0, sent before: 0, not chest: 1\)")
    stack.wait_for_routing(ours_study, r"nothing to send \(Lung Vision objects: 1, sent before: 0, not chest: 0\)")
    for study_uid in (knee_study, other_sc_study, ours_study):
        assert stack.node_instances(study_uid) == []
