"""Load before fork: the worker's parent process loads the model before Celery forks its pool, so the
pool processes share the weights' memory pages (copy-on-write) and none of them spends its first
study loading the model.

Torch and fork: GNU OpenMP, the thread pool of PyTorch's Linux wheels, does not survive a fork — a
pool process whose parent had started OpenMP threads waits for ever for threads it does not have in
its first parallel region. So the parent runs torch on one thread (no OpenMP threads are ever
started there) and each pool process sets its own share of the cores after the fork.
"""

import gc
import logging
import os
from typing import TYPE_CHECKING

from config.settings import Settings

if TYPE_CHECKING:
    from inference.classifier import Classifier

log = logging.getLogger("lungvision.worker")


def load_before_fork(settings: Settings) -> None:
    """In the worker's parent process, before the pool forks: load the model, on one torch thread."""
    import torch

    torch.set_num_threads(1)  # before any torch work here: see the module's note on OpenMP and fork
    _load_model(settings)
    # Move everything alive now out of the garbage collector's sight, so collections in the pool
    # processes do not write to (and so copy) the pages of the objects they inherited.
    gc.collect()
    gc.freeze()


def prepare_pool_process(settings: Settings) -> None:
    """In each pool process, once, before its first task: its share of the cores, the model (inherited
    from the parent when :func:`load_before_fork` ran there) and the outcome store."""
    import torch

    from inference.classifier import load_classifier
    from worker.tasks import store

    torch.set_num_threads(threads_per_process(settings.worker.concurrency))
    hits_before = load_classifier.cache_info().hits
    classifier = _load_model(settings)
    inherited = load_classifier.cache_info().hits > hits_before
    store()
    log.info("worker process %d ready: model %s %s, %d torch threads", os.getpid(),
             "unavailable" if classifier is None else classifier.version,
             "inherited from the parent (loaded before the fork)" if inherited else "not inherited",
             torch.get_num_threads())


def _load_model(settings: Settings) -> "Classifier | None":
    """The configured classifier, or None (logged) when it cannot be loaded: the worker then runs
    anyway and records each study as failed with the reason (worker/tasks.py), as it did before."""
    from inference.classifier import load_model

    try:
        classifier, _ = load_model(settings.model)
    except Exception as error:  # any failure to load (missing file, bad card, wrong shapes): reported per study
        log.error("the model could not be loaded (%s: %s); each study will be recorded as failed",
                  type(error).__name__, error)
        return None
    return classifier


def threads_per_process(concurrency: int) -> int:
    """Each pool process's share of the CPU cores, so the processes do not oversubscribe them."""
    return max(1, (os.cpu_count() or 1) // concurrency)
