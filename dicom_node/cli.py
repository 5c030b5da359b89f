"""Command hook: ``lungvision node`` → load the settings and run the DICOM node."""

from collections.abc import Callable

import typer

from config.settings import ConfigError, Settings


def register(app: typer.Typer, get_settings: Callable[[], Settings]) -> None:
    """Add the ``node`` command to the ``lungvision`` app."""

    @app.command("node")
    def node() -> None:
        """Run the DICOM node: storage SCP, study completion, and dispatch to the worker queue (Ctrl-C stops)."""
        from dicom_node.node import run_node  # pynetdicom and Celery load only for this command

        run_node(get_settings(), reload_settings=_reloader(get_settings))


def _reloader(get_settings: Callable[[], Settings]) -> Callable[[], Settings]:
    """``get_settings`` exits the CLI on a bad file; on SIGHUP that must be a ConfigError instead."""

    def reload() -> Settings:
        try:
            return get_settings()
        except typer.Exit as exit_:
            raise ConfigError("the configuration could not be reloaded (see the message above)") from exit_

    return reload
