"""How each project fares on the shared pool: the figures behind `trapq status` and
`trapq metrics`, read from the job store.

GPU share: the chunk wall seconds (claim to end) of each project's chunks that ended in the
last hour, over all projects' (one slot busy for a second counts one second, whatever the
slot runs), to set against the project's weight over the weights of the projects that had
work in that hour.

ETA of a running job: captures left over its captures per second in the last ten minutes
(since its start if younger), counted from its chunks that ended in that time (chunk rows
keep their counts, so a million-capture job costs a scan of its chunks, not its captures).
That rate already carries the project's share of the pool and the job's share of its
project as they were; the ETA assumes they stay so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from db.models import Chunk, Job, Project
from db.projects import IN_FLIGHT
from db.states import ChunkState, JobState

HOUR = timedelta(hours=1)
RATE_WINDOW = timedelta(minutes=10)
ACTIVE = (JobState.PENDING.value, JobState.RUNNING.value)


@dataclass(frozen=True)
class JobEta:
    job_id: int
    left: int  # captures not ended
    done: int  # captures done
    chunks_pending: int
    chunks_in_flight: int
    captures_per_s: float | None  # None: nothing ended in the window yet
    eta_s: float | None


@dataclass
class ProjectFigures:
    name: str
    weight: float
    max_in_flight: int | None
    captures_pending: int = 0  # work items not ended, of chunks not yet released
    chunks_pending: int = 0
    chunks_in_flight: int = 0  # queued on the broker or running
    captures_done_last_hour: int = 0
    gpu_seconds_last_hour: float = 0.0
    gpu_share: float = 0.0  # of all projects' chunk seconds in the last hour
    weight_share: float = 0.0  # its weight over the weights of projects busy in the hour
    jobs: list[JobEta] = field(default_factory=list)


def project_figures(s: Session, now: datetime | None = None) -> list[ProjectFigures]:
    now = now or datetime.now(UTC)
    since = now - HOUR
    figures = {
        p.id: ProjectFigures(p.name, p.weight, p.max_in_flight)
        for p in s.scalars(select(Project).order_by(Project.name))
    }
    c, j = Chunk, Job
    for project_id, state, n_chunks, n_items in s.execute(
        select(j.project_id, c.state, func.count(), func.sum(c.n_items - c.n_done - c.n_failed))
        .join(j, j.id == c.job_id)
        .where(j.state.in_(ACTIVE), c.state.in_((ChunkState.PENDING.value, *IN_FLIGHT)))
        .group_by(j.project_id, c.state)
    ).all():
        f = figures.get(project_id)
        if f is None:
            continue
        if state == ChunkState.PENDING.value:
            f.chunks_pending += n_chunks
            f.captures_pending += int(n_items or 0)
        else:
            f.chunks_in_flight += n_chunks
    for project_id, n in s.execute(
        select(j.project_id, func.sum(c.n_done))
        .join(j, j.id == c.job_id)
        .where(c.finished_at >= since)
        .group_by(j.project_id)
    ).all():
        if project_id in figures:
            figures[project_id].captures_done_last_hour = int(n or 0)
    wall = func.extract("epoch", c.finished_at - c.started_at)
    if s.get_bind().dialect.name == "sqlite":
        wall = (func.julianday(c.finished_at) - func.julianday(c.started_at)) * 86400.0
    for project_id, seconds in s.execute(
        select(j.project_id, func.sum(wall))
        .join(j, j.id == c.job_id)
        .where(c.finished_at >= since, c.started_at.is_not(None))
        .group_by(j.project_id)
    ).all():
        if project_id in figures:
            figures[project_id].gpu_seconds_last_hour = float(seconds or 0.0)
    total = sum(f.gpu_seconds_last_hour for f in figures.values())
    busy = [f for f in figures.values()
            if f.gpu_seconds_last_hour or f.chunks_in_flight or f.chunks_pending]
    weights = sum(f.weight for f in busy)
    for f in busy:
        f.gpu_share = f.gpu_seconds_last_hour / total if total else 0.0
        f.weight_share = f.weight / weights if weights else 0.0
    for project_id, eta in job_etas(s, now):
        if project_id in figures:
            figures[project_id].jobs.append(eta)
    return list(figures.values())


def job_etas(s: Session, now: datetime) -> list[tuple[int, JobEta]]:
    """(project id, ETA) of each job that has not ended (see the module docstring)."""
    c = Chunk
    window_start = now - RATE_WINDOW
    recent = case((c.finished_at >= window_start, c.n_done + c.n_failed), else_=0)
    rows = s.execute(
        select(
            Job.id, Job.project_id, Job.n_captures, Job.started_at,
            func.sum(c.n_done + c.n_failed), func.sum(recent), func.sum(c.n_done),
            func.count(case((c.state == ChunkState.PENDING.value, 1))),
            func.count(case((c.state.in_(IN_FLIGHT), 1))),
        )
        .join(c, c.job_id == Job.id)
        .where(Job.state.in_(ACTIVE))
        .group_by(Job.id, Job.project_id, Job.n_captures, Job.started_at)
        .order_by(Job.id)
    ).all()
    out = []
    for job_id, project_id, n, started, n_ended, n_recent, done, pending, out_now in rows:
        left = n - int(n_ended or 0)
        rate = None
        if started is not None and n_recent:
            began = started if started.tzinfo else started.replace(tzinfo=UTC)
            span = (now - max(began, window_start)).total_seconds()
            rate = n_recent / span if span > 0 else None
        eta = left / rate if rate else None
        out.append((project_id, JobEta(job_id, left, int(done or 0), pending, out_now, rate,
                                       eta)))
    return out
