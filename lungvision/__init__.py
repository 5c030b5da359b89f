"""Lung Vision — the command-line entry point that wires the packages together."""

__version__ = "0.1.0"
