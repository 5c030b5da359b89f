"""``lungvision demo --keep``: the loop that keeps the worklist up after the demo, until a stop signal.

The whole demo with ``--keep`` runs in tests/lungvision/test_serve.py; here the keep loop alone, with a
small HTTP server standing in for ``serve``, so that it runs in seconds.
"""

import signal
import subprocess
import sys
import urllib.request

import pytest

from common.ports import free_port
from lungvision.demo import keep_serving
from tests.kit.data import REPO
from tests.kit.serve import listening, output_lines, wait_for_line

STOP_WAIT_S = 30

# What run_demo does around keep_serving: the server is up, keep it until a signal, then stop it.
HARNESS = """
import subprocess, sys
from lungvision.demo import keep_serving
from common.ports import wait_until_listening
port = int(sys.argv[1])
server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    wait_until_listening(port, server, 30)
    code = keep_serving(server, f"http://127.0.0.1:{port}/")
finally:
    server.terminate()
    server.wait(timeout=30)
raise SystemExit(code)
"""


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_keep_serving_answers_until_a_stop_signal_then_exits_0(stop_signal) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", HARNESS, str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = wait_for_line(output_lines(process.stdout), "Ctrl-C to stop", timeout_s=60)
        url = f"http://127.0.0.1:{port}/"
        assert line.strip() == f"worklist at {url} — Ctrl-C to stop"
        with urllib.request.urlopen(url, timeout=10) as answer:  # still answering while kept
            assert answer.status == 200
        assert process.poll() is None
        process.send_signal(stop_signal)
        assert process.wait(timeout=STOP_WAIT_S) == 0
        assert not listening(port)  # the server was stopped with it
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_keep_serving_returns_1_when_the_server_exits_on_its_own(capsys) -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    server = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert keep_serving(server, "http://127.0.0.1:1/") == 1
    assert "exited with status 3" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
