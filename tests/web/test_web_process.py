"""The web process never loads the worker, the model or torch: a fresh interpreter creates the app from
settings, serves the worklist, the API and the metrics, replays a dead letter (sent by task name), and
has imported nothing of ``worker``, ``inference`` or ``torch``."""

import json
import subprocess
import sys

from tests.kit.data import REPO

WEB_PROCESS = r"""
import json, sys
from pathlib import Path

from fastapi.testclient import TestClient

from common.dead_letters import DeadLetters, DeliveryJob, new_dead_letter
from common.store import Store
from config.settings import load_settings
from web.app import create_app

root = Path(sys.argv[1])
settings = load_settings(store={"url": f"sqlite:///{root / 'lv.db'}"},
                         broker={"url": f"sqla+sqlite:///{root / 'broker.sqlite'}",
                                 "result_backend": f"db+sqlite:///{root / 'results.sqlite'}"},
                         audit={"path": str(root / "audit.jsonl")}, web={"auth_token": "secret"})
job = DeliveryJob("m1", "1.2.3", "pacs", [])
letter = DeadLetters(Store(settings.store.url)).add(new_dead_letter(job, "refused", 5))
client = TestClient(create_app(settings))
bearer = {"Authorization": "Bearer secret"}
answers = {"/": client.get("/").status_code, "/api/studies": client.get("/api/studies").status_code,
           "/metrics": client.get("/metrics").status_code,
           "replay": client.post(f"/api/dead-letters/{letter.id}/replay", headers=bearer).status_code,
           "dead letters left": len(client.get("/api/dead-letters", headers=bearer).json())}
metrics = client.get("/metrics").text.splitlines()
broker_up = [line for line in metrics if line.startswith("lungvision_broker_up")]
loaded = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "worker", "inference"})
print(json.dumps({"answers": answers, "broker_up": broker_up, "loaded": loaded}))
"""


def test_the_web_process_imports_no_worker_no_model_and_no_torch(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WEB_PROCESS, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["answers"] == {"/": 200, "/api/studies": 200, "/metrics": 200, "replay": 200, "dead letters left": 0}
    assert report["broker_up"] == ["lungvision_broker_up 1.0"]
    assert report["loaded"] == []
