"""Web test fixtures: the seeded site (the ``site`` fixture, tests/conftest.py) on a real socket."""

import threading

import pytest

from common.ports import free_port
from tests.kit.wait import wait_until


@pytest.fixture(scope="module")
def live_server(site) -> str:
    """The web app on a real socket (uvicorn in a thread), for the browser."""
    import uvicorn

    from web.app import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(site.settings), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout_s=20, interval_s=0.05, message="uvicorn started")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
