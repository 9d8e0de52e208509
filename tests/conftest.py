"""Fixtures for the real services: a fresh PostgreSQL database per test session, Redis, queues.

Each session gets its own database and its own queue names, so two test runs on one machine
(or a developer's and CI's) never see each other's rows or messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, text

from db.models import Base
from db.session import make_engine
from tests import services


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of an empty PostgreSQL database migrated to head, dropped after the session."""
    with services.temporary_database("trapq_test") as url:
        yield url


@pytest.fixture(scope="session")
def empty_pg_url() -> Iterator[str]:
    """URL of a PostgreSQL database with no schema at all (for migration tests)."""
    with services.temporary_database("trapq_test_empty", migrate=False) as url:
        yield url


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def clean_pg(pg_engine: Engine) -> Engine:
    """The session's database with every table emptied before the test."""
    tables = ", ".join(t.name for t in reversed(Base.metadata.sorted_tables))
    with pg_engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    return pg_engine


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(services.REDIS_URL)
    client.ping()
    client.close()
    return services.REDIS_URL


@pytest.fixture
def queue_name(redis_url: str) -> Iterator[str]:
    """A queue name of this test alone; its Redis keys are deleted afterwards."""
    with services.temporary_queue("trapq-test") as name:
        yield name


@pytest.fixture
def service_env(
    tmp_path: Path, pg_url: str, redis_url: str, queue_name: str, clean_pg: Engine
) -> dict[str, str]:
    """TRAPQ_* variables that point a CLI or worker subprocess at the real services."""
    return services.service_env(tmp_path / "trapq-data", pg_url, redis_url, queue_name)
