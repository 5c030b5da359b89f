"""Lung Vision — the command-line entry point that wires the packages together."""

from common.version import __version__

__all__ = ["__version__"]
