"""The worker's job-store queries on real PostgreSQL: claims, exactly-once writes, job ends."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, exc, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

import migrations
from db.models import Chunk, Classification, Detection, Job, JobCapture
from db.repair import cancel_job, plan_requeue
from db.results import (
    CHUNK_FAILED_KIND,
    Outcome,
    claim_chunk,
    fail_chunk,
    finish_chunk,
    heartbeat,
    pending_items,
    write_results,
)
from db.session import make_engine, make_sessionmaker
from inference.types import Classification as Cls
from inference.types import Detection as Det
from inference.types import ErrorKind, ItemResult
from tests.worker_jobs import MadeJob, make_job

T = TypeVar("T")


def _job(engine: Engine, n: int = 4, chunk_size: int = 2) -> MadeJob:
    return make_job(engine, [f"/data/img{i}.jpg" for i in range(n)], chunk_size=chunk_size)


def _result(capture_id: int, n_boxes: int = 3) -> ItemResult:
    dets = [
        Det(i, i, i + 10, i + 10, 0.9, "moth", [Cls("species", "a", 0.7, [("a", 0.7), ("b", 0.2)])])
        for i in range(n_boxes)
    ]
    return ItemResult(capture_id, f"/data/{capture_id}.jpg", 640, 480, dets)


def in_tx(factory: sessionmaker[Session], query: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one job-store query in a transaction of its own, as the worker does."""
    with factory.begin() as session:
        return query(session, *args, **kwargs)


def _claim(engine: Engine, chunk_id: int, retries: int = 0, max_deliveries: int = 3):  # noqa: ANN202
    return in_tx(make_sessionmaker(engine), claim_chunk, chunk_id, worker="w@test",
                 retries=retries, max_deliveries=max_deliveries)


def test_writing_a_capture_twice_keeps_one_set_of_rows(clean_pg: Engine) -> None:
    job = _job(clean_pg)
    factory = make_sessionmaker(clean_pg)
    chunk = job.chunk_ids[0]
    assert _claim(clean_pg, chunk).outcome is Outcome.RUN
    items = in_tx(factory, pending_items, chunk)
    results = [_result(i.capture_id) for i in items]

    first = in_tx(factory, write_results, job.job_id, results)
    again = in_tx(factory, write_results, job.job_id, results)

    assert (first.done, first.skipped, first.detections) == (2, 0, 6)
    assert (again.done, again.skipped, again.detections) == (0, 2, 0)
    with clean_pg.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Detection)) == 6
        assert conn.scalar(select(func.count()).select_from(Classification)) == 6
    assert in_tx(factory, pending_items, chunk) == []
    with clean_pg.connect() as conn:
        topk = conn.scalar(select(Classification.topk).limit(1))
    assert topk == [["a", 0.7], ["b", 0.2]]


def test_a_capture_written_before_gets_its_new_rows_instead_of_the_old(clean_pg: Engine) -> None:
    """The delete is skipped only for work items never written: one that was written and is
    pending again (attempts > 0) gets its new rows instead of the old, not beside them."""
    job = _job(clean_pg, n=2, chunk_size=2)
    factory = make_sessionmaker(clean_pg)
    chunk = job.chunk_ids[0]
    _claim(clean_pg, chunk)
    first, second = in_tx(factory, pending_items, chunk)
    written = in_tx(factory, write_results, job.job_id, [_result(first.capture_id, n_boxes=3)])
    assert written.done == 1
    with clean_pg.begin() as conn:
        conn.execute(update(JobCapture).where(JobCapture.capture_id == first.capture_id)
                     .values(state="pending"))
    again = ItemResult(first.capture_id, first.uri, 800, 600, _result(0, n_boxes=2).detections)

    rewrite = [again, _result(second.capture_id, n_boxes=1)]
    counts = in_tx(factory, write_results, job.job_id, rewrite)

    assert (counts.done, counts.detections) == (2, 3)
    with clean_pg.connect() as conn:
        per_capture = dict(conn.execute(
            select(Detection.capture_id, func.count()).group_by(Detection.capture_id)
        ).all())
        n_classes = conn.scalar(select(func.count()).select_from(Classification))
        attempts = conn.scalar(select(JobCapture.attempts)
                               .where(JobCapture.capture_id == first.capture_id))
    assert per_capture == {first.capture_id: 2, second.capture_id: 1}
    assert n_classes == 3
    assert attempts == 2


def test_failed_items_record_kind_and_reason_and_the_rest_is_done(clean_pg: Engine) -> None:
    job = _job(clean_pg)
    factory = make_sessionmaker(clean_pg)
    chunk = job.chunk_ids[0]
    _claim(clean_pg, chunk)
    good, bad = in_tx(factory, pending_items, chunk)
    broken = ItemResult(bad.capture_id, bad.uri, error_kind=ErrorKind.UNDECODABLE,
                        error="truncated JPEG")
    counts = in_tx(factory, write_results, job.job_id, [_result(good.capture_id), broken])
    assert (counts.done, counts.failed) == (1, 1)
    with clean_pg.connect() as conn:
        row = conn.execute(
            select(JobCapture.state, JobCapture.error_kind, JobCapture.error)
            .where(JobCapture.capture_id == bad.capture_id)
        ).one()
    assert tuple(row) == ("failed", "undecodable", "truncated JPEG")


def test_last_chunk_to_finish_ends_the_job(clean_pg: Engine) -> None:
    job = _job(clean_pg)
    factory = make_sessionmaker(clean_pg)
    for chunk in job.chunk_ids:
        _claim(clean_pg, chunk)
        in_tx(factory, write_results, job.job_id,
                      [_result(i.capture_id) for i in in_tx(factory, pending_items, chunk)])
    ended = [in_tx(factory, finish_chunk, c, fetch_s=0.1, gpu_s=0.2, write_s=0.3, metrics={"x": 1})
             for c in job.chunk_ids]
    assert ended == [None, "done"]
    with clean_pg.connect() as conn:
        state, started, finished = conn.execute(
            select(Job.state, Job.started_at, Job.finished_at).where(Job.id == job.job_id)
        ).one()
    assert state == "done" and started is not None and finished is not None


def test_chunk_redelivered_past_the_limit_fails_with_its_items(clean_pg: Engine) -> None:
    job = _job(clean_pg, n=2, chunk_size=2)
    chunk = job.chunk_ids[0]
    outcomes = [_claim(clean_pg, chunk, max_deliveries=3).outcome for _ in range(4)]
    assert outcomes == [Outcome.RUN] * 3 + [Outcome.EXHAUSTED]
    assert _claim(clean_pg, chunk).outcome is Outcome.SKIP
    with clean_pg.connect() as conn:
        state, error = conn.execute(select(Chunk.state, Chunk.error).where(Chunk.id == chunk)).one()
        kinds = set(conn.scalars(select(JobCapture.error_kind)))
        assert conn.scalar(select(Job.state)) == "failed"
    assert state == "failed" and "delivered 4 times" in error
    assert kinds == {CHUNK_FAILED_KIND}


def test_retries_do_not_count_as_lost_deliveries(clean_pg: Engine) -> None:
    job = _job(clean_pg, n=2, chunk_size=2)
    chunk = job.chunk_ids[0]
    outcomes = [_claim(clean_pg, chunk, retries=r, max_deliveries=1).outcome for r in range(4)]
    assert outcomes == [Outcome.RUN] * 4


def test_requeue_failed_resets_chunk_items_and_job(clean_pg: Engine) -> None:
    job = _job(clean_pg, n=2, chunk_size=2)
    factory = make_sessionmaker(clean_pg)
    chunk = job.chunk_ids[0]
    _claim(clean_pg, chunk)
    assert in_tx(factory, fail_chunk, chunk, "gave up") == "failed"

    assert in_tx(factory, plan_requeue, job.job_id).chunk_ids == []
    plan = in_tx(factory, plan_requeue, job.job_id, failed=True)

    assert plan.failed == [chunk]
    with clean_pg.connect() as conn:
        assert conn.execute(
            select(Chunk.state, Chunk.attempts, Chunk.deliveries, Chunk.error)
        ).one() == ("pending", 0, 0, None)
        assert set(conn.scalars(select(JobCapture.state))) == {"pending"}
        assert conn.scalar(select(Job.state)) == "running"


def test_requeue_stuck_picks_chunks_with_an_old_heartbeat(clean_pg: Engine) -> None:
    job = _job(clean_pg, n=4, chunk_size=2)
    factory = make_sessionmaker(clean_pg)
    old, fresh = job.chunk_ids
    _claim(clean_pg, old)
    _claim(clean_pg, fresh)
    with clean_pg.begin() as conn:
        conn.execute(update(Chunk).where(Chunk.id == old)
                     .values(heartbeat_at=func.now() - timedelta(minutes=30)))
    assert in_tx(factory, heartbeat, fresh) == "running"
    plan = in_tx(factory, plan_requeue, job.job_id, stuck_after=timedelta(minutes=10))
    assert (plan.stuck, plan.pending, plan.failed) == ([old], [], [])


def test_cancelled_chunk_is_skipped_and_heartbeat_reports_it(clean_pg: Engine) -> None:
    job = _job(clean_pg, n=4, chunk_size=2)
    factory = make_sessionmaker(clean_pg)
    running, waiting = job.chunk_ids
    _claim(clean_pg, running)
    cancelled = in_tx(factory, cancel_job, job.job_id)
    assert (cancelled.previous_state, cancelled.n_chunks) == ("running", 2)
    assert in_tx(factory, heartbeat, running) == "cancelled"
    assert _claim(clean_pg, waiting).outcome is Outcome.SKIP
    with clean_pg.connect() as conn:
        assert conn.scalar(select(Job.state)) == "cancelled"


def test_sqlite_job_store_gets_the_same_exactly_once_writes(tmp_path: Path) -> None:
    """The embedded demo runs the worker on SQLite: the generic insert path, same promise."""
    url = f"sqlite:///{tmp_path / 'trapq.db'}"
    migrations.upgrade(url)
    engine = make_engine(url)
    job = _job(engine, n=2, chunk_size=2)
    factory = make_sessionmaker(engine)
    chunk = job.chunk_ids[0]
    assert _claim(engine, chunk).outcome is Outcome.RUN
    results = [_result(i.capture_id) for i in in_tx(factory, pending_items, chunk)]
    assert in_tx(factory, write_results, job.job_id, results).detections == 6
    assert in_tx(factory, write_results, job.job_id, results).skipped == 2
    assert in_tx(factory, finish_chunk, chunk, fetch_s=0, gpu_s=0, write_s=0, metrics={}) == "done"
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Detection)) == 6
        topk = conn.scalar(select(Classification.topk).limit(1))
    assert topk == [["a", 0.7], ["b", 0.2]]
    engine.dispose()


def test_a_failing_copy_raises_sqlalchemys_operational_error(clean_pg: Engine) -> None:
    """The worker retries on SQLAlchemy's OperationalError; COPY's errors must look the same."""
    job = _job(clean_pg, n=2, chunk_size=2)
    factory = make_sessionmaker(clean_pg)
    chunk = job.chunk_ids[0]
    _claim(clean_pg, chunk)
    with clean_pg.begin() as conn:
        conn.execute(text(
            "CREATE FUNCTION trapq_unit_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'injected' USING ERRCODE = '40001'; END $$"
        ))
        conn.execute(text("CREATE TRIGGER trapq_unit_fail BEFORE INSERT ON classifications "
                          "FOR EACH STATEMENT EXECUTE FUNCTION trapq_unit_fail()"))
    try:
        results = [_result(i.capture_id) for i in in_tx(factory, pending_items, chunk)]
        with pytest.raises(exc.OperationalError, match="injected"):
            in_tx(factory, write_results, job.job_id, results)
    finally:
        with clean_pg.begin() as conn:
            conn.execute(text("DROP TRIGGER trapq_unit_fail ON classifications"))
            conn.execute(text("DROP FUNCTION trapq_unit_fail()"))
    assert len(in_tx(factory, pending_items, chunk)) == 2
    with clean_pg.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Detection)) == 0
