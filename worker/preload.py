"""Load before fork: the worker's parent process loads the model before Celery forks its pool, so the
pool processes share the weights' memory pages (copy-on-write) and none of them spends its first
study loading the model.

Torch and fork: GNU OpenMP, the thread pool of PyTorch's Linux wheels, does not survive a fork — a
pool process whose parent had started OpenMP threads waits for ever for threads it does not have in
its first parallel region. So the parent runs torch on one thread (no OpenMP threads are ever
started there), and so does each pool process (see ``POOL_TORCH_THREADS``).
"""

import ctypes
import functools
import gc
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread

from config.settings import Settings

if TYPE_CHECKING:
    from inference.classifier import Classifier

log = logging.getLogger("lungvision.worker")


def load_before_fork(settings: Settings) -> None:
    """In the worker's parent process, before the pool forks: load the model, on one torch thread."""
    import torch

    torch.set_num_threads(1)  # before any torch work here: see the module's note on OpenMP and fork
    set_large_block_thresholds()  # inherited by the pool processes
    classifier = _load_model(settings)
    if classifier is not None:
        warm_up_or_log(classifier, settings)
    # Move everything alive now out of the garbage collector's sight, so collections in the pool
    # processes do not write to (and so copy) the pages of the objects they inherited.
    gc.collect()
    gc.freeze()
    return_free_memory()  # what loading and the warm-up freed: no pool process inherits it


# Torch threads of a pool process: one, whatever the cores. A study's torch work (a 224-pixel model, one
# resize of the image) is too small to gain from a second OpenMP thread, and in a worker that waits between
# studies that thread cost more than it gave: with 2 threads a pool process (concurrency 1 on 2 cores)
# analysed a study in ≈ 30–40 ms more and used ≈ 55–60 ms more CPU (bench/end_to_end.py, issue 12). More cores
# are used by more pool processes (``worker.concurrency``), which also keeps them apart.
POOL_TORCH_THREADS = 1

_warm_up_ms: float | None = None  # set by warm_up in the parent; the pool processes inherit it and log it


def warm_up_or_log(classifier: "Classifier", settings: Settings) -> None:
    """The warm-up study, or an error logged when it fails: the worker starts without it (each pool process
    then loads lazily, and a study that fails the same way is recorded as failed with its reason)."""
    try:
        warm_up(classifier, settings)
    except Exception as error:  # any failure of the synthetic study must not keep the worker from starting
        log.error("the warm-up study failed (%s: %s); the worker starts without it", type(error).__name__, error)


def warm_up(classifier: "Classifier", settings: Settings) -> None:
    """Run one synthetic study through analyse and encode, in the parent: the lazy loads of a first study
    happen here once — highdicom's map of the standard (≈ 60 MB of Python objects, parsed from JSON on
    first use), fonts, colour maps, codecs — in pages the pool processes share, and none of them pays
    for them on its first real study."""
    import numpy as np

    from common.messages import InstanceRef, StudyReady
    from inference.sample_dicom import wrap_image, write_dataset
    from worker.pipeline import analyse_study, device_uid_for

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lungvision-warm-up-") as folder:
        pixels = np.linspace(0, 255, 512 * 512, dtype=np.float32).reshape(512, 512).astype(np.uint8)
        path = write_dataset(wrap_image(pixels), Path(folder) / "warm-up.dcm")
        dataset = dcmread(path, stop_before_pixels=True)
        now = datetime.now(UTC)
        instance = InstanceRef(
            sop_class_uid=dataset.SOPClassUID,
            sop_instance_uid=dataset.SOPInstanceUID,
            series_instance_uid=dataset.SeriesInstanceUID,
            path=str(path),
            calling_ae=None,
            transfer_syntax_uid=dataset.file_meta.TransferSyntaxUID,
            received_at=now,
        )
        message = StudyReady(
            message_id="warm-up",
            study_instance_uid=dataset.StudyInstanceUID,
            round=1,
            spool_dir=folder,
            calling_ae=None,
            first_received_at=now,
            last_received_at=now,
            instances=[instance],
        )
        analyse_study(
            message,
            classifier,
            classifier.intended_use(),
            Path(folder) / "out",
            device_uid=device_uid_for(settings.node.ae_title),
            max_long_side=settings.worker.sc_max_long_side,
            sc_compression=settings.worker.sc_compression,
        )
    global _warm_up_ms
    _warm_up_ms = (time.perf_counter() - started) * 1000


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# Above a study's arrays (a 2500×2000 image as float32 is 19 MiB): they come from the heap, where the study's
# later arrays reuse the memory its earlier ones freed; larger blocks are mapped on their own, unmapped on free.
LARGE_BLOCK_BYTES = 24 << 20
NEVER_TRIM_BYTES = (1 << 31) - 1  # mallopt's largest value: free() never trims the heap; the idle return does
ARENAS = 1


# New memory faults page by page on first use. With this glibc tunable in the worker's environment — read
# when the process starts, so ``lungvision serve`` and the Docker image set it — glibc asks for transparent
# huge pages for its heap and mapped blocks (Linux "madvise" mode), 512 times fewer faults; other C libraries
# ignore it.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def worker_environment(environment: dict[str, str]) -> dict[str, str]:
    """``environment`` with ``HUGE_PAGES_TUNABLE`` in ``GLIBC_TUNABLES``, unless tunables are set already."""
    return environment if environment.get("GLIBC_TUNABLES") else {**environment, "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}


def set_large_block_thresholds() -> bool:
    """Fix glibc's thresholds for a study's large arrays (glibc only; False elsewhere).

    By default glibc raises its mmap and trim thresholds each time a large block is freed (up to 32 and
    64 MiB), so a pool process keeps the high-water mark of its largest study. This fixes the mmap
    threshold at ``LARGE_BLOCK_BYTES``: a study's 10–20 MB arrays come from the heap, from the first study
    on, and its later arrays reuse the pages its earlier ones freed. The trim threshold is set out of
    reach (``NEVER_TRIM_BYTES``): ``free`` never gives the heap's top back by itself; once a pool process
    is idle :class:`ReturnMemoryWhenIdle` gives back all the heap's free pages (:func:`return_free_memory`).
    ``ARENAS``: one heap for all the process's threads (torch's, the one drawing the SC's picture, the fsync
    one), where their blocks too reuse the pages of the study's earlier ones; a second heap, which the picture's
    thread filled, kept 20–65 MiB more per pool process (bench/memory.py, concurrency 2).

    Measured against the former 1 MiB thresholds, which mapped every array on its own and so faulted all
    its pages in again for each study (bench/end_to_end.py, issue 12, concurrency 2, medians over runs):
    analysis 82 ms instead of 105 ms a study, the same worker memory (bench/memory.py). With the trim
    threshold at 24 MiB too, the end of each study still handed the heap's top back (a 2500×2000 study:
    25–29 huge-page faults in the next one, against 1–4 now; ``bench/worker.py`` counts them) — on a VM
    that reports free pages to its host, faults the host serves again. Without any return a pool
    process keeps 15–100 MiB more: the holes its studies left in the heap.
    """
    libc = _glibc()
    if libc is None:  # not glibc (musl, macOS): its allocator's defaults stay
        return False
    return all(
        libc.mallopt(parameter, value) == 1
        for parameter, value in (
            (_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES),
            (_M_TRIM_THRESHOLD, NEVER_TRIM_BYTES),
            (_M_ARENA_MAX, ARENAS),
        )
    )


def return_free_memory() -> None:
    """Give the heap's free pages back to the system, the holes between its blocks too (glibc's
    ``malloc_trim``, well under a millisecond; nothing elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class ReturnMemoryWhenIdle:
    """Give the heap's free pages back (``release``, by default :func:`return_free_memory`) once a pool
    process has run no task for ``idle_s`` seconds; with ``idle_s`` 0, after each task. Its two methods are
    Celery's ``task_prerun`` and ``task_postrun`` handlers.

    Why not after each task: on a VM whose balloon device reports free pages to the host, pages given back
    go back to the hypervisor, and the next study faults them in again at the host's cost — ≈ 100 ms more
    at p95 for studies 1.2 s apart (docs/worker.md, *Memory*). Studies that follow each other within
    ``idle_s`` reuse the heap as it is; a worker left idle still gives back what its studies freed.
    """

    def __init__(self, idle_s: float, release: Callable[[], None] | None = None) -> None:
        self.idle_s = idle_s
        self.release = release or return_free_memory
        self._pending: threading.Timer | None = None
        self._lock = threading.Lock()

    def task_started(self, **_: object) -> None:
        with self._lock:
            if self._pending is not None:
                self._pending.cancel()
                self._pending = None

    def task_finished(self, **_: object) -> None:
        if self.idle_s == 0:
            self.release()
            return
        with self._lock:
            if self._pending is not None:
                self._pending.cancel()
            self._pending = threading.Timer(self.idle_s, self.release)
            self._pending.daemon = True  # never keeps a pool process from exiting
            self._pending.start()


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def prepare_pool_process(settings: Settings) -> None:
    """In each pool process, once, before its first task: its torch threads, the model (inherited from the
    parent when :func:`load_before_fork` ran there) and the outcome store."""
    import torch
    from celery.signals import task_postrun, task_prerun

    from inference.classifier import load_classifier
    from worker.tasks import store

    torch.set_num_threads(POOL_TORCH_THREADS)
    return_memory = ReturnMemoryWhenIdle(settings.worker.return_memory_after_idle_s)  # see set_large_block_thresholds
    task_prerun.connect(return_memory.task_started, weak=False)  # weak=False: the signals keep it alive
    task_postrun.connect(return_memory.task_finished, weak=False)
    hits_before = load_classifier.cache_info().hits
    classifier = _load_model(settings)
    inherited = load_classifier.cache_info().hits > hits_before
    store()
    log.info(
        "worker process %d ready: model %s %s, %s, %d torch threads",
        os.getpid(),
        "unavailable" if classifier is None else classifier.version,
        "inherited from the parent (loaded before the fork)" if inherited else "not inherited",
        "no warm-up"
        if _warm_up_ms is None
        else f"warm-up study analysed and encoded before the fork ({_warm_up_ms:.0f} ms)",
        torch.get_num_threads(),
    )


def _load_model(settings: Settings) -> "Classifier | None":
    """The configured classifier, or None (logged) when it cannot be loaded: the worker then runs
    anyway and records each study as failed with the reason (worker/tasks.py), as it did before."""
    from inference.classifier import load_model

    try:
        classifier, _ = load_model(settings.model)
    except Exception as error:  # any failure to load (missing file, bad card, wrong shapes): reported per study
        log.error(
            "the model could not be loaded (%s: %s); each study will be recorded as failed", type(error).__name__, error
        )
        return None
    return classifier
