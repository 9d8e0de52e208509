"""How tests and benchmarks reach the real services: one place for the URLs, databases and queues.

A fresh database and queue name per test session or benchmark run keep two runs on one machine
(a developer's and CI's) from seeing each other's rows or messages. Their names carry the
creating process's pid (`p<pid>`), so a later run can tell the leftovers of a killed one
(tests/leftovers.py) from those of a run still going.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

import migrations

PG_ADMIN_URL = os.environ.get(
    "TRAPQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _session_redis_url(url: str) -> str:
    """One Redis database per pytest-xdist worker (gw0 the given one, gw1 the next, ...):
    Celery's remote control is a broadcast to every worker on the broker's database, and node
    names such as `trapq worker`'s `cpu@host` repeat across sessions, so a command meant for
    one session's worker (add_consumer, tasks.routing) would reach another's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0) + int(worker[2:])
    return urlunsplit(parts._replace(path=f"/{db}"))


REDIS_URL = _session_redis_url(
    os.environ.get("TRAPQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/1")
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _admin(sql: str) -> None:
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def create_database(name: str) -> str:
    """Create an empty database on the admin server; returns its URL."""
    _admin(f'CREATE DATABASE "{name}"')
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(name: str) -> None:
    """Drop the database even while workers still hold connections to it."""
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def temporary_database(prefix: str, migrate: bool = True) -> Iterator[str]:
    """A fresh database (migrated to head unless migrate=False), always dropped afterwards."""
    name = f"{prefix}_p{os.getpid()}_{uuid.uuid4().hex[:10]}"
    url = create_database(name)
    try:
        if migrate:
            migrations.upgrade(url)
        yield url
    finally:
        drop_database(name)


def queue_name(prefix: str) -> str:
    """A fresh queue name of this process."""
    return f"{prefix}-p{os.getpid()}-{uuid.uuid4().hex[:10]}"


def delete_queue(name: str) -> None:
    """The queue's Redis list, Kombu's bindings of its exchange (named as the queue), its
    unacknowledged messages, its workers' visibility leases (tasks.visibility), and its
    pipeline queues with their bindings (tasks.routing)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.delete(name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}",
                      f"{name}.unacked", f"{name}.unacked_index", f"{name}.unacked_mutex",
                      *client.scan_iter(match=f"trapq:{name}:visibility:*"),
                      *client.scan_iter(match=f"*+{name}.*"))
    finally:
        client.close()


@contextlib.contextmanager
def temporary_queue(prefix: str) -> Iterator[str]:
    """A fresh queue name, deleted afterwards (delete_queue)."""
    name = queue_name(prefix)
    try:
        yield name
    finally:
        delete_queue(name)


def service_env(
    data_dir: Path, database_url: str, redis_url: str, queue: str, **overrides: str
) -> dict[str, str]:
    """The environment of a CLI or worker subprocess pointed at these services and no others."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAPQ_")}
    env.update(
        TRAPQ_DATA_DIR=str(data_dir),
        TRAPQ_DATABASE_URL=database_url,
        TRAPQ_BROKER_URL=redis_url,
        TRAPQ_RESULT_BACKEND=redis_url,
        TRAPQ_QUEUE=queue,
        TRAPQ_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    env.update(overrides)
    return env
