"""The ``lungvision`` command: one sub-command per job, all reading the one settings object."""

import json
from pathlib import Path

import typer

from config.settings import ConfigError, Settings, effective_settings_json, load_settings
from dicom_node import cli as node_commands
from inference import commands as inference_commands
from web import commands as web_commands
from worker import commands as worker_commands

app = typer.Typer(
    help="Lung Vision — DICOM AI node for chest X-ray pneumonia triage. Not a medical device.",
    no_args_is_help=True,
    add_completion=False,
)


class State:
    """What the global options decided, handed to sub-commands."""

    config_file: Path | None = None

    @classmethod
    def settings(cls) -> Settings:
        try:
            return load_settings(cls.config_file)
        except ConfigError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None


@app.callback()
def main(config: Path | None = typer.Option(None, "--config", help="YAML file overriding the defaults")) -> None:
    """Global options."""
    State.config_file = config


@app.command("config")
def show_config() -> None:
    """Print the effective settings as JSON (secrets masked)."""
    typer.echo(json.dumps(effective_settings_json(State.settings()), indent=2))


@app.command()
def serve() -> None:
    """Run the DICOM node, analysis worker and worklist web server together (Ctrl-C or SIGTERM stops all cleanly)."""
    from lungvision.serve import serve as run_both

    config_args = ["--config", str(State.config_file)] if State.config_file else []
    raise typer.Exit(run_both(State.settings(), config_args))


@app.command()
def demo(
    workdir: Path = typer.Option(Path("var/demo"), help="folder for the demo's spool, store and results"),
    keep: bool = typer.Option(
        False, "--keep", help="keep 'serve' and its worklist running after the results, until Ctrl-C/SIGTERM"
    ),
) -> None:
    """Start 'serve' on embedded defaults, send the bundled sample studies, print results, stop (--keep: stay up)."""
    from lungvision.demo import run_demo

    raise typer.Exit(run_demo(workdir.resolve(), keep=keep))


inference_commands.register(app, State.settings, worker_commands.worklist_labels)
node_commands.register(app, State.settings)
worker_commands.register(app, State.settings)
web_commands.register(app, State.settings)
