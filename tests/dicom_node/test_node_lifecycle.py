"""Node processes with their own settings: TLS, the disk watermark, and kill -9 between spool and queue."""

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from common.scu import ClientTls, DeliveryError, Destination, send_datasets
from tests.kit.dcmtk import dcmtk
from tests.kit.dicom_fixtures import make_image
from tests.kit.node import store_statuses

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl CLI)."""
    openssl = shutil.which("openssl") or pytest.skip("openssl CLI not installed")
    folder = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Lung Vision test CA",
    )
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        extension = ["-extfile", "server.ext"] if name == "server" else []
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            *extension,
        )
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_mutual_tls_associations_work_and_plain_or_anonymous_ones_do_not(node_factory, redis_queue, certificates):
    node = node_factory(
        node={
            "unknown_storage_classes": "refuse",
            "tls": {
                "enabled": True,
                "cert_file": str(certificates["server.pem"]),
                "key_file": str(certificates["server.key"]),
                "ca_file": str(certificates["ca.pem"]),
                "require_client_cert": True,
            },
        }
    )
    tls = ClientTls(
        ca_file=certificates["ca.pem"],
        cert_file=certificates["client.pem"],
        key_file=certificates["client.key"],
        server_hostname="localhost",
    )
    destination = Destination("LUNGVISION", "127.0.0.1", node.port, tls)
    study = generate_uid()
    assert send_datasets(destination, [make_image(study_uid=study), make_image(study_uid=study)]) == [0, 0]
    assert len(redis_queue.wait_for({study}, 1, timeout_s=20)[0]["instances"]) == 2

    echo = subprocess.run(
        [
            dcmtk("echoscu"),
            "+tls",
            certificates["client.key"],
            certificates["client.pem"],
            "+cf",
            certificates["ca.pem"],
            "-aec",
            "LUNGVISION",
            "127.0.0.1",
            str(node.port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert echo.returncode == 0, echo.stderr

    plain = AE(ae_title="PLAIN")
    plain.acse_timeout = plain.network_timeout = 5
    plain.add_requested_context(Verification)
    assert not plain.associate("127.0.0.1", node.port, ae_title="LUNGVISION").is_established
    no_client_certificate = ClientTls(ca_file=certificates["ca.pem"], server_hostname="localhost")
    with pytest.raises(DeliveryError):
        send_datasets(Destination("LUNGVISION", "127.0.0.1", node.port, no_client_certificate), [make_image()])

    with pytest.raises(DeliveryError) as refused:  # policy "refuse": the CT context is not accepted
        send_datasets(destination, [make_image(sop_class_uid=CTImageStorage)])
    assert refused.value.status is None and not refused.value.transient
    assert refused.value.sop_instance_uid is not None


def test_low_disk_watermark_answers_out_of_resources_then_recovers_without_restart(node_factory, redis_queue):
    node = node_factory(spool={"min_free_bytes": 2**62})  # more than any disk has
    study = generate_uid()
    dataset = make_image(study_uid=study)
    assert store_statuses(node.port, [dataset]) == [0xA700]
    assert node.spooled(study) == []
    with pytest.raises(DeliveryError) as full:
        send_datasets(Destination("LUNGVISION", "127.0.0.1", node.port), [dataset])
    assert (full.value.status, full.value.transient) == (0xA700, True)
    assert full.value.sop_instance_uid == str(dataset.SOPInstanceUID)

    node.settings["spool"]["min_free_bytes"] = 0  # space is back (here: the operator lowers the watermark)
    node.write_config()
    node.signal(signal.SIGHUP)
    node.wait_for_event("config.reloaded")
    if node.receivers() > 1:  # every process must have it: any of them may take the next association
        node.wait_for_event("receiver.reloaded", count=node.receivers() - 1)
    assert store_statuses(node.port, [dataset]) == [0]
    assert len(node.spooled(study)) == 1
    assert len(redis_queue.wait_for({study}, 1, timeout_s=20)) == 1


def test_kill_9_after_spooling_then_restart_dispatches_the_study_exactly_once(node_factory, redis_queue):
    node = node_factory(spool={"stable_seconds": 3})
    study = generate_uid()
    assert store_statuses(node.port, [make_image(study_uid=study) for _ in range(3)]) == [0, 0, 0]
    node.kill_hard()  # well inside stable_seconds: nothing was queued yet
    assert len(node.spooled(study)) == 3
    assert redis_queue.for_studies({study}) == []

    node.start()
    [message] = redis_queue.wait_for({study}, 1, timeout_s=20)
    assert len(message["instances"]) == 3
    node.wait_for_event("study.queued")  # logged once queued.json is on disk
    node.kill_hard()  # dies again right after queueing: the restart must not queue it a second time
    node.start()
    assert len(redis_queue.wait_for({study}, 2, timeout_s=5)) == 1
    assert node.events("spool.recovered")[-1]["unqueued_rounds"] == 0
