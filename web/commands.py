"""Command hook: ``lungvision web`` serves the worklist pages, the JSON API and /metrics."""

from collections.abc import Callable

import typer

from config.settings import Settings


def register(app: typer.Typer, get_settings: Callable[[], Settings]) -> None:
    """Add the ``web`` command to the ``lungvision`` app."""

    @app.command("web")
    def web() -> None:
        """Run the worklist web server (pages, /api/studies with OpenAPI at /docs, /metrics); Ctrl-C stops."""
        import uvicorn

        from common.logs import configure_logging
        from web.app import create_app

        settings = get_settings()
        configure_logging(settings.log_level)
        application = create_app(settings)
        print(f"worklist on http://{settings.web.bind_address}:{settings.web.port}/", flush=True)
        # access_log off: request paths carry only UIDs, but the worklist is no place to leak anything into logs
        uvicorn.run(
            application, host=settings.web.bind_address, port=settings.web.port, log_level="warning", access_log=False
        )
