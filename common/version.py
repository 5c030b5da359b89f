"""Lung Vision's version, as written into the objects it creates (keep equal to pyproject.toml's)."""

__version__ = "0.1.0"
