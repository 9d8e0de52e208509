"""`trapq worker`, `export` and `cancel` as a user runs them, against real services."""

from __future__ import annotations

import base64
import csv
import json
import signal
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, select, update

from db.models import Capture, Chunk, Classification, Detection
from tasks.worker.supervisor import plan_workers
from tests.shared_workers import SharedWorker
from tests.trapq_cli import TRAPQ, trapq
from tests.worker_jobs import (
    ENDED,
    chunk_rows,
    item_states,
    job_state,
    make_job,
    send,
    worker_env,
    write_jpegs,
)
from tests.worker_process import wait_for


def _db_rows(engine: Engine, job_id: int) -> list[tuple]:
    with engine.connect() as conn:
        dets = conn.execute(
            select(Detection.id, Capture.uri, Detection.x1, Detection.y1, Detection.x2,
                   Detection.y2, Detection.score, Detection.label)
            .join(Capture, Capture.id == Detection.capture_id)
            .where(Detection.job_id == job_id)
        ).all()
        classes = {
            det_id: (label, score)
            for det_id, label, score in conn.execute(
                select(Classification.detection_id, Classification.label, Classification.score)
            )
        }
    return sorted(
        (uri, x1, y1, x2, y2, score, label, *classes[det_id])
        for det_id, uri, x1, y1, x2, y2, score, label in dets
    )


def test_export_csv_and_jsonl_match_the_rows_in_the_database(
    tmp_path: Path, clean_pg: Engine, shared_worker: Callable[..., SharedWorker],
) -> None:
    paths = write_jpegs(tmp_path / "images", 3)
    job = make_job(clean_pg, [str(p) for p in paths], chunk_size=3)
    worker = shared_worker()
    env = worker.env
    send(env, clean_pg, job.chunk_ids)
    wait_for(lambda: job_state(clean_pg, job.job_id) == "done", 120, "job done",
             on_timeout=worker.tail)
    expected = _db_rows(clean_pg, job.job_id)
    assert len(expected) == 3 * 20

    out_csv, out_jsonl = tmp_path / "d.csv", tmp_path / "d.jsonl"
    for fmt, out in (("csv", out_csv), ("jsonl", out_jsonl)):
        done = trapq(env, "export", str(job.job_id), "--format", fmt, "-o", str(out))
        assert done.returncode == 0, done.stderr

    with out_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(
        (r["uri"], float(r["x1"]), float(r["y1"]), float(r["x2"]), float(r["y2"]),
         float(r["score"]), r["label"], r["demo_classifier_label"],
         float(r["demo_classifier_score"]))
        for r in rows
    ) == expected
    records = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert sorted(
        (r["uri"], *r["box"], r["score"], r["label"],
         r["classifications"]["demo_classifier"]["label"],
         r["classifications"]["demo_classifier"]["score"])
        for r in records
    ) == expected


def test_export_of_an_unknown_job_is_one_line_error(service_env: dict[str, str]) -> None:
    done = trapq(service_env, "export", "999", "--format", "csv")
    assert done.returncode == 1
    assert "no job 999" in done.stderr and "Traceback" not in done.stderr


def test_cancelled_job_is_revoked_and_its_chunks_are_skipped(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
    redis_url: str, queue_name: str,
) -> None:
    paths = write_jpegs(tmp_path / "images", 4)
    job = make_job(clean_pg, [str(p) for p in paths], chunk_size=2)
    env = worker_env(service_env)
    send(env, clean_pg, job.chunk_ids)

    done = trapq(env, "cancel", str(job.job_id))
    assert done.returncode == 0, done.stderr
    assert "2 chunk(s) cancelled, 2 task(s) revoked" in done.stdout

    worker = worker_factory(env).start()
    client = redis.Redis.from_url(redis_url)
    # Either the worker learnt of the revoke (from a neighbour at start-up) and discards the
    # message, or it runs the task, which finds the chunk cancelled and does nothing.
    wait_for(lambda: client.llen(queue_name) == 0 and _skipped(worker.log_text()) == 2,
             60, "both messages taken and skipped", on_timeout=worker.tail)
    client.close()
    assert job_state(clean_pg, job.job_id) == "cancelled"
    assert {c.state for c in chunk_rows(clean_pg, job.job_id)} == {"cancelled"}
    assert item_states(clean_pg, job.job_id) == {"pending": 4}


def _skipped(log: str) -> int:
    return log.count("Discarding revoked task") + log.count("not run: skip")


def test_gpus_option_plans_one_pinned_worker_per_gpu_without_touching_cuda() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert [(w.node, w.gpu) for w in plan_workers("all", env)] == [
        ("gpu2@%h", "2"), ("gpu3@%h", "3")
    ]
    assert [w.node for w in plan_workers("cpu", env)] == ["cpu@%h"]
    assert [w.node for w in plan_workers("all", {"CUDA_VISIBLE_DEVICES": ""})] == ["cpu@%h"]
    assert [(w.node, w.gpu) for w in plan_workers("1", env)] == [("gpu1@%h", "3")]
    assert [w.gpu for w in plan_workers("0,1", {})] == ["0", "1"]
    with pytest.raises(ValueError):
        plan_workers("first", env)
    with pytest.raises(ValueError):
        plan_workers("2", env)


def test_trapq_worker_restarts_a_worker_stopped_by_the_memory_guard_and_stops_on_ctrl_c(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine, worker_factory,
) -> None:
    paths = write_jpegs(tmp_path / "images", 4)
    job = make_job(clean_pg, [str(p) for p in paths], chunk_size=2)
    # Any real worker is past 1 MB, so each one stops after its first chunk: two chunks, two
    # restarts (the second once the job is done).
    env = worker_env(service_env, TRAPQ_MAX_MEMORY_MB="1")
    # No dispatcher: the test sends the chunks, and one would send each again.
    argv = [str(TRAPQ), "worker", "--gpus", "cpu", "--concurrency", "1", "--no-dispatch"]
    supervisor = worker_factory(env, argv=argv)
    try:
        supervisor.start()
        send(env, clean_pg, job.chunk_ids)
        wait_for(lambda: job_state(clean_pg, job.job_id) in ENDED, 180, "job end",
                 on_timeout=supervisor.tail)
        assert job_state(clean_pg, job.job_id) == "done"
        wait_for(lambda: supervisor.log_text().count("memory guard; starting it again") >= 2,
                 60, "the second restart", on_timeout=supervisor.tail)
        assert "cpu@" in supervisor.log_text()

        supervisor.signal(signal.SIGINT)
        assert supervisor.wait(60) == 0
    finally:
        supervisor.kill()
    with clean_pg.connect() as conn:
        workers = set(conn.scalars(select(Chunk.worker)))
    assert all(w.startswith("cpu@") for w in workers)
    leftover = subprocess.run(["pgrep", "-f", "--", f"--queues {env['TRAPQ_QUEUE']}"])
    assert leftover.returncode == 1, "a worker outlived trapq worker"


def test_requeue_sends_never_sent_and_stuck_chunks_with_a_fresh_budget(
    service_env: dict[str, str], clean_pg: Engine, redis_url: str, queue_name: str,
) -> None:
    job = make_job(clean_pg, [f"/data/img{i}.jpg" for i in range(6)], chunk_size=2)
    never_sent, stuck, fresh = job.chunk_ids
    long_ago = datetime.now(UTC) - timedelta(minutes=30)
    with clean_pg.begin() as conn:
        conn.execute(update(Chunk).where(Chunk.id == stuck).values(
            state="running", heartbeat_at=long_ago, attempts=3, deliveries=4))
        conn.execute(update(Chunk).where(Chunk.id == fresh).values(
            state="running", heartbeat_at=datetime.now(UTC), attempts=1, deliveries=1))

    done = trapq(service_env, "requeue", str(job.job_id), "--stuck-after", "10")

    assert done.returncode == 0, done.stderr
    assert "requeued 0 failed, 1 pending, 1 stuck chunk(s); sent 2, not sent 0" in done.stdout
    rows = {c.id: c for c in chunk_rows(clean_pg, job.job_id)}
    assert (rows[never_sent].state, rows[stuck].state, rows[fresh].state) == (
        "queued", "queued", "running")
    assert (rows[stuck].attempts, rows[stuck].deliveries) == (0, 0)
    messages = _queued(redis_url, queue_name)
    assert sorted(args[0] for _, args, _ in messages) == sorted([never_sent, stuck])
    assert {task_id for task_id, _, _ in messages} == {
        rows[never_sent].task_id, rows[stuck].task_id}
    # Flower names a requeued chunk as the first send did: its job and place.
    assert {shadow for _, _, shadow in messages} == {
        f"job {job.job_id} · chunk 1/3", f"job {job.job_id} · chunk 2/3"}


def _queued(redis_url: str, queue: str) -> list[tuple[str, list, str]]:
    """(task id, args, shadow name) of the messages waiting on a queue, as Kombu stores them
    in Redis."""
    client = redis.Redis.from_url(redis_url)
    raw = client.lrange(queue, 0, -1)
    client.close()
    out = []
    for item in raw:
        message = json.loads(item)
        assert message["content-type"] == "application/json"
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"]["id"], args, message["headers"]["shadow"]))
    return out
