"""A real worker under faults: killed mid-chunk, database writes failing, bad input, pickle."""

from __future__ import annotations

import pickle
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.result import AsyncResult
from kombu import Connection, Exchange, Queue
from sqlalchemy import Engine, func, select, text

from db.models import Detection, JobCapture
from tasks.celery_app import PROCESS_CHUNK, make_app
from tests.badinputs import ImageServer
from tests.local_http import QuietHandler, serving
from tests.trapq_cli import trapq
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    ENDED,
    VISIBILITY_S,
    chunk_rows,
    detections_per_capture,
    item_states,
    job_state,
    jpeg_bytes,
    kill_trial_env,
    make_job,
    send,
    settings_of,
    worker_env,
    write_jpegs,
)
from tests.worker_process import wait_for


def _wait_job_end(engine: Engine, job_id: int, worker: object, timeout: float = 120) -> str:
    wait_for(lambda: job_state(engine, job_id) in ENDED, timeout, f"job {job_id} to end",
             on_timeout=worker.tail)  # type: ignore[attr-defined]
    return job_state(engine, job_id)


def _assert_every_capture_once(engine: Engine, job_id: int, n: int) -> None:
    assert item_states(engine, job_id) == {"done": n}
    per_capture = detections_per_capture(engine, job_id)
    assert len(per_capture) == n
    assert set(per_capture.values()) == {BOXES_PER_IMAGE}


@pytest.fixture
def slow_image_server() -> Iterator[str]:
    """HTTP server of small JPEGs that takes 0.25 s per image, so a chunk lasts seconds."""
    body = jpeg_bytes(160, 120)

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802
            time.sleep(0.25)
            self.send_body(200, body, "image/jpeg")

    with serving(Handler) as base:
        yield base


def test_worker_killed_mid_chunk_then_restarted_loses_and_doubles_nothing(
    service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    env = kill_trial_env(service_env)
    n = 12
    with ImageServer() as server:
        job = make_job(clean_pg, [f"{server.url}/img/{i}.jpg" for i in range(n)], chunk_size=n)
        first = worker_factory(env, concurrency=1).start()
        server.hold(lambda i: i == n // 2)  # the run stops there until killed
        send(env, clean_pg, job.chunk_ids)
        wait_for(lambda: item_states(clean_pg, job.job_id).get("done", 0) >= 4, 60,
                 "some captures done", on_timeout=first.tail)
        progress = _progress(env, chunk_rows(clean_pg, job.job_id)[0].task_id)
        state, info = progress.state, progress.info  # read now: the backend's state moves on
        first.kill()
        killed_at = time.monotonic()
        done_at_kill = item_states(clean_pg, job.job_id).get("done", 0)
        server.release()
        second = worker_factory(env, concurrency=1).start()
        # Redis hands the killed delivery out again once past the visibility timeout.
        assert _wait_job_end(clean_pg, job.job_id, second) == "done"
    assert done_at_kill < n, "the chunk ended before the kill"

    assert state == "PROGRESS", state
    assert info["total"] == n and info["chunk_id"] == job.chunk_ids[0]
    assert 0 < info["done"] < n
    assert "progress not reported" not in first.log_text()

    assert time.monotonic() - killed_at >= VISIBILITY_S

    _assert_every_capture_once(clean_pg, job.job_id, n)
    (chunk,) = chunk_rows(clean_pg, job.job_id)
    # At least the killed run and the one after it. Kombu keeps one unacked hash per Redis
    # database, so a worker of another test with a shorter visibility timeout may hand the
    # message out once more; that run finds nothing pending.
    assert chunk.state == "done" and chunk.deliveries >= 2


def _progress(env: dict[str, str], task_id: str | None) -> AsyncResult:
    """The chunk task's state in the result backend, as Flower's API and AsyncResult read it."""
    app = make_app(settings_of(env))
    result = AsyncResult(task_id, app=app)
    wait_for(lambda: result.state == "PROGRESS" and result.info.get("done"), 30, "progress")
    return result


@pytest.fixture
def failing_detection_writes(clean_pg: Engine) -> Iterator[callable]:
    """A trigger that makes every INSERT into detections fail as a serialization failure,
    the error PostgreSQL asks clients to retry; the returned function removes it."""
    with clean_pg.begin() as conn:
        conn.execute(text(
            "CREATE FUNCTION trapq_test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'injected write failure' USING ERRCODE = '40001'; END $$"
        ))
        conn.execute(text(
            "CREATE TRIGGER trapq_test_fail BEFORE INSERT ON detections "
            "FOR EACH STATEMENT EXECUTE FUNCTION trapq_test_fail()"
        ))

    def heal() -> None:
        with clean_pg.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS trapq_test_fail ON detections"))
            conn.execute(text("DROP FUNCTION IF EXISTS trapq_test_fail()"))

    yield heal
    heal()


def test_chunk_whose_writes_fail_for_a_while_retries_and_succeeds(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
    failing_detection_writes,
) -> None:
    paths = write_jpegs(tmp_path / "images", 4)
    job = make_job(clean_pg, [str(p) for p in paths], chunk_size=4)
    env = worker_env(service_env, TRAPQ_MAX_RETRIES="40")
    worker = worker_factory(env).start()
    send(env, clean_pg, job.chunk_ids)

    # attempts only grows, unlike the error text that each retry overwrites within a second
    wait_for(lambda: chunk_rows(clean_pg, job.job_id)[0].attempts >= 3, 60,
             "a second retry", on_timeout=worker.tail)
    failing_detection_writes()
    assert _wait_job_end(clean_pg, job.job_id, worker) == "done"

    _assert_every_capture_once(clean_pg, job.job_id, 4)
    (chunk,) = chunk_rows(clean_pg, job.job_id)
    assert chunk.attempts >= 3 and chunk.error is None


def test_chunk_failing_past_its_retries_is_failed_then_requeued_to_done(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
    failing_detection_writes,
) -> None:
    paths = write_jpegs(tmp_path / "images", 4)
    job = make_job(clean_pg, [str(p) for p in paths], chunk_size=4)
    env = worker_env(service_env, TRAPQ_MAX_RETRIES="1")
    worker = worker_factory(env).start()
    send(env, clean_pg, job.chunk_ids)

    assert _wait_job_end(clean_pg, job.job_id, worker) == "failed"
    (chunk,) = chunk_rows(clean_pg, job.job_id)
    assert chunk.state == "failed" and chunk.attempts >= 2
    assert "gave up after 1 retries" in chunk.error and "injected write failure" in chunk.error
    assert item_states(clean_pg, job.job_id) == {"failed": 4}

    failing_detection_writes()
    out = trapq(env, "requeue", str(job.job_id), "--failed")
    assert out.returncode == 0, out.stderr
    assert "requeued 1 failed, 0 pending, 0 stuck" in out.stdout
    assert _wait_job_end(clean_pg, job.job_id, worker) == "done"
    _assert_every_capture_once(clean_pg, job.job_id, 4)


def test_corrupt_and_missing_images_fail_alone_while_their_chunk_is_done(
    tmp_path: Path, clean_pg: Engine, shared_worker,
) -> None:
    good = write_jpegs(tmp_path / "images", 4)
    truncated = tmp_path / "images" / "truncated.jpg"
    truncated.write_bytes(jpeg_bytes()[:300])
    text_file = tmp_path / "images" / "notes.jpg"
    text_file.write_text("not an image at all")
    empty = tmp_path / "images" / "empty.jpg"
    empty.write_bytes(b"")
    missing = tmp_path / "images" / "missing.jpg"
    bad = [truncated, text_file, empty, missing]
    job = make_job(clean_pg, [str(p) for p in good + bad], chunk_size=8)
    worker = shared_worker()
    send(worker.env, clean_pg, job.chunk_ids)

    assert _wait_job_end(clean_pg, job.job_id, worker) == "done"
    (chunk,) = chunk_rows(clean_pg, job.job_id)
    assert (chunk.state, chunk.n_done, chunk.n_failed) == ("done", 4, 4)
    with clean_pg.connect() as conn:
        from db.models import Capture

        rows = conn.execute(
            select(Capture.uri, JobCapture.state, JobCapture.error_kind, JobCapture.error)
            .join(Capture, Capture.id == JobCapture.capture_id)
        ).all()
    by_uri = {uri: (state, kind, error) for uri, state, kind, error in rows}
    for path in good:
        assert by_uri[str(path)][0] == "done"
    for path in bad:
        state, kind, error = by_uri[str(path)]
        assert state == "failed" and error, (path, by_uri[str(path)])
    assert by_uri[str(missing)][1] == "missing"
    assert {by_uri[str(p)][1] for p in (truncated, text_file, empty)} == {"undecodable"}
    assert set(detections_per_capture(clean_pg, job.job_id).values()) == {BOXES_PER_IMAGE}


class _RunsOnUnpickle:
    """Unpickling this creates a file: proof that a pickle body would have run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_task_message_with_a_pickle_body_is_refused(
    tmp_path: Path, clean_pg: Engine, shared_worker, redis_url: str,
) -> None:
    paths = write_jpegs(tmp_path / "images", 2)
    job = make_job(clean_pg, [str(p) for p in paths], chunk_size=2)
    worker = shared_worker()
    env, queue_name = worker.env, worker.queue
    logged = len(worker.log_text())  # the log of a shared worker: earlier tests' lines too
    marker = tmp_path / "unpickled"
    task_id = str(uuid.uuid4())
    body = pickle.dumps(([job.chunk_ids[0], _RunsOnUnpickle(marker)], {}, {}))
    exchange = Exchange(queue_name, "direct")
    with Connection(redis_url) as conn:
        conn.Producer().publish(
            body,
            exchange=exchange,
            routing_key=queue_name,
            declare=[Queue(queue_name, exchange, routing_key=queue_name)],
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"lang": "py", "task": PROCESS_CHUNK, "id": task_id, "root_id": task_id,
                     "retries": 0, "argsrepr": "", "kwargsrepr": ""},
        )
    wait_for(lambda: "untrusted content" in worker.log_text()[logged:], 30, "the refusal",
             on_timeout=worker.tail)
    client = redis.Redis.from_url(redis_url)
    assert client.llen(queue_name) == 0
    client.close()
    assert not marker.exists()
    (chunk,) = chunk_rows(clean_pg, job.job_id)
    assert (chunk.state, chunk.deliveries) == ("pending", 0)

    send(env, clean_pg, job.chunk_ids)  # the worker is still alive and takes JSON
    assert _wait_job_end(clean_pg, job.job_id, worker) == "done"
    with clean_pg.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Detection)) == 2 * BOXES_PER_IMAGE


@pytest.fixture
def flaky_image_server() -> Iterator[tuple[str, threading.Event]]:
    """HTTP server that answers 500 to its first three requests (a three-image chunk's first
    attempt: the host is down), then holds each request until the returned event is set, so
    the retry is caught with its captures pending however soon it starts."""
    body = jpeg_bytes(160, 120)
    healthy = threading.Event()
    lock = threading.Lock()
    served = 0

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802
            nonlocal served
            with lock:
                served += 1
                down = served <= 3
            if down:
                self.send_error(500, "host down")
                return
            healthy.wait(60)
            self.send_body(200, body, "image/jpeg")

    with serving(Handler) as base:
        yield base, healthy


def test_chunk_whose_image_host_is_down_retries_until_it_is_back(
    service_env: dict[str, str], clean_pg: Engine, worker_factory,
    flaky_image_server: tuple[str, threading.Event],
) -> None:
    base, healthy = flaky_image_server
    job = make_job(clean_pg, [f"{base}/img{i}.jpg" for i in range(3)], chunk_size=3)
    env = worker_env(service_env, TRAPQ_MAX_RETRIES="10")
    worker = worker_factory(env).start()
    send(env, clean_pg, job.chunk_ids)

    wait_for(lambda: "every capture failed transiently" in
             (chunk_rows(clean_pg, job.job_id)[0].error or ""), 60, "a retry for the host",
             on_timeout=worker.tail)
    assert item_states(clean_pg, job.job_id) == {"pending": 3}
    healthy.set()
    assert _wait_job_end(clean_pg, job.job_id, worker) == "done"
    _assert_every_capture_once(clean_pg, job.job_id, 3)
    assert chunk_rows(clean_pg, job.job_id)[0].attempts >= 2


def test_chunk_past_its_deadline_stops_and_its_retry_finishes_the_rest(
    service_env: dict[str, str], clean_pg: Engine, worker_factory,
    slow_image_server: str,
) -> None:
    # The threads pool ignores Celery's time limits; the task keeps its own deadline.
    env = worker_env(
        service_env,
        TRAPQ_TEST_TIMEOUTS="true",
        TRAPQ_CHUNK_SOFT_TIME_LIMIT_S="3",
        TRAPQ_CHUNK_TIME_LIMIT_S="4",
        TRAPQ_VISIBILITY_TIMEOUT_S="5",
        TRAPQ_FETCH_THREADS="1",
        TRAPQ_MAX_RETRIES="5",
    )
    n = 20  # 0.25 s each through one fetch thread: about 5 s, past the 3 s deadline
    job = make_job(clean_pg, [f"{slow_image_server}/img{i}.jpg" for i in range(n)], chunk_size=n)
    worker = worker_factory(env, concurrency=1).start()
    send(env, clean_pg, job.chunk_ids)

    assert _wait_job_end(clean_pg, job.job_id, worker, timeout=180) == "done"
    _assert_every_capture_once(clean_pg, job.job_id, n)
    (chunk,) = chunk_rows(clean_pg, job.job_id)
    assert chunk.attempts >= 2
    assert "past its deadline of 3s" in worker.log_text()
