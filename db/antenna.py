"""Antenna tasks in the job store: what was taken, which capture and job answer it, and
which answers are ready, being posted or posted (tasks.antenna.bridge drives it).

Several bridges share these rows. An answer moves ready -> posting in one UPDATE of rows
locked with SKIP LOCKED, so exactly one bridge posts it; a redelivered task (Antenna never
got the answer) moves back to ready with its new reply subject and is answered from the
stored answer, without the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.imports import get_or_create_deployment, insert_captures
from db.models import (
    AntennaImage,
    AntennaTask,
    Capture,
    Chunk,
    Deployment,
    Job,
    JobCapture,
)
from db.projects import get_or_create_project, set_deployment_project
from db.states import AntennaTaskState, ChunkState, ItemState

HELD = (AntennaTaskState.WAITING, AntennaTaskState.READY, AntennaTaskState.POSTING)


@dataclass(frozen=True)
class Delivery:
    """One task as Antenna handed it out; `answer` is set for a task answered at once (an
    error for a malformed one)."""

    task_id: str
    image_id: str | None
    image_url: str | None
    reply_subject: str
    answer: dict[str, Any] | None = None


@dataclass(frozen=True)
class Recorded:
    new: list[AntennaTask]  # first deliveries still to be processed
    again: int  # redeliveries of tasks already known


@dataclass(frozen=True)
class EndedTask:
    """A waiting task whose work item ended."""

    id: int
    image_id: str
    image_url: str
    pipeline_slug: str
    job_id: int
    capture_id: int
    state: str  # the work item's: done or failed
    error: str | None
    finished_at: datetime | None
    first_received_at: datetime


@dataclass(frozen=True)
class Claimed:
    id: int
    antenna_job_id: int
    reply_subject: str
    answer: dict[str, Any]


def lock_intake(session: Session, antenna: str) -> None:
    """Serialize taking tasks from one Antenna across bridges (PostgreSQL advisory lock,
    held to the end of the transaction), so they share one budget instead of each taking it."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"antenna:{antenna}"))))


def record_deliveries(
    session: Session,
    *,
    antenna: str,
    project_id: int,
    antenna_job_id: int,
    pipeline_slug: str,
    deliveries: Sequence[Delivery],
    now: datetime,
    ack_wait: timedelta,
) -> Recorded:
    """Record tasks just taken. A task seen before gets its new reply subject and deadline,
    and is ready again at once if its answer is stored (Antenna redelivers only what it never
    got); a task answered at delivery (malformed) is ready with its answer."""
    ids = [d.task_id for d in deliveries]
    known = {
        t.task_id: t
        for t in session.scalars(
            select(AntennaTask)
            .where(AntennaTask.antenna == antenna, AntennaTask.antenna_job_id == antenna_job_id,
                   AntennaTask.task_id.in_(ids))
            .with_for_update()
        )
    }
    new: list[AntennaTask] = []
    for d in deliveries:
        task = known.get(d.task_id)
        if task is not None:
            task.reply_subject = d.reply_subject
            task.deliveries += 1
            task.received_at = now
            task.deadline = now + ack_wait
            if task.answer is not None:
                task.state = AntennaTaskState.READY
            continue
        task = AntennaTask(
            antenna=antenna, project_id=project_id, antenna_job_id=antenna_job_id,
            task_id=d.task_id, image_id=d.image_id, pipeline_slug=pipeline_slug,
            reply_subject=d.reply_subject, deliveries=1, first_received_at=now,
            received_at=now, deadline=now + ack_wait, state=AntennaTaskState.WAITING,
        )
        if d.answer is not None:
            task.answer, task.state, task.ready_at = d.answer, AntennaTaskState.READY, now
        session.add(task)
        if d.answer is None:
            new.append(task)
    session.flush()
    return Recorded(new=new, again=len(known))


def image_captures(
    session: Session, deployment_id: int, images: Sequence[tuple[str, str]]
) -> dict[str, int]:
    """The capture of each (image id, url), made if missing: by image id, not by URL."""
    wanted = dict(images)
    found = _mapped(session, deployment_id, list(wanted))
    missing = {i: u for i, u in wanted.items() if i not in found}
    if missing:
        insert_captures(session, deployment_id, [
            {"uri": u, "captured_at": None, "width": None, "height": None}
            for u in missing.values()
        ])
        by_uri = dict(session.execute(
            select(Capture.uri, Capture.id).where(
                Capture.deployment_id == deployment_id, Capture.uri.in_(list(missing.values()))
            )
        ).all())
        for image_id, url in missing.items():
            try:
                with session.begin_nested():
                    session.add(AntennaImage(deployment_id=deployment_id, image_id=image_id,
                                             capture_id=by_uri[url]))
            except IntegrityError:
                pass  # another bridge mapped it a moment ago
        found = _mapped(session, deployment_id, list(wanted))
    return found


def _mapped(session: Session, deployment_id: int, image_ids: list[str]) -> dict[str, int]:
    return dict(session.execute(
        select(AntennaImage.image_id, AntennaImage.capture_id).where(
            AntennaImage.deployment_id == deployment_id, AntennaImage.image_id.in_(image_ids)
        )
    ).all())


def processed_items(
    session: Session, capture_ids: Sequence[int], fingerprint: str
) -> dict[int, int]:
    """Captures already done by a job of this pipeline fingerprint: capture id -> job id."""
    if not capture_ids:
        return {}
    rows = session.execute(
        select(JobCapture.capture_id, func.max(JobCapture.job_id))
        .join(Job, Job.id == JobCapture.job_id)
        .where(JobCapture.capture_id.in_(list(capture_ids)),
               JobCapture.state == ItemState.DONE.value, Job.fingerprint == fingerprint)
        .group_by(JobCapture.capture_id)
    )
    return {capture_id: job_id for capture_id, job_id in rows}


def ended_tasks(session: Session, antenna: str, slugs: Sequence[str],
                limit: int) -> list[EndedTask]:
    """Waiting tasks on these pipelines whose work item is done or failed, oldest first."""
    t, jc, c = AntennaTask, JobCapture, Capture
    rows = session.execute(
        select(t.id, t.image_id, c.uri, t.pipeline_slug, t.job_id, t.capture_id, jc.state,
               jc.error, jc.finished_at, t.first_received_at)
        .join(jc, and_(jc.job_id == t.job_id, jc.capture_id == t.capture_id))
        .join(c, c.id == t.capture_id)
        .where(t.antenna == antenna, t.state == AntennaTaskState.WAITING.value,
               t.pipeline_slug.in_(list(slugs)),
               jc.state.in_([ItemState.DONE.value, ItemState.FAILED.value]))
        .order_by(t.deadline)
        .limit(limit)
    )
    return [EndedTask(*row) for row in rows]


def project_deployment(session: Session, name: str) -> int:
    """The deployment `name`, put in a project of the same name when it has none (so each
    Antenna project gets its fair share); a project an operator chose is kept."""
    deployment_id = get_or_create_deployment(session, name)
    project_id = session.scalar(
        select(Deployment.project_id).where(Deployment.id == deployment_id)
    )
    if project_id is None:
        get_or_create_project(session, name)
        set_deployment_project(session, name, name)
    return deployment_id


def stuck_chunks(session: Session, antenna: str, before: datetime) -> list[int]:
    """Chunks that waiting tasks wait on, queued or running with no sign of life since
    `before`: a worker died on them, and a pipeline queue nobody consumes now may hold their
    message (tasks.routing)."""
    t = AntennaTask
    waited = select(t.job_id).where(t.antenna == antenna,
                                     t.state == AntennaTaskState.WAITING.value).distinct()
    quiet = [or_(at.is_(None), at < before)
             for at in (Chunk.heartbeat_at, Chunk.started_at, Chunk.queued_at,
                        Chunk.released_at)]
    return list(session.scalars(
        select(Chunk.id).where(
            Chunk.job_id.in_(waited),
            Chunk.state.in_([ChunkState.QUEUED.value, ChunkState.RUNNING.value]),
            *quiet,
        ).order_by(Chunk.id)
    ))


def store_answers(session: Session, answers: dict[int, dict[str, Any]], now: datetime) -> None:
    """Answers of waiting tasks; a task no longer waiting keeps what it has."""
    for task_id, answer in answers.items():
        session.execute(
            update(AntennaTask)
            .where(AntennaTask.id == task_id, AntennaTask.state == AntennaTaskState.WAITING.value)
            .values(answer=answer, state=AntennaTaskState.READY.value, ready_at=now)
        )


def claim_ready(session: Session, antenna: str, poster: str, now: datetime,
                limit: int) -> list[Claimed]:
    """Take ready answers whose reply subject is still live, for this bridge alone."""
    t = AntennaTask
    rows = list(session.execute(
        select(t.id, t.antenna_job_id, t.reply_subject, t.answer)
        .where(t.antenna == antenna, t.state == AntennaTaskState.READY.value, t.deadline > now)
        .order_by(t.deadline)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ))
    if rows:
        session.execute(
            update(t).where(t.id.in_([r[0] for r in rows]))
            .values(state=AntennaTaskState.POSTING.value, poster=poster)
        )
    return [Claimed(*row) for row in rows]


def mark_answered(session: Session, ids: Sequence[int], now: datetime) -> None:
    if ids:
        session.execute(
            update(AntennaTask).where(AntennaTask.id.in_(list(ids)))
            .values(state=AntennaTaskState.ANSWERED.value, answered_at=now)
        )


def release(session: Session, ids: Sequence[int]) -> None:
    """Answers certainly not received: ready again, for any bridge to post."""
    if ids:
        session.execute(
            update(AntennaTask)
            .where(AntennaTask.id.in_(list(ids)),
                   AntennaTask.state == AntennaTaskState.POSTING.value)
            .values(state=AntennaTaskState.READY.value, poster=None)
        )


@dataclass(frozen=True)
class Load:
    held: int  # tasks taken and not yet answered, reply subject still live
    oldest_s: float  # how long the oldest of them has been held (0 when none)
    rate: float  # captures per second the pool's chunks ended within the horizon


def load(session: Session, antenna: str, now: datetime, horizon: timedelta) -> Load:
    """What the pool holds of this Antenna's tasks, and how fast it has been working: the
    captures its chunks ended within the horizon, counted from the first of those chunks'
    starts, so time the pool sat idle before it is not held against it. Answers from SQL
    (no chunk) do not count: they say nothing of the pool."""
    t = AntennaTask
    held, oldest = session.execute(
        select(func.count(), func.min(t.received_at))
        .where(t.antenna == antenna, t.state.in_([s.value for s in HELD]), t.deadline > now)
    ).one()
    since = now - horizon
    ended, first = session.execute(
        select(func.coalesce(func.sum(Chunk.n_done + Chunk.n_failed), 0),
               func.min(Chunk.started_at))
        .where(Chunk.finished_at >= since)
    ).one()
    rate = 0.0
    if ended and first is not None:
        rate = ended / max((now - max(since, first)).total_seconds(), 1.0)
    oldest_s = (now - oldest).total_seconds() if oldest is not None else 0.0
    return Load(held=held, oldest_s=oldest_s, rate=rate)

