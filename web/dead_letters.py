"""Dead letters on the web: the list (JSON and page, for signed-in operators only: their errors name
destinations) and replaying one — its task is sent again by name (common/dead_letters.py), as
``lungvision jobs retry`` does."""

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from web.auth import UNAUTHENTICATED, require_bearer, require_sign_in
from web.context import WebContext
from web.schemas import DeadLetterEntry, ReplayAnswer, errors

log = logging.getLogger("lungvision.web")


def letters(context: WebContext) -> list[DeadLetterEntry]:
    return [
        DeadLetterEntry(
            id=letter.id,
            message_id=letter.job.message_id,
            study_instance_uid=letter.job.study_instance_uid,
            destination=letter.job.destination,
            attempts=letter.attempts,
            error=letter.error,
            failed_at=letter.failed_at,
        )
        for letter in context.dead_letters.list()
    ]


def replay(context: WebContext, letter_id: str) -> str:
    letter = context.dead_letters.replay(letter_id, context.publisher)
    if letter is None:
        raise HTTPException(404, "no such dead letter")
    log.info("dead letter %s replayed from the web (%s → %s)", letter_id, letter.job.message_id, letter.job.destination)
    return letter_id


def router(context: WebContext) -> APIRouter:
    routes = APIRouter()
    Auth = Annotated[str | None, Depends(context.auth)]

    @routes.get(
        "/api/dead-letters", response_model=list[DeadLetterEntry], tags=["api"], responses=errors(e401=UNAUTHENTICATED)
    )
    def api_dead_letters(auth: Auth) -> list[DeadLetterEntry]:
        """Deliveries that ran out of attempts, oldest first (authentication required: the errors name
        destinations)."""
        require_sign_in(auth, "see dead letters")
        return letters(context)

    @routes.post(
        "/api/dead-letters/{letter_id}/replay",
        response_model=ReplayAnswer,
        tags=["api"],
        responses=errors(e401="no Bearer token, or a wrong one", e404="no such dead letter"),
    )
    def api_replay(letter_id: str, auth: Auth) -> ReplayAnswer:
        """Replay one dead letter (Bearer token required)."""
        require_bearer(auth)
        return ReplayAnswer(replayed=replay(context, letter_id))

    @routes.get("/dead-letters", response_class=HTMLResponse, include_in_schema=False)
    def dead_letters_page(request: Request, auth: Auth, replayed: str | None = None):
        require_sign_in(auth, "see dead letters")
        return context.page(
            request,
            "dead_letters.html",
            auth,
            letters=letters(context),
            csrf_token=context.auth.csrf_token,
            replayed=replayed,
        )

    @routes.post("/dead-letters/{letter_id}/replay", include_in_schema=False)
    async def replay_form(request: Request, letter_id: str, auth: Auth):
        await context.auth.form_fields(request, auth, "replay")
        replay(context, letter_id)
        return RedirectResponse(f"/dead-letters?replayed={letter_id}", status_code=303)

    return routes
