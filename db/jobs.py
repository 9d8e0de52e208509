"""Creating a job: its work items and chunks, set-based in one transaction.

A million captures must turn into a job without a million objects in Python, so the
capture selection, the chunk numbering (row_number() / chunk_size) and both inserts run as
INSERT ... SELECT in the database. Only the chunk ids come back, to be sent one per message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    exists,
    func,
    insert,
    literal,
    literal_column,
    select,
)
from sqlalchemy.orm import Session

from db.models import Capture, Chunk, Job, JobCapture, Pipeline
from db.pipelines import detector_fingerprint
from db.projects import project_of_deployment
from db.states import ChunkState, ItemState

captures = Capture.__table__.c
chunks_t = Chunk.__table__
job_captures_t = JobCapture.__table__


@dataclass(frozen=True)
class JobPlan:
    job_id: int
    n_captures: int
    chunk_ids: list[int]


def count_captures(
    session: Session,
    deployment_id: int,
    *,
    pipeline: dict[str, Any],
    fingerprint: str,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    only_unprocessed: bool = False,
) -> int:
    """How many captures create_job would take with the same arguments (for --dry-run)."""
    done_in = _same_pipeline_jobs(session, deployment_id, fingerprint) if only_unprocessed else []
    where = _capture_filter(deployment_id, since, until, done_in)
    chosen = select(captures.id).where(*where).limit(limit).subquery()
    return session.scalar(select(func.count()).select_from(chosen)) or 0


def create_job(
    session: Session,
    deployment_id: int,
    *,
    pipeline: dict[str, Any],
    fingerprint: str,
    chunk_size: int,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    only_unprocessed: bool = False,
    boxes_from_job_id: int | None = None,
    capture_ids: Sequence[int] | None = None,
    pipeline_id: int | None = None,
) -> JobPlan:
    """Create the job, its chunks and one pending work item per selected capture.

    Captures are taken in (captured_at, id) order, so a chunk holds neighbouring frames.
    `since` is inclusive, `until` exclusive; either one leaves out captures without a time.
    `pipeline` is the job's PipelineSpec as a dict and `fingerprint` its fingerprint;
    `pipeline_id` the named version it comes from (db.pipelines).
    `only_unprocessed` leaves out captures already `done` in an earlier job of this
    deployment with the same fingerprint (same weights' bytes, labels and thresholds):
    a new model or threshold processes everything again, a rerun only what is missing.
    `boxes_from_job_id` makes it a re-classification job reusing that job's boxes (checked
    by the caller, see db.reuse). `capture_ids` keeps only those captures (the Antenna
    bridge's job over one batch of tasks).

    The caller commits. Run it in one snapshot (REPEATABLE READ on PostgreSQL, as the
    producer does); should captures still change between the count and the insert, the
    mismatch raises instead of recording a wrong plan.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    done_in = _same_pipeline_jobs(session, deployment_id, fingerprint) if only_unprocessed else []
    where = _capture_filter(deployment_id, since, until, done_in, capture_ids)
    n = session.scalar(
        select(func.count()).select_from(select(captures.id).where(*where).limit(limit).subquery())
    ) or 0
    n_chunks = -(-n // chunk_size)

    job = Job(
        deployment_id=deployment_id,
        pipeline=pipeline,
        fingerprint=fingerprint,
        chunk_size=chunk_size,
        n_captures=n,
        n_chunks=n_chunks,
        boxes_from_job_id=boxes_from_job_id,
        pipeline_id=pipeline_id,
        detector_fingerprint=detector_fingerprint(pipeline),
        project_id=project_of_deployment(session, deployment_id),
    )
    session.add(job)
    session.flush()
    if n == 0:
        return JobPlan(job_id=job.id, n_captures=0, chunk_ids=[])

    conn = session.connection()
    conn.execute(_insert_chunks(job.id, n, chunk_size, n_chunks))
    inserted = conn.execute(
        _insert_work_items(job.id, where, limit, chunk_size),
        execution_options={"preserve_rowcount": True},
    ).rowcount
    if inserted != n:
        raise RuntimeError(f"captures changed while job {job.id} was planned; enqueue again")
    chunk_ids = list(
        session.scalars(select(Chunk.id).where(Chunk.job_id == job.id).order_by(Chunk.seq))
    )
    return JobPlan(job_id=job.id, n_captures=n, chunk_ids=chunk_ids)


@dataclass(frozen=True)
class ChunkPlace:
    """Where a chunk sits: its job, its position (from 1) and how many the job has, and the
    pipeline it runs (NAME@VERSION, or "" for a removed one, and its fingerprint)."""

    job_id: int
    number: int
    of: int
    pipeline: str = ""
    fingerprint: str = ""


def chunk_places(session: Session, chunk_ids: Sequence[int]) -> dict[int, ChunkPlace]:
    """The place of each chunk that exists, by chunk id (one query for any number)."""
    if not chunk_ids:
        return {}
    rows = session.execute(
        select(Chunk.id, Chunk.job_id, Chunk.seq, Job.n_chunks, Job.fingerprint,
               Pipeline.name, Pipeline.version)
        .join(Job, Job.id == Chunk.job_id)
        .outerjoin(Pipeline, Pipeline.id == Job.pipeline_id)
        .where(Chunk.id.in_(list(chunk_ids)))
    )
    return {
        cid: ChunkPlace(job_id, seq + 1, n, f"{name}@{version}" if name else "", fp)
        for cid, job_id, seq, n, fp, name, version in rows
    }


def _same_pipeline_jobs(session: Session, deployment_id: int, fingerprint: str) -> list[int]:
    where = (Job.deployment_id == deployment_id, Job.fingerprint == fingerprint)
    return list(session.scalars(select(Job.id).where(*where)))


def _capture_filter(
    deployment_id: int, since: datetime | None, until: datetime | None, done_in: list[int],
    capture_ids: Sequence[int] | None = None,
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [captures.deployment_id == deployment_id]
    if capture_ids is not None:
        where.append(captures.id.in_(list(capture_ids)))
    if since is not None:
        where.append(captures.captured_at >= since)
    if until is not None:
        where.append(captures.captured_at < until)
    if done_in:
        jc = job_captures_t.c
        where.append(
            ~exists().where(
                jc.capture_id == captures.id,
                jc.job_id.in_(done_in),
                jc.state == ItemState.DONE.value,
            )
        )
    return where


def _insert_chunks(job_id: int, n: int, chunk_size: int, n_chunks: int) -> Any:
    # A recursive CTE numbers the chunks on PostgreSQL and SQLite alike (no generate_series).
    seqs = select(literal_column("0").label("seq")).cte("seqs", recursive=True)
    seqs = seqs.union_all(select(seqs.c.seq + literal_column("1")).where(seqs.c.seq < n_chunks - 1))
    last_size = n - (n_chunks - 1) * chunk_size
    c = chunks_t.c
    return insert(chunks_t).from_select(
        [c.job_id, c.seq, c.state, c.n_items, c.attempts, c.deliveries, c.n_done, c.n_failed],
        select(
            literal(job_id),
            seqs.c.seq,
            literal(ChunkState.PENDING.value),
            case((seqs.c.seq == n_chunks - 1, last_size), else_=chunk_size),
            literal(0),
            literal(0),
            literal(0),
            literal(0),
        ),
    )


def _insert_work_items(
    job_id: int, where: list[ColumnElement[bool]], limit: int | None, chunk_size: int
) -> Any:
    order = (captures.captured_at.asc().nulls_last(), captures.id.asc())
    position = (func.row_number().over(order_by=order) - 1).self_group()
    # Plain "/": integer division on both databases, where "//" would render FLOOR().
    seq = position.op("/")(chunk_size)
    chosen = (
        select(captures.id.label("capture_id"), seq.label("seq"))
        .where(*where)
        .order_by(*order)
        .limit(limit)
        .subquery()
    )
    c, jc = chunks_t.c, job_captures_t.c
    return insert(job_captures_t).from_select(
        [jc.job_id, jc.capture_id, jc.chunk_id, jc.state, jc.attempts],
        select(
            literal(job_id), chosen.c.capture_id, c.id, literal(ItemState.PENDING.value), literal(0)
        ).join_from(chosen, chunks_t, and_(c.job_id == job_id, c.seq == chosen.c.seq)),
    )
