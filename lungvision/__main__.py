"""``python -m lungvision`` — the same as the ``lungvision`` command."""

from lungvision.cli import app

app()
