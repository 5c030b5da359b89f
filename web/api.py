"""The JSON API of the worklist: studies in priority order, one study's detail, and reviews (dead letters:
web/dead_letters.py). Its OpenAPI schema is at /openapi.json and /docs."""

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from common.results import Finding
from web import studies
from web.auth import require_bearer
from web.context import WebContext
from web.schemas import ReviewAnswer, ReviewRequest, StudyDetail, StudySummary, errors
from web.worklist import WorklistStatus


def router(context: WebContext) -> APIRouter:
    api = APIRouter(tags=["api"])
    Auth = Annotated[str | None, Depends(context.auth)]

    @api.get(
        "/api/studies", response_model=list[StudySummary], responses=errors(e422="an unknown status or finding filter")
    )
    def api_studies(
        auth: Auth, status: WorklistStatus | None = Query(None), finding: Finding | None = Query(None)
    ) -> list[StudySummary]:
        """The worklist in priority order: positives first, then higher probability, then arrival."""
        return [
            studies.summary(context, row, auth is not None)
            for row in context.worklist.rows(status=status, finding=finding)
        ]

    @api.get("/api/studies/{study_uid}", response_model=StudyDetail, responses=errors(e404="no such study"))
    def api_study(study_uid: str, auth: Auth) -> StudyDetail:
        """One study: per-image results, SR summary, deliveries and its audit events."""
        return studies.detail(context, context.row(study_uid), auth is not None)

    @api.post(
        "/api/studies/{study_uid}/review",
        response_model=ReviewAnswer,
        responses=errors(
            e401="no Bearer token, or a wrong one",
            e404="no such study",
            e409="the study's latest round has no analysed finding (POSITIVE or NEGATIVE)",
            e422='the body is not {"verdict": "agree" | "disagree"}',
        ),
    )
    def api_review(study_uid: str, body: ReviewRequest, auth: Auth) -> ReviewAnswer:
        """Agree or disagree with the finding of the study's latest round (Bearer token required); a later
        verdict on the same round replaces the earlier one."""
        require_bearer(auth)
        return studies.review(context, study_uid, body.verdict)

    return api
