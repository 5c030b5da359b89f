"""The worklist JSON API, its OpenAPI schema, authentication of patient fields, replay, reviews, intended use,
shadow mode and /metrics."""

import base64
import json
import re
import uuid
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from common.dead_letters import DeadLetters, DeliveryJob, new_dead_letter
from common.results import DeliveryStatus, Finding, GateReason, ImageResult, StudyStatus, Verdict
from common.store import StudyResult
from tests.kit.site import TOKEN
from web.app import create_app

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
    assert {
        "study_instance_uid",
        "arrival_time",
        "accession_number",
        "modality",
        "calling_ae",
        "finding",
        "probability",
        "status",
        "thumbnail_url",
        "patient",
    } <= set(summary)
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
    assert [s["accession_number"] for s in client.get("/api/studies?finding=POSITIVE&status=delivered").json()] == [
        "ACC-POS-HIGH",
        "ACC-POS-LOW",
    ]
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
    assert client.get("/api/studies/1.2.3.4").status_code == 404


def test_every_result_names_its_population_and_operating_point(client, site) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"population", "operating_point"} <= set(schema["StudySummary"]["properties"])
    assert {"population", "operating_point", "threshold"} <= set(schema["ImageResult"]["properties"])
    study = site.studies["ACC-POS-HIGH"]
    detail = client.get(f"/api/studies/{study.study_uid}").json()
    assert (detail["population"], detail["operating_point"]) == ("children", "shipped / children")
    (image,) = detail["images"]
    assert (image["population"], image["operating_point"]) == ("children", "shipped / children")
    assert image["threshold"] == pytest.approx(detail["threshold"])
    summaries = {s["study_instance_uid"]: s for s in client.get("/api/studies").json()}
    assert summaries[study.study_uid]["population"] == "children"
    assert summaries[site.studies["analysing"].study_uid]["population"] is None
    page = client.get("/").text
    assert "<th>Population</th>" in page and 'title="operating point shipped / children">children</td>' in page


def test_unauthenticated_requests_see_no_patient_fields(client, site) -> None:
    secrets = (
        [s.patient_id for s in site.studies.values() if s.patient_id]
        + [s.patient_name.replace("^", " ") for s in site.studies.values() if s.patient_name]
        + [s.patient_name for s in site.studies.values() if s.patient_name]
    )
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
    letter = DeadLetters(site.store).add(
        new_dead_letter(DeliveryJob(message_id, study.study_uid, "pacs", []), "rejected", 5)
    )
    assert client.get("/dead-letters").status_code == 401  # the list names destinations: sign in first
    assert client.get("/api/dead-letters").status_code == 401
    assert letter.id in [entry["id"] for entry in client.get("/api/dead-letters", headers=BEARER).json()]
    url = f"/dead-letters/{letter.id}/replay"
    assert client.post(url, data={"csrf": "x"}, follow_redirects=False).status_code == 401
    assert client.post(url, data={"csrf": "x"}, headers=BASIC, follow_redirects=False).status_code == 403
    signed_in = client.get("/dead-letters", headers=BASIC).text
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', signed_in).group(1)
    cross_site = {**BASIC, "Origin": "http://evil.example"}
    assert client.post(url, data={"csrf": csrf}, headers=cross_site, follow_redirects=False).status_code == 403
    answer = client.post(url, data={"csrf": csrf}, headers=BASIC, follow_redirects=False)
    assert answer.status_code == 303
    assert letter.id not in [entry["id"] for entry in client.get("/api/dead-letters", headers=BEARER).json()]
    assert client.get(f"/api/studies/{study.study_uid}").json()["deliveries"][0]["status"] == "pending"
    events = [json.loads(line) for line in site.settings.audit.path.read_text().splitlines()]
    assert any(
        e["event"] == "replayed" and e["dead_letter"] == letter.id and e["destination"] == "pacs" for e in events
    )


def test_metrics_are_computed_from_the_audit_trail_and_broker(client, site) -> None:
    text = client.get("/metrics").text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")
    }
    assert values["lungvision_instances_received_total"] >= 1
    assert values['lungvision_studies_analysed_total{finding="POSITIVE"}'] == 3
    assert values["lungvision_task_duration_seconds_count"] == 4
    assert values['lungvision_inference_milliseconds_bucket{le="250.0"}'] == 4
    assert values["lungvision_queue_depth"] >= 0 and values["lungvision_broker_up"] == 1
    assert "lungvision_dead_letters" in values
    assert 'lungvision_delivery_failures_total{final="true",kind="dicom"}' in values


# ---- reviews, intended use and shadow mode --------------------------------------------------------

REVIEW_PAGE_CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


def audit_events(site) -> list[dict]:
    return [json.loads(line) for line in site.settings.audit.path.read_text().splitlines()]


def metric_values(client) -> dict[str, float]:
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in client.get("/metrics").text.splitlines()
        if line and not line.startswith("#")
    }


def extra_result(
    site, *, status: StudyStatus, finding: Finding, probability: float | None, images: list[ImageResult]
) -> StudyResult:
    """A round added by hand to the seeded store (sorting after the four seeded studies)."""
    template = site.store.study_results(site.studies["ACC-NEG"].study_uid)[0]
    result = StudyResult(
        message_id=uuid.uuid4().hex,
        study_instance_uid=generate_uid(),
        round=1,
        calling_ae="CR_ROOM3",
        modality="CR",
        accession_number=f"ACC-{uuid.uuid4().hex[:8]}",
        status=status,
        finding=finding,
        probability=probability,
        threshold=template.threshold,
        model_version=template.model_version,
        model_sha256=template.model_sha256,
        images=images,
        timings_ms={},
        received_at=datetime(2026, 11, 25, 9, 0, tzinfo=UTC),
    )
    site.store.save_result(result)
    return result


def test_openapi_schema_describes_the_review_endpoint(client) -> None:
    schema = client.get("/openapi.json").json()
    review = schema["paths"]["/api/studies/{study_uid}/review"]["post"]
    assert {"200", "401", "404", "409", "422"} <= set(review["responses"])
    assert review["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ReviewAnswer")
    assert review["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ReviewRequest")
    assert schema["components"]["schemas"]["Verdict"]["enum"] == ["agree", "disagree"]
    assert {"review", "outside_intended_use"} <= set(schema["components"]["schemas"]["StudySummary"]["properties"])
    assert "intended_use" in schema["components"]["schemas"]["ImageResult"]["properties"]


def test_reviewing_through_the_api_needs_a_bearer_token(client, site) -> None:
    uid = site.studies["ACC-POS-LOW"].study_uid
    for headers in ({}, {"Authorization": "Bearer nope"}, BASIC):  # browser credentials use the page form
        answer = client.post(f"/api/studies/{uid}/review", json={"verdict": "agree"}, headers=headers)
        assert answer.status_code == 401, headers
    assert site.store.review(client.get(f"/api/studies/{uid}").json()["message_id"]) is None


def test_a_verdict_is_stored_audited_counted_and_shown(client, site) -> None:
    study = site.studies["ACC-POS-LOW"]
    message_id = client.get(f"/api/studies/{study.study_uid}").json()["message_id"]
    answer = client.post(f"/api/studies/{study.study_uid}/review", json={"verdict": "agree"}, headers=BEARER)
    assert answer.status_code == 200
    assert answer.json() == {"study_instance_uid": study.study_uid, "message_id": message_id, "verdict": "agree"}
    stored = site.store.review(message_id)
    assert (stored.verdict, stored.reviewer, stored.finding) == (Verdict.AGREE, "operator", "POSITIVE")
    reviewed = [e for e in audit_events(site) if e["event"] == "reviewed"]
    assert reviewed[-1] == {
        **reviewed[-1],
        "message_id": message_id,
        "study_uid": study.study_uid,
        "verdict": "agree",
        "finding": "POSITIVE",
        "model_sha256": stored.model_sha256,
    }
    assert not {"patient_name", "patient_id", "patient_birth_date", "reviewer"} & set(reviewed[-1])
    by_uid = {s["study_instance_uid"]: s for s in client.get("/api/studies").json()}
    assert by_uid[study.study_uid]["review"] == "agree"
    assert by_uid[site.studies["ACC-POS-HIGH"].study_uid]["review"] is None
    assert client.get(f"/api/studies/{study.study_uid}").json()["review"] == "agree"
    row = re.search(rf'data-study-uid="{re.escape(study.study_uid)}".*?</tr>', client.get("/").text, re.S).group(0)
    assert 'class="verdict agree"' in row
    assert metric_values(client)['lungvision_reviews_total{verdict="agree"}'] == 1

    changed = client.post(f"/api/studies/{study.study_uid}/review", json={"verdict": "disagree"}, headers=BEARER)
    assert changed.json()["verdict"] == "disagree"
    assert [r.verdict for r in site.store.reviews() if r.message_id == message_id] == [Verdict.DISAGREE]
    assert client.get(f"/api/studies/{study.study_uid}").json()["review"] == "disagree"
    assert metric_values(client)['lungvision_reviews_total{verdict="disagree"}'] == 1
    assert (
        client.post(f"/api/studies/{study.study_uid}/review", json={"verdict": "maybe"}, headers=BEARER).status_code
        == 422
    )


def test_only_an_analysed_finding_can_be_reviewed(client, site) -> None:
    image = ImageResult(
        sop_instance_uid=generate_uid(), not_analysed_reason="not a chest radiograph", sr_uid=generate_uid()
    )
    not_analysed = extra_result(
        site, status=StudyStatus.NOT_ANALYSED, finding=Finding.NOT_ANALYSED, probability=None, images=[image]
    )
    for uid in (
        not_analysed.study_instance_uid,
        site.studies["analysing"].study_uid,
        site.studies["received"].study_uid,
    ):
        answer = client.post(f"/api/studies/{uid}/review", json={"verdict": "agree"}, headers=BEARER)
        assert answer.status_code == 409, uid
    assert site.store.review(not_analysed.message_id) is None
    assert client.post("/api/studies/1.2.3.4/review", json={"verdict": "agree"}, headers=BEARER).status_code == 404
    assert "Agree</button>" not in client.get(f"/studies/{not_analysed.study_instance_uid}", headers=BASIC).text


def test_the_study_page_review_form_needs_sign_in_and_the_csrf_token(client, site) -> None:
    study = site.studies["ACC-NEG"]
    url = f"/studies/{study.study_uid}/review"
    assert "Agree</button>" not in client.get(f"/studies/{study.study_uid}").text  # not signed in: no form
    signed_in = client.get(f"/studies/{study.study_uid}", headers=BASIC).text
    assert "Agree / Disagree with the finding" in signed_in
    csrf = REVIEW_PAGE_CSRF.search(signed_in).group(1)
    assert client.post(url, data={"csrf": csrf, "verdict": "disagree"}, follow_redirects=False).status_code == 401
    assert (
        client.post(url, data={"csrf": "x", "verdict": "disagree"}, headers=BASIC, follow_redirects=False).status_code
        == 403
    )
    assert (
        client.post(
            url,
            data={"csrf": csrf, "verdict": "disagree"},
            headers={**BASIC, "Origin": "http://evil.example"},
            follow_redirects=False,
        ).status_code
        == 403
    )
    message_id = client.get(f"/api/studies/{study.study_uid}").json()["message_id"]
    assert site.store.review(message_id) is None
    answer = client.post(url, data={"csrf": csrf, "verdict": "disagree"}, headers=BASIC, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == f"/studies/{study.study_uid}"
    assert site.store.review(message_id).verdict == Verdict.DISAGREE
    assert 'class="verdict disagree"' in client.get(f"/studies/{study.study_uid}").text
    assert any(
        e["event"] == "reviewed"
        and e["message_id"] == message_id
        and e["verdict"] == "disagree"
        and e["finding"] == "NEGATIVE"
        for e in audit_events(site)
    )


def test_outside_intended_use_is_a_status_and_a_per_image_flag(client, site) -> None:
    lateral = ImageResult(
        sop_instance_uid=generate_uid(),
        intended_use=False,
        gate_reason=GateReason.VIEW,
        gate_text="lateral view (ViewPosition LL)",
        not_analysed_reason="lateral view (ViewPosition LL)",
        sr_uid=generate_uid(),
    )
    adult = ImageResult(
        sop_instance_uid=generate_uid(),
        probability=0.004,
        positive=False,
        intended_use=False,
        gate_reason=GateReason.AGE,
        logit=-5.5,
        sr_uid=generate_uid(),
        gate_text="patient age 58 years is outside the model's population",
    )
    refused = extra_result(
        site, status=StudyStatus.OUTSIDE_USE, finding=Finding.NOT_ANALYSED, probability=None, images=[lateral]
    )
    flagged = extra_result(
        site, status=StudyStatus.ANALYSED, finding=Finding.NEGATIVE, probability=0.004, images=[adult]
    )
    status = "outside intended use"
    listed = client.get("/api/studies", params={"status": status}).json()
    assert [s["study_instance_uid"] for s in listed] == [refused.study_instance_uid]
    assert listed[0]["outside_intended_use"] is True
    by_uid = {s["study_instance_uid"]: s for s in client.get("/api/studies").json()}
    assert (
        by_uid[flagged.study_instance_uid]["status"],
        by_uid[flagged.study_instance_uid]["outside_intended_use"],
    ) == ("analysed", True)
    assert by_uid[site.studies["ACC-NEG"].study_uid]["outside_intended_use"] is False
    images = client.get(f"/api/studies/{refused.study_instance_uid}").json()["images"]
    assert (images[0]["intended_use"], images[0]["gate_reason"]) == (False, "view")
    assert client.get(f"/api/studies/{site.studies['ACC-NEG'].study_uid}").json()["images"][0]["intended_use"] in (
        True,
        None,
    )  # None: recorded before the gate existed

    page = client.get("/", params={"status": status})
    assert page.status_code == 200 and refused.study_instance_uid in page.text
    assert flagged.study_instance_uid not in page.text
    assert (
        "outside intended use: lateral view (ViewPosition LL)"
        in client.get(f"/studies/{refused.study_instance_uid}").text
    )
    flagged_page = client.get(f"/studies/{flagged.study_instance_uid}").text
    assert "probability 0.004" in flagged_page and 'class="badge outside-intended-use"' in flagged_page
    assert "patient age 58 years is outside the model&#39;s population" in flagged_page
    row = re.search(rf'data-study-uid="{re.escape(flagged.study_instance_uid)}".*?</tr>', client.get("/").text, re.S)
    assert 'class="badge outside-intended-use"' in row.group(0)

    site.store.update_delivery(
        refused.message_id, "pacs", status=DeliveryStatus.DELIVERED, attempts=1
    )  # the stored status rolls up to delivered
    assert client.get(f"/api/studies/{refused.study_instance_uid}").json()["status"] == status
    assert (
        client.post(
            f"/api/studies/{refused.study_instance_uid}/review", json={"verdict": "agree"}, headers=BEARER
        ).status_code
        == 409
    )


def test_shadow_mode_shows_a_banner_and_is_reported_by_healthz(client, site) -> None:
    banner = "Shadow mode: results are kept here and not sent to PACS or RIS while this site validates the model"
    assert banner not in client.get("/").text
    assert client.get("/healthz").json() == {"ok": True, "shadow_mode": False}
    delivery = site.settings.delivery.model_copy(update={"shadow_mode": True})
    shadow = TestClient(create_app(site.settings.model_copy(update={"delivery": delivery})))
    assert banner in shadow.get("/").text
    assert shadow.get("/healthz").json() == {"ok": True, "shadow_mode": True}


def test_every_error_answer_is_one_detail_sentence(client) -> None:
    bad_filter = client.get("/api/studies", params={"status": "nonsense"})
    bad_body = client.post("/api/studies/1.2.3/review", json={"verdict": "maybe"}, headers=BEARER)
    for answer in (bad_filter, bad_body):
        assert answer.status_code == 422 and isinstance(answer.json()["detail"], str)
    assert "verdict" in bad_body.json()["detail"]
    assert client.get("/api/studies/1.2.3").json() == {"detail": "no such study"}
