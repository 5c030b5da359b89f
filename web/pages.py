"""The worklist's pages (server-rendered, Jinja2): the worklist, one study with its review form, sign-in
and the health check."""

from enum import StrEnum
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from common.results import Finding, Verdict
from web import studies
from web.context import WebContext
from web.worklist import WorklistStatus


def filters(status: str | None, finding: str | None) -> tuple[WorklistStatus | None, Finding | None]:
    """The worklist page's filters; an empty one (the form's "all") is none."""
    return choice("status", WorklistStatus, status), choice("finding", Finding, finding)


Choice = TypeVar("Choice", bound=StrEnum)


def choice(name: str, kind: type[Choice], value: str | None) -> Choice | None:
    """``value`` as a member of ``kind`` (None when empty); 422 when it is none of them."""
    try:
        return kind(value) if value else None
    except ValueError:
        raise HTTPException(422, f"{name} must be one of {[member.value for member in kind]}") from None


def router(context: WebContext) -> APIRouter:
    pages = APIRouter(include_in_schema=False)
    Auth = Annotated[str | None, Depends(context.auth)]

    @pages.get("/", response_class=HTMLResponse)
    def worklist_page(request: Request, auth: Auth, status: str | None = None, finding: str | None = None):
        status, finding = filters(status, finding)
        rows = context.worklist.rows(status=status, finding=finding)
        return context.page(
            request,
            "worklist.html",
            auth,
            auto_refresh=True,
            studies=[studies.summary(context, row, auth is not None) for row in rows],
            statuses=list(WorklistStatus),
            findings=list(Finding),
            status=status,
            finding=finding,
            dead_letter_count=len(context.dead_letters.list()),
        )

    @pages.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study_page(request: Request, study_uid: str, auth: Auth):
        row = context.row(study_uid)
        return context.page(
            request,
            "study.html",
            auth,
            study=studies.detail(context, row, auth is not None),
            reviewable=row.finding.reviewable,
            csrf_token=context.auth.csrf_token if auth else None,
        )

    @pages.post("/studies/{study_uid}/review")
    async def review_form(request: Request, study_uid: str, auth: Auth):
        form = await context.auth.form_fields(request, auth, "review")
        try:
            verdict = Verdict(form.get("verdict", [""])[0])
        except ValueError:
            raise HTTPException(422, f"verdict must be one of {[v.value for v in Verdict]}") from None
        studies.review(context, study_uid, verdict)
        return RedirectResponse(f"/studies/{study_uid}", status_code=303)

    @pages.get("/login")
    def login(auth: Auth):
        """Ask the browser for basic-auth credentials, then go back to the worklist."""
        if not context.auth.enabled:
            raise HTTPException(404, "authentication is not configured (web.auth_token)")
        if auth is None:
            return Response(
                "sign-in required",
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="Lung Vision", charset="UTF-8"'},
            )
        return RedirectResponse("/", status_code=303)

    @pages.get("/healthz")
    def healthz():
        return {"ok": True, "shadow_mode": context.settings.delivery.shadow_mode}

    return pages
