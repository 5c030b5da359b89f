"""Routing rules, back-off delays, destination validation and the outcome store (SQLite and PostgreSQL)."""

import random
import uuid
from datetime import UTC, datetime
from typing import get_args

import pytest

from common.dead_letters import DeadLetters, DeliveryJob, new_dead_letter
from common.results import DeliveryStatus, Finding, ImageResult, StudyStatus
from common.store import Store, StudyResult
from config.settings import ConfigError, RoutingRule, load_settings
from tests.kit.postgresql import postgresql_url
from worker.deliver import RouteResult, choose_destinations, retry_delay_s

DESTINATIONS = [
    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
    {"name": "priority", "ae_title": "PRIORITY", "host": "127.0.0.1", "port": 105},
    {"name": "er", "ae_title": "ER", "host": "127.0.0.1", "port": 106},
]


def test_without_rules_every_destination_gets_everything() -> None:
    settings = load_settings(destinations=DESTINATIONS)
    assert choose_destinations(settings, calling_ae="X", modalities={"CR"}, finding=Finding.NEGATIVE) == [
        "pacs",
        "priority",
        "er",
    ]


def test_rules_route_by_result_calling_ae_and_modality() -> None:
    settings = load_settings(
        destinations=DESTINATIONS,
        routing=[
            {"destinations": ["pacs"]},
            {"result": "positive", "destinations": ["priority"]},
            {"calling_ae": "ER_CR1", "modality": "CR", "destinations": ["er"]},
        ],
    )

    def chosen(calling_ae: str, modality: str, finding: Finding) -> list[str]:
        return choose_destinations(settings, calling_ae=calling_ae, modalities={modality}, finding=finding)

    assert chosen("X", "CR", Finding.POSITIVE) == ["pacs", "priority"]
    assert chosen("X", "CR", Finding.NEGATIVE) == ["pacs"]
    assert chosen("ER_CR1", "CR", Finding.NOT_ANALYSED) == ["pacs", "er"]
    assert chosen("ER_CR1", "DX", Finding.NEGATIVE) == ["pacs"]


def test_the_route_results_are_those_a_routing_rule_may_name() -> None:
    (literal, _none) = get_args(RoutingRule.model_fields["result"].annotation)
    assert {result.value for result in RouteResult} == set(get_args(literal))


def test_a_rule_naming_an_unknown_destination_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"routing\.0\.destinations.*nowhere"):
        load_settings(destinations=DESTINATIONS, routing=[{"destinations": ["nowhere"]}])


def test_backoff_grows_exponentially_with_jitter_up_to_the_maximum() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 10), (2, 20), (3, 40), (7, 600), (12, 600)]:
        delays = [retry_delay_s(attempt, 10, 600, rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert len(set(delays)) > 1


def _result(message_id: str) -> StudyResult:
    return StudyResult(
        message_id=message_id,
        study_instance_uid="1.2.3",
        round=1,
        calling_ae="AE",
        modality="CR",
        accession_number=None,
        status=StudyStatus.ANALYSED,
        finding=Finding.POSITIVE,
        probability=0.9,
        threshold=0.5,
        model_version="m 1",
        model_sha256="ab" * 32,
        images=[ImageResult(sop_instance_uid="1.2.3.4")],
        timings_ms={"encode": 1.0},
        received_at=datetime.now(UTC),
    )


def _exercise(store: Store) -> None:
    message_id = uuid.uuid4().hex
    store.save_result(_result(message_id))
    store.update_delivery(message_id, "pacs", status=DeliveryStatus.PENDING, attempts=0)
    store.update_delivery(message_id, "priority", status=DeliveryStatus.PENDING, attempts=0)
    store.update_delivery(message_id, "pacs", status=DeliveryStatus.DELIVERED, attempts=1)
    assert store.result(message_id).status is StudyStatus.ANALYSED
    store.update_delivery(message_id, "priority", status=DeliveryStatus.DELIVERED, attempts=2)
    assert store.result(message_id).status is StudyStatus.DELIVERED
    assert {(d.destination, d.attempts) for d in store.deliveries(message_id)} == {("pacs", 1), ("priority", 2)}
    store.update_delivery(message_id, "priority", status=DeliveryStatus.FAILED, attempts=5, error="no answer")
    assert store.result(message_id).status is StudyStatus.FAILED
    assert store.result(message_id).images == [ImageResult(sop_instance_uid="1.2.3.4")]


def test_sqlite_store(tmp_path) -> None:
    _exercise(Store(f"sqlite:///{tmp_path}/outcomes.db"))


def test_postgresql_store() -> None:
    _exercise(Store(postgresql_url()))


def test_folder_destination_copies_the_outbox_layout(tmp_path) -> None:
    from worker.deliver import send_files

    outbox = tmp_path / "outbox" / "1.2.3"
    outbox.mkdir(parents=True)
    (outbox / "1.2.3.4.dcm").write_bytes(b"sc")
    (outbox / "1.2.3.5.dcm").write_bytes(b"sr")
    settings = load_settings(destinations=[{"name": "files", "kind": "folder", "path": str(tmp_path / "out")}])
    send_files(settings, "files", sorted(outbox.iterdir()))
    assert sorted(p.name for p in (tmp_path / "out" / "1.2.3").iterdir()) == ["1.2.3.4.dcm", "1.2.3.5.dcm"]
    with pytest.raises(LookupError, match="nowhere"):
        send_files(settings, "nowhere", [])


def test_dead_letters_live_in_the_store_without_redis(tmp_path) -> None:
    letters = DeadLetters(Store(f"sqlite:///{tmp_path}/outcomes.db"))
    letter = letters.add(new_dead_letter(DeliveryJob("m1", "1.2.3", "pacs", ["a.dcm"]), "refused", 5))
    assert [(found.id, found.job.destination) for found in letters.list()] == [(letter.id, "pacs")]
    assert letters.take(letter.id).error == "refused"
    assert letters.take(letter.id) is None and letters.list() == []


def test_a_study_outside_the_intended_use_matches_not_analysed_and_its_own_rules() -> None:
    settings = load_settings(
        destinations=DESTINATIONS,
        routing=[
            {"result": "not_analysed", "destinations": ["pacs"]},
            {"result": "outside_intended_use", "destinations": ["er"]},
        ],
    )
    assert choose_destinations(
        settings, calling_ae="X", modalities={"CR"}, finding=Finding.NOT_ANALYSED, status=StudyStatus.OUTSIDE_USE
    ) == ["pacs", "er"]
    assert choose_destinations(
        settings, calling_ae="X", modalities={"CR"}, finding=Finding.NOT_ANALYSED, status=StudyStatus.NOT_ANALYSED
    ) == ["pacs"]
