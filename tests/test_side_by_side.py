"""Results of every pipeline side by side, and `enqueue --only-unprocessed` through a real
worker: a capture counts as done only by a `done` work item of a job with the same
fingerprint, so a failed one is taken again and another pipeline takes everything."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, select

from db.models import Detection, JobCapture
from tests.shared_workers import SharedWorker
from tests.test_status_cli import table_rows
from tests.trapq_cli import trapq
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    detections_per_capture,
    item_states,
    job_state,
    jpeg_bytes,
    write_jpegs,
)
from tests.worker_process import wait_for


def enqueue(env: dict[str, str], *args: str) -> int:
    result = trapq(env, "enqueue", "trap-s", "--chunk-size", "3", *args)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def wait_end(engine: Engine, job_id: int) -> None:
    wait_for(lambda: job_state(engine, job_id) in ("done", "failed"), 120, f"job {job_id}")


def detection_ids(engine: Engine, job_id: int) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(
            select(Detection.id).where(Detection.job_id == job_id).order_by(Detection.id)
        ))


def test_only_unprocessed_retakes_failed_captures_and_keeps_earlier_results(
    tmp_path: Path, clean_pg: Engine, shared_worker: Callable[..., SharedWorker]
) -> None:
    folder = tmp_path / "imgs"
    paths = write_jpegs(folder, 6)
    late = paths[4:]
    manifest = tmp_path / "captures.csv"
    manifest.write_text("uri\n" + "".join(f"{p}\n" for p in paths))
    env = shared_worker().env
    assert trapq(env, "import", str(manifest), "--deployment", "trap-s").returncode == 0
    for p in late:  # not there yet: their work items fail in the first job
        p.unlink()

    first = enqueue(env)
    wait_end(clean_pg, first)
    assert item_states(clean_pg, first) == {"done": 4, "failed": 2}
    kept = detection_ids(clean_pg, first)
    for i, p in enumerate(late, start=4):
        p.write_bytes(jpeg_bytes(seed=i))

    second = enqueue(env, "--only-unprocessed")
    wait_end(clean_pg, second)

    with clean_pg.connect() as conn:
        taken = set(conn.scalars(select(JobCapture.capture_id).where(JobCapture.job_id == second)))
        failed_before = set(conn.scalars(select(JobCapture.capture_id).where(
            JobCapture.job_id == first, JobCapture.state == "failed")))
    assert taken == failed_before
    assert item_states(clean_pg, second) == {"done": 2}
    assert set(detections_per_capture(clean_pg, second).values()) == {BOXES_PER_IMAGE}
    assert detection_ids(clean_pg, first) == kept  # the first job's results are untouched
    nothing_left = trapq(env, "enqueue", "trap-s", "--only-unprocessed", "--dry-run")
    assert "no captures of 'trap-s' match" in nothing_left.stderr
    other = trapq(dict(env, TRAPQ_TOP_K="3"), "enqueue", "trap-s", "--only-unprocessed",
                  "--dry-run")
    assert other.returncode == 0 and "dry run: 6 captures" in other.stdout

    listed = trapq(env, "deployments")
    assert listed.returncode == 0, listed.stderr
    [(_, (name, models, done))] = table_rows(
        listed.stdout.split("captures done per pipeline")[1]
    ).items()
    assert (name, models, done) == ("trap-s", "constant_boxes > demo_classifier", "6 of 6")
    status = trapq(env, "status")
    pipelines_table = status.stdout.split("pipelines of these jobs")[1].split("projects")[0]
    [(name, (fingerprint, models, jobs))] = table_rows(pipelines_table).items()  # both jobs
    assert name == "default@1" and len(fingerprint) == 10
    assert models == "constant_boxes > demo_classifier" and jobs == f"{second}, {first}"
    one = trapq(env, "status", str(second))
    assert f"pipeline default@1 ({fingerprint}) · constant_boxes > demo_classifier" in one.stdout
