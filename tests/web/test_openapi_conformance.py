"""Every answer of the JSON API matches /openapi.json: schemathesis generates requests from the schema
(valid and invalid ones, with and without the Bearer token) and checks status codes, content types
and bodies against what the schema documents. The schema names every status, finding, gate rule and
verdict a client can get."""

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from common.results import DeliveryStatus, Finding, GateReason, Verdict
from tests.kit.site import TOKEN
from web.worklist import WorklistStatus

SIGNED_IN = {"Authorization": f"Bearer {TOKEN}"}


def test_every_api_answer_matches_the_schema(site) -> None:
    from web.app import create_app

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(site.settings))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.path for operation in operations} >= {
        "/api/studies",
        "/api/studies/{study_uid}",
        "/api/dead-letters",
        "/api/studies/{study_uid}/review",
    }
    for operation in operations:
        for headers in (None, SIGNED_IN):

            @given(case=operation.as_strategy())
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def answers_as_documented(case) -> None:
                case.call_and_validate(headers=headers)  # noqa: B023 (called within this iteration)

            answers_as_documented()


def test_the_schema_lists_the_values_of_every_enum(site) -> None:
    from web.app import create_app

    schema = TestClient(create_app(site.settings)).get("/openapi.json").json()
    components = schema["components"]["schemas"]
    expected = {
        "WorklistStatus": [
            "received",
            "queued",
            "requeued",
            "analysing",
            "analysed",
            "delivered",
            "failed",
            "not analysed",
            "outside intended use",
        ],
        "Finding": ["POSITIVE", "NEGATIVE", "NOT_ANALYSED", "PENDING"],
        "GateReason": ["modality", "body_part", "view", "age", "image_check"],
        "DeliveryStatus": ["pending", "retrying", "delivered", "failed"],
        "Verdict": ["agree", "disagree"],
    }
    for name, values in expected.items():
        assert components[name]["enum"] == values, name
    for kind in (WorklistStatus, Finding, GateReason, DeliveryStatus, Verdict):  # none left out above
        assert [member.value for member in kind] == expected[kind.__name__]
    summary, image = components["StudySummary"]["properties"], components["ImageResult"]["properties"]
    assert summary["status"]["$ref"].endswith("/WorklistStatus")
    assert summary["finding"]["$ref"].endswith("/Finding")
    assert any(choice.get("$ref", "").endswith("/GateReason") for choice in image["gate_reason"]["anyOf"])
    delivery = components["DeliveryEntry"]["properties"]["status"]
    assert delivery["$ref"].endswith("/DeliveryStatus")
    parameters = schema["paths"]["/api/studies"]["get"]["parameters"]
    filters = {parameter["name"]: parameter["schema"] for parameter in parameters}
    assert any(choice.get("$ref", "").endswith("/WorklistStatus") for choice in filters["status"]["anyOf"])
    assert any(choice.get("$ref", "").endswith("/Finding") for choice in filters["finding"]["anyOf"])
