"""The worklist web app: server-rendered pages (Jinja2), a JSON API with OpenAPI, and /metrics.

Authentication (web/auth.py): without ``web.auth_token`` every page works but shows no patient name, id
or birth date, dead letters cannot be replayed and findings cannot be reviewed. Patient fields are read
from result headers per request and never logged.

The web process imports neither the worker nor the model: it reads the outcome store and the audit
trail (common), and replays a dead letter by sending its task by name (common/dead_letters.py).
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from common import audit
from config.settings import Settings
from web import api, dead_letters, images, metrics, pages
from web.context import WebContext


async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
    """A 422 answer like every other error: one ``detail`` sentence naming the bad fields."""
    problems = "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors())
    return JSONResponse(status_code=422, content={"detail": problems})


def create_app(settings: Settings) -> FastAPI:
    audit.configure(settings.audit.path)  # reviews and replays are audited
    context = WebContext.of(settings)
    app = FastAPI(
        title="Lung Vision worklist",
        version="0.1.0",
        description="Prioritised chest X-ray pneumonia triage results. NOT FOR DIAGNOSTIC USE.",
    )
    # Starlette types handlers as taking any Exception; this one is only registered for RequestValidationError
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    for concern in (api, dead_letters, pages, images, metrics):
        app.include_router(concern.router(context))
    return app
