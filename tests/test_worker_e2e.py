"""A real worker processes a job end to end on real Redis and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from db.models import Capture, Detection
from tests.shared_workers import SharedWorker
from tests.trapq_cli import trapq
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    ENDED,
    chunk_rows,
    classifications_per_detection,
    detections_per_capture,
    item_states,
    job_state,
    make_job,
    send,
    write_jpegs,
)
from tests.worker_process import wait_for


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_job_processed_end_to_end_with_boxes_inside_their_images(
    tmp_path: Path, clean_pg: Engine, shared_worker: Callable[..., SharedWorker], pool: str,
) -> None:
    """threads (the default) loads the engine in the worker process; prefork in each child,
    never in the parent. The threads run goes through `trapq import` and `trapq enqueue`; the
    prefork one leaves capture sizes unknown, for the worker to record."""
    paths = write_jpegs(tmp_path / "images", 10, 160, 120)
    worker = shared_worker(pool=pool, concurrency=2 if pool == "threads" else 1)
    env = worker.env
    if pool == "threads":
        done = trapq(env, "import", str(tmp_path / "images"), "--deployment", "e2e")
        assert done.returncode == 0, done.stderr
        done = trapq(env, "enqueue", "e2e", "--chunk-size", "4")
        assert done.returncode == 0, done.stderr
        job_id = int(done.stdout.split()[-1])
    else:
        job = make_job(clean_pg, [str(p) for p in paths], chunk_size=4)
        send(env, clean_pg, job.chunk_ids)
        job_id = job.job_id

    wait_for(lambda: job_state(clean_pg, job_id) in ENDED, 120, "job end",
             on_timeout=worker.tail)
    assert job_state(clean_pg, job_id) == "done", worker.tail()

    assert item_states(clean_pg, job_id) == {"done": 10}
    per_capture = detections_per_capture(clean_pg, job_id)
    assert len(per_capture) == 10 and set(per_capture.values()) == {BOXES_PER_IMAGE}
    with clean_pg.connect() as conn:
        sizes = dict(conn.execute(select(Capture.id, Capture.width)).all())
        assert set(sizes.values()) == {160}
        boxes = conn.execute(
            select(Detection.x1, Detection.y1, Detection.x2, Detection.y2)
        ).all()
    assert len(boxes) == 10 * BOXES_PER_IMAGE
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 120
    assert classifications_per_detection(clean_pg, job_id, "demo_classifier") == {
        1: 10 * BOXES_PER_IMAGE
    }, "one classification per detection"
    for chunk in chunk_rows(clean_pg, job_id):
        assert chunk.state == "done" and chunk.n_done == chunk.n_items
        assert chunk.gpu_s is not None and chunk.write_s is not None
        # The chunk's own figures: its images, the batches that carried them (not the
        # process's count since start), the device's busy share over its own run.
        m = chunk.metrics or {}
        assert m["captures"] == chunk.n_items and m["images_per_s"] > 0
        assert 1 <= m["batches"] <= chunk.n_items and 1 <= m["mean_batch_size"] <= 4
        assert 0 < m["gpu_busy_fraction"] <= 1
    log = worker.log_text()
    assert log.count("trapq engine loaded") == 1
    if pool == "prefork":
        assert f"pid {worker.pid}" not in log.split("trapq engine loaded")[1].splitlines()[0]
