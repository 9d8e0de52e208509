"""Operator repairs of a job: pick the chunks to send again, or cancel what is left."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from db.errors import NoSuchJob
from db.models import Chunk, Job, JobCapture
from db.states import CHUNK_ENDED, JOB_ENDED, ChunkState, ItemState, JobState

chunks_t = Chunk.__table__
jobs_t = Job.__table__
items_t = JobCapture.__table__


class JobCancelled(ValueError):
    pass


@dataclass
class RequeuePlan:
    job_id: int
    failed: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    stuck: list[int] = field(default_factory=list)

    @property
    def chunk_ids(self) -> list[int]:
        return sorted(self.failed + self.pending + self.stuck)


def plan_requeue(
    s: Session,
    job_id: int,
    *,
    failed: bool = False,
    stuck_after: timedelta | None = None,
    chunk_id: int | None = None,
) -> RequeuePlan:
    """Reset the chunks to send again and return them, in the caller's transaction.

    Chosen: never-sent `pending` chunks (always), `failed` ones (with `failed`, or when
    named by `chunk_id`), and `running`/`queued` ones whose heartbeat is older than
    `stuck_after` (a queued chunk that never ran counts from when it was sent: a broker that
    lost its data, e.g. Redis restarted without persistence, leaves it queued forever).
    Each goes back to `pending` with attempts and deliveries at zero, so it gets the whole
    retry and redelivery budget again; the failed work items of a failed chunk become
    pending again, and an ended job is running again.
    """
    job_state = s.scalar(select(Job.state).where(Job.id == job_id).with_for_update())
    if job_state is None:
        raise NoSuchJob(job_id)
    if job_state == JobState.CANCELLED.value:
        raise JobCancelled(job_id)
    c = chunks_t.c
    where = [c.job_id == job_id]
    if chunk_id is not None:
        where.append(c.id == chunk_id)
    plan = RequeuePlan(job_id)
    rows = s.execute(
        select(c.id, c.state, func.coalesce(c.heartbeat_at, c.queued_at))
        .where(*where)
        .order_by(c.seq)
    )
    limit = datetime.now(UTC) - stuck_after if stuck_after is not None else None
    for cid, state, beat in rows:
        if state == ChunkState.PENDING.value:
            plan.pending.append(cid)
        elif state == ChunkState.FAILED.value and (failed or chunk_id is not None):
            plan.failed.append(cid)
        elif (
            state in (ChunkState.RUNNING.value, ChunkState.QUEUED.value)
            and limit is not None
            and beat is not None
            and beat < limit
        ):
            plan.stuck.append(cid)
    ids = plan.chunk_ids
    if not ids:
        return plan
    s.execute(
        update(chunks_t)
        .where(c.id.in_(ids))
        .values(
            state=ChunkState.PENDING.value,
            attempts=0,
            deliveries=0,
            error=None,
            finished_at=None,
        )
    )
    if plan.failed:
        jc = items_t.c
        s.execute(
            update(items_t)
            .where(jc.chunk_id.in_(plan.failed), jc.state == ItemState.FAILED.value)
            .values(state=ItemState.PENDING.value, error_kind=None, error=None,
                    finished_at=None)
        )
    s.execute(
        update(jobs_t)
        .where(jobs_t.c.id == job_id, jobs_t.c.state.in_(JOB_ENDED))
        .values(state=JobState.RUNNING.value, finished_at=None)
    )
    return plan


@dataclass(frozen=True)
class Cancelled:
    previous_state: str
    n_chunks: int
    task_ids: list[str]


def cancel_job(s: Session, job_id: int) -> Cancelled:
    """Mark the job and its unfinished chunks cancelled; returns their task ids to revoke.

    A job that has already ended is left as it is. A worker that still receives one of
    these chunks sees it cancelled and skips it; a run in progress stops at its next
    heartbeat. Work items keep their state.
    """
    job_state = s.scalar(select(Job.state).where(Job.id == job_id).with_for_update())
    if job_state is None:
        raise NoSuchJob(job_id)
    c = chunks_t.c
    open_chunks = and_(c.job_id == job_id, c.state.not_in(CHUNK_ENDED))
    task_ids = [
        t for t in s.scalars(select(c.task_id).where(open_chunks, c.task_id.is_not(None)))
    ]
    at = datetime.now(UTC)
    if job_state in JOB_ENDED:
        return Cancelled(job_state, 0, [])
    n = s.execute(
        update(chunks_t)
        .where(open_chunks)
        .values(state=ChunkState.CANCELLED.value, finished_at=at),
        execution_options={"preserve_rowcount": True},
    ).rowcount
    s.execute(
        update(jobs_t)
        .where(jobs_t.c.id == job_id)
        .values(state=JobState.CANCELLED.value, finished_at=at)
    )
    return Cancelled(job_state, n, task_ids)
