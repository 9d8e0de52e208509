"""Deliveries that overlap or never finish, on real workers and PostgreSQL row locks.

Two runs of one chunk at the same time (a re-send while the first worker lives, as from
Flower), two chunks of one job ending at the same moment, and a chunk whose worker dies on
it every time until its delivery budget is spent.
"""

from __future__ import annotations

from sqlalchemy import Engine, select, text

from db.models import Job
from tests import fault_scenarios as fs
from tests.badinputs import ImageServer
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    chunk_rows,
    detections_per_capture,
    item_states,
    job_state,
    make_job,
    send,
)
from tests.worker_process import WorkerProcess, start_all, wait_for


def _assert_every_capture_once(engine: Engine, job_id: int, n: int) -> None:
    assert item_states(engine, job_id) == {"done": n}
    per_capture = detections_per_capture(engine, job_id)
    assert len(per_capture) == n and set(per_capture.values()) == {BOXES_PER_IMAGE}
    assert fs.audit(engine, job_id).duplicates == 0


def _busy(engine: Engine, job_id: int, workers: list[WorkerProcess]) -> list[WorkerProcess]:
    return [w for w in workers if fs.mid_chunk(engine, job_id, w)]


def test_the_same_chunk_sent_again_while_it_runs_is_done_exactly_once(
    service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    env = fs.fault_env(service_env)
    n = 24
    with ImageServer() as server:
        job = make_job(clean_pg, [f"{server.url}/img/{i}.jpg" for i in range(n)], chunk_size=n)
        pair = start_all([worker_factory(env, concurrency=1) for _ in range(2)])
        fs.hold_last_images(server, n)
        send(env, clean_pg, job.chunk_ids)
        (first,) = wait_for(lambda: _busy(clean_pg, job.job_id, pair), 60, "a chunk half done",
                            every=0.05, on_timeout=pair[0].tail)  # type: ignore[misc]
        send(env, clean_pg, job.chunk_ids)  # the idle worker starts it too
        server.release()  # the first run goes on, into the second one's claim
        wait_for(lambda: chunk_rows(clean_pg, job.job_id)[0].state == "done", 120,
                 "the chunk done", on_timeout=pair[1].tail)
        (second,) = [w for w in pair if w is not first]
        wait_for(lambda: "this delivery stops" in first.log_text()
                 or "the chunk is superseded" in first.log_text(), 60,
                 "the first run to meet the second one's claim", on_timeout=first.tail)
        for w in pair:
            w.stop()
    _assert_every_capture_once(clean_pg, job.job_id, n)
    (chunk,) = chunk_rows(clean_pg, job.job_id)
    assert chunk.claim == 2 and chunk.deliveries == 2
    assert chunk.worker is not None and chunk.worker.startswith(second.node.split("@")[0])


def test_two_chunks_of_one_job_ending_together_end_the_job_once(
    service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    env = fs.fault_env(service_env)
    with ImageServer(delay_s=0.5) as server:
        job = make_job(clean_pg, [f"{server.url}/img/{i}.jpg" for i in range(8)], chunk_size=4)
        pair = start_all([worker_factory(env, concurrency=1) for _ in range(2)])
        send(env, clean_pg, job.chunk_ids)
        wait_for(lambda: [c.state for c in chunk_rows(clean_pg, job.job_id)] == ["running"] * 2,
                 60, "both chunks running", every=0.05, on_timeout=pair[0].tail)
        # Hold the job row: both chunk ends queue on it, then go at the same moment.
        with clean_pg.connect() as holder:
            holder.execute(select(Job.id).where(Job.id == job.job_id).with_for_update())
            wait_for(lambda: _waiting_on_locks(clean_pg) == 2, 60, "both chunk ends waiting",
                     on_timeout=pair[0].tail)
            holder.rollback()
        wait_for(lambda: job_state(clean_pg, job.job_id) == "done", 60, "the job done",
                 on_timeout=pair[0].tail)
        for w in pair:
            w.stop()
    _assert_every_capture_once(clean_pg, job.job_id, 8)
    ended = sum(w.log_text().count(f"job {job.job_id} ended done") for w in pair)
    assert ended == 1
    with clean_pg.connect() as conn:
        assert conn.scalar(select(Job.finished_at).where(Job.id == job.job_id)) is not None


def _waiting_on_locks(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'trapq-worker%' AND wait_event_type = 'Lock'"
        )) or 0)


def test_a_chunk_whose_worker_dies_on_it_every_time_fails_after_its_delivery_budget(
    service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    env = fs.fault_env(service_env, TRAPQ_MAX_DELIVERIES="2")
    n = 24
    with ImageServer() as server:
        job = make_job(clean_pg, [f"{server.url}/img/{i}.jpg" for i in range(n)], chunk_size=n)
        send(env, clean_pg, job.chunk_ids)
        for delivery, held in ((1, 11), (2, 19)):
            # Each delivery writes captures up to image `held`, whose fetch holds it there.
            server.hold(lambda i, held=held: i == held)  # type: ignore[misc]
            # Each new worker's sweep puts the killed delivery back once past the timeout.
            worker = worker_factory(env, concurrency=1).start()
            wait_for(lambda w=worker: fs.mid_chunk(clean_pg, job.job_id, w), 60,  # type: ignore[misc]
                     f"delivery {delivery} half done", every=0.05, on_timeout=worker.tail)
            worker.kill()  # dies on the chunk, as one out of memory would
            server.release()
        last = worker_factory(env, concurrency=1).start()
        wait_for(lambda: job_state(clean_pg, job.job_id) == "failed", 60, "the job failed",
                 on_timeout=last.tail)
        last.stop()
    (chunk,) = chunk_rows(clean_pg, job.job_id)
    assert chunk.state == "failed" and chunk.deliveries == 3
    assert "delivered 3 times without finishing" in (chunk.error or "")
    states = item_states(clean_pg, job.job_id)
    assert states.get("pending", 0) == 0 and states.get("failed", 0) > 0
    assert states.get("done", 0) + states["failed"] == n
    with clean_pg.connect() as conn:
        reasons = set(conn.scalars(text(
            "SELECT error FROM job_captures WHERE job_id = :j AND state = 'failed'"
        ), {"j": job.job_id}))
    assert reasons == {chunk.error}
    assert fs.audit(clean_pg, job.job_id).duplicates == 0
