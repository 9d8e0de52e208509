"""The flat exports: one row per detection (box in pixels, scores, labels) as CSV or JSONL.

Each classifier gives its label, score, the label's rank (with a taxonomy: a label, or the
higher taxon its scores rolled up to) and how the answer was reached (prediction_source).
Every row names the job's pipeline (NAME@VERSION) and its fingerprint, last, so a file read
by itself still says what made it.

Rows stream from db.export_rows.capture_records, so memory stays flat whatever the job's size.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any, TextIO

from sqlalchemy.orm import Session

from db.boxes import DetectionRecord
from db.export_rows import CaptureRecord, capture_records, classifiers_of
from db.pipelines import job_pipeline


def write_csv(session: Session, job_id: int, out: TextIO) -> int:
    """Write the job's detections as CSV; returns how many rows were written."""
    names = classifiers_of(session, job_id)
    made_by = _pipeline(session, job_id)
    writer = csv.writer(out)
    writer.writerow(
        ["capture_id", "uri", "captured_at", "x1", "y1", "x2", "y2", "score", "label"]
        + [f"{name}_{col}" for name in names for col in ("label", "score", "rank", "source")]
        + list(made_by)
    )
    n = 0
    for c, d in _detections(session, job_id):
        extra: list[Any] = []
        for name in names:
            answer = d.classification(name)
            extra += ([answer.label, answer.score, answer.rank or "", answer.source or ""]
                      if answer else ["", "", "", ""])
        writer.writerow(
            [c.capture_id, c.uri, _iso(c.captured_at), d.x1, d.y1, d.x2, d.y2, d.score, d.label,
             *extra, *made_by.values()]
        )
        n += 1
    return n


def write_jsonl(session: Session, job_id: int, out: TextIO) -> int:
    """Write the job's detections as JSON lines; returns how many lines were written."""
    made_by = _pipeline(session, job_id)
    n = 0
    for c, d in _detections(session, job_id):
        record = {
            "capture_id": c.capture_id,
            "uri": c.uri,
            "captured_at": _iso(c.captured_at),
            "box": [d.x1, d.y1, d.x2, d.y2],
            "score": d.score,
            "label": d.label,
            "classifications": {
                a.classifier: {"label": a.label, "score": a.score, "rank": a.rank,
                               "prediction_source": a.source}
                for a in d.classifications
            },
            **made_by,
        }
        out.write(json.dumps(record) + "\n")
        n += 1
    return n


def _detections(session: Session, job_id: int) -> Iterator[tuple[CaptureRecord, DetectionRecord]]:
    """The job's detections in capture order, each with its capture."""
    for capture in capture_records(session, job_id):
        for detection in capture.detections:
            yield capture, detection


def _pipeline(session: Session, job_id: int) -> dict[str, str]:
    stored = job_pipeline(session, job_id)
    return {"pipeline": stored.label, "pipeline_fingerprint": stored.fingerprint}


def _iso(t: datetime | None) -> str:
    return t.isoformat() if t is not None else ""
