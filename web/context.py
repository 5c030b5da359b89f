"""What every part of the web app shares: the settings, the outcome store read through the worklist, the
dead-letter list, the broker (to replay dead letters by task name), the authentication and the pages'
templates."""

from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from common.dead_letters import DeadLetters
from common.publisher import Publisher
from common.store import Store
from config.settings import Settings
from web.auth import Authentication
from web.worklist import StudyRow, Worklist

TEMPLATES = Path(__file__).with_name("templates")


@dataclass
class WebContext:
    settings: Settings
    store: Store
    worklist: Worklist
    dead_letters: DeadLetters
    publisher: Publisher
    auth: Authentication
    templates: Jinja2Templates

    @classmethod
    def of(cls, settings: Settings) -> "WebContext":
        store = Store(settings.store.url)
        return cls(
            settings,
            store,
            Worklist(settings, store),
            DeadLetters(store),
            Publisher(settings.broker.url),
            Authentication(settings),
            Jinja2Templates(directory=str(TEMPLATES)),
        )

    def row(self, study_uid: str) -> StudyRow:
        """The worklist row of one study; 404 when there is none."""
        row = self.worklist.row(study_uid)
        if row is None:
            raise HTTPException(404, "no such study")
        return row

    def page(self, request: Request, name: str, auth: str | None, **context) -> HTMLResponse:
        return self.templates.TemplateResponse(
            request,
            name,
            {
                "authenticated": auth is not None,
                "auth_enabled": self.auth.enabled,
                "shadow_mode": self.settings.delivery.shadow_mode,
                "refresh_s": self.settings.web.refresh_s,
                **context,
            },
        )
