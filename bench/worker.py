"""Benchmark — per-study wall time of the worker pipeline, stage by stage, into a real Orthanc.

Run: ``.venv/bin/python bench/worker.py [--studies 12]``. Each study is one generated ~2000×2500
16-bit CR (uncompressed). Prints median and p95 per stage (read+decode, preprocess, model+heatmap,
encode — SC build (overlay and highdicom), SR build, durable write — and send) and page faults for
studies run one after another, the ratio of encoding to model+heatmap of the same studies, then
studies/s with 2 worker processes. Nothing is asserted.

Every study runs as in a worker's pool process (``as_in_a_pool_process``): torch on the pool's thread
count, glibc's allocator set up as the worker sets it (its huge-page tunable too: the script restarts
itself with it, as ``lungvision serve`` starts the worker), free memory returned when the process has been
idle for ``worker.return_memory_after_idle_s`` (as the worker's ``ReturnMemoryWhenIdle``), and the objects
of the model and the warm-up study frozen out of the garbage collector's sight.

``--gap S`` waits S seconds before each study, as studies arriving one at a time leave the worker idle;
``--return-memory-after-idle S`` sets the idle time (0: after each study). On a VM whose balloon device
reports free pages to the host, the two together show what returning memory costs the next study
(docs/worker.md, *Memory*).
"""

import argparse
import gc
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# This script shares its name with the package it measures: look for packages in the repo, not in bench/.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from common.ports import free_port
from config.settings import load_settings
from inference.classifier import load_classifier
from inference.sample_dicom import wrap_image, write_dataset
from tests.kit.data import chest_pixels
from tests.kit.orthanc import Orthanc
from tests.kit.worker import make_message
from worker.deliver import send_files
from worker.pipeline import analyse_study, device_uid_for
from worker.preload import POOL_TORCH_THREADS, ReturnMemoryWhenIdle, set_large_block_thresholds, worker_environment

ENCODE = ("sc_build", "sr_build", "write")  # the pipeline's encode stages, also shown together as "encode"
STAGES = ("read_decode", "preprocess", "model_heatmap", *ENCODE, "send")
ROWS = ("read_decode", "preprocess", "model_heatmap", *ENCODE, "encode", "send", "total")


def make_studies(folder: Path, count: int) -> list[Path]:
    """``count`` one-image studies: a chest radiograph upscaled to 2500×2000, 16-bit CR."""
    pixels = np.asarray(Image.fromarray(chest_pixels()).resize((2000, 2500), Image.BICUBIC))
    return [write_dataset(wrap_image(pixels, bits_stored=16), folder / f"study-{index}.dcm") for index in range(count)]


def as_in_a_pool_process() -> None:
    """This process's torch threads and glibc thresholds as in a worker's pool process (worker/preload.py).

    With torch's default threads instead (2 on a 2-core machine), OpenMP's second thread spins on for
    ≈ 10 ms of CPU after each forward pass, beside the SC build that follows: on a busy machine that
    build then waited for a core, a tail the worker's pool processes (one torch thread) do not have."""
    import torch

    torch.set_num_threads(POOL_TORCH_THREADS)
    set_large_block_thresholds()


def run_one(path: Path, outbox: Path, settings, idle: ReturnMemoryWhenIdle) -> dict[str, float]:
    """Analyse and deliver one study as one worker task (``idle`` told of its start and end, as Celery's
    signals tell the worker's); return its stage timings in ms and its page faults (``page_faults``)."""
    idle.task_started()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    classifier = load_classifier()
    outcome = analyse_study(
        make_message([path]),
        classifier,
        classifier.intended_use(),
        outbox,
        device_uid=device_uid_for("BENCH"),
        max_long_side=1024,
    )
    started = time.perf_counter()
    send_files(settings, "orthanc", outcome.files)
    timings = {**outcome.timings_ms, "send": (time.perf_counter() - started) * 1000}
    timings["page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    idle.task_finished()
    return timings


def _worker(arguments) -> int:
    paths, outbox, settings = arguments
    as_in_a_pool_process()
    idle = ReturnMemoryWhenIdle(settings.worker.return_memory_after_idle_s)
    for path in paths:
        run_one(path, outbox, settings, idle)
    return len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument(
        "--gap", type=float, default=0.0, help="seconds between studies (bench/end_to_end.py's pace: ≈ 1.2)"
    )
    parser.add_argument(
        "--return-memory-after-idle",
        type=float,
        default=None,
        metavar="S",
        help="return free memory after S seconds without a study (0: after each); default: the setting's",
    )
    arguments = parser.parse_args()
    count = arguments.studies
    if not os.environ.get("GLIBC_TUNABLES"):
        # glibc reads its tunables when a process starts: start again with the worker's
        os.execve(sys.executable, [sys.executable, *sys.argv], worker_environment(dict(os.environ)))
    as_in_a_pool_process()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        orthanc = Orthanc(folder / "orthanc", free_port(), free_port()).start()
        try:
            settings = load_settings(
                destinations=[
                    {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
                ],
                **(
                    {}
                    if arguments.return_memory_after_idle is None
                    else {"worker": {"return_memory_after_idle_s": arguments.return_memory_after_idle}}
                ),
            )
            idle = ReturnMemoryWhenIdle(settings.worker.return_memory_after_idle_s)
            paths = make_studies(folder, count)
            load_classifier()
            run_one(paths[0], folder / "warmup", settings, ReturnMemoryWhenIdle(0))
            gc.collect()  # as load_before_fork does after its warm-up study
            gc.freeze()
            timings = []
            for path in paths:
                time.sleep(arguments.gap)
                timings.append(run_one(path, folder / "outbox", settings, idle))
            print(
                f"{count} studies, one 2500x2000 16-bit CR each, sequential, as in a pool process "
                f"(torch threads: {POOL_TORCH_THREADS}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')}), "
                f"{arguments.gap:g} s apart, free memory returned after {idle.idle_s:g} s idle"
            )
            print(f"{'stage':>14} | {'median ms':>9} | {'p95 ms':>8}")
            for stage in ROWS:
                parts = {"encode": ENCODE, "total": STAGES}.get(stage, (stage,))
                values = [sum(t[part] for part in parts) for t in timings]
                print(f"{stage:>14} | {np.median(values):>9.1f} | {np.percentile(values, 95):>8.1f}")
            faults = [t["page_faults"] for t in timings]
            print(
                f"page faults per study (a huge page is one): median {np.median(faults):.0f}, "
                f"p95 {np.percentile(faults, 95):.0f}"
            )
            ratios = [sum(t[part] for part in ENCODE) / t["model_heatmap"] for t in timings]
            print(
                f"encode / model+heatmap, same studies: median {np.median(ratios):.2f}x "
                f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)"
            )

            halves = [(paths[0::2], folder / "outbox-a", settings), (paths[1::2], folder / "outbox-b", settings)]
            started = time.perf_counter()
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                done = sum(pool.map(_worker, halves))
            elapsed = time.perf_counter() - started
            print(
                f"concurrency 2 (2 processes, 1 torch thread each): {done / elapsed:.2f} studies/s "
                f"({done} studies in {elapsed:.1f} s, process start-up and model load included)"
            )
        finally:
            orthanc.stop()


if __name__ == "__main__":
    main()
