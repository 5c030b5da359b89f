"""Delivery — a study's result files go to the destinations its routing rules choose; failures are
retried with exponential back-off and jitter, and the last failure lands on a dead-letter list."""

import json
import random
import shutil
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import redis
from pydicom import dcmread

from config.settings import DestinationSettings, RoutingRule, Settings
from dicom_node.scu import ClientTls, Destination, Timeouts, send_datasets
from worker.record import OUTSIDE_USE, Store


def choose_destinations(settings: Settings, *, calling_ae: str | None, modalities: set[str], finding: str,
                        status: str = "analysed") -> list[str]:
    """Names of the destinations for one study: every destination when no rule is configured,
    else the union of the destinations of the rules that match. A study the intended-use gate
    refused matches rules for ``not_analysed`` and for ``outside_intended_use``."""
    if not settings.routing:
        return [destination.name for destination in settings.destinations]
    results = {{"POSITIVE": "positive", "NEGATIVE": "negative"}.get(finding, "not_analysed")}
    if status == OUTSIDE_USE:
        results.add("outside_intended_use")
    chosen: list[str] = []
    for rule in settings.routing:
        if any(_matches(rule, calling_ae, modalities, result) for result in results):
            chosen += [name for name in rule.destinations if name not in chosen]
    return chosen


def _matches(rule: RoutingRule, calling_ae: str | None, modalities: set[str], result: str) -> bool:
    return ((rule.calling_ae is None or rule.calling_ae == calling_ae)
            and (rule.modality is None or rule.modality in modalities)
            and (rule.result is None or rule.result == result))


def retry_delay_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before attempt ``attempt + 1`` (``attempt`` ≥ 1): "full jitter" exponential back-off,
    uniformly drawn between half and all of ``min(max_s, base_s · 2^(attempt-1))``."""
    ceiling = min(max_s, base_s * 2 ** (attempt - 1))
    return (rng or random.Random()).uniform(ceiling / 2, ceiling)


def to_destination(settings: DestinationSettings) -> Destination:
    """The SCU's view of a configured destination."""
    tls = None
    if settings.tls.enabled:
        tls = ClientTls(ca_file=settings.tls.ca_file, cert_file=settings.tls.cert_file, key_file=settings.tls.key_file,
                        server_hostname=settings.host if settings.tls.check_hostname else None)
    return Destination(ae_title=settings.ae_title, host=settings.host, port=settings.port, tls=tls)


def send_files(settings: Settings, destination_name: str, files: list[Path]) -> None:
    """Deliver ``files`` to one configured destination: C-STORE over one association (raises
    DeliveryError), or copies into a folder destination."""
    destination = next((d for d in settings.destinations if d.name == destination_name), None)
    if destination is None:
        raise LookupError(f"destination {destination_name!r} is not configured")
    if destination.kind == "folder":
        copy_to_folder(destination.path, files)
        return
    datasets = [dcmread(path) for path in files]
    delivery = settings.delivery
    timeouts = Timeouts(connection_s=delivery.connection_timeout_s, acse_s=delivery.acse_timeout_s,
                        dimse_s=delivery.dimse_timeout_s, network_s=delivery.network_timeout_s)
    send_datasets(to_destination(destination), datasets, calling_ae=settings.node.ae_title, timeouts=timeouts)


def copy_to_folder(folder: Path, files: list[Path]) -> None:
    """Copy outbox files (``<StudyInstanceUID>/<SOPInstanceUID>.dcm``) to ``folder`` with the same
    two-level layout; each file appears complete or not at all (copy, then rename)."""
    for source in files:
        target = folder / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copyfile(source, partial)
        partial.replace(target)


@dataclass(frozen=True)
class DeliveryJob:
    """One study round's files for one destination — the argument of the delivery task."""

    message_id: str
    study_instance_uid: str
    destination: str
    files: list[str]


@dataclass(frozen=True)
class DeadLetter:
    """A delivery that used up its attempts."""

    id: str
    job: DeliveryJob
    error: str
    attempts: int
    failed_at: str


class RedisDeadLetters:
    """The dead-letter list in Redis (the production broker): a hash of id → JSON record."""

    def __init__(self, redis_url: str, key: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.key = key

    def add(self, job: DeliveryJob, error: str, attempts: int) -> DeadLetter:
        letter = new_dead_letter(job, error, attempts)
        self.client.hset(self.key, letter.id, json.dumps(asdict(letter)))
        return letter

    def list(self) -> list[DeadLetter]:
        """All dead letters, oldest first."""
        letters = [_letter(json.loads(raw)) for raw in self.client.hvals(self.key)]
        return sorted(letters, key=lambda letter: letter.failed_at)

    def take(self, letter_id: str) -> DeadLetter | None:
        """Remove and return one dead letter (None if there is no such id)."""
        raw = self.client.hget(self.key, letter_id)
        if raw is None or not self.client.hdel(self.key, letter_id):
            return None
        return _letter(json.loads(raw))


class StoreDeadLetters:
    """The dead-letter list in the outcome store, for installations without Redis (embedded broker)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, job: DeliveryJob, error: str, attempts: int) -> DeadLetter:
        letter = new_dead_letter(job, error, attempts)
        self.store.put_dead_letter(letter.id, json.dumps(asdict(letter)))
        return letter

    def list(self) -> list[DeadLetter]:
        """All dead letters, oldest first."""
        return sorted((_letter(json.loads(raw)) for raw in self.store.dead_letters()), key=lambda l: l.failed_at)

    def take(self, letter_id: str) -> DeadLetter | None:
        """Remove and return one dead letter (None if there is no such id)."""
        raw = self.store.take_dead_letter(letter_id)
        return None if raw is None else _letter(json.loads(raw))


def dead_letters_for(settings: Settings, store: Store) -> RedisDeadLetters | StoreDeadLetters:
    """Redis when the broker is Redis (``worker.dead_letter_key``), else the outcome store."""
    if settings.broker.url.startswith(("redis://", "rediss://")):
        return RedisDeadLetters(settings.broker.url, settings.worker.dead_letter_key)
    return StoreDeadLetters(store)


def new_dead_letter(job: DeliveryJob, error: str, attempts: int) -> DeadLetter:
    """A dead letter with a fresh short id, stamped now."""
    return DeadLetter(uuid.uuid4().hex[:12], job, error, attempts, datetime.now(timezone.utc).isoformat())


def _letter(data: dict) -> DeadLetter:
    return DeadLetter(**{**data, "job": DeliveryJob(**data["job"])})
