"""What exports read: a job's context and its results, streamed from a server-side cursor.

Results come as one ordered query (work items, their detections, their classifications) read
with yield_per and folded into one record per capture as they stream by, so memory holds one
capture's detections at a time whatever the size of the job.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from db.boxes import ClassificationRecord, DetectionRecord
from db.counts import job_item_counts
from db.errors import NoSuchJob
from db.models import Capture, Classification, Deployment, Detection, Job, JobCapture
from db.pipelines import StoredPipeline, job_pipeline
from db.states import ItemState

STREAM_ROWS = 5000
SAMPLE_DETECTIONS = 10_000


@dataclass(frozen=True)
class JobContext:
    job_id: int
    state: str
    pipeline: StoredPipeline
    created_at: datetime
    finished_at: datetime | None
    deployment: Deployment


@dataclass
class CaptureRecord:
    capture_id: int
    uri: str
    captured_at: datetime | None
    width: int | None
    height: int | None
    state: str  # the work item's: pending, done or failed
    error: str | None
    finished_at: datetime | None
    detections: list[DetectionRecord] = field(default_factory=list)


@dataclass(frozen=True)
class JobCounts:
    by_state: dict[str, int]
    done_without_size: int  # done captures whose pixel size is unknown (processed long ago)
    without_time: int  # captures with no timestamp at all
    first: datetime | None
    last: datetime | None


def job_context(session: Session, job_id: int) -> JobContext:
    row = session.execute(
        select(Job, Deployment).join(Deployment, Deployment.id == Job.deployment_id)
        .where(Job.id == job_id)
    ).first()
    if row is None:
        raise NoSuchJob(job_id)
    job, deployment = row
    return JobContext(
        job_id=job.id,
        state=job.state,
        pipeline=job_pipeline(session, job_id),
        created_at=job.created_at,
        finished_at=job.finished_at,
        deployment=deployment,
    )


def job_counts(session: Session, job_id: int) -> JobCounts:
    """What an export checks before writing anything, in two aggregate queries."""
    jc, c = JobCapture, Capture
    by_state = job_item_counts(session, [job_id]).get(job_id, {})
    done = jc.state == ItemState.DONE.value
    no_size, no_time, first, last = session.execute(
        select(
            func.count().filter(and_(done, c.width.is_(None))),
            func.count().filter(c.captured_at.is_(None)),
            func.min(c.captured_at),
            func.max(c.captured_at),
        )
        .select_from(jc)
        .join(c, c.id == jc.capture_id)
        .where(jc.job_id == job_id)
    ).one()
    return JobCounts(by_state, no_size, no_time, first, last)


def capture_records(session: Session, job_id: int) -> Iterator[CaptureRecord]:
    """Every capture of the job in capture order, with its detections and classifications."""
    jc, c, d, k = JobCapture, Capture, Detection, Classification
    stmt = (
        select(
            jc.capture_id, c.uri, c.captured_at, c.width, c.height, jc.state, jc.error,
            jc.finished_at, d.id, d.x1, d.y1, d.x2, d.y2, d.score, d.label, d.occurrence_id,
            k.classifier, k.label, k.score, k.topk, k.rank, k.prediction_source,
        )
        .select_from(jc)
        .join(c, c.id == jc.capture_id)
        .outerjoin(d, and_(d.job_id == jc.job_id, d.capture_id == jc.capture_id))
        .outerjoin(k, k.detection_id == d.id)
        .where(jc.job_id == job_id)
        .order_by(jc.capture_id, d.id, k.id)
        .execution_options(yield_per=STREAM_ROWS)
    )
    current: CaptureRecord | None = None
    detection: DetectionRecord | None = None
    for (cap_id, uri, at, width, height, state, error, finished, det_id, x1, y1, x2, y2, score,
         label, occurrence, classifier, k_label, k_score, topk, rank, source) in session.execute(
            stmt):
        if current is None or cap_id != current.capture_id:
            if current is not None:
                yield current
            current = CaptureRecord(cap_id, uri, at, width, height, state, error, finished)
            detection = None
        if det_id is None:
            continue
        if detection is None or detection.id != det_id:
            detection = DetectionRecord(x1, y1, x2, y2, score, label, id=det_id,
                                        occurrence_id=occurrence)
            current.detections.append(detection)
        if classifier is not None:
            ranked = [(str(lbl), float(sc)) for lbl, sc in topk] if topk else []
            detection.classifications.append(ClassificationRecord(
                classifier, k_label, k_score, ranked or [(k_label, k_score)], rank, source
            ))
    if current is not None:
        yield current


def classifiers_of(session: Session, job_id: int) -> list[str]:
    """The classifier names of this job: the flat exports' extra column pairs.

    Taken from the job's pipeline (filter first, then the classifier), plus any other name
    found on the job's first detections, so a big job is not scanned whole to learn them.
    """
    pipeline = job_pipeline(session, job_id)
    names = [model.name for model in (pipeline.filter, pipeline.classifier) if model is not None]
    first = select(Detection.id).where(Detection.job_id == job_id).limit(SAMPLE_DETECTIONS)
    found = session.scalars(
        select(Classification.classifier)
        .where(Classification.detection_id.in_(first.scalar_subquery()))
        .distinct()
    )
    return names + sorted(set(found) - set(names))
