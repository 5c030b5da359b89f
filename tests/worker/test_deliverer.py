"""The deliverer's share of the work: the result tasks load no model code, and an analysis worker leaves the
result queue to a deliverer when ``delivery.by_deliverer`` says one runs. (The deliverer as a real process,
with Orthanc: tests/integration/test_worker_orthanc.py.)"""

import json
import subprocess
import sys

from common.messages import DELIVERY_QUEUE
from common.messages import QUEUE as ANALYSIS_QUEUE
from config.settings import load_settings
from tests.kit.data import REPO
from worker.commands import worker_queues

MODEL_MODULES = ("torch", "torchvision", "inference.classifier", "worker.pipeline")
PROBE = """
import json
import sys
from config.settings import load_settings
from worker.celery_app import configure

app = configure(load_settings(), deliverer={deliverer})
app.loader.import_default_modules()  # what a Celery worker imports at start
print(json.dumps([sorted(set({model_modules}) & set(sys.modules)), "lungvision.deliver" in app.tasks]))
"""


def imported_by(*, deliverer: bool) -> tuple[list[str], bool]:
    """The model modules a fresh worker (or deliverer) process has imported with its tasks, and whether the
    delivery task is among these."""
    probe = PROBE.format(deliverer=deliverer, model_modules=MODEL_MODULES)
    answer = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    modules, delivers = json.loads(answer.stdout)
    return modules, delivers


def test_the_result_tasks_import_no_model_code() -> None:
    assert imported_by(deliverer=True) == ([], True)  # the delivery task, no model code
    assert imported_by(deliverer=False)[0] != []  # (an analysis worker's do: the probe sees them)


def test_an_analysis_worker_leaves_results_to_a_deliverer_only_when_one_runs() -> None:
    assert worker_queues(load_settings()) == [DELIVERY_QUEUE, ANALYSIS_QUEUE]  # results first, then studies
    assert worker_queues(load_settings(delivery={"by_deliverer": True})) == [ANALYSIS_QUEUE]
