"""`trapq delete` and `trapq delete-deployment` leave nothing of a job in any table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, func, select, text

from db.models import Base, Classification, Detection
from tests.shared_workers import SharedWorker
from tests.trapq_cli import one_line_error, trapq
from tests.worker_jobs import (
    BOXES_PER_IMAGE,
    item_states,
    job_state,
    make_job,
    send,
    write_jpegs,
)
from tests.worker_process import wait_for


def rows_of_job(engine: Engine, job_id: int, detection_ids: list[int]) -> dict[str, int]:
    """Rows in any table that belong to the job: by a job_id column, the job row itself, or by
    pointing at one of its detections. Tables added later are covered without naming them."""
    found: dict[str, int] = {}
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for column in table.columns:
                refers_to_job = column.name == "job_id" or (
                    table.name == "jobs" and column.name == "id"
                )
                refers_to_detection = column.name in ("detection_id", "source_detection_id") or (
                    table.name == "detections" and column.name == "id"
                )
                if refers_to_job:
                    n = conn.scalar(select(func.count()).where(column == job_id))
                elif refers_to_detection and detection_ids:
                    n = conn.scalar(select(func.count()).where(column.in_(detection_ids)))
                else:
                    continue
                if n:
                    found[f"{table.name}.{column.name}"] = n
    return found


def detection_ids(engine: Engine, job_id: int) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(
            select(Detection.id).where(Detection.job_id == job_id).order_by(Detection.id)
        ))


def classification_count(engine: Engine, job_id: int) -> int:
    with engine.connect() as conn:
        return conn.scalar(
            select(func.count())
            .select_from(Classification)
            .join(Detection, Detection.id == Classification.detection_id)
            .where(Detection.job_id == job_id)
        ) or 0


def run_two_jobs(
    tmp_path: Path, engine: Engine, shared_worker: Callable[..., SharedWorker]
) -> tuple[dict[str, str], int, int]:
    """Two jobs over the same 8 captures, both processed by a real (shared) worker."""
    env = shared_worker().env
    uris = [str(p) for p in write_jpegs(tmp_path / "imgs", 8)]
    first = make_job(engine, uris, chunk_size=4, deployment="trap-d")
    second = make_job(engine, uris, chunk_size=4, deployment="trap-d")
    send(env, engine, first.chunk_ids + second.chunk_ids)
    for job in (first, second):
        wait_for(lambda j=job: job_state(engine, j.job_id) == "done", 120, "both jobs to end")
        assert item_states(engine, job.job_id) == {"done": 8}
    return env, first.job_id, second.job_id


def test_delete_removes_every_row_of_the_job_and_nothing_of_its_neighbour(
    tmp_path: Path, clean_pg: Engine, shared_worker: Callable[..., SharedWorker]
) -> None:
    env, job, other = run_two_jobs(tmp_path, clean_pg, shared_worker)
    doomed = detection_ids(clean_pg, job)
    assert len(doomed) == 8 * BOXES_PER_IMAGE
    assert classification_count(clean_pg, job) == len(doomed)
    kept = rows_of_job(clean_pg, other, detection_ids(clean_pg, other))

    result = trapq(env, "delete", str(job), "--yes")

    assert result.returncode == 0, result.stderr
    assert f"job {job} deleted: 8 work items, 2 chunks, 160 detections" in result.stdout
    assert rows_of_job(clean_pg, job, doomed) == {}
    assert rows_of_job(clean_pg, other, detection_ids(clean_pg, other)) == kept
    assert classification_count(clean_pg, other) == 8 * BOXES_PER_IMAGE
    assert one_line_error(trapq(env, "delete", str(job), "--yes")) == (
        f"error: no job {job}; `trapq status` lists jobs"
    )


def test_delete_asks_first_and_a_no_keeps_everything(
    tmp_path: Path, service_env: dict[str, str], clean_pg: Engine
) -> None:
    job = make_job(clean_pg, ["/nowhere/a.jpg", "/nowhere/b.jpg"], chunk_size=1).job_id
    answered = trapq(service_env, "delete", str(job), input="n\n")
    assert answered.returncode == 1
    assert "delete job" in answered.stdout and "2 work items, 2 chunks" in answered.stdout
    assert item_states(clean_pg, job) == {"pending": 2}


def test_delete_refuses_a_job_with_a_running_chunk(
    service_env: dict[str, str], clean_pg: Engine
) -> None:
    job = make_job(clean_pg, ["/nowhere/a.jpg", "/nowhere/b.jpg"], chunk_size=1)
    with clean_pg.begin() as conn:  # what a worker's claim writes
        conn.execute(text("UPDATE chunks SET state = 'running' WHERE id = :c"),
                     {"c": job.chunk_ids[0]})

    error = one_line_error(trapq(service_env, "delete", str(job.job_id), "--yes"))

    assert error == (
        f"error: job {job.job_id} not deleted: job {job.job_id} has chunks running; "
        "`trapq cancel` it or wait"
    )
    assert item_states(clean_pg, job.job_id) == {"pending": 2}


def test_delete_deployment_deletes_its_captures_and_every_job_the_same_way(
    tmp_path: Path, clean_pg: Engine, shared_worker: Callable[..., SharedWorker]
) -> None:
    env, job, other = run_two_jobs(tmp_path, clean_pg, shared_worker)
    doomed = {j: detection_ids(clean_pg, j) for j in (job, other)}
    bystander = make_job(clean_pg, ["/elsewhere/x.jpg"], chunk_size=1, deployment="trap-e")

    result = trapq(env, "delete-deployment", "trap-d", "--yes")

    assert result.returncode == 0, result.stderr
    assert "deployment trap-d deleted: 8 captures, 2 jobs, 16 work items" in result.stdout
    for j, ids in doomed.items():
        assert rows_of_job(clean_pg, j, ids) == {}
    with clean_pg.connect() as conn:
        names = list(conn.scalars(text("SELECT name FROM deployments")))
        captures = conn.scalar(text("SELECT count(*) FROM captures"))
    assert names == ["trap-e"] and captures == 1
    assert item_states(clean_pg, bystander.job_id) == {"pending": 1}


def test_delete_refuses_a_job_whose_boxes_an_unfinished_job_reuses(
    service_env: dict[str, str], clean_pg: Engine
) -> None:
    source = make_job(clean_pg, ["/nowhere/a.jpg"], chunk_size=1).job_id
    reuser = make_job(clean_pg, ["/nowhere/a.jpg"], chunk_size=1).job_id
    with clean_pg.begin() as conn:  # what `enqueue --reuse-detections-from` records
        conn.execute(text("UPDATE jobs SET boxes_from_job_id = :s WHERE id = :r"),
                     {"s": source, "r": reuser})

    error = one_line_error(trapq(service_env, "delete", str(source), "--yes"))

    assert error == (
        f"error: job {source} not deleted: job {reuser} is still reusing its detections; "
        "`trapq cancel` it or wait"
    )
    deleted = trapq(service_env, "delete", str(reuser), "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert trapq(service_env, "delete", str(source), "--yes").returncode == 0
