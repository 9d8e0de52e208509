"""Fixtures for the real services: a fresh PostgreSQL database per test session, Redis, queues.

Each session gets its own database and its own queue names, so two test runs on one machine
(or a developer's and CI's) never see each other's rows or messages.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

import migrations
from db.models import Base
from db.session import make_engine

PG_ADMIN_URL = os.environ.get(
    "TRAPQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_BASE_URL = os.environ.get("TRAPQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/1")


def _create_database(name: str) -> str:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop_database(name: str) -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of an empty PostgreSQL database migrated to head, dropped after the session."""
    name = f"trapq_test_{uuid.uuid4().hex[:10]}"
    url = _create_database(name)
    migrations.upgrade(url)
    yield url
    _drop_database(name)


@pytest.fixture(scope="session")
def empty_pg_url() -> Iterator[str]:
    """URL of a PostgreSQL database with no schema at all (for migration tests)."""
    name = f"trapq_test_empty_{uuid.uuid4().hex[:10]}"
    yield _create_database(name)
    _drop_database(name)


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
    client = redis.Redis.from_url(REDIS_BASE_URL)
    client.ping()
    client.close()
    return REDIS_BASE_URL


@pytest.fixture
def queue_name(redis_url: str) -> Iterator[str]:
    """A queue name of this test alone; its Redis list is deleted afterwards."""
    name = f"trapq-test-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(name)
    client.close()


@pytest.fixture
def service_env(
    tmp_path: Path, pg_url: str, redis_url: str, queue_name: str, clean_pg: Engine
) -> dict[str, str]:
    """TRAPQ_* variables that point a CLI or worker subprocess at the real services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAPQ_")}
    env.update(
        TRAPQ_DATA_DIR=str(tmp_path / "trapq-data"),
        TRAPQ_DATABASE_URL=pg_url,
        TRAPQ_BROKER_URL=redis_url,
        TRAPQ_RESULT_BACKEND=redis_url,
        TRAPQ_QUEUE=queue_name,
        TRAPQ_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    return env
