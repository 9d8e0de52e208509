"""Export a job's detections, one row per detection, streamed from the database.

Rows come through a server-side cursor (yield_per) ordered by capture and detection, and
the classifications of one detection are folded into its row as they stream by, so memory
stays flat whatever the size of the job.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Capture, Classification, Detection, Job

Format = Literal["csv", "jsonl"]
STREAM_ROWS = 5000
SAMPLE_DETECTIONS = 10_000


@dataclass
class DetectionRow:
    capture_id: int
    uri: str
    captured_at: datetime | None
    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    label: str
    classes: dict[str, tuple[str, float]]  # classifier -> (label, score)


def classifiers_of(session: Session, job_id: int) -> list[str]:
    """The classifier names of this job: the CSV's extra column pairs.

    Taken from the job's pipeline (filter first, then the classifier), plus any other name
    found on the job's first detections, so a big job is not scanned whole to learn them.
    """
    pipeline = session.scalar(select(Job.pipeline).where(Job.id == job_id)) or {}
    names = [
        part["name"]
        for part in (pipeline.get("filter"), pipeline.get("classifier"))
        if isinstance(part, dict) and part.get("name")
    ]
    first = select(Detection.id).where(Detection.job_id == job_id).limit(SAMPLE_DETECTIONS)
    found = session.scalars(
        select(Classification.classifier)
        .where(Classification.detection_id.in_(first.scalar_subquery()))
        .distinct()
    )
    return names + sorted(set(found) - set(names))


def detection_rows(session: Session, job_id: int) -> Iterator[DetectionRow]:
    d, c, k = Detection, Capture, Classification
    stmt = (
        select(
            d.id, d.capture_id, c.uri, c.captured_at, d.x1, d.y1, d.x2, d.y2, d.score, d.label,
            k.classifier, k.label, k.score,
        )
        .join(c, c.id == d.capture_id)
        .outerjoin(k, k.detection_id == d.id)
        .where(d.job_id == job_id)
        .order_by(d.capture_id, d.id, k.id)
        .execution_options(yield_per=STREAM_ROWS)
    )
    current: DetectionRow | None = None
    current_id = None
    for det_id, cap_id, uri, at, x1, y1, x2, y2, score, label, name, k_label, k_score in (
        session.execute(stmt)
    ):
        if det_id != current_id:
            if current is not None:
                yield current
            current_id = det_id
            current = DetectionRow(cap_id, uri, at, x1, y1, x2, y2, score, label, {})
        if name is not None and current is not None:
            current.classes[name] = (k_label, k_score)
    if current is not None:
        yield current


def export_job(
    factory: sessionmaker[Session], job_id: int, fmt: Format, out: TextIO
) -> int:
    """Write the job's detections to `out`; returns how many rows were written."""
    n = 0
    with factory() as session:
        names = classifiers_of(session, job_id)
        rows = detection_rows(session, job_id)
        if fmt == "csv":
            writer = csv.writer(out)
            writer.writerow(
                ["capture_id", "uri", "captured_at", "x1", "y1", "x2", "y2", "score", "label"]
                + [f"{name}_{col}" for name in names for col in ("label", "score")]
            )
            for r in rows:
                extra: list[Any] = []
                for name in names:
                    extra.extend(r.classes.get(name, ("", "")))
                writer.writerow(
                    [r.capture_id, r.uri, _iso(r.captured_at), r.x1, r.y1, r.x2, r.y2, r.score,
                     r.label, *extra]
                )
                n += 1
        else:
            for r in rows:
                record = {
                    "capture_id": r.capture_id,
                    "uri": r.uri,
                    "captured_at": _iso(r.captured_at),
                    "box": [r.x1, r.y1, r.x2, r.y2],
                    "score": r.score,
                    "label": r.label,
                    "classifications": {
                        name: {"label": lbl, "score": sc} for name, (lbl, sc) in r.classes.items()
                    },
                }
                out.write(json.dumps(record) + "\n")
                n += 1
    return n


def _iso(t: datetime | None) -> str:
    return t.isoformat() if t is not None else ""
