"""The machine's PostgreSQL (:5432, database ``test``) for the store's tests; skipped where there is none."""

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

POSTGRESQL_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgresql_url() -> str:
    """The URL of the test database, or skip the test when PostgreSQL does not answer."""
    try:
        create_engine(POSTGRESQL_URL).connect().close()
    except OperationalError:
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    return POSTGRESQL_URL
