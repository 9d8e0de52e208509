"""Workers shared by the tests whose worker environment is identical.

Starting a worker costs seconds (imports, models, Celery's start-up), and most worker tests
only need a running worker of some environment: `shared_worker(**overrides)` returns one of
`worker_env(...)` with those TRAPQ_* overrides, started by the first test that asks for that
environment and kept for the session, on a queue and data folder of its own. Send with
`shared.env`; rows stay the test's own (`clean_pg` empties the tables first).

After a test that failed, or that left messages queued or unacknowledged or a chunk not
ended, the worker is retired (killed, its queue deleted) and the next test starts a fresh
one, so no test inherits another's work. Tests that kill, stop, signal or reconfigure their
worker use `worker_factory` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, text

from tests import services
from tests.worker_jobs import worker_env
from tests.worker_process import WorkerProcess

Key = tuple[tuple[tuple[str, str], ...], str, int]


@dataclass
class SharedWorker:
    worker: WorkerProcess
    env: dict[str, str]

    @property
    def queue(self) -> str:
        return self.env["TRAPQ_QUEUE"]

    @property
    def pid(self) -> int:
        return self.worker.pid

    def log_text(self) -> str:
        """The worker's whole log: earlier tests' lines included."""
        return self.worker.log_text()

    def tail(self, n: int = 60) -> str:
        return self.worker.tail(n)

    def idle(self, engine: Engine) -> bool:
        """Nothing queued or unacknowledged on its queue, no chunk queued or running."""
        client = redis.Redis.from_url(self.env["TRAPQ_BROKER_URL"])
        try:
            queued = client.llen(self.queue) + client.hlen(f"{self.queue}.unacked")
        finally:
            client.close()
        with engine.connect() as conn:
            unended = conn.scalar(text(
                "SELECT count(*) FROM chunks WHERE state IN ('queued', 'running')"
            ))
        return queued == 0 and unended == 0 and self.worker.proc is not None \
            and self.worker.proc.poll() is None


class WorkerPool:
    """The session's shared workers, one per environment."""

    def __init__(self, folder: Path, pg_url: str, redis_url: str) -> None:
        self.folder, self.pg_url, self.redis_url = folder, pg_url, redis_url
        self._workers: dict[Key, SharedWorker] = {}
        self._made = 0

    def get(self, overrides: dict[str, str], pool: str, concurrency: int) -> SharedWorker:
        key: Key = (tuple(sorted(overrides.items())), pool, concurrency)
        shared = self._workers.get(key)
        if shared is not None and shared.worker.proc is not None \
                and shared.worker.proc.poll() is None:
            return shared
        self._made += 1
        queue = services.queue_name("trapq-test-shared")
        base = services.service_env(self.folder / f"data-{self._made}", self.pg_url,
                                    self.redis_url, queue)
        env = worker_env(base, **overrides)
        worker = WorkerProcess(env, self.folder / f"worker-{self._made}.log", pool=pool,
                               concurrency=concurrency)
        self._workers[key] = shared = SharedWorker(worker, env)
        worker.start()
        return shared

    def retire(self, shared: SharedWorker) -> None:
        shared.worker.kill()
        services.delete_queue(shared.queue)
        self._workers = {k: v for k, v in self._workers.items() if v is not shared}

    def close(self) -> None:
        for shared in list(self._workers.values()):
            self.retire(shared)


@pytest.fixture(scope="session")
def worker_pool(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, redis_url: str
) -> Iterator[WorkerPool]:
    pool = WorkerPool(tmp_path_factory.mktemp("shared-workers"), pg_url, redis_url)
    yield pool
    pool.close()


@pytest.fixture
def shared_worker(
    worker_pool: WorkerPool, clean_pg: Engine, request: pytest.FixtureRequest
) -> Iterator[Callable[..., SharedWorker]]:
    """`shared_worker(pool="threads", concurrency=2, **TRAPQ_overrides)`: a running worker
    of worker_env(**overrides), shared with the other tests of that environment."""
    used: list[SharedWorker] = []

    def get(pool: str = "threads", concurrency: int = 2, **overrides: str) -> SharedWorker:
        shared = worker_pool.get(overrides, pool, concurrency)
        used.append(shared)
        return shared

    yield get
    report = getattr(request.node, "rep_call", None)
    failed = report is None or report.failed
    for shared in used:
        if failed or not shared.idle(clean_pg):
            worker_pool.retire(shared)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    """Keeps the call phase's report on the item, for shared_worker's teardown."""
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
