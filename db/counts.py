"""Counting work items and chunks by state: each of these queries is written once, here.

The worker's claims, heartbeats and chunk ends (db.results) and `trapq status` (db.status)
read the same counts; the work items are the truth, the chunk's n_done/n_failed a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Chunk, JobCapture
from db.states import ItemState


@dataclass(frozen=True)
class ItemCounts:
    """A chunk's work items that have ended, by outcome."""

    done: int
    failed: int

    def columns(self) -> dict[str, int]:
        """The chunk row's copy of these counts, as update values."""
        return {"n_done": self.done, "n_failed": self.failed}


def chunk_item_counts(session: Session, chunk_id: int) -> ItemCounts:
    by_state = dict(
        session.execute(
            select(JobCapture.state, func.count())
            .where(JobCapture.chunk_id == chunk_id)
            .group_by(JobCapture.state)
        ).all()
    )
    done, failed = (by_state.get(state.value, 0) for state in (ItemState.DONE, ItemState.FAILED))
    return ItemCounts(done, failed)


def job_item_counts(session: Session, job_ids: list[int]) -> dict[int, dict[str, int]]:
    """Work items of each job by state (states without items left out)."""
    counts: dict[int, dict[str, int]] = {}
    if not job_ids:
        return counts
    rows = session.execute(
        select(JobCapture.job_id, JobCapture.state, func.count())
        .where(JobCapture.job_id.in_(job_ids))
        .group_by(JobCapture.job_id, JobCapture.state)
    )
    for job_id, state, n in rows:
        counts.setdefault(job_id, {})[state] = n
    return counts


def chunk_states(session: Session, job_id: int) -> dict[str, int]:
    """The job's chunks by state."""
    return dict(
        session.execute(
            select(Chunk.state, func.count()).where(Chunk.job_id == job_id).group_by(Chunk.state)
        ).all()
    )
