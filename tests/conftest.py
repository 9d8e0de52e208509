"""Fixtures for the real services: a fresh PostgreSQL database per test session, Redis, queues.

Each session gets its own database and its own queue names, so two test runs on one machine
(or a developer's and CI's) never see each other's rows or messages.

How to write a test here (read before adding one; the suite must stay fast):
- Tiers. `make test-fast` (`pytest -m "not slow"`, <= 1 minute) runs every test that starts
  no process; `make test` runs everything. Markers come from what a test uses
  (tests/tiers.py): `worker_factory` and `shared_worker` mark `worker`; a test that starts
  another process of ours (the installed trapq, a script, redis-server) says
  `@pytest.mark.subprocess`. A test that starts one without the marker fails, naming it.
  One that computes for many seconds in-process (full-size detectors on a CPU) says
  `@pytest.mark.heavy`.
- Workers. Fixtures `worker_factory` (tests/worker_process.py) and `shared_worker`
  (tests/shared_workers.py) are plugins of this file: never import them. Use
  `shared_worker(**TRAPQ_overrides)` when the test only needs a running worker (one per
  environment for the whole session; send with its `.env`); `worker_factory(env)` only where
  the test kills, stops, signals or reconfigures its worker. Test workers start without
  Celery's mingle and gossip (`peers=True` where a test needs them).
- The CLI. `tests.trapq_cli.trapq(env, *args)` runs `trapq` in-process (milliseconds);
  `installed_trapq` runs the installed entry point, only for tests proving the entry point,
  its exit codes or one-line errors (mark them `subprocess`).
- Waiting. Never sleep to synchronise: `wait_for(predicate, bound, what)` on a row's state or
  an event (fault_scenarios.HangingHost holds a fetch until the test releases it). Fault
  tests take short deadlines from `worker_jobs.FAULT_TIMEOUTS` (TRAPQ_TEST_TIMEOUTS lets them
  go below the settings' 10 s floors): a killed worker's chunk is back in about 8 s.
- Leftovers. Databases, queues and processes of a run carry its pid (tests/leftovers.py):
  a killed run's are removed when the next run starts, this run's when it ends.
- Parallel. `make test` runs on pytest-xdist workers (`-n 4 --dist loadgroup`), each a run
  of its own (its database, queues, processes), so nothing may be global: take ports from
  services.free_port, names from services.queue_name, files from tmp_path. A test that
  measures a time bound says `@pytest.mark.serial` (no two such tests run at once); the
  `shared_worker` tests share one xdist worker, hence one pool (tests/tiers.py).
- Images. fault_scenarios.hold_last_images / ImageServer.hold keep a fetch waiting until the
  test releases it: a worker is caught mid-chunk for certain, not probably.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, text

from db.models import Base
from db.session import make_engine
from tests import leftovers, services

pytest_plugins = ["tests.tiers", "tests.worker_process", "tests.shared_workers"]


def _xdist_controller(config: pytest.Config) -> bool:
    """This pytest only hands tests to pytest-xdist workers (`-n N`), each a session of its
    own with its own pid, so its own databases, queues and process tag."""
    return config.pluginmanager.has_plugin("dsession")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove what killed runs left behind, then tag this run's processes. A sibling xdist
    worker is a live run: nothing of its is touched."""
    leftovers.kill_stale_processes()
    leftovers.drop_stale_databases(services.PG_ADMIN_URL)
    leftovers.delete_stale_queues(services.REDIS_URL)
    if not _xdist_controller(session.config):  # its workers would inherit its tag
        leftovers.claim_processes()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _xdist_controller(session.config):
        leftovers.kill_own_processes()


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
