"""The flat exports: one row per detection (box in pixels, scores, labels) as CSV or JSONL.

Each classifier gives its label, score, the label's rank (with a taxonomy: a label, or the
higher taxon its scores rolled up to) and how the answer was reached (prediction_source).

Rows stream from db.export_rows.detection_rows, so memory stays flat whatever the job's size.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime
from typing import Any, TextIO

from sqlalchemy.orm import Session

from db.export_rows import classifiers_of, detection_rows


def write_csv(session: Session, job_id: int, out: TextIO) -> int:
    """Write the job's detections as CSV; returns how many rows were written."""
    names = classifiers_of(session, job_id)
    writer = csv.writer(out)
    writer.writerow(
        ["capture_id", "uri", "captured_at", "x1", "y1", "x2", "y2", "score", "label"]
        + [f"{name}_{col}" for name in names for col in ("label", "score", "rank", "source")]
    )
    n = 0
    for r in detection_rows(session, job_id):
        extra: list[Any] = []
        for name in names:
            answer = r.classes.get(name)
            extra += ([answer.label, answer.score, answer.rank or "", answer.source or ""]
                      if answer else ["", "", "", ""])
        writer.writerow(
            [r.capture_id, r.uri, _iso(r.captured_at), r.x1, r.y1, r.x2, r.y2, r.score, r.label,
             *extra]
        )
        n += 1
    return n


def write_jsonl(session: Session, job_id: int, out: TextIO) -> int:
    """Write the job's detections as JSON lines; returns how many lines were written."""
    n = 0
    for r in detection_rows(session, job_id):
        record = {
            "capture_id": r.capture_id,
            "uri": r.uri,
            "captured_at": _iso(r.captured_at),
            "box": [r.x1, r.y1, r.x2, r.y2],
            "score": r.score,
            "label": r.label,
            "classifications": {
                name: {"label": a.label, "score": a.score, "rank": a.rank,
                       "prediction_source": a.source}
                for name, a in r.classes.items()
            },
        }
        out.write(json.dumps(record) + "\n")
        n += 1
    return n


def _iso(t: datetime | None) -> str:
    return t.isoformat() if t is not None else ""
