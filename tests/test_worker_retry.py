"""The chunk's failure policy through a real worker on PostgreSQL and Redis: Celery's own
retry (tasks.chunk.ChunkTask) gives up with each capture's own reason, a transient failure
after a success fails alone, and a chunk cancelled while it runs stops writing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from db.models import JobCapture
from tests.fault_scenarios import wait_job_end
from tests.local_http import QuietHandler, serving
from tests.trapq_cli import trapq
from tests.worker_jobs import (
    chunk_rows,
    item_states,
    job_state,
    jpeg_bytes,
    make_job,
    send,
    worker_env,
    write_jpegs,
)
from tests.worker_process import wait_for


@pytest.fixture
def image_host() -> Iterator[str]:
    """/down/... answers 500 (transient: the host's fault), /slow/... a JPEG after 0.25 s."""
    body = jpeg_bytes(160, 120)

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith("/down/"):
                self.send_error(500, "host down")
                return
            time.sleep(0.25)
            self.send_body(200, body, "image/jpeg")

    with serving(Handler) as base:
        yield base


def _items(engine: Engine, job_id: int) -> list[tuple[str, str | None, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(JobCapture.state, JobCapture.error_kind, JobCapture.error)
            .where(JobCapture.job_id == job_id)
            .order_by(JobCapture.capture_id)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def test_last_retry_gives_up_and_each_capture_keeps_its_own_reason(
    service_env: dict[str, str], clean_pg: Engine, worker_factory,
    image_host: str,
) -> None:
    uris = [f"{image_host}/down/img{i}.jpg" for i in range(3)]
    job = make_job(clean_pg, uris, chunk_size=3)
    env = worker_env(service_env, TRAPQ_MAX_RETRIES="1")
    worker = worker_factory(env).start()
    send(env, clean_pg, job.chunk_ids)

    assert wait_job_end(clean_pg, job.job_id, worker) == "failed"
    (chunk,) = chunk_rows(clean_pg, job.job_id)
    assert chunk.state == "failed" and chunk.attempts == 2
    error = chunk.error or ""
    assert "gave up after 1 retries" in error and "every capture failed transiently" in error
    items = _items(clean_pg, job.job_id)
    assert [(state, kind) for state, kind, _ in items] == [("failed", "http_server")] * 3
    for uri, (_, _, error) in zip(uris, items, strict=True):
        assert uri in (error or "") and "500" in (error or "")


def test_a_transient_failure_after_a_success_fails_alone_and_the_chunk_is_done(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
    image_host: str,
) -> None:
    [local] = write_jpegs(tmp_path / "images", 1)
    uris = [str(local), f"{image_host}/down/a.jpg", f"{image_host}/down/b.jpg"]
    job = make_job(clean_pg, uris, chunk_size=3)
    env = worker_env(service_env, TRAPQ_MAX_RETRIES="3")
    worker = worker_factory(env).start()
    send(env, clean_pg, job.chunk_ids)

    assert wait_job_end(clean_pg, job.job_id, worker) == "done"
    (chunk,) = chunk_rows(clean_pg, job.job_id)
    assert chunk.state == "done" and chunk.attempts == 1  # no retry: the host is not all down
    assert [(s, k) for s, k, _ in _items(clean_pg, job.job_id)] == [
        ("done", None), ("failed", "http_server"), ("failed", "http_server")
    ]


def test_a_chunk_cancelled_while_it_runs_stops_writing_and_its_worker_goes_on(
    service_env: dict[str, str], clean_pg: Engine, worker_factory,
    image_host: str,
) -> None:
    """Celery cannot revoke a task that runs in the threads pool (terminate needs prefork);
    the chunk's heartbeat reads the cancelled state and stops the run."""
    n = 40  # 0.25 s each through one fetch thread: about 10 s
    job = make_job(clean_pg, [f"{image_host}/slow/img{i}.jpg" for i in range(n)], chunk_size=n)
    env = worker_env(service_env, TRAPQ_FETCH_THREADS="1", TRAPQ_WRITE_BATCH_SIZE="2")
    worker = worker_factory(env, concurrency=1).start()
    send(env, clean_pg, job.chunk_ids)
    wait_for(lambda: item_states(clean_pg, job.job_id).get("done", 0) >= 2, 60,
             "some captures done", on_timeout=worker.tail)

    out = trapq(env, "cancel", str(job.job_id))
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "stopped: the chunk is cancelled" in worker.log_text(), 30, "the run to stop",
             on_timeout=worker.tail)
    done_at_stop = item_states(clean_pg, job.job_id).get("done", 0)
    time.sleep(2)  # several heartbeats and write flushes of a run that went on

    states = item_states(clean_pg, job.job_id)
    assert states.get("done", 0) == done_at_stop < n and states["pending"] == n - done_at_stop
    assert job_state(clean_pg, job.job_id) == "cancelled"
    assert {c.state for c in chunk_rows(clean_pg, job.job_id)} == {"cancelled"}
    assert worker.proc is not None and worker.proc.poll() is None
