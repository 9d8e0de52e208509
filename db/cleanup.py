"""Deleting jobs and deployments with everything they own; the caller runs each call in a
transaction of its own (`with sessions.begin() as s:`).

Work items (job_captures) have no foreign keys (see db.models.JobCapture), so no cascade
removes them: this module deletes them explicitly, and with them go the job's detections
(their foreign key to the work item cascades) and classifications. Chunks cascade from the
job row. A job with chunks still running is refused: its worker would go on writing rows of
a job that no longer exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from db.errors import NoSuchDeployment, NoSuchJob
from db.models import Capture, Chunk, Classification, Deployment, Detection, Job, JobCapture
from db.states import JOB_ENDED, ChunkState


class StillRunning(ValueError):
    """The job (or one of the deployment's jobs) has running chunks, or an unfinished job
    reuses its detections."""


@dataclass(frozen=True)
class Deleted:
    jobs: list[int]
    work_items: int
    chunks: int
    detections: int
    classifications: int
    captures: int = 0


def delete_job(s: Session, job_id: int) -> Deleted:
    """Delete one job with its work items, chunks, detections and classifications."""
    if s.scalar(select(Job.id).where(Job.id == job_id).with_for_update()) is None:
        raise NoSuchJob(job_id)
    return _delete_jobs(s, [job_id])


def delete_deployment(s: Session, name: str) -> Deleted:
    """Delete a deployment, its captures and every one of its jobs the way delete_job does."""
    dep_id = s.scalar(select(Deployment.id).where(Deployment.name == name).with_for_update())
    if dep_id is None:
        raise NoSuchDeployment(name)
    job_ids = list(
        s.scalars(
            select(Job.id).where(Job.deployment_id == dep_id).order_by(Job.id).with_for_update()
        )
    )
    counts = _delete_jobs(s, job_ids)
    n_captures = s.scalar(select(func.count()).where(Capture.deployment_id == dep_id)) or 0
    # Its captures go by their foreign key's cascade.
    s.execute(delete(Deployment.__table__).where(Deployment.id == dep_id))
    return replace(counts, captures=n_captures)


def describe_job(session: Session, job_id: int) -> Deleted:
    """What delete_job would remove, for the confirmation prompt."""
    if session.scalar(select(Job.id).where(Job.id == job_id)) is None:
        raise NoSuchJob(job_id)
    return _counts(session, [job_id])


def _delete_jobs(s: Session, job_ids: Sequence[int]) -> Deleted:
    if not job_ids:
        return Deleted([], 0, 0, 0, 0)
    _refuse_if_busy(s, job_ids)
    counts = _counts(s, job_ids)
    conn = s.connection()
    # Explicitly, not by cascade: the detections' index on (job_id, capture_id) finds them in
    # one pass, where the cascade would look them up once per work item.
    conn.execute(
        delete(Classification.__table__).where(
            Classification.detection_id.in_(
                select(Detection.id).where(Detection.job_id.in_(job_ids))
            )
        )
    )
    conn.execute(delete(Detection.__table__).where(Detection.job_id.in_(job_ids)))
    conn.execute(delete(JobCapture.__table__).where(JobCapture.job_id.in_(job_ids)))
    conn.execute(delete(Chunk.__table__).where(Chunk.job_id.in_(job_ids)))
    conn.execute(delete(Job.__table__).where(Job.id.in_(job_ids)))
    return counts


def _refuse_if_busy(s: Session, job_ids: Sequence[int]) -> None:
    # Chunk rows are locked, so a worker's claim of a queued chunk waits for this transaction
    # and then finds the chunk gone (and skips it) instead of starting it underneath us.
    running = s.scalars(
        select(Chunk.job_id)
        .where(Chunk.job_id.in_(job_ids), Chunk.state == ChunkState.RUNNING.value)
        .with_for_update()
    ).first()
    if running is not None:
        raise StillRunning(f"job {running} has chunks running")
    s.execute(select(Chunk.id).where(Chunk.job_id.in_(job_ids)).with_for_update()).all()
    reuser = s.scalar(
        select(Job.id).where(
            Job.boxes_from_job_id.in_(job_ids),
            Job.id.not_in(job_ids),
            Job.state.not_in(JOB_ENDED),
        )
    )
    if reuser is not None:
        raise StillRunning(f"job {reuser} is still reusing its detections")


def _counts(s: Session, job_ids: Sequence[int]) -> Deleted:
    def count(stmt: object) -> int:
        return s.scalar(stmt) or 0  # type: ignore[call-overload]

    dets = select(Detection.id).where(Detection.job_id.in_(job_ids))
    return Deleted(
        jobs=list(job_ids),
        work_items=count(select(func.count()).where(JobCapture.job_id.in_(job_ids))),
        chunks=count(select(func.count()).where(Chunk.job_id.in_(job_ids))),
        detections=count(select(func.count()).where(Detection.job_id.in_(job_ids))),
        classifications=count(
            select(func.count()).where(Classification.detection_id.in_(dets))
        ),
    )
