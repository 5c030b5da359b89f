"""Several receiving processes on one port (dicom_node/receivers.py): what one receives is stored and reported to
the node, a dead one is replaced, none outlives the node, and a reload reaches them all.

While the node's own process is stopped (SIGSTOP), only its other receiving processes can accept a connection:
that makes "which process received it" certain instead of up to the kernel.
"""

import os
import signal
import tempfile
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom.uid import generate_uid
from pynetdicom import _config as pynetdicom_config

from common.ports import free_port
from common.spool import Spool
from config.settings import NodeSettings, load_settings
from dicom_node.receivers import AUTO_RECEIVERS_MAX, receiver_count, serve_instances
from tests.kit.dicom_fixtures import make_image
from tests.kit.node import NodeProcess, store_statuses
from tests.kit.wait import wait_until

TWO = {"receivers": 2}


def _is_running(pid: int) -> bool:
    """False once the process is gone or a zombie (its parent died: nobody may have reaped it yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def test_a_receiving_process_stores_and_reports_so_the_node_queues_the_study(node_factory, redis_queue) -> None:
    node: NodeProcess = node_factory(node=TWO, spool={"stable_seconds": 1})
    node.wait_for_event("receiver.started")
    study = generate_uid()
    with node.paused():
        assert store_statuses(node.port, [make_image(study_uid=study) for _ in range(3)]) == [0, 0, 0]
    [message] = redis_queue.wait_for({study}, 1, timeout_s=20)
    assert len(message["instances"]) == 3
    assert {line["receiver"] for line in node.events("instance") if line["study_uid"] == study} == {1}


def test_a_killed_receiving_process_is_replaced_with_backoff_and_the_port_keeps_serving(
    node_factory, redis_queue
) -> None:
    node: NodeProcess = node_factory(node=TWO, spool={"stable_seconds": 1})
    [first] = node.wait_for_event("receiver.started")
    os.kill(first["pid"], signal.SIGKILL)
    [exited] = node.wait_for_event("receiver.exited")
    assert (exited["receiver"], exited["exit_code"], exited["restart_in_s"]) == (1, -signal.SIGKILL, 1.0)
    second = node.wait_for_event("receiver.started", count=2, timeout_s=30)[-1]
    assert second["pid"] != first["pid"]
    os.kill(second["pid"], signal.SIGKILL)  # dies again soon after its start: it waits twice as long
    assert node.wait_for_event("receiver.exited", count=2)[-1]["restart_in_s"] == 2.0
    node.wait_for_event("receiver.started", count=3, timeout_s=30)
    study = generate_uid()
    with node.paused():
        assert store_statuses(node.port, [make_image(study_uid=study)]) == [0]
    assert len(redis_queue.wait_for({study}, 1, timeout_s=20)) == 1


def test_receiving_processes_die_with_a_killed_node_so_a_restart_gets_the_port(node_factory, redis_queue) -> None:
    node: NodeProcess = node_factory(node=TWO)
    [started] = node.wait_for_event("receiver.started")
    node.kill_hard()
    wait_until(lambda: not _is_running(started["pid"]), 10, message="a receiving process outlived its node")
    node.start()  # binds the same port
    assert store_statuses(node.port, [make_image()]) == [0]


def test_a_reloaded_watermark_reaches_every_receiving_process(node_factory) -> None:
    node: NodeProcess = node_factory(node=TWO, spool={"min_free_bytes": 2**62})  # more than any disk has
    node.wait_for_event("receiver.started")
    with node.paused():
        assert store_statuses(node.port, [make_image()]) == [0xA700]
    node.settings["spool"]["min_free_bytes"] = 0
    node.write_config()
    node.signal(signal.SIGHUP)
    node.wait_for_event("receiver.reloaded")
    with node.paused():
        assert store_statuses(node.port, [make_image()]) == [0]


def test_the_default_is_one_receiving_process_per_cpu_up_to_four(monkeypatch) -> None:
    for cpus, expected in ((1, 1), (2, 2), (4, 4), (32, AUTO_RECEIVERS_MAX)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, cpus=cpus: set(range(cpus)))
        assert receiver_count(NodeSettings()) == expected
    assert receiver_count(NodeSettings(receivers=6)) == 6


class NoArrivals:
    def seen(self, study_uid: str, at: float) -> None:
        pass


def test_a_receiving_process_reads_values_without_pydicom_validating_them(tmp_path, monkeypatch) -> None:
    """The node checks what it uses itself; pydicom's checks of every UID of every association request (≈ 8 ms
    of CPU an association) are off in a process that serves instances."""
    # what serve_instances sets for the whole process, restored after the test
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.WARN)
    monkeypatch.setattr(pynetdicom_config, "STORE_RECV_CHUNKED_DATASET", False)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    settings = load_settings(
        node={"port": free_port(), "bind_address": "127.0.0.1"}, spool={"dir": str(tmp_path / "spool")}
    )
    spool = Spool(settings.spool.dir, 0)
    spool.prepare()
    server = serve_instances(settings, spool, NoArrivals())
    try:
        assert pydicom_config.settings.reading_validation_mode == pydicom_config.IGNORE
    finally:
        server.shutdown()
