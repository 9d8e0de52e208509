"""The dispatcher's decisions, made in SQL: which pending chunks go out next, and in doubt.

Fair order is start-time fair queueing (Goyal, Vin and Cheng, 1996) at two levels. Each
project carries a virtual start and finish tag; releasing a chunk of `c` captures starts it
at S = max(F_project, V), where V is the largest start tag handed out so far, and moves the
project's finish tag to S + c / weight. The project with the smallest S goes next, so over
any stretch in which projects have work pending they get captures in proportion to their
weights, and a project that was idle starts level with the others (V), banking no credit.
Within a project its jobs share the same way with equal weights, and a job's chunks go
oldest first (by seq). A project at its max_in_flight is passed over: the next one gets the
slot, so no GPU idles for fairness's sake (work-conserving).

Tags, the chosen chunks' new state and their task ids change in one transaction that first
locks every project row, so two dispatchers at once take turns and each chunk is released
once; a crash before the commit releases nothing.

A chunk is `queued` with its task id recorded before its message is published, and
`queued_at` is set once the broker took the message. A chunk queued without `queued_at` is
in doubt: its sender died between the two. After a grace period `recover_in_doubt` puts it
back to `pending` (the dispatcher then releases it under a new task id); should the first
message exist after all, the worker's claim finds another task id on the chunk and skips it
(db.results.claim_chunk), so the chunk still runs once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from celery.utils import uuid
from sqlalchemy import and_, bindparam, case, func, select, text, update
from sqlalchemy.orm import Session

from db.models import Chunk, Job, Project
from db.projects import IN_FLIGHT, INTERACTIVE_PROJECT
from db.states import ChunkState, JobState

chunks_t = Chunk.__table__
DISPATCHER_SESSION = "trapq-dispatcher"  # application_name of a dispatcher's connections
PENDING = ChunkState.PENDING.value
ACTIVE_JOBS = (JobState.PENDING.value, JobState.RUNNING.value)


@dataclass(frozen=True)
class Assigned:
    """A chunk about to be published under `task_id`; `previous` is the task id it had (kept
    if the publish fails) and `was_pending` whether this assignment made it `queued`."""

    chunk_id: int
    task_id: str
    previous: str | None = None
    was_pending: bool = True
    lane: bool = False  # the fast lane's (the `interactive` project): sent on its own queue


@dataclass
class _Job:
    id: int
    chunk_size: int
    pending: int
    vstart: float
    vfinish: float
    take: int = 0


@dataclass
class _Project:
    id: int
    name: str
    weight: float
    cap: int | None
    in_flight: int
    vstart: float
    vfinish: float
    jobs: list[_Job] = field(default_factory=list)

    def eligible(self) -> bool:
        return any(j.pending for j in self.jobs) and (
            self.cap is None or self.in_flight < self.cap
        )


@dataclass(frozen=True)
class Release:
    """One round's outcome: the chunks assigned, and how many chunks were out before."""

    assigned: list[Assigned]
    in_flight_before: int
    by_project: dict[str, int]


def assign_task_ids(s: Session, chunk_ids: Sequence[int], at: datetime) -> list[Assigned]:
    """Record a fresh task id on each chunk before its message goes out (any state: a resend
    of a running chunk supersedes the delivery in hand); a `pending` one becomes `queued`."""
    if not chunk_ids:
        return []
    c = chunks_t.c
    rows = s.execute(
        select(c.id, c.task_id, c.state).where(c.id.in_(list(chunk_ids))).with_for_update()
    ).all()
    known = {cid: (task_id, state) for cid, task_id, state in rows}
    assigned = [
        Assigned(cid, uuid(), known[cid][0], known[cid][1] == PENDING)
        for cid in chunk_ids
        if cid in known
    ]
    _record(s, assigned, at)
    return assigned


def _record(s: Session, assigned: Sequence[Assigned], at: datetime) -> None:
    if not assigned:
        return
    c = chunks_t.c
    s.connection().execute(
        update(chunks_t)
        .where(c.id == bindparam("cid"))
        .values(
            task_id=bindparam("tid"),
            released_at=at,
            queued_at=None,
            state=case((c.state == PENDING, ChunkState.QUEUED.value), else_=c.state),
        ),
        [{"cid": a.chunk_id, "tid": a.task_id} for a in assigned],
    )


def confirm_sent(s: Session, assigned: Sequence[Assigned], at: datetime) -> None:
    """The broker took these messages: no longer in doubt."""
    if not assigned:
        return
    c = chunks_t.c
    s.connection().execute(
        update(chunks_t)
        .where(c.id == bindparam("cid"), c.task_id == bindparam("tid"))
        .values(queued_at=at),
        [{"cid": a.chunk_id, "tid": a.task_id} for a in assigned],
    )


def unassign(s: Session, assigned: Sequence[Assigned]) -> None:
    """The publish failed: each chunk gets its previous task id back, and a chunk this
    assignment made `queued` is `pending` again (unless a worker or a later sender has
    moved it on meanwhile)."""
    if not assigned:
        return
    c = chunks_t.c
    s.connection().execute(
        update(chunks_t)
        .where(c.id == bindparam("cid"), c.task_id == bindparam("tid"))
        .values(
            task_id=bindparam("previous"),
            released_at=None,
            state=case(
                (and_(bindparam("was_pending"), c.state == ChunkState.QUEUED.value), PENDING),
                else_=c.state,
            ),
        ),
        [
            {"cid": a.chunk_id, "tid": a.task_id, "previous": a.previous,
             "was_pending": a.was_pending}
            for a in assigned
        ],
    )


def recover_in_doubt(s: Session, now: datetime, grace: timedelta) -> int:
    """Chunks whose sender died between recording and publishing (queued, never confirmed,
    older than `grace`) go back to `pending`, keeping their task id so that a message that
    did go out can still be claimed until the chunk is released again. Returns how many."""
    c = chunks_t.c
    return s.execute(
        update(chunks_t)
        .where(
            c.state == ChunkState.QUEUED.value,
            c.queued_at.is_(None),
            c.released_at < now - grace,
        )
        .values(state=PENDING, released_at=None),
        execution_options={"preserve_rowcount": True},
    ).rowcount


def dispatcher_running(s: Session) -> bool:
    """Whether a dispatcher is connected to this database (its sessions carry the name
    DISPATCHER_SESSION); SQLite cannot tell, and the embedded runs start one."""
    if s.get_bind().dialect.name != "postgresql":
        return True
    return bool(s.scalar(text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = :name AND datname = current_database()"
    ), {"name": DISPATCHER_SESSION}))


def release(s: Session, window: int, at: datetime, interactive_cap: int) -> Release:
    """Pick up to (window - chunks out) pending chunks in fair order, record their task ids
    and mark them `queued`, in the caller's transaction; the caller publishes them.

    The `interactive` project's chunks (the fast lane) go first, apart from the window, with
    at most `interactive_cap` of them out at once.
    """
    projects = _load(s)
    out = sum(p.in_flight for p in projects.values())
    chosen: list[_Project] = []
    lane = next((p for p in projects.values() if p.name == INTERACTIVE_PROJECT), None)
    if lane is not None:
        lane.cap = interactive_cap
        out -= lane.in_flight
        _pick({lane.id: lane}, interactive_cap, chosen)
        del projects[lane.id]
    _pick(projects, window - out, chosen)
    by_project: dict[str, int] = {}
    assigned: list[Assigned] = []
    for p in chosen:
        s.execute(update(Project).where(Project.id == p.id).values(vstart=p.vstart,
                                                                    vfinish=p.vfinish))
        for job in p.jobs:
            if job.take:
                ids = _oldest_pending(s, job.id, job.take)
                assigned += [Assigned(cid, uuid(), lane=p is lane) for cid in ids]
                by_project[p.name] = by_project.get(p.name, 0) + len(ids)
                s.execute(update(Job).where(Job.id == job.id).values(vstart=job.vstart,
                                                                     vfinish=job.vfinish))
    _record(s, assigned, at)
    return Release(assigned, out, by_project)


def _pick(projects: dict[int, _Project], room: int, chosen: list[_Project]) -> None:
    if not projects:
        return
    v = max(p.vstart for p in projects.values())
    for _ in range(max(room, 0)):
        ready = [p for p in projects.values() if p.eligible()]
        if not ready:
            return
        p = min(ready, key=lambda q: (max(q.vfinish, v), q.vstart, q.id))
        start = max(p.vfinish, v)
        job_v = max(j.vstart for j in p.jobs)
        job = min(
            (j for j in p.jobs if j.pending), key=lambda j: (max(j.vfinish, job_v), j.id)
        )
        cost = float(job.chunk_size)
        p.vstart, p.vfinish = start, start + cost / p.weight
        v = start
        job_start = max(job.vfinish, job_v)
        job.vstart, job.vfinish = job_start, job_start + cost
        job.pending -= 1
        job.take += 1
        p.in_flight += 1
        if p not in chosen:
            chosen.append(p)


def _load(s: Session) -> dict[int, _Project]:
    """Every project (rows locked: one dispatcher decides at a time) with its active jobs
    that have chunks pending, and its chunks out."""
    rows = s.execute(select(Project).order_by(Project.id).with_for_update()).scalars().all()
    projects = {
        p.id: _Project(p.id, p.name, p.weight, p.max_in_flight, 0, p.vstart, p.vfinish)
        for p in rows
    }
    c = chunks_t.c
    for project_id, n in s.execute(
        select(Job.project_id, func.count())
        .join(Chunk, Chunk.job_id == Job.id)
        .where(Job.state.in_(ACTIVE_JOBS), c.state.in_(IN_FLIGHT))
        .group_by(Job.project_id)
    ):
        if project_id in projects:
            projects[project_id].in_flight = n
    pending = (
        select(func.count())
        .where(c.job_id == Job.id, c.state == PENDING)
        .correlate(Job)
        .scalar_subquery()
    )
    for job_id, project_id, size, n, vstart, vfinish in s.execute(
        select(Job.id, Job.project_id, Job.chunk_size, pending, Job.vstart, Job.vfinish)
        .where(Job.state.in_(ACTIVE_JOBS))
        .order_by(Job.id)
    ):
        if n and project_id in projects:
            projects[project_id].jobs.append(_Job(job_id, size, n, vstart, vfinish))
    return projects


def _oldest_pending(s: Session, job_id: int, n: int) -> list[int]:
    c = chunks_t.c
    return list(
        s.scalars(
            select(c.id)
            .where(c.job_id == job_id, c.state == PENDING)
            .order_by(c.seq)
            .limit(n)
            .with_for_update(skip_locked=True)
        )
    )


def fingerprints_out(s: Session) -> set[str]:
    """The pipelines of the chunks out (queued or running): the pipeline queues their
    messages can be in (tasks.dispatcher looks there for messages nobody consumes)."""
    return set(
        s.scalars(
            select(Job.fingerprint)
            .join(Chunk, Chunk.job_id == Job.id)
            .where(Chunk.state.in_(IN_FLIGHT))
            .distinct()
        )
    )
