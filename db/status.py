"""Read-only queries behind `trapq status` and `trapq deployments`.

Capture counts come from the work items (the truth, written with the results); timings
come from the chunk rows the workers fill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.counts import chunk_states, job_item_counts
from db.errors import NoSuchJob
from db.models import Capture, Chunk, Deployment, Job, JobCapture
from db.pipelines import StoredPipeline, job_pipelines
from db.states import CHUNK_ENDED, ItemState


@dataclass(frozen=True)
class JobRow:
    id: int
    deployment: str
    state: str
    n_captures: int
    n_chunks: int
    done: int
    failed: int
    created_at: datetime
    fingerprint: str = ""  # the pipeline's
    models: str = ""  # "detector > [filter >] classifier", as registry names
    pipeline: str = ""  # NAME@VERSION (db.pipelines)
    boxes_from_job_id: int | None = None  # re-classification: the job whose boxes it reuses


@dataclass(frozen=True)
class PipelineDone:
    """How many of a deployment's captures one pipeline has done (in any of its jobs)."""

    fingerprint: str
    models: str
    captures: int


@dataclass(frozen=True)
class ChunkTimings:
    """Means over the chunks that have ended and reported timings."""

    n_chunks: int
    fetch_s: float
    gpu_s: float
    write_s: float
    wall_s: float
    images_per_s: float  # per chunk: its items over its wall time, averaged


@dataclass(frozen=True)
class JobStatus:
    job: JobRow
    started_at: datetime | None
    finished_at: datetime | None
    captures: dict[str, int] = field(default_factory=dict)  # work items by state
    chunks: dict[str, int] = field(default_factory=dict)  # chunks by state
    timings: ChunkTimings | None = None
    throughput: float | None = None  # captures ended per second since the first chunk started
    failures: dict[str, int] = field(default_factory=dict)  # failed work items by error kind

    @property
    def ended(self) -> int:
        return self.captures.get(ItemState.DONE, 0) + self.captures.get(ItemState.FAILED, 0)


@dataclass(frozen=True)
class DeploymentRow:
    name: str
    n_captures: int
    first: datetime | None
    last: datetime | None
    n_jobs: int
    pipelines: list[PipelineDone] = field(default_factory=list)  # most captures first


def recent_jobs(session: Session, limit: int = 20) -> list[JobRow]:
    jobs = session.execute(
        select(Job, Deployment.name)
        .join(Deployment, Deployment.id == Job.deployment_id)
        .order_by(Job.id.desc())
        .limit(limit)
    ).all()
    counts = job_item_counts(session, [job.id for job, _ in jobs])
    pipelines = job_pipelines(session, [job.id for job, _ in jobs])
    return [_job_row(job, name, counts.get(job.id, {}), pipelines[job.id]) for job, name in jobs]


def job_status(session: Session, job_id: int, now: datetime | None = None) -> JobStatus:
    found = session.execute(
        select(Job, Deployment.name)
        .join(Deployment, Deployment.id == Job.deployment_id)
        .where(Job.id == job_id)
    ).first()
    if found is None:
        raise NoSuchJob(job_id)
    job, name = found
    items = job_item_counts(session, [job_id]).get(job_id, {})
    by_chunk_state = chunk_states(session, job_id)
    first_start, last_end = session.execute(
        select(func.min(Chunk.started_at), func.max(Chunk.finished_at)).where(
            Chunk.job_id == job_id
        )
    ).one()
    started = job.started_at or first_start
    finished = job.finished_at
    row = _job_row(job, name, items, job_pipelines(session, [job_id])[job_id])
    throughput = None
    if started is not None:
        all_ended = sum(by_chunk_state.values()) == sum(
            n for state, n in by_chunk_state.items() if state in CHUNK_ENDED
        )
        end = finished or (last_end if all_ended else None) or now or datetime.now(UTC)
        elapsed = (end - started).total_seconds()
        throughput = (row.done + row.failed) / elapsed if elapsed > 0 else None
    failures: dict[str, int] = {}
    if row.failed:
        failures = {
            kind or "unknown": n
            for kind, n in session.execute(
                select(JobCapture.error_kind, func.count())
                .where(JobCapture.job_id == job_id, JobCapture.state == ItemState.FAILED.value)
                .group_by(JobCapture.error_kind)
            )
        }
    return JobStatus(
        job=row,
        started_at=started,
        finished_at=finished,
        captures=items,
        chunks=by_chunk_state,
        timings=chunk_timings(session, job_id),
        throughput=throughput,
        failures=failures,
    )


def chunk_timings(session: Session, job_id: int) -> ChunkTimings | None:
    rows = session.execute(
        select(
            Chunk.n_items,
            Chunk.started_at,
            Chunk.finished_at,
            Chunk.fetch_s,
            Chunk.gpu_s,
            Chunk.write_s,
        ).where(
            Chunk.job_id == job_id,
            Chunk.state.in_(CHUNK_ENDED),
            Chunk.started_at.is_not(None),
            Chunk.finished_at.is_not(None),
            Chunk.gpu_s.is_not(None),
        )
    )
    n = 0
    fetch = gpu = write = wall = rate = 0.0
    for items, started, finished, fetch_s, gpu_s, write_s in rows:
        seconds = (finished - started).total_seconds()
        n += 1
        fetch += fetch_s or 0.0
        gpu += gpu_s or 0.0
        write += write_s or 0.0
        wall += seconds
        rate += items / seconds if seconds > 0 else 0.0
    if n == 0:
        return None
    return ChunkTimings(n, fetch / n, gpu / n, write / n, wall / n, rate / n)


def deployments(session: Session) -> list[DeploymentRow]:
    captures = (
        select(
            Capture.deployment_id,
            func.count().label("n"),
            func.min(Capture.captured_at).label("first"),
            func.max(Capture.captured_at).label("last"),
        )
        .group_by(Capture.deployment_id)
        .subquery()
    )
    jobs = (
        select(Job.deployment_id, func.count().label("n"))
        .group_by(Job.deployment_id)
        .subquery()
    )
    rows = session.execute(
        select(
            Deployment.id,
            Deployment.name,
            func.coalesce(captures.c.n, 0),
            captures.c.first,
            captures.c.last,
            func.coalesce(jobs.c.n, 0),
        )
        .outerjoin(captures, captures.c.deployment_id == Deployment.id)
        .outerjoin(jobs, jobs.c.deployment_id == Deployment.id)
        .order_by(Deployment.name)
    )
    done = pipelines_done(session)
    return [
        DeploymentRow(name, n, first, last, n_jobs, done.get(dep_id, []))
        for dep_id, name, n, first, last, n_jobs in rows
    ]


def pipelines_done(session: Session) -> dict[int, list[PipelineDone]]:
    """Per deployment id: captures done by each pipeline (by fingerprint), a capture counted
    once however many jobs of that pipeline did it."""
    rows = session.execute(
        select(Job.deployment_id, Job.fingerprint, func.count(func.distinct(JobCapture.capture_id)))
        .join(Job, Job.id == JobCapture.job_id)
        .where(JobCapture.state == ItemState.DONE.value)
        .group_by(Job.deployment_id, Job.fingerprint)
    )
    counts = list(rows)
    first_jobs = dict(session.execute(select(Job.fingerprint, func.min(Job.id)).group_by(
        Job.fingerprint)).all())
    pipelines = job_pipelines(session, list(first_jobs.values()))
    names = {fp: pipelines[job_id].model_names() for fp, job_id in first_jobs.items()}
    out: dict[int, list[PipelineDone]] = {}
    for dep_id, fingerprint, n in counts:
        out.setdefault(dep_id, []).append(PipelineDone(fingerprint, names.get(fingerprint, ""), n))
    for done in out.values():
        done.sort(key=lambda p: (-p.captures, p.fingerprint))
    return out


def _job_row(
    job: Job, deployment: str, items: dict[str, int], pipeline: StoredPipeline
) -> JobRow:
    return JobRow(
        id=job.id,
        deployment=deployment,
        state=job.state,
        n_captures=job.n_captures,
        n_chunks=job.n_chunks,
        done=items.get(ItemState.DONE, 0),
        failed=items.get(ItemState.FAILED, 0),
        created_at=job.created_at,
        fingerprint=job.fingerprint,
        models=pipeline.model_names(),
        pipeline=pipeline.label,
        boxes_from_job_id=job.boxes_from_job_id,
    )
