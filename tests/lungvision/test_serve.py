"""`lungvision serve` and `lungvision demo` on embedded defaults: no Redis, no PACS, nothing lost."""

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from common.ports import wait_until_listening
from common.scu import Destination, send_datasets
from inference.sample_dicom import wrap_image
from lungvision.demo import sample_studies
from tests.kit.data import REPO, chest_pixels
from tests.kit.mllp import MllpListener
from tests.kit.serve import Serve, listening, output_lines, rest_of, wait_for_line
from tests.kit.wait import wait_until

pytestmark = pytest.mark.integration


def test_demo_shows_a_result_for_every_sample_study(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lungvision", "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    descriptions = [study.description for study in sample_studies()]
    rows = {line[:56].strip(): line for line in result.stdout.splitlines() if line[:56].strip() in descriptions}
    assert len(rows) == 6, result.stdout
    knee, adult = rows["knee DX (not a chest)"], rows[descriptions[-1]]
    assert "NOT_ANALYSED" in knee and "body part KNEE is not the chest" in knee
    assert "NOT_ANALYSED" in adult and "patient age 12 years" in adult  # the intended-use gate: no population
    assert all(("POSITIVE" in line or "NEGATIVE" in line) for line in list(rows.values())[:4])
    assert "lateral view" in rows[descriptions[1]]
    files = list((tmp_path / "demo" / "var" / "out").rglob("*.dcm"))
    assert len(files) == 4 * 2 + 3  # SC + SR per analysed image, an SR each for the lateral, the knee, the 12-year-old


def test_demo_keep_keeps_the_worklist_up_after_the_results_until_ctrl_c(tmp_path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "lungvision", "demo", "--keep", "--workdir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    lines, seen = output_lines(process.stdout), []
    try:
        line = wait_for_line(lines, "Ctrl-C to stop", timeout_s=600, seen=seen)  # after the results table
        url = line.split("worklist at ", 1)[1].split(" ", 1)[0]
        with urllib.request.urlopen(f"{url}api/studies", timeout=10) as answer:
            assert len(json.load(answer)) == len(sample_studies())
        time.sleep(2)
        with urllib.request.urlopen(url, timeout=10) as answer:  # still there: not stopped after the demo
            assert answer.status == 200
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=180)
        serve_log = (tmp_path / "demo" / "serve.log").read_text(errors="replace")[-20000:]
        assert code == 0, "".join(seen) + rest_of(lines) + "\nserve.log (end):\n" + serve_log
        assert not listening(int(url.rstrip("/").rsplit(":", 1)[1]))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def get_json(url: str, **headers: str):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as answer:
        return json.loads(answer.read())


def test_sigterm_exits_cleanly_and_a_restart_loses_nothing(tmp_path) -> None:
    """Also: after the restart the study reaches the worklist, /metrics, the audit trail and an HL7 listener."""
    with MllpListener() as listener:
        endpoints = json.dumps([{"name": "ris", "host": "127.0.0.1", "port": listener.port}])
        serve = Serve(tmp_path, LUNGVISION_HL7__ENDPOINTS=endpoints, LUNGVISION_WEB__AUTH_TOKEN="serve-token").start()
        study_uid = generate_uid()
        dataset = wrap_image(chest_pixels(), study_uid=study_uid)
        statuses = send_datasets(Destination("LUNGVISION", "127.0.0.1", serve.port), [dataset])
        assert statuses == [0x0000]
        assert serve.terminate() == 0  # stopped before the study was complete (stable_seconds = 3)
        assert serve.results(study_uid) == []

        serve.start()
        try:
            wait_until(
                lambda: len(serve.results(study_uid)) >= 2,
                timeout_s=120,
                interval_s=0.5,
                message="the study's results in var/out",
            )
            assert len(serve.results(study_uid)) == 2  # the heatmap SC and the SR

            api = f"http://127.0.0.1:{serve.web_port}"

            def study_now() -> dict:
                try:
                    return get_json(f"{api}/api/studies/{study_uid}")
                except OSError:  # the web server is still starting
                    return {}

            def delivered_and_sent() -> dict:
                study = study_now()
                return study if study.get("status") == "delivered" and listener.messages else {}

            study = wait_until(
                delivered_and_sent,
                timeout_s=120,
                interval_s=0.5,
                message=lambda: (
                    f"the study delivered and its HL7 result received; HL7 messages: {len(listener.messages)}, "
                    f"study: {study_now()}\nserve.log (end):\n{serve.log()[-6000:]}"
                ),
            )
            assert study["status"] == "delivered" and study["finding"] in ("POSITIVE", "NEGATIVE"), study
            assert study["patient"] is None
            assert (
                get_json(f"{api}/api/studies/{study_uid}", Authorization="Bearer serve-token")["patient"]["patient_id"]
                == "LV-TEST"
            )
            (message,) = listener.messages
            assert str(message.segment("OBX")[8]) == ("A" if study["finding"] == "POSITIVE" else "N")
            assert str(message.segment("PID")[3][0][0]) == "LV-TEST"
            with urllib.request.urlopen(f"{api}/metrics", timeout=10) as answer:
                metrics = answer.read().decode()
            assert "lungvision_instances_received_total 1.0" in metrics
            assert "lungvision_studies_queued_total 1.0" in metrics
            assert "lungvision_task_duration_seconds_count 1.0" in metrics
            assert 'lungvision_deliveries_total{kind="hl7"} 1.0' in metrics
            assert "lungvision_queue_depth 0.0" in metrics
            trail = (tmp_path / "var" / "audit.jsonl").read_text()
            events = [json.loads(line)["event"] for line in trail.splitlines()]
            assert events.count("received") == 1 and events.count("delivered") == 2, events  # folder + HL7
            assert {"queued", "analysing", "analysed"} <= set(events)
            assert "LV-TEST" not in trail and "Test^Patient" not in trail
        finally:
            assert serve.terminate() == 0


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process from /proc, or None when it no longer exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:  # it ended while we looked: that is an answer, not an error
        return None
    state, parent, group = stat[stat.rindex(")") + 2 :].split()[:3]  # the command name may hold spaces
    return state, int(parent), int(group)


def _live_processes() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, process group) of every process that is not a zombie."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None and stat[0] != "Z":
            found[int(entry.name)] = stat[1:]
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except FileNotFoundError:  # ended meanwhile
        return "?"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_killed_serve_takes_its_children_along_and_a_new_serve_gets_the_same_ports(tmp_path) -> None:
    """Issue 10: kill -9 of serve must not orphan node, worker (with its pool), deliverer or web."""
    serve = Serve(tmp_path).start()
    children = {pid: _command(pid) for pid, (parent, _) in _live_processes().items() if parent == serve.process.pid}
    assert sorted(command.split()[-1] for command in children.values()) == ["deliverer", "node", "web", "worker"], (
        children
    )
    groups = set(children)  # serve starts each child as the leader of a group (session) of its own
    assert len([pid for pid, (_, group) in _live_processes().items() if group in groups]) > len(groups)  # the pool

    serve.process.kill()  # SIGKILL: serve runs no clean-up of its own
    serve.process.wait(timeout=30)

    def left() -> list[int]:
        return [pid for pid, (_, group) in _live_processes().items() if group in groups]

    wait_until(
        lambda: not left(),
        timeout_s=120,
        interval_s=0.5,
        message=lambda: f"serve's children gone; left: {[(pid, _command(pid)) for pid in left()]}",
    )

    serve.start()  # the same folder, the same node and web ports
    try:
        [listening] = [json.loads(line) for line in serve.log().splitlines() if '"event": "node.listening"' in line]
        assert listening["port"] == serve.port
        wait_until_listening(serve.web_port, serve.process, timeout_s=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{serve.web_port}/api/studies", timeout=10) as answer:
            assert answer.status == 200
    finally:
        assert serve.terminate() == 0
