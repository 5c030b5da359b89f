"""Every answer of the JSON API matches /openapi.json: schemathesis generates requests from the schema
(valid and invalid ones, with and without the Bearer token) and checks status codes, content types
and bodies against what the schema documents."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.kit.site import TOKEN

SIGNED_IN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def fresh_worker_store():
    """Replays go through the worker's process-wide store (worker.tasks.store); forget this module's."""
    from worker import tasks

    yield
    tasks.store.cache_clear()


def test_every_api_answer_matches_the_schema(site, fresh_worker_store) -> None:
    from web.app import create_app

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(site.settings))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.path for operation in operations} >= {"/api/studies", "/api/studies/{study_uid}",
                                                            "/api/dead-letters", "/api/studies/{study_uid}/review"}
    for operation in operations:
        for headers in (None, SIGNED_IN):
            @given(case=operation.as_strategy())
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def answers_as_documented(case) -> None:
                case.call_and_validate(headers=headers)

            answers_as_documented()
