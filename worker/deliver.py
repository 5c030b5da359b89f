"""Delivery — a study's result files go to the destinations its routing rules choose; failures are
retried with exponential back-off and jitter, and the last failure lands on the dead-letter list
(common/dead_letters.py, in the outcome store), beside the analyses that failed.

Deliveries have a queue of their own, taken before the analysis queue (worker/queues.py), and each
worker process keeps its associations to DICOM destinations open for a few idle seconds
(``delivery.association_idle_s``), so a burst of studies shares one association set-up."""

import logging
import os
import random
import shutil
from enum import StrEnum
from pathlib import Path

import redis

from common.results import Finding, StudyStatus
from common.scu import AssociationPool, ClientTls, Destination, InstanceFile, Timeouts, send_datasets
from common.store import Store
from config.settings import DestinationSettings, RoutingRule, Settings

log = logging.getLogger("lungvision.worker")


class RouteResult(StrEnum):
    """The ``result`` a routing rule names (config's ``RoutingRule.result``)."""

    POSITIVE = "positive"
    NEGATIVE = "negative"
    NOT_ANALYSED = "not_analysed"
    OUTSIDE_INTENDED_USE = "outside_intended_use"


def choose_destinations(
    settings: Settings,
    *,
    calling_ae: str | None,
    modalities: set[str],
    finding: Finding,
    status: StudyStatus = StudyStatus.ANALYSED,
) -> list[str]:
    """Names of the destinations for one study: every destination when no rule is configured,
    else the union of the destinations of the rules that match. A study the intended-use gate
    refused matches rules for ``not_analysed`` and for ``outside_intended_use``."""
    if not settings.routing:
        return [destination.name for destination in settings.destinations]
    results = {
        {Finding.POSITIVE: RouteResult.POSITIVE, Finding.NEGATIVE: RouteResult.NEGATIVE}.get(
            finding, RouteResult.NOT_ANALYSED
        )
    }
    if status == StudyStatus.OUTSIDE_USE:
        results.add(RouteResult.OUTSIDE_INTENDED_USE)
    chosen: list[str] = []
    for rule in settings.routing:
        if any(_matches(rule, calling_ae, modalities, result) for result in results):
            chosen += [name for name in rule.destinations if name not in chosen]
    return chosen


def _matches(rule: RoutingRule, calling_ae: str | None, modalities: set[str], result: RouteResult) -> bool:
    return (
        (rule.calling_ae is None or rule.calling_ae == calling_ae)
        and (rule.modality is None or rule.modality in modalities)
        and (rule.result is None or rule.result == result)
    )


def retry_delay_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before attempt ``attempt + 1`` (``attempt`` ≥ 1): "full jitter" exponential back-off,
    uniformly drawn between half and all of ``min(max_s, base_s · 2^(attempt-1))``."""
    ceiling = min(max_s, base_s * 2 ** (attempt - 1))
    return (rng or random.Random()).uniform(ceiling / 2, ceiling)


def to_destination(settings: DestinationSettings) -> Destination:
    """The SCU's view of a configured destination."""
    tls = None
    if settings.tls.enabled:
        tls = ClientTls(
            ca_file=settings.tls.ca_file,
            cert_file=settings.tls.cert_file,
            key_file=settings.tls.key_file,
            server_hostname=settings.host if settings.tls.check_hostname else None,
        )
    # the settings require all three for a dicom destination
    assert settings.ae_title is not None and settings.host is not None and settings.port is not None
    return Destination(ae_title=settings.ae_title, host=settings.host, port=settings.port, tls=tls)


def send_files(settings: Settings, destination_name: str, files: list[Path]) -> None:
    """Deliver ``files`` to one configured destination: C-STORE over one association, each file as it is on
    disk where the destination accepts its transfer syntax (raises DeliveryError), or copies into a folder
    destination."""
    destination = next((d for d in settings.destinations if d.name == destination_name), None)
    if destination is None:
        raise LookupError(f"destination {destination_name!r} is not configured")
    if destination.kind == "folder":
        assert destination.path is not None  # the settings require it for a folder destination
        copy_to_folder(destination.path, files)
        return
    instances = [InstanceFile.read(path) for path in files]
    delivery = settings.delivery
    timeouts = Timeouts(
        connection_s=delivery.connection_timeout_s,
        acse_s=delivery.acse_timeout_s,
        dimse_s=delivery.dimse_timeout_s,
        network_s=delivery.network_timeout_s,
    )
    send_datasets(
        to_destination(destination),
        instances,
        calling_ae=settings.node.ae_title,
        timeouts=timeouts,
        pool=association_pool(settings),
    )


_pool: AssociationPool | None = None  # this process's kept associations (Celery's pool children: one each)


def association_pool(settings: Settings) -> AssociationPool:
    """This process's association pool, keeping associations ``delivery.association_idle_s`` seconds."""
    global _pool
    if _pool is None or _pool.idle_s != settings.delivery.association_idle_s:
        close_association_pool()
        _pool = AssociationPool(idle_s=settings.delivery.association_idle_s)
    return _pool


def close_association_pool() -> None:
    """Release the associations this process keeps open (at worker shutdown)."""
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


def _forget_parent_pool() -> None:
    """In a forked child: the parent's kept associations (sockets, threads) are not the child's to use."""
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_parent_pool)


def copy_to_folder(folder: Path, files: list[Path]) -> None:
    """Copy outbox files (``<StudyInstanceUID>/<SOPInstanceUID>.dcm``) to ``folder`` with the same
    two-level layout; each file appears complete or not at all (copy, then rename)."""
    for source in files:
        target = folder / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copyfile(source, partial)
        partial.replace(target)


def move_legacy_dead_letters(settings: Settings, store: Store) -> int:
    """Move the dead letters that earlier versions kept in the Redis hash ``worker.dead_letter_key``
    into the outcome store; return how many. A no-op without a Redis broker."""
    if not settings.broker.url.startswith(("redis://", "rediss://")):
        return 0
    client = redis.Redis.from_url(settings.broker.url, socket_timeout=10)
    key = settings.worker.dead_letter_key
    try:
        legacy = client.hgetall(key)
        for letter_id, record in legacy.items():
            # without decode_responses the client answers bytes (its type also allows str)
            store.put_dead_letter(letter_id.decode(), record.decode())  # type: ignore[union-attr]
            client.hdel(key, letter_id)
    except redis.exceptions.ConnectionError as error:
        log.warning(
            "dead letters of earlier versions in Redis (%s) not moved to the store, Redis is unreachable "
            "(%s); the next worker start tries again",
            key,
            type(error).__name__,
        )
        return 0
    finally:
        client.close()
    if legacy:
        log.info("moved %d dead letter(s) from the Redis hash %s to the outcome store", len(legacy), key)
    return len(legacy)
