"""What re-applying a taxa list or threshold reads and writes: a finished job's species
classifications with their stored softmax, their new answers, and the job's new pipeline.

The whole re-application is one transaction (the caller's), so a job never shows half its
answers under one list and half under another.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from db.models import Classification, Detection, Job

STREAM_ROWS = 5000
classifications_t = Classification.__table__


@dataclass(frozen=True)
class StoredAnswer:
    id: int
    label: str
    rank: str | None
    probabilities: bytes


@dataclass(frozen=True)
class NewAnswer:
    id: int
    label: str
    score: float
    rank: str | None
    source: str
    topk: list[list[Any]]


def missing_probabilities(session: Session, job_id: int, classifier: str, size: int) -> int:
    """The job's classifications by `classifier` without a stored softmax of `size` bytes."""
    return int(session.scalar(
        select(func.count())
        .select_from(Classification)
        .join(Detection, Detection.id == Classification.detection_id)
        .where(
            Detection.job_id == job_id,
            Classification.classifier == classifier,
            (Classification.probabilities.is_(None))
            | (func.length(Classification.probabilities) != size),
        )
    ) or 0)


def stored_answers(
    session: Session, job_id: int, classifier: str
) -> Iterator[list[StoredAnswer]]:
    """The job's classifications by `classifier`, in batches, streamed."""
    rows = session.execute(
        select(Classification.id, Classification.label, Classification.rank,
               Classification.probabilities)
        .join(Detection, Detection.id == Classification.detection_id)
        .where(Detection.job_id == job_id, Classification.classifier == classifier)
        .order_by(Classification.id)
        .execution_options(yield_per=STREAM_ROWS)
    )
    for part in rows.partitions(STREAM_ROWS):
        yield [StoredAnswer(cid, label, rank, probs) for cid, label, rank, probs in part]


def write_answers(session: Session, answers: Sequence[NewAnswer]) -> None:
    c = classifications_t.c
    session.connection().execute(
        update(classifications_t)
        .where(c.id == bindparam("cid"))
        .values(label=bindparam("label"), score=bindparam("score"), rank=bindparam("rank"),
                prediction_source=bindparam("source"), topk=bindparam("topk")),
        [{"cid": a.id, "label": a.label, "score": a.score, "rank": a.rank, "source": a.source,
          "topk": a.topk} for a in answers],
    )


def set_job_pipeline(session: Session, job_id: int, pipeline: dict[str, Any],
                     fingerprint: str) -> None:
    """The job's own copy of its spec, now under the re-applied list or threshold."""
    session.execute(
        update(Job).where(Job.id == job_id).values(pipeline=pipeline, fingerprint=fingerprint)
    )
