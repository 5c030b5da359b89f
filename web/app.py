"""The worklist web app: server-rendered pages (Jinja2), a JSON API with OpenAPI, and /metrics.

Authentication: ``web.auth_token`` (a secret) is accepted as ``Authorization: Bearer TOKEN`` (API
clients) or as the password of HTTP basic auth for ``web.auth_user`` (browsers: "Sign in" asks for
it). Without it every page works but shows no patient name, id or birth date, dead letters
cannot be replayed and findings cannot be reviewed. Patient fields are read from result headers
per request and never logged.

Replaying a dead letter and reviewing a finding (agree / disagree, for local validation) are POSTs
that need authentication and, for browser (basic-auth) credentials, which the browser would attach
to a forged cross-site request too, a CSRF token derived from the secret (HMAC) in the form, plus
an Origin header, when sent, naming this host.
"""

import base64
import binascii
import hashlib
import hmac
import logging
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, urlsplit

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from common import audit
from config.settings import Settings
from web.metrics import registry_for
from web.worklist import FINDINGS, STATUSES, StudyRow, Worklist, patient_fields, render_png, sr_summary, top_sc_uid
from worker.record import REVIEWABLE_FINDINGS, Verdict

TEMPLATES = Path(__file__).with_name("templates")
log = logging.getLogger("lungvision.web")


class PatientFields(BaseModel):
    """Only in answers to authenticated requests."""

    patient_name: str
    patient_id: str
    patient_birth_date: str


class StudySummary(BaseModel):
    study_instance_uid: str
    status: str  # received | queued | analysing | analysed | delivered | failed | not analysed | outside intended use
    finding: str  # POSITIVE | NEGATIVE | NOT_ANALYSED | PENDING
    probability: float | None
    threshold: float | None
    arrival_time: datetime
    accession_number: str | None
    modality: str | None
    calling_ae: str | None
    message_id: str | None
    round: int | None
    thumbnail_url: str | None
    detail_url: str
    review: Verdict | None = None  # the current reviewer verdict on this round's finding
    outside_intended_use: bool = False  # any image of the round is outside the intended use
    population: str | None = None  # the population of the study's finding, e.g. children (None: nothing analysed)
    operating_point: str | None = None  # the operating point it was judged at, e.g. "shipped / adults"
    patient: PatientFields | None = None


class ImageResult(BaseModel):
    sop_instance_uid: str | None
    probability: float | None
    positive: bool | None
    not_analysed_reason: str | None
    intended_use: bool | None  # False: outside the intended use (refused, or analysed and flagged); None: not checked
    gate_reason: str | None  # the intended-use gate's rule (modality, body_part, view, age, image_check) when it said no
    gate_text: str | None  # ...and its sentence for people
    population: str | None = None  # whose operating point: by the header's patient age, else the image check
    operating_point: str | None = None  # e.g. "shipped / adults" or "site profile ward-7 / children"
    threshold: float | None = None  # the operating point's threshold
    sc_uid: str | None
    sr_uid: str | None
    image_url: str | None


class DeliveryEntry(BaseModel):
    destination: str
    status: str
    attempts: int
    last_error: str | None
    updated_at: datetime | None


class StudyDetail(StudySummary):
    model_version: str | None
    model_sha256: str | None
    timings_ms: dict[str, float]
    images: list[ImageResult]
    deliveries: list[DeliveryEntry]
    events: list[dict]
    sr_summary: list[str]


class ReviewRequest(BaseModel):
    verdict: Verdict


class ReviewAnswer(BaseModel):
    study_instance_uid: str
    message_id: str
    verdict: Verdict


class ErrorMessage(BaseModel):
    """Every error answer of the API, including request validation (422)."""

    detail: str


class ReplayAnswer(BaseModel):
    replayed: str  # the dead letter's id


def errors(**descriptions: str) -> dict:
    """OpenAPI ``responses`` for error statuses given as ``e401="…"``: each answers an ErrorMessage."""
    return {int(code[1:]): {"model": ErrorMessage, "description": text} for code, text in descriptions.items()}


UNAUTHENTICATED = "no Bearer token (or basic-auth sign-in), or a wrong one"


class DeadLetterEntry(BaseModel):
    id: str
    message_id: str
    study_instance_uid: str
    destination: str
    attempts: int
    error: str
    failed_at: str


def create_app(settings: Settings) -> FastAPI:
    from worker.celery_app import configure
    from worker.deliver import dead_letters_for
    from worker.record import Store

    configure(settings)  # the broker for replays; the audit trail path
    store = Store(settings.store.url)
    worklist = Worklist(settings, store)
    outbox = Path(settings.worker.outbox_dir)
    templates = Jinja2Templates(directory=str(TEMPLATES))
    token = settings.web.auth_token.get_secret_value() if settings.web.auth_token else None
    # one CSRF token for every form (replay, review); the HMAC message is kept as it was when replay was the only one
    csrf_token = hmac.new(token.encode(), b"lungvision-replay", hashlib.sha256).hexdigest() if token else None

    def dead_letters():
        return dead_letters_for(settings, store)

    registry = registry_for(settings, worklist.audit, lambda: len(dead_letters().list()))
    app = FastAPI(title="Lung Vision worklist", version="0.1.0",
                  description="Prioritised chest X-ray pneumonia triage results. NOT FOR DIAGNOSTIC USE.")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        """A 422 answer like every other error: one ``detail`` sentence naming the bad fields."""
        problems = "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors())
        return JSONResponse(status_code=422, content={"detail": problems})

    def credentials(request: Request) -> str | None:
        """"bearer" or "basic" when the request carries the configured secret, else None."""
        if token is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            return "bearer"
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):  # a malformed header: simply not signed in (the answer
                return None                               # is 401 and says so; nothing to log per request)
            if hmac.compare_digest(user.encode(), settings.web.auth_user.encode()) \
                    and hmac.compare_digest(password.encode(), token.encode()):
                return "basic"
        return None

    Auth = Annotated[str | None, Depends(credentials)]

    def summary(row: StudyRow, authenticated: bool) -> StudySummary:
        uid = row.study_instance_uid
        patient = patient_fields(outbox, row.result) if authenticated else None
        return StudySummary(
            study_instance_uid=uid, status=row.status, finding=row.finding, probability=row.probability,
            threshold=row.threshold, arrival_time=row.arrival_time, accession_number=row.accession_number,
            modality=row.modality, calling_ae=row.calling_ae, message_id=row.message_id, round=row.round,
            thumbnail_url=f"/studies/{uid}/thumbnail.png" if row.has_heatmap else None,
            detail_url=f"/studies/{uid}", review=row.review, outside_intended_use=row.outside_intended_use,
            population=row.population, operating_point=row.operating_point,
            patient=PatientFields(**patient) if patient else None)

    def detail(row: StudyRow, authenticated: bool) -> StudyDetail:
        result = row.result
        images, deliveries, lines = [], [], []
        if result is not None:
            uid = result.study_instance_uid
            images = [ImageResult(sop_instance_uid=image.get("sop_instance_uid"),
                                  probability=image.get("probability"), positive=image.get("positive"),
                                  not_analysed_reason=image.get("not_analysed_reason") or image.get("error"),
                                  intended_use=image.get("intended_use"), gate_reason=image.get("gate_reason"),
                                  gate_text=image.get("gate_text"), population=image.get("population"),
                                  operating_point=image.get("operating_point"), threshold=image.get("threshold"),
                                  sc_uid=image.get("sc_uid"), sr_uid=image.get("sr_uid"),
                                  image_url=f"/studies/{uid}/images/{image['sc_uid']}.png" if image.get("sc_uid")
                                  else None) for image in result.images or []]
            deliveries = [DeliveryEntry(destination=d.destination, status=d.status, attempts=d.attempts,
                                        last_error=d.last_error, updated_at=d.updated_at)
                          for d in store.deliveries(result.message_id)]
            sr_uid = next((image.sr_uid for image in images if image.sr_uid and image.sc_uid), None) \
                or next((image.sr_uid for image in images if image.sr_uid), None)
            lines = sr_summary(worklist.output_path(uid, sr_uid)) if sr_uid else []
        return StudyDetail(**summary(row, authenticated).model_dump(),
                           model_version=result.model_version if result else None,
                           model_sha256=result.model_sha256 if result else None,
                           timings_ms=result.timings_ms or {} if result else {}, images=images,
                           deliveries=deliveries, events=worklist.events(row.study_instance_uid), sr_summary=lines)

    def letters() -> list[DeadLetterEntry]:
        return [DeadLetterEntry(id=l.id, message_id=l.job.message_id, study_instance_uid=l.job.study_instance_uid,
                                destination=l.job.destination, attempts=l.attempts, error=l.error,
                                failed_at=l.failed_at) for l in dead_letters().list()]

    def reviewed(study_uid: str, verdict: Verdict) -> ReviewAnswer:
        """Record ``verdict`` on the finding of the study's latest round, and audit it."""
        row = worklist.row(study_uid)
        if row is None:
            raise HTTPException(404, "no such study")
        result = row.result
        if result is None:
            raise HTTPException(409, "the study has not been analysed yet")
        try:
            review = store.save_review(result, verdict, settings.web.auth_user)
        except ValueError as error:  # no POSITIVE or NEGATIVE finding to agree or disagree with
            raise HTTPException(409, str(error)) from error
        audit.record("reviewed", message_id=result.message_id, study_uid=result.study_instance_uid,
                     verdict=review.verdict.value, finding=review.finding, model_sha256=review.model_sha256)
        log.info("study round %s reviewed from the web: %s %s", result.message_id, review.verdict.value, review.finding)
        return ReviewAnswer(study_instance_uid=result.study_instance_uid, message_id=result.message_id,
                            verdict=review.verdict)

    async def form_fields(request: Request, auth: str | None, action: str) -> dict[str, list[str]]:
        """The fields of a page's state-changing form, after checking who sent it: credentials are
        required, and browser (basic-auth) ones only count with our CSRF token and no foreign Origin."""
        if auth is None:
            raise HTTPException(401, f"sign in to {action}", headers={"WWW-Authenticate": 'Basic realm="Lung Vision"'})
        form = parse_qs((await request.body()).decode(errors="replace"))
        if auth == "basic":  # browser credentials: require proof the form came from our page
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                raise HTTPException(403, "cross-origin request refused")
            if not hmac.compare_digest(form.get("csrf", [""])[0].encode(), csrf_token.encode()):
                raise HTTPException(403, "missing or wrong CSRF token")
        return form

    def checked_filters(status: str | None, finding: str | None) -> tuple[str | None, str | None]:
        status, finding = status or None, finding or None
        if status is not None and status not in STATUSES:
            raise HTTPException(422, f"status must be one of {list(STATUSES)}")
        if finding is not None and finding not in FINDINGS:
            raise HTTPException(422, f"finding must be one of {list(FINDINGS)}")
        return status, finding

    # ---- JSON API -----------------------------------------------------------------------------

    def signed_in(auth: str | None) -> None:
        if auth is None:
            raise HTTPException(401, "sign in (web.auth_token) to see dead letters",
                                headers={"WWW-Authenticate": 'Basic realm="Lung Vision"'})

    @app.get("/api/studies", response_model=list[StudySummary], tags=["api"],
             responses=errors(e422="an unknown status or finding filter"))
    def api_studies(auth: Auth, status: Literal[STATUSES] | None = Query(None),
                    finding: Literal[FINDINGS] | None = Query(None)) -> list[StudySummary]:
        """The worklist in priority order: positives first, then higher probability, then arrival."""
        return [summary(row, auth is not None) for row in worklist.rows(status=status, finding=finding)]

    @app.get("/api/studies/{study_uid}", response_model=StudyDetail, tags=["api"], responses=errors(e404="no such study"))
    def api_study(study_uid: str, auth: Auth) -> StudyDetail:
        """One study: per-image results, SR summary, deliveries and its audit events."""
        row = worklist.row(study_uid)
        if row is None:
            raise HTTPException(404, "no such study")
        return detail(row, auth is not None)

    @app.get("/api/dead-letters", response_model=list[DeadLetterEntry], tags=["api"],
             responses=errors(e401=UNAUTHENTICATED))
    def api_dead_letters(auth: Auth) -> list[DeadLetterEntry]:
        """Deliveries that ran out of attempts, oldest first (authentication required: the errors name
        destinations)."""
        signed_in(auth)
        return letters()

    @app.post("/api/dead-letters/{letter_id}/replay", response_model=ReplayAnswer, tags=["api"],
              responses=errors(e401="no Bearer token, or a wrong one", e404="no such dead letter"))
    def api_replay(letter_id: str, auth: Auth) -> ReplayAnswer:
        """Replay one dead letter (Bearer token required)."""
        if auth != "bearer":
            raise HTTPException(401, "a Bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        return ReplayAnswer(replayed=replay(letter_id))

    @app.post("/api/studies/{study_uid}/review", response_model=ReviewAnswer, tags=["api"], responses=errors(
        e401="no Bearer token, or a wrong one", e404="no such study",
        e409="the study's latest round has no analysed finding (POSITIVE or NEGATIVE)",
        e422="the body is not {\"verdict\": \"agree\" | \"disagree\"}"))
    def api_review(study_uid: str, body: ReviewRequest, auth: Auth) -> ReviewAnswer:
        """Agree or disagree with the finding of the study's latest round (Bearer token required); a later
        verdict on the same round replaces the earlier one."""
        if auth != "bearer":
            raise HTTPException(401, "a Bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        return reviewed(study_uid, body.verdict)

    def replay(letter_id: str) -> str:
        from worker.tasks import replay_dead_letter

        letter = replay_dead_letter(settings, letter_id)
        if letter is None:
            raise HTTPException(404, "no such dead letter")
        log.info("dead letter %s replayed from the web (%s → %s)", letter_id, letter.job.message_id,
                 letter.job.destination)
        return letter_id

    # ---- pages ------------------------------------------------------------------------------------

    def page(request: Request, name: str, auth: str | None, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {
            "authenticated": auth is not None, "auth_enabled": token is not None,
            "shadow_mode": settings.delivery.shadow_mode, "refresh_s": settings.web.refresh_s, **context})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def worklist_page(request: Request, auth: Auth, status: str | None = None, finding: str | None = None):
        status, finding = checked_filters(status, finding)
        studies = [summary(row, auth is not None) for row in worklist.rows(status=status, finding=finding)]
        return page(request, "worklist.html", auth, auto_refresh=True, studies=studies, statuses=STATUSES, findings=FINDINGS,
                    status=status, finding=finding, dead_letter_count=len(dead_letters().list()))

    @app.get("/studies/{study_uid}", response_class=HTMLResponse, include_in_schema=False)
    def study_page(request: Request, study_uid: str, auth: Auth):
        row = worklist.row(study_uid)
        if row is None:
            raise HTTPException(404, "no such study")
        return page(request, "study.html", auth, study=detail(row, auth is not None),
                    reviewable=row.finding in REVIEWABLE_FINDINGS, csrf_token=csrf_token if auth else None)

    @app.post("/studies/{study_uid}/review", include_in_schema=False)
    async def review_form(request: Request, study_uid: str, auth: Auth):
        form = await form_fields(request, auth, "review")
        try:
            verdict = Verdict(form.get("verdict", [""])[0])
        except ValueError:
            raise HTTPException(422, f"verdict must be one of {[v.value for v in Verdict]}") from None
        reviewed(study_uid, verdict)
        return RedirectResponse(f"/studies/{study_uid}", status_code=303)

    @app.get("/dead-letters", response_class=HTMLResponse, include_in_schema=False)
    def dead_letters_page(request: Request, auth: Auth, replayed: str | None = None):
        signed_in(auth)
        return page(request, "dead_letters.html", auth, letters=letters(), csrf_token=csrf_token if auth else None,
                    replayed=replayed)

    @app.post("/dead-letters/{letter_id}/replay", include_in_schema=False)
    async def replay_form(request: Request, letter_id: str, auth: Auth):
        await form_fields(request, auth, "replay")
        replay(letter_id)
        return RedirectResponse(f"/dead-letters?replayed={letter_id}", status_code=303)

    @app.get("/login", include_in_schema=False)
    def login(auth: Auth):
        """Ask the browser for basic-auth credentials, then go back to the worklist."""
        if token is None:
            raise HTTPException(404, "authentication is not configured (web.auth_token)")
        if auth is None:
            return Response("sign-in required", status_code=401,
                            headers={"WWW-Authenticate": 'Basic realm="Lung Vision", charset="UTF-8"'})
        return RedirectResponse("/", status_code=303)

    # ---- pictures and metrics ---------------------------------------------------------------------

    def sc_png(study_uid: str, sc_uid: str, max_side: int) -> Response:
        row = worklist.row(study_uid)
        known = row is not None and row.result is not None and any(
            image.get("sc_uid") == sc_uid for image in row.result.images or [])
        path = worklist.output_path(study_uid, sc_uid)
        if not known or not path.exists():
            raise HTTPException(404, "no such heatmap")
        return Response(render_png(path, max_side), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/studies/{study_uid}/thumbnail.png", include_in_schema=False)
    def thumbnail(study_uid: str):
        row = worklist.row(study_uid)
        sc_uid = top_sc_uid(row.result) if row is not None and row.result is not None else None
        if sc_uid is None:
            raise HTTPException(404, "no heatmap")
        return sc_png(study_uid, sc_uid, settings.web.thumbnail_px)

    @app.get("/studies/{study_uid}/images/{sc_uid}.png", include_in_schema=False)
    def image(study_uid: str, sc_uid: str):
        return sc_png(study_uid, sc_uid, settings.worker.sc_max_long_side)

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        return {"ok": True, "shadow_mode": settings.delivery.shadow_mode}

    return app
