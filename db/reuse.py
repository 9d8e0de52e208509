"""Re-classification: which earlier job's boxes a new job may reuse, and loading those boxes.

A job whose detector and box threshold equal an earlier job's would find the same boxes
again, so it reuses that job's detections: its workers skip the detector and run only the
crop classifiers (images are still fetched and decoded, to cut the crops). A capture the
source job has not done (failed, or not in it) is detected as usual, so a re-classification
job covers every capture it was enqueued for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.boxes import DetectionRecord
from db.errors import NoSuchJob
from db.models import Detection, Job, JobCapture
from db.pipelines import detector_fingerprint, job_pipeline
from db.states import ItemState, JobState


def box_source_problem(
    session: Session, deployment_id: int, pipeline: dict[str, Any], job_id: int
) -> str | None:
    """Why job `job_id` cannot lend its boxes to a new job of `pipeline`, or None if it can;
    NoSuchJob if there is no such job."""
    found = session.execute(
        select(Job.deployment_id, Job.detector_fingerprint).where(Job.id == job_id)
    ).first()
    if found is None:
        raise NoSuchJob(job_id)
    dep, theirs = found
    if dep != deployment_id:
        return f"job {job_id} is of another deployment"
    if theirs == detector_fingerprint(pipeline):
        return None
    source = job_pipeline(session, job_id)
    if detector_fingerprint(
        {**source.spec, "box_threshold": pipeline.get("box_threshold")}
    ) == detector_fingerprint(pipeline):
        return f"job {job_id} ran another box threshold than the one configured now"
    return f"job {job_id} ran another detector than the one configured now"


def find_box_source(session: Session, deployment_id: int, pipeline: dict[str, Any]) -> int | None:
    """The newest `done` job of the deployment with the same detector and box threshold
    (by the indexed detector fingerprint)."""
    return session.scalar(
        select(Job.id)
        .where(
            Job.deployment_id == deployment_id,
            Job.detector_fingerprint == detector_fingerprint(pipeline),
            Job.state == JobState.DONE.value,
        )
        .order_by(Job.id.desc())
        .limit(1)
    )


def stored_boxes(
    s: Session, source_job_id: int, capture_ids: Sequence[int]
) -> dict[int, list[DetectionRecord]]:
    """The job's boxes per capture it has done (an empty list: done, nothing found), each
    with its id and its original detection as `source` (its own id, or the one it copies).

    Captures it has not done are absent: they are to be detected afresh.
    """
    if not capture_ids:
        return {}
    done = s.scalars(
        select(JobCapture.capture_id).where(
            JobCapture.job_id == source_job_id,
            JobCapture.capture_id.in_(list(capture_ids)),
            JobCapture.state == ItemState.DONE.value,
        )
    ).all()
    boxes: dict[int, list[DetectionRecord]] = {cid: [] for cid in done}
    if not boxes:
        return boxes
    rows = s.execute(
        select(
            Detection.capture_id,
            Detection.id,
            func.coalesce(Detection.source_detection_id, Detection.id),
            Detection.x1,
            Detection.y1,
            Detection.x2,
            Detection.y2,
            Detection.score,
            Detection.label,
        )
        .where(Detection.job_id == source_job_id, Detection.capture_id.in_(list(boxes)))
        .order_by(Detection.capture_id, Detection.id)
    )
    for cid, det_id, source, x1, y1, x2, y2, score, label in rows:
        boxes[cid].append(DetectionRecord(x1, y1, x2, y2, score, label, id=det_id, source=source))
    return boxes
