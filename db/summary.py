"""Per-job result summaries: detections per answer and rank, and the boxes of a few captures
to draw."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.boxes import ClassificationRecord, DetectionRecord
from db.models import Capture, Classification, Detection, JobCapture
from db.states import ItemState


def answer_counts(
    session: Session, job_id: int, classifier: str
) -> list[tuple[str, str | None, int]]:
    """Detections of the job by the classifier's answer and its rank (a label, or the taxon
    its scores rolled up to): (answer, rank, count), most frequent first."""
    rows = session.execute(
        select(Classification.label, Classification.rank, func.count())
        .join(Detection, Detection.id == Classification.detection_id)
        .where(Detection.job_id == job_id, Classification.classifier == classifier)
        .group_by(Classification.label, Classification.rank)
        .order_by(func.count().desc(), Classification.label)
    )
    return [(label, rank, n) for label, rank, n in rows]


def busiest_captures(session: Session, job_id: int, n: int) -> list[tuple[int, str]]:
    """The n done captures of the job with the most detections: (capture id, uri)."""
    counts = (
        select(Detection.capture_id, func.count().label("n"))
        .where(Detection.job_id == job_id)
        .group_by(Detection.capture_id)
        .subquery()
    )
    rows = session.execute(
        select(Capture.id, Capture.uri)
        .join(counts, counts.c.capture_id == Capture.id)
        .join(JobCapture, (JobCapture.capture_id == Capture.id) & (JobCapture.job_id == job_id))
        .where(JobCapture.state == ItemState.DONE)
        .order_by(counts.c.n.desc(), Capture.id)
        .limit(n)
    )
    return [(cid, uri) for cid, uri in rows]


def boxes_of(
    session: Session, job_id: int, capture_id: int, classifier: str
) -> list[DetectionRecord]:
    """A capture's boxes, each with the classifier's answer if it gave one."""
    rows = session.execute(
        select(Detection, Classification.label, Classification.score)
        .outerjoin(
            Classification,
            (Classification.detection_id == Detection.id)
            & (Classification.classifier == classifier),
        )
        .where(Detection.job_id == job_id, Detection.capture_id == capture_id)
        .order_by(Detection.id)
    )
    return [
        DetectionRecord(d.x1, d.y1, d.x2, d.y2, d.score, d.label, id=d.id, classifications=[
            ClassificationRecord(classifier, label, score)] if label is not None else [])
        for d, label, score in rows
    ]
