"""The dispatcher with real workers: a small job is not stuck behind a large one, caps hold,
weights shift the split, the fast lane overtakes batch chunks already on the broker,
dispatchers killed mid-release (two at once) lose and double nothing, a broker restart while
chunks wait in SQL loses none, a terminated LISTEN connection is opened again, and a message
left in a pipeline queue that no live worker consumes is moved to the common queue and runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text

from db.dispatch import assign_task_ids
from db.imports import get_or_create_deployment
from db.models import Chunk, Detection, Job
from db.projects import add_project, set_deployment_project
from db.session import make_sessionmaker
from tasks import routing
from tasks.celery_app import PROCESS_CHUNK
from tasks.dispatcher import Dispatcher, run_in_thread
from tasks.fast_lane import classify_images
from tasks.pipeline import resolve_pipeline
from tasks.producer import producer_app
from tasks.queues import pipeline_queue
from tasks.settings import Settings
from tasks.store import ready_session_factory
from tasks.wakeups import CHANNEL
from tests.fault_scenarios import redis_server
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    item_states,
    job_state,
    make_job,
    worker_env,
    write_jpegs,
)
from tests.worker_process import wait_for

pytestmark = pytest.mark.slow


def settings_for(env: dict[str, str]) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        **{k[6:].lower(): v for k, v in env.items() if k.startswith("TRAPQ_")},
    )


def deployment_in(
    engine: Engine, name: str, project: str, cap: int | None = None, weight: float = 1.0
) -> None:
    with make_sessionmaker(engine).begin() as s:
        add_project(s, project, weight, cap)
        get_or_create_deployment(s, name)
        set_deployment_project(s, name, project)


def job_over(engine: Engine, folder: Path, deployment: str, n_chunks: int) -> int:
    """A job of n_chunks chunks of two new images each."""
    paths = write_jpegs(folder / deployment, 2 * n_chunks, 32, 24)
    return make_job(engine, [p.as_uri() for p in paths], chunk_size=2,
                    deployment=deployment).job_id


def out_by_project(engine: Engine, project: str) -> int:
    with engine.connect() as conn:
        return conn.scalar(text(
            "SELECT count(*) FROM chunks c JOIN jobs j ON j.id = c.job_id "
            "JOIN projects p ON p.id = j.project_id "
            "WHERE p.name = :p AND c.state IN ('queued', 'running')"
        ), {"p": project}) or 0


def every_capture_once(engine: Engine, job_id: int) -> None:
    """Every capture done, with exactly its boxes, and every chunk run by one delivery."""
    assert item_states(engine, job_id) == {"done": _n_items(engine, job_id)}
    with engine.connect() as conn:
        per_capture = conn.execute(
            select(func.count()).where(Detection.job_id == job_id).group_by(Detection.capture_id)
        ).scalars().all()
        deliveries = conn.scalars(select(Chunk.deliveries).where(Chunk.job_id == job_id)).all()
    assert set(per_capture) == {BOXES_PER_IMAGE}
    assert set(deliveries) == {1}, "no chunk was run twice"


def _n_items(engine: Engine, job_id: int) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(Job.n_captures).where(Job.id == job_id)) or 0


@contextmanager
def dispatching(settings: Settings) -> Iterator[Dispatcher]:
    dispatcher, thread = run_in_thread(settings)
    try:
        yield dispatcher
    finally:
        dispatcher.stop.set()
        thread.join(30)


def test_a_small_job_finishes_while_a_large_one_runs_and_a_cap_is_never_exceeded(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    env = worker_env(service_env, TRAPQ_DISPATCH_WINDOW_MIN="2")
    deployment_in(clean_pg, "large", "batch", cap=2)
    jobs = {"large": job_over(clean_pg, tmp_path, "large", 30)}
    worker = worker_factory(env, concurrency=2).start()
    peak = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.is_set():
            peak = max(peak, out_by_project(clean_pg, "batch"))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with dispatching(settings_for(env)):
            wait_for(lambda: job_state(clean_pg, jobs["large"]) == "running", 60, "the large job")
            deployment_in(clean_pg, "small", "late")
            jobs["small"] = job_over(clean_pg, tmp_path, "small", 2)
            wait_for(lambda: job_state(clean_pg, jobs["small"]) == "done", 120, "the small job",
                     on_timeout=lambda: f"{chunk_states(clean_pg)}\n{worker.tail()}")
            large_then = job_state(clean_pg, jobs["large"])
            wait_for(lambda: job_state(clean_pg, jobs["large"]) == "done", 300, "the large job")
    finally:
        sampling.set()
        sampler.join()

    assert large_then == "running", "the small job did not wait for the large one"
    assert peak == 2, "project `batch` (max in flight 2) had more chunks out"
    every_capture_once(clean_pg, jobs["small"])
    every_capture_once(clean_pg, jobs["large"])


def test_weights_three_to_one_run_three_heavy_chunks_for_each_light_one(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    """Two projects with work for longer than 40 chunks each way, planned before the
    dispatcher starts: of the first 40 chunks to run, about 10 are the weight-1 project's
    (equal weights would run 20, strict priority none). Counted by start, so a chunk that
    happens to retry does not move the others."""
    env = worker_env(service_env, TRAPQ_DISPATCH_WINDOW_MIN="2")
    deployment_in(clean_pg, "heavy", "heavy", weight=3)
    deployment_in(clean_pg, "light", "light")
    heavy = job_over(clean_pg, tmp_path, "heavy", 45)
    light = job_over(clean_pg, tmp_path, "light", 30)
    worker_factory(env, concurrency=1).start()
    with dispatching(settings_for(env)):
        for job in (heavy, light):
            wait_for(lambda: job_state(clean_pg, job) == "done", 300, "both jobs",  # noqa: B023
                     on_timeout=lambda: str(chunk_states(clean_pg)))

    with clean_pg.connect() as conn:
        first = "".join("H" if job == heavy else "L" for job in conn.scalars(text(
            "SELECT job_id FROM chunks ORDER BY started_at LIMIT 40")))
    # 10 at 3:1; the window (a few chunks) lets the order wobble by a few.
    assert 6 <= first.count("L") <= 15, first
    every_capture_once(clean_pg, heavy)
    every_capture_once(clean_pg, light)


def test_the_fast_lane_overtakes_batch_chunks_already_on_the_broker(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    """A window deep enough to hold the whole backlog on the broker, one slot: the lane's
    chunk starts next after the chunk the worker holds when its message reaches the broker
    (prefetch 1), ahead of every batch chunk that waited there."""
    env = worker_env(service_env, TRAPQ_DISPATCH_WINDOW_MIN="60")
    settings = settings_for(env)
    backlog = job_over(clean_pg, tmp_path, "backlog", 40)
    (image,) = write_jpegs(tmp_path / "ask", 1, 64, 48)
    # Recording the pipeline imports torch (seconds); done first, as `trapq enqueue` would.
    resolve_pipeline(settings, ready_session_factory(settings), None)
    worker_factory(env, concurrency=1).start()
    with dispatching(settings):
        wait_for(lambda: _done_chunks(clean_pg, backlog) >= 2, 120, "the backlog")
        result = classify_images(settings, [str(image)], wait=True, timeout_s=240)
        wait_for(lambda: job_state(clean_pg, backlog) == "done", 300, "the backlog")

    assert result.images[0].state == "done", result
    with clean_pg.connect() as conn:
        ahead, behind = conn.execute(text(
            "SELECT count(*) FILTER (WHERE b.started_at < lane.started_at), "
            "count(*) FILTER (WHERE b.started_at > lane.started_at) "
            "FROM chunks b, chunks lane WHERE lane.job_id = :lane AND b.job_id = :backlog "
            "AND b.queued_at < lane.queued_at AND b.started_at > lane.queued_at"
        ), {"lane": result.job_id, "backlog": backlog}).one()
    assert behind >= 10, "the backlog's messages were on the broker, not yet run"
    # The one the worker held when the broker took the lane's message (queued_at is set just
    # after), and one more should the worker have finished it within that moment.
    assert ahead <= 2, (ahead, behind)


def test_the_dispatcher_listens_again_after_its_connection_is_terminated(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    """Its LISTEN backend terminated mid-job (as a PostgreSQL restart would), with polling
    too rare to finish the job: it listens again on a new backend and releases the rest on
    the wake-ups."""
    env = worker_env(service_env, TRAPQ_DISPATCH_WINDOW_MIN="2", TRAPQ_DISPATCH_POLL_S="3600")
    job = job_over(clean_pg, tmp_path, "listened", 16)
    worker_factory(env, concurrency=1).start()
    with dispatching(settings_for(env)):
        wait_for(lambda: _done_chunks(clean_pg, job) >= 2, 120, "two chunks done")
        first = listen_backends(clean_pg)
        with clean_pg.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM unnest(:pids) pid"),
                         {"pids": list(first)})
        wait_for(lambda: bool(listen_backends(clean_pg) - first), 60, "listening again")
        wait_for(lambda: job_state(clean_pg, job) == "done", 300, "the job")

    assert len(first) == 1
    every_capture_once(clean_pg, job)


def test_a_message_left_in_a_pipeline_queue_nobody_consumes_is_moved_and_runs(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    """A chunk's message in its pipeline's queue whose only consumer is gone (as the broker
    restores a killed worker's message there), and a fresh worker that consumes the common
    queue alone: the dispatcher's first look only notes the queue, the second moves the
    message, and the chunk runs once."""
    env = worker_env(service_env)
    settings = settings_for(env)
    job = job_over(clean_pg, tmp_path, "stray", 1)
    with make_sessionmaker(clean_pg).begin() as s:
        (chunk,) = s.scalars(select(Chunk.id).where(Chunk.job_id == job))
        (assigned,) = assign_task_ids(s, [chunk], datetime.now(UTC))
        fingerprint = s.scalar(select(Job.fingerprint).where(Job.id == job))
    stray = pipeline_queue(settings.queue, fingerprint)
    producer_app(settings).send_task(PROCESS_CHUNK, args=[chunk], queue=stray,
                                     task_id=assigned.task_id)
    worker = worker_factory(env, concurrency=1).start()
    dispatcher = Dispatcher.build(settings)
    routing.forget_consumed()

    seen = dispatcher.move_strays(set())
    assert seen == {stray}
    assert job_state(clean_pg, job) == "pending", "nobody consumes the pipeline queue"
    dispatcher.move_strays(seen)
    wait_for(lambda: job_state(clean_pg, job) == "done", 120, "the stray chunk",
             on_timeout=worker.tail)
    assert dispatcher.move_strays(set()) == set()
    every_capture_once(clean_pg, job)


def listen_backends(engine: Engine) -> set[int]:
    with engine.connect() as conn:
        return set(conn.scalars(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND query = :listen"
        ), {"listen": f"LISTEN {CHANNEL}"}))


def start_dispatcher(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tasks.dispatcher"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.subprocess
def test_two_dispatchers_killed_again_and_again_mid_release_lose_and_double_nothing(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    """Two dispatcher processes at once, each SIGKILLed as soon as it has released chunks
    (at a varying moment after, often mid-release) and started again, with a one-second grace
    for chunks in doubt: the job still completes, each chunk run by exactly one delivery and
    each capture written once."""
    env = worker_env(service_env, TRAPQ_DISPATCH_WINDOW_MIN="3", TRAPQ_DISPATCH_IN_DOUBT_S="1",
                     TRAPQ_DISPATCH_POLL_S="0.2")
    job = job_over(clean_pg, tmp_path, "many", 40)
    worker = worker_factory(env, concurrency=2).start()
    logs = [tmp_path / f"dispatcher-{k}.log" for k in range(2)]
    procs = [start_dispatcher(env, log) for log in logs]
    kills = 0
    try:
        while job_state(clean_pg, job) != "done":
            k = kills % 2
            seen = logs[k].read_text().count("released")
            wait_for(lambda: logs[k].read_text().count("released") > seen  # noqa: B023
                     or job_state(clean_pg, job) == "done", 120, "a release",
                     every=0.02, on_timeout=lambda: logs[k].read_text()[-2000:])  # noqa: B023
            time.sleep(0.05 * (kills % 5))
            os.killpg(procs[k].pid, signal.SIGKILL)
            procs[k].wait(10)
            procs[k] = start_dispatcher(env, logs[k])
            kills += 1
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    assert job_state(clean_pg, job) == "done", worker.tail()
    assert kills >= 5
    every_capture_once(clean_pg, job)


@pytest.mark.subprocess
def test_a_broker_restart_while_chunks_wait_in_sql_loses_none(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    with redis_server(tmp_path / "redis") as broker:
        env = worker_env(service_env, TRAPQ_BROKER_URL=broker.url,
                         TRAPQ_RESULT_BACKEND=broker.url, TRAPQ_DISPATCH_WINDOW_MIN="2",
                         TRAPQ_DISPATCH_POLL_S="0.5")
        job = job_over(clean_pg, tmp_path, "waiting", 20)
        worker = worker_factory(env, concurrency=1).start()
        with dispatching(settings_for(env)):
            wait_for(lambda: _done_chunks(clean_pg, job) >= 2, 120, "two chunks done")
            broker.stop(signal.SIGKILL)
            pending_while_down = _pending_chunks(clean_pg, job)
            time.sleep(2)
            broker.start()
            wait_for(lambda: job_state(clean_pg, job) == "done", 300, "the job",
                     on_timeout=worker.tail)

    assert pending_while_down >= 10
    every_capture_once(clean_pg, job)


def chunk_states(engine: Engine) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT job_id, state, count(*) FROM chunks GROUP BY job_id, state ORDER BY 1, 2"
        ))]


def _done_chunks(engine: Engine, job_id: int) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).where(Chunk.job_id == job_id,
                                                      Chunk.state == "done")) or 0


def _pending_chunks(engine: Engine, job_id: int) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).where(Chunk.job_id == job_id,
                                                      Chunk.state == "pending")) or 0
