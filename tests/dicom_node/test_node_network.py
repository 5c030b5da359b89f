"""The node as a real process on loopback, with real peers (dcmtk, pynetdicom) and Redis as the broker."""

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage

from common.identity import MANUFACTURER
from dicom_node.intake import StoreStatus
from tests.kit.dcmtk import dcmtk
from tests.kit.dicom_fixtures import (
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    encoded_body,
    make_image,
    raw_part10,
    save,
    truncated_copy,
)
from tests.kit.node import NodeProcess, node_settings, store_statuses
from tests.kit.redis_server import RedisServer
from tests.kit.wait import wait_until

pytestmark = pytest.mark.integration

STABLE_S = 3
SETTLE_S = 1.5  # after a study's task appeared: time in which a (wrong) second one would have followed
QUIET_S = STABLE_S + 1.5  # after a store: time in which a (wrong) first task would have appeared


@pytest.fixture(scope="module")
def node(tmp_path_factory, redis_server: RedisServer):
    """One node shared by this module's tests; each test uses its own study UIDs."""
    folder = tmp_path_factory.mktemp("node")
    allowed = [{"ae_title": title} for title in ("STORESCU", "ECHOSCU", "PYSCU")]
    allowed.append({"ae_title": "HOSTCHECK", "hosts": ["10.9.9.0/24"]})
    process = NodeProcess(
        folder,
        node_settings(
            folder, redis_server.url, node={"allowed_calling_aes": allowed}, spool={"stable_seconds": STABLE_S}
        ),
    )
    process.start()
    yield process
    process.stop()


def run_tool(*args: object, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(arg) for arg in args], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
    )


def test_dcmtk_echoscu_is_answered(node: NodeProcess) -> None:
    result = run_tool(dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "LUNGVISION", "127.0.0.1", node.port)
    assert result.returncode == 0, result.stderr
    assert node.wait_for_event("echo")[-1]["status"] == "0x0000"


def test_dcmtk_storescu_instance_is_spooled_then_queued_exactly_once(node, redis_queue, tmp_path) -> None:
    study = generate_uid()
    path = save(make_image(study_uid=study), tmp_path / "cr.dcm")
    result = run_tool(dcmtk("storescu"), "-aet", "STORESCU", "-aec", "LUNGVISION", "127.0.0.1", node.port, path)
    assert result.returncode == 0, result.stderr
    assert len(node.spooled(study)) == 1  # on disk before storescu got its success
    [message] = redis_queue.wait_for({study}, 1, timeout_s=STABLE_S + 15)
    assert message["calling_ae"] == "STORESCU" and message["round"] == 1
    [instance] = message["instances"]
    assert instance["sop_class_uid"] == ComputedRadiographyImageStorage
    assert Path(instance["path"]).is_file() and Path(instance["path"]).is_relative_to(node.spool)
    [(task_id, task_name, _)] = [t for t in redis_queue.tasks() if t[2]["study_instance_uid"] == study]
    assert (task_id, task_name) == (message["message_id"], "lungvision.analyse_study")
    assert len(redis_queue.wait_for({study}, 2, timeout_s=SETTLE_S)) == 1


def test_compressed_and_deflated_instances_are_accepted_as_sent(node, redis_queue, tmp_path) -> None:
    study = generate_uid()
    conversions = [  # dcmtk converter (+ options), storescu's proposal option, the transfer syntax written
        (("dcmcjpeg",), "-xs", "1.2.840.10008.1.2.4.70"),
        (("dcmcrle",), "-xr", "1.2.840.10008.1.2.5"),
        (("dcmcjpls",), "-xt", "1.2.840.10008.1.2.4.80"),
        (("dcmconv", "+td"), "-xd", "1.2.840.10008.1.2.1.99"),
    ]
    for (tool, *options), proposal, _syntax in conversions:
        plain = save(make_image(study_uid=study), tmp_path / f"{tool}-plain.dcm")
        converted = tmp_path / f"{tool}.dcm"
        result = run_tool(dcmtk(tool), *options, plain, converted)
        assert result.returncode == 0, result.stderr
        result = run_tool(
            dcmtk("storescu"), proposal, "-aet", "STORESCU", "-aec", "LUNGVISION", "127.0.0.1", node.port, converted
        )
        assert result.returncode == 0, result.stderr
    [message] = redis_queue.wait_for({study}, 1, timeout_s=STABLE_S + 15)
    assert sorted(i["transfer_syntax_uid"] for i in message["instances"]) == sorted(c[2] for c in conversions)


def test_200_instances_over_8_parallel_associations_are_all_spooled_with_one_task_per_study(
    node, redis_queue, tmp_path
) -> None:
    studies = [generate_uid() for _ in range(4)]
    folders = [tmp_path / f"association-{index}" for index in range(8)]
    for folder in folders:
        folder.mkdir()
    for index in range(200):
        dataset = make_image(study_uid=studies[index % 4])
        save(dataset, folders[index % 8] / f"{index:03d}.dcm")
    storescu = dcmtk("storescu")

    def send(folder: Path) -> subprocess.CompletedProcess:
        return run_tool(
            storescu, "-aet", "STORESCU", "-aec", "LUNGVISION", "+sd", "127.0.0.1", node.port, folder, timeout_s=120
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send, folders))
    assert all(result.returncode == 0 for result in results), [r.stderr[-500:] for r in results]
    assert sorted(len(node.spooled(study)) for study in studies) == [50, 50, 50, 50]
    messages = redis_queue.wait_for(set(studies), 4, timeout_s=STABLE_S + 20)
    messages = redis_queue.wait_for(set(studies), 5, timeout_s=SETTLE_S)
    assert sorted(m["study_instance_uid"] for m in messages) == sorted(studies)
    assert all(len(m["instances"]) == 50 for m in messages)


def test_calling_aes_off_the_allow_list_or_from_other_hosts_are_rejected(node: NodeProcess) -> None:
    result = run_tool(dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "LUNGVISION", "127.0.0.1", node.port)
    assert result.returncode != 0
    for title in ("INTRUDER2", "HOSTCHECK"):  # HOSTCHECK is allowed, but only from 10.9.9.0/24
        ae = AE(ae_title=title)
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="LUNGVISION")
        assert assoc.is_rejected
    titles = {"INTRUDER", "INTRUDER2", "HOSTCHECK"}

    def rejected() -> list[dict]:  # earlier tests' associations are in the same log, some logged just now
        found = [e for e in node.events("association") if e["result"] == "rejected" and e["calling_ae"] in titles]
        return found if {e["calling_ae"] for e in found} == titles else []

    logged = wait_until(rejected, timeout_s=20, message=lambda: f"3 rejections logged; log tail:\n{node.log_tail()}")
    assert any("not allowed from 127.0.0.1" in (e["reason"] or "") for e in logged)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_bad_payloads_get_failure_statuses_and_the_node_keeps_serving(node, tmp_path) -> None:
    study = generate_uid()
    good = make_image(study_uid=study)
    full = save(make_image(study_uid=study), tmp_path / "full.dcm")
    ct = make_image(study_uid=study, sop_class_uid=CTImageStorage)
    cr = {"sop_class_uid": ComputedRadiographyImageStorage}
    payloads = [
        raw_part10(tmp_path / "empty.dcm", b"", sop_uid=generate_uid(), **cr),
        raw_part10(tmp_path / "garbage.dcm", b"this is not DICOM at all" * 40, sop_uid=generate_uid(), **cr),
        truncated_copy(full, tmp_path / "truncated.dcm", drop_bytes=1000),
        raw_part10(tmp_path / "ct-as-cr.dcm", encoded_body(ct), sop_uid=str(ct.SOPInstanceUID), **cr),
        good,
    ]
    statuses = store_statuses(node.port, payloads)
    assert all(0xC000 <= status <= 0xCFFF for status in statuses[:3]), [hex(s) for s in statuses]
    assert statuses[3] == 0xA900
    assert statuses[4] == 0x0000
    assert [path.name for path in node.spooled(study)] == [f"{good.SOPInstanceUID}.dcm"]
    assert run_tool(dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "LUNGVISION", "127.0.0.1", node.port).returncode == 0


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
def test_path_traversal_and_malformed_uids_cannot_escape_the_spool(node: NodeProcess) -> None:
    hostile = [
        make_image(study_uid="../../escaped-study"),
        make_image(study_uid="1.2/../../../escaped-study"),
        make_image(study_uid=""),
        make_image(study_uid="1." * 40 + "1"),
        make_image(series_uid="../../escaped-series"),
        make_image(sop_uid="../../../escaped-instance"),
    ]
    statuses = store_statuses(node.port, hostile)
    assert statuses == [0xC001] * len(hostile), [hex(s) for s in statuses]
    root = node.folder.parent
    assert not [path for path in root.rglob("escaped*")]
    assert sorted(path.name for path in node.folder.iterdir()) == ["node.log", "node.yaml", "spool"]
    assert sorted(path.name for path in node.spool.iterdir()) == [".locks", ".receiving", "studies"]


def test_duplicates_are_stored_once_and_later_instances_make_a_second_round(node, redis_queue) -> None:
    study = generate_uid()
    first, later = make_image(study_uid=study), make_image(study_uid=study)
    assert store_statuses(node.port, [first, first]) == [0, 0]
    [round_1] = redis_queue.wait_for({study}, 1, timeout_s=STABLE_S + 15)
    assert store_statuses(node.port, [first, later]) == [0, 0]  # the resent one is still stored once
    rounds = redis_queue.wait_for({study}, 2, timeout_s=STABLE_S + 15)
    assert len(redis_queue.wait_for({study}, 3, timeout_s=SETTLE_S)) == 2
    assert [(m["round"], [i["sop_instance_uid"] for i in m["instances"]]) for m in rounds] == [
        (1, [str(first.SOPInstanceUID)]),
        (2, [str(later.SOPInstanceUID)]),
    ]
    assert len(node.spooled(study)) == 2
    assert round_1["message_id"] != rounds[1]["message_id"]


def test_other_storage_classes_are_ignored_by_default_policy(node: NodeProcess) -> None:
    study = generate_uid()
    assert store_statuses(node.port, [make_image(study_uid=study, sop_class_uid=CTImageStorage)]) == [0]
    assert node.spooled(study) == []
    assert node.wait_for_event("instance")[-1]["outcome"] == "ignored-sop-class"


def test_our_own_results_are_stored_but_never_queued(node, redis_queue) -> None:
    study = generate_uid()
    assert store_statuses(node.port, [make_image(study_uid=study, manufacturer=MANUFACTURER)]) == [0]
    assert [path.parent.name for path in node.spooled(study)] == ["own"]
    assert redis_queue.wait_for({study}, 1, timeout_s=QUIET_S) == []


def test_log_lines_are_structured_and_free_of_patient_data(node: NodeProcess) -> None:
    text = node.log_path.read_text()
    for secret in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, PATIENT_BIRTH_DATE):
        assert secret not in text
    instance = node.events("instance")[-1]
    assert {"calling_ae", "sop_class", "transfer_syntax", "status", "ms", "association"} <= instance.keys()
    association = node.events("association")[-1]
    assert {"calling_ae", "peer", "result", "instances", "ms"} <= association.keys()


def test_a_cut_file_sent_by_pynetdicom_is_refused_and_neither_spooled_nor_queued(node, redis_queue, tmp_path) -> None:
    """Issue 10: a 512×512 16-bit CR whose last 200 kB were cut, sent with a plain ``send_c_store(path)``."""
    cut_study, good_study = generate_uid(), generate_uid()
    whole = save(make_image(study_uid=cut_study, size=(512, 512)), tmp_path / "whole.dcm")
    cut = truncated_copy(whole, tmp_path / "cut.dcm", drop_bytes=200_000)
    good = make_image(study_uid=good_study)
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LUNGVISION")
    assert assoc.is_established
    try:
        refused = assoc.send_c_store(str(cut))
        accepted = assoc.send_c_store(good)  # the same association goes on
    finally:
        assoc.release()
    assert refused.Status == StoreStatus.CANNOT_UNDERSTAND == 0xC000
    assert refused.ErrorComment == "incomplete-pixel-data: Pixel Data has 324288 of 524288 bytes"
    assert accepted.Status == 0x0000
    assert node.spooled(cut_study) == []
    assert not (node.spool / "studies" / cut_study).exists()
    assert list((node.spool / ".receiving").iterdir()) == []  # the payload was not kept either
    # The good study, sent after the cut one, is queued; the cut one would have been queued no later.
    assert len(redis_queue.wait_for({good_study}, 1, timeout_s=STABLE_S + 15)) == 1
    assert redis_queue.for_studies({cut_study}) == []
    [event] = [e for e in node.events("instance") if e["study_uid"] == cut_study]
    assert (event["status"], event["outcome"]) == ("0xC000", "incomplete-pixel-data")
