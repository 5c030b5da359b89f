"""The worklist JSON API, its OpenAPI schema, authentication of patient fields, replay and /metrics."""

import base64
import json
import re

import pytest
from fastapi.testclient import TestClient

from tests.web.conftest import TOKEN
from web.app import create_app
from worker.deliver import DeliveryJob, StoreDeadLetters

BEARER = {"Authorization": f"Bearer {TOKEN}"}
BASIC = {"Authorization": "Basic " + base64.b64encode(f"operator:{TOKEN}".encode()).decode()}


@pytest.fixture(scope="module")
def client(site) -> TestClient:
    return TestClient(create_app(site.settings))


def test_openapi_schema_describes_the_study_endpoints(client) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/api/studies", "/api/studies/{study_uid}", "/api/dead-letters"} <= set(schema["paths"])
    ok = schema["paths"]["/api/studies"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["items"]["$ref"].endswith("/StudySummary")
    summary = schema["components"]["schemas"]["StudySummary"]["properties"]
    assert {"study_instance_uid", "arrival_time", "accession_number", "modality", "calling_ae", "finding",
            "probability", "status", "thumbnail_url", "patient"} <= set(summary)
    detail = schema["components"]["schemas"]["StudyDetail"]["properties"]
    assert {"images", "deliveries", "sr_summary", "events"} <= set(detail)
    assert client.get("/docs").status_code == 200


def test_studies_come_in_priority_order_with_status(client, site) -> None:
    studies = client.get("/api/studies").json()
    accessions = [study["accession_number"] for study in studies]
    assert accessions[:4] == ["ACC-POS-HIGH", "ACC-POS-LOW", "ACC-FAILED", "ACC-NEG"]  # equal 0.41: earlier first
    by_uid = {study["study_instance_uid"]: study for study in studies}
    assert by_uid[site.studies["analysing"].study_uid]["status"] == "analysing"
    assert by_uid[site.studies["received"].study_uid]["status"] == "received"
    assert by_uid[site.studies["ACC-FAILED"].study_uid]["status"] == "failed"
    assert by_uid[site.studies["ACC-NEG"].study_uid]["status"] == "delivered"
    assert [s["accession_number"] for s in client.get("/api/studies?finding=POSITIVE&status=delivered").json()] == \
        ["ACC-POS-HIGH", "ACC-POS-LOW"]
    assert client.get("/api/studies?status=bogus").status_code == 422


def test_study_detail_has_images_sr_summary_and_delivery_log(client, site) -> None:
    study = site.studies["ACC-POS-HIGH"]
    detail = client.get(f"/api/studies/{study.study_uid}").json()
    assert detail["finding"] == "POSITIVE" and detail["probability"] == pytest.approx(0.93)
    assert detail["images"][0]["image_url"].endswith(".png")
    assert any("Pneumonia" in line for line in detail["sr_summary"])
    assert detail["deliveries"][0] == {**detail["deliveries"][0], "destination": "pacs", "status": "delivered"}
    assert [event["event"] for event in detail["events"]] == ["analysed"]
    png = client.get(detail["thumbnail_url"])
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"/api/studies/1.2.3.4").status_code == 404


def test_unauthenticated_requests_see_no_patient_fields(client, site) -> None:
    secrets = [s.patient_id for s in site.studies.values() if s.patient_id] + \
              [s.patient_name.replace("^", " ") for s in site.studies.values() if s.patient_name] + \
              [s.patient_name for s in site.studies.values() if s.patient_name]
    uid = site.studies["ACC-POS-HIGH"].study_uid
    wrong = {"Authorization": "Bearer nope"}
    for headers in ({}, wrong):
        for path in ("/api/studies", f"/api/studies/{uid}", "/", f"/studies/{uid}"):
            body = client.get(path, headers=headers).text
            leaked = [secret for secret in secrets if secret in body]
            assert not leaked, (path, leaked)
        assert all(study["patient"] is None for study in client.get("/api/studies", headers=headers).json())
    authenticated = client.get(f"/api/studies/{uid}", headers=BEARER).json()
    assert authenticated["patient"]["patient_id"] == site.studies["ACC-POS-HIGH"].patient_id
    assert site.studies["ACC-POS-HIGH"].patient_id in client.get("/", headers=BASIC).text
    assert client.get("/login").status_code == 401
    assert client.get("/login", headers=BASIC, follow_redirects=False).status_code == 303


def test_replay_needs_authentication_and_a_csrf_token(client, site) -> None:
    study = site.studies["ACC-FAILED"]
    message_id = client.get(f"/api/studies/{study.study_uid}").json()["message_id"]
    letter = StoreDeadLetters(site.store).add(DeliveryJob(message_id, study.study_uid, "pacs", []), "rejected", 5)
    page = client.get("/dead-letters").text
    assert letter.id in page and "Replay</button>" not in page  # listed, but no replay without signing in
    url = f"/dead-letters/{letter.id}/replay"
    assert client.post(url, data={"csrf": "x"}, follow_redirects=False).status_code == 401
    assert client.post(url, data={"csrf": "x"}, headers=BASIC, follow_redirects=False).status_code == 403
    signed_in = client.get("/dead-letters", headers=BASIC).text
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', signed_in).group(1)
    cross_site = {**BASIC, "Origin": "http://evil.example"}
    assert client.post(url, data={"csrf": csrf}, headers=cross_site, follow_redirects=False).status_code == 403
    answer = client.post(url, data={"csrf": csrf}, headers=BASIC, follow_redirects=False)
    assert answer.status_code == 303
    assert letter.id not in [l["id"] for l in client.get("/api/dead-letters").json()]
    assert client.get(f"/api/studies/{study.study_uid}").json()["deliveries"][0]["status"] == "pending"
    events = [json.loads(line) for line in site.settings.audit.path.read_text().splitlines()]
    assert any(e["event"] == "replayed" and e["dead_letter"] == letter.id and e["destination"] == "pacs"
               for e in events)


def test_metrics_are_computed_from_the_audit_trail_and_broker(client, site) -> None:
    text = client.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["lungvision_instances_received_total"] >= 1
    assert values['lungvision_studies_analysed_total{finding="POSITIVE"}'] == 3
    assert values["lungvision_task_duration_seconds_count"] == 4
    assert values['lungvision_inference_milliseconds_bucket{le="250.0"}'] == 4
    assert values["lungvision_queue_depth"] >= 0 and values["lungvision_broker_up"] == 1
    assert "lungvision_dead_letters" in values
    assert 'lungvision_delivery_failures_total{final="true",kind="dicom"}' in values
