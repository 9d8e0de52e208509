"""What a worker does to the job store: claim a chunk, write results exactly once, end it.

Every function takes a Session, and the caller runs each call in a transaction of its
own (`with sessions.begin() as s:`), so a crash between two calls leaves the store
consistent: a capture's detections, classifications and its work item's state change
together, and a redelivered chunk only sees the captures still pending.

Works on PostgreSQL and SQLite. Row locks (FOR UPDATE) are what make two deliveries of the
same chunk harmless on PostgreSQL; SQLite serialises writers anyway and ignores them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import bindparam, case, delete, func, insert, literal, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from db.boxes import DetectionRecord
from db.counts import chunk_item_counts, chunk_states
from db.models import Capture, Chunk, Classification, Detection, Job, JobCapture
from db.states import CHUNK_ENDED, JOB_ENDED, ChunkState, ItemState, JobState

chunks_t = Chunk.__table__
jobs_t = Job.__table__
items_t = JobCapture.__table__
captures_t = Capture.__table__
detections_t = Detection.__table__
classifications_t = Classification.__table__

# error_kind of work items failed because their whole chunk was given up.
CHUNK_FAILED_KIND = "chunk_failed"


class ResultLike(Protocol):
    """One capture's outcome; `key` is the capture id (inference.types.ItemResult fits: its
    detections have DetectionRecord's fields)."""

    key: int
    width: int | None
    height: int | None
    detections: Sequence[DetectionRecord]
    error_kind: Any
    error: str | None


class Outcome(StrEnum):
    RUN = "run"  # claimed: process the pending items
    SKIP = "skip"  # already ended or cancelled (or unknown): acknowledge and do nothing
    EXHAUSTED = "exhausted"  # delivered too often without finishing: now failed
    STALE = "stale"  # the chunk was sent again under another task id: that message runs it


@dataclass(frozen=True)
class Claim:
    outcome: Outcome
    chunk_id: int
    job_id: int | None = None
    state: str | None = None  # the chunk's state after the claim
    n_items: int = 0
    n_done: int = 0
    n_failed: int = 0
    deliveries: int = 0
    boxes_from_job_id: int | None = None  # re-classification: the job whose boxes it reuses
    token: ClaimToken | None = None  # what this delivery's writes must still hold


@dataclass(frozen=True)
class ClaimToken:
    """A delivery's hold on its chunk: the chunk's `claim` counter as its claim set it."""

    chunk_id: int
    claim: int


class ClaimLost(Exception):
    """A later delivery claimed the chunk (after the visibility timeout or a requeue): this
    one, e.g. a worker cut off by a network partition and back, must write nothing more."""

    def __init__(self, token: ClaimToken, current: int | None) -> None:
        super().__init__(
            f"chunk {token.chunk_id} was claimed again (claim {current}, this delivery's "
            f"{token.claim}): its writes are refused"
        )


# heartbeat()'s answer to a delivery whose claim was superseded.
SUPERSEDED = "superseded"


# A delivery cut off mid-transaction (a network partition) would keep its row locks, and
# the next delivery waiting on them, until TCP gives up (many minutes): PostgreSQL ends a
# worker's transaction that sits idle this long. Its statements follow each other at once.
WRITE_IDLE_LIMIT_MS = 30_000


def limit_idle(s: Session) -> None:
    """This transaction ends (and frees its locks) if its client goes silent inside it."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {WRITE_IDLE_LIMIT_MS}"))


def check_claim(s: Session, token: ClaimToken) -> None:
    """Fencing, in the caller's write transaction: raise ClaimLost unless the chunk still
    carries this delivery's claim. The chunk row is share-locked until the transaction
    ends, so a new claim (which locks it for update) waits for a write in progress and
    every write after it sees the new claim."""
    limit_idle(s)
    current = s.scalar(
        select(chunks_t.c.claim).where(chunks_t.c.id == token.chunk_id).with_for_update(read=True)
    )
    if current != token.claim:
        raise ClaimLost(token, current)


@dataclass(frozen=True)
class PendingItem:
    capture_id: int
    uri: str


@dataclass(frozen=True)
class WriteCounts:
    done: int
    failed: int
    skipped: int  # no longer pending (written by another delivery): left untouched
    detections: int


def now() -> datetime:
    return datetime.now(UTC)


def claim_chunk(
    s: Session,
    chunk_id: int,
    *,
    worker: str,
    retries: int,
    max_deliveries: int,
    task_id: str | None = None,
) -> Claim:
    """Mark the chunk running (one more attempt and delivery), or say why not to run it.

    `task_id` is the message's: every sender records a chunk's task id before publishing
    (db.dispatch), so a message under another id than the chunk's is an older one (its
    chunk released again after its sender died, or requeued) and is skipped, uncounted.

    `retries` is the Celery retry count of the message. Every start counts as a delivery;
    the starts that no retry explains (deliveries - retries) are redeliveries of a run that
    never ended, e.g. a chunk that kills its worker by running out of memory. Past
    `max_deliveries` of those the chunk is failed for good instead of looping forever.
    """
    limit_idle(s)
    row = s.execute(
        select(Chunk.job_id, Chunk.state, Chunk.deliveries, Chunk.n_items, Chunk.claim,
               Chunk.task_id)
        .where(Chunk.id == chunk_id)
        .with_for_update()
    ).first()
    if row is None:
        return Claim(Outcome.SKIP, chunk_id)
    job_id, state, deliveries, n_items, claimed, current_task = row
    if task_id is not None and current_task is not None and task_id != current_task:
        return Claim(Outcome.STALE, chunk_id, job_id, state, n_items, deliveries=deliveries)
    if state in CHUNK_ENDED:
        return Claim(Outcome.SKIP, chunk_id, job_id, state, n_items, deliveries=deliveries)
    deliveries += 1
    if deliveries - retries > max_deliveries:
        _exhaust(s, chunk_id, job_id, deliveries, worker)
        return Claim(Outcome.EXHAUSTED, chunk_id, job_id, ChunkState.FAILED.value, n_items,
                     deliveries=deliveries)
    _mark_running(s, chunk_id, job_id, worker=worker, deliveries=deliveries, claim=claimed + 1)
    counts = chunk_item_counts(s, chunk_id)
    boxes_from = s.scalar(select(Job.boxes_from_job_id).where(Job.id == job_id))
    return Claim(
        Outcome.RUN,
        chunk_id,
        job_id,
        ChunkState.RUNNING.value,
        n_items,
        n_done=counts.done,
        n_failed=counts.failed,
        deliveries=deliveries,
        boxes_from_job_id=boxes_from,
        token=ClaimToken(chunk_id, claimed + 1),
    )


def _mark_running(
    s: Session, chunk_id: int, job_id: int, *, worker: str, deliveries: int, claim: int
) -> None:
    """The chunk runs under this delivery's claim; its job is running, started at its first
    claim."""
    at = now()
    s.execute(
        update(chunks_t)
        .where(chunks_t.c.id == chunk_id)
        .values(
            state=ChunkState.RUNNING.value,
            worker=worker,
            started_at=at,
            heartbeat_at=at,
            finished_at=None,
            attempts=chunks_t.c.attempts + 1,
            deliveries=deliveries,
            claim=claim,
        )
    )
    j = jobs_t.c
    pending = j.state == JobState.PENDING.value
    s.execute(
        update(jobs_t)
        .where(j.id == job_id, j.started_at.is_(None) | pending)
        .values(
            started_at=func.coalesce(j.started_at, literal(at, j.started_at.type)),
            state=case((pending, JobState.RUNNING.value), else_=j.state),
        )
    )


def _exhaust(s: Session, chunk_id: int, job_id: int, deliveries: int, worker: str) -> None:
    """Fail a chunk delivered too often: its worker dies on it, and would again."""
    s.execute(
        update(chunks_t)
        .where(chunks_t.c.id == chunk_id)
        .values(deliveries=deliveries, worker=worker, heartbeat_at=now())
    )
    _fail_chunk(
        s, chunk_id, job_id,
        f"delivered {deliveries} times without finishing (last on {worker}); "
        "its worker probably died on it (out of memory?)",
    )


def pending_items(s: Session, chunk_id: int) -> list[PendingItem]:
    """The chunk's captures still pending, in capture order: a redelivery skips what is done."""
    rows = s.execute(
        select(JobCapture.capture_id, Capture.uri)
        .join(Capture, Capture.id == JobCapture.capture_id)
        .where(JobCapture.chunk_id == chunk_id, JobCapture.state == ItemState.PENDING.value)
        .order_by(JobCapture.capture_id)
    )
    return [PendingItem(cid, uri) for cid, uri in rows]


def write_results(
    s: Session, job_id: int, results: Sequence[ResultLike], token: ClaimToken | None = None
) -> WriteCounts:
    """Write a batch of captures' results and mark their work items, in the caller's
    transaction: one per batch, committed before the next.

    A chunk's delivery passes its `token`: checked first (check_claim), so the late writes
    of a delivery whose chunk was claimed again are refused with ClaimLost.

    Only items still pending are written: they are locked first, in capture order (so a
    second delivery of the chunk waits here, then skips them, and two never deadlock). A
    capture's results are replaced, never appended: an item written before (attempts > 0,
    e.g. failed, then requeued) loses its old detections first; one never written has none,
    and pays no delete. Per batch that is one lock, one COPY per table, one update of the
    done items and one of the capture sizes unknown or not upright, whatever the batch size.
    """
    if not results:
        return WriteCounts(0, 0, 0, 0)
    if token is not None:
        check_claim(s, token)
    by_key = {r.key: r for r in results}
    at = now()
    jc = items_t.c
    locked = s.execute(
        select(jc.capture_id, jc.attempts)
        .where(
            jc.job_id == job_id,
            jc.capture_id.in_(list(by_key)),
            jc.state == ItemState.PENDING.value,
        )
        .order_by(jc.capture_id)
        .with_for_update()
    ).all()
    todo = [by_key[cid] for cid, _ in locked]
    conn = s.connection()
    written_before = [cid for cid, attempts in locked if attempts]
    if written_before:
        conn.execute(
            delete(detections_t).where(
                detections_t.c.job_id == job_id, detections_t.c.capture_id.in_(written_before)
            )
        )
    ok = [r for r in todo if r.error_kind is None]
    failed = [r for r in todo if r.error_kind is not None]
    n_det = _insert_detections(conn, job_id, ok)
    _record_sizes(conn, todo)
    done = [r.key for r in ok]
    if done:
        conn.execute(
            update(items_t)
            .where(jc.job_id == job_id, jc.capture_id.in_(done))
            .values(
                state=ItemState.DONE.value,
                attempts=jc.attempts + 1,
                error_kind=None,
                error=None,
                finished_at=at,
            )
        )
    if failed:
        conn.execute(
            update(items_t)
            .where(jc.job_id == job_id, jc.capture_id == bindparam("cid"))
            .values(
                state=ItemState.FAILED.value,
                attempts=jc.attempts + 1,
                error_kind=bindparam("kind"),
                error=bindparam("err"),
                finished_at=at,
            ),
            [
                {"cid": r.key, "kind": str(r.error_kind), "err": r.error or str(r.error_kind)}
                for r in failed
            ],
        )
    return WriteCounts(len(done), len(failed), len(results) - len(todo), n_det)


def _insert_detections(conn: Any, job_id: int, results: Sequence[ResultLike]) -> int:
    dets = [(r.key, d) for r in results for d in r.detections]
    if not dets:
        return 0
    classified = any(d.classifications for _, d in dets)
    if conn.dialect.name == "postgresql":
        _insert_detections_pg(conn, job_id, dets, classified)
        return len(dets)
    rows = [
        {
            "job_id": job_id,
            "capture_id": key,
            "x1": float(d.x1),
            "y1": float(d.y1),
            "x2": float(d.x2),
            "y2": float(d.y2),
            "score": float(d.score),
            "label": d.label,
            "source_detection_id": d.source,
            "embedding": d.embedding,
        }
        for key, d in dets
    ]
    if not classified:
        conn.execute(insert(detections_t), rows)
        return len(rows)
    ids = conn.execute(
        insert(detections_t).returning(detections_t.c.id, sort_by_parameter_order=True), rows
    ).scalars().all()
    classes = [
        {
            "detection_id": det_id,
            "classifier": c.classifier,
            "label": c.label,
            "score": float(c.score),
            "topk": [[label, float(score)] for label, score in c.topk] or None,
            "rank": c.rank,
            "prediction_source": c.source,
            "probabilities": c.probabilities,
        }
        for det_id, (_, d) in zip(ids, dets, strict=True)
        for c in d.classifications
    ]
    conn.execute(insert(classifications_t), classes)
    return len(rows)


# PostgreSQL: COPY, the fastest way in. Detection ids are drawn from their sequence first,
# so classifications can point at them in the same transaction. The sequence is looked up
# once per statement (MATERIALIZED), not once per id, and the ids come back as one array:
# that made drawing them 3x faster.
_PG_DETECTION_IDS = text(
    "WITH s AS MATERIALIZED (SELECT pg_get_serial_sequence('detections', 'id')::regclass AS seq) "
    "SELECT array_agg(nextval(s.seq)) FROM s, generate_series(1, :n)"
)
_PG_COPY_DETECTIONS = (
    "COPY detections (id, job_id, capture_id, x1, y1, x2, y2, score, label, "
    "source_detection_id, embedding) FROM STDIN"
)
_PG_COPY_CLASSIFICATIONS = (
    "COPY classifications (detection_id, classifier, label, score, topk, rank, "
    "prediction_source, probabilities) FROM STDIN"
)


def _insert_detections_pg(
    conn: Any, job_id: int, dets: list[tuple[int, DetectionRecord]], classified: bool
) -> None:
    ids = conn.execute(_PG_DETECTION_IDS, {"n": len(dets)}).scalar_one()
    dbapi_error = conn.dialect.loaded_dbapi.Error
    statement = _PG_COPY_DETECTIONS
    try:
        with conn.connection.driver_connection.cursor() as cur:
            with cur.copy(statement) as copy:
                for det_id, (key, d) in zip(ids, dets, strict=True):
                    copy.write_row((det_id, job_id, key, float(d.x1), float(d.y1),
                                    float(d.x2), float(d.y2), float(d.score), d.label,
                                    d.source, d.embedding))
            if not classified:
                return
            statement = _PG_COPY_CLASSIFICATIONS
            with cur.copy(statement) as copy:
                for det_id, (_, d) in zip(ids, dets, strict=True):
                    for c in d.classifications:
                        topk = (json.dumps([[label, float(score)] for label, score in c.topk])
                                if c.topk else None)
                        copy.write_row((det_id, c.classifier, c.label, float(c.score), topk,
                                        c.rank, c.source, c.probabilities))
    except dbapi_error as e:
        # COPY goes around SQLAlchemy's execute(): wrap the driver's error the way execute()
        # would (OperationalError for a lost connection or a serialization failure, ...), so
        # callers tell transient errors from the rest in one way.
        raise sa_exc.DBAPIError.instance(
            statement, None, e, dbapi_error, dialect=conn.dialect
        ) from e


def _record_sizes(conn: Any, results: Sequence[ResultLike]) -> None:
    """Record the image sizes of captures whose size is unknown or other than the decoded one:
    one UPDATE per distinct size, and a camera's captures share one, so a batch costs one
    statement. The decoded size is upright (EXIF orientation applied), as the boxes are, so
    exports can normalise boxes by it."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for r in results:
        if r.width and r.height:
            by_size.setdefault((r.width, r.height), []).append(r.key)
    for (width, height), keys in by_size.items():
        conn.execute(
            update(captures_t)
            .where(
                captures_t.c.id.in_(keys),
                captures_t.c.width.is_distinct_from(width)
                | captures_t.c.height.is_distinct_from(height),
            )
            .values(width=width, height=height)
        )


def heartbeat(s: Session, chunk_id: int, token: ClaimToken | None = None) -> str | None:
    """Refresh the chunk's heartbeat and live counts; returns its state, or SUPERSEDED
    (and refreshes nothing) once another delivery claimed it after `token`'s.

    A run that reads back anything but `running` stops.
    """
    c = chunks_t.c
    held = [c.claim == token.claim] if token is not None else []
    limit_idle(s)
    s.execute(
        update(chunks_t)
        .where(c.id == chunk_id, c.state == ChunkState.RUNNING.value, *held)
        .values(heartbeat_at=now(), **chunk_item_counts(s, chunk_id).columns())
    )
    state, claim = s.execute(select(c.state, c.claim).where(c.id == chunk_id)).one()
    return SUPERSEDED if token is not None and claim != token.claim else state


def finish_chunk(
    s: Session,
    chunk_id: int,
    *,
    fetch_s: float,
    gpu_s: float,
    write_s: float,
    metrics: dict[str, Any],
    token: ClaimToken | None = None,
) -> str | None:
    """End a chunk `done` with its timings, and the job too if it was its last chunk.

    With `token`, only while that delivery still holds the chunk (check_claim).
    Returns the job's state when this call ended the job, else None.
    """
    job_id = _lock_job_of(s, chunk_id)
    if job_id is None:
        return None
    if token is not None:
        check_claim(s, token)
    s.execute(
        update(chunks_t)
        .where(chunks_t.c.id == chunk_id, chunks_t.c.state.not_in(CHUNK_ENDED))
        .values(
            state=ChunkState.DONE.value,
            finished_at=now(),
            heartbeat_at=now(),
            **chunk_item_counts(s, chunk_id).columns(),
            fetch_s=fetch_s,
            gpu_s=gpu_s,
            write_s=write_s,
            metrics=metrics,
            error=None,
        )
    )
    return _finish_job_if_ended(s, job_id)


def fail_chunk(s: Session, chunk_id: int, error: str) -> str | None:
    """Give a chunk up: it and its pending work items become `failed` with `error`.

    Returns the job's state when this call ended the job, else None.
    """
    job_id = _lock_job_of(s, chunk_id)
    if job_id is None:
        return None
    return _fail_chunk(s, chunk_id, job_id, error)


def mark_retrying(s: Session, chunk_id: int, error: str, delivery: int) -> None:
    """A running chunk whose retry was scheduled goes back to `queued`, with the reason.

    Only if no later delivery claimed it meanwhile: the retry message is out before Celery
    calls its on_retry hook, and a short countdown lets another worker start it first.
    """
    c = chunks_t.c
    s.execute(
        update(chunks_t)
        .where(c.id == chunk_id, c.state == ChunkState.RUNNING.value, c.deliveries == delivery)
        .values(state=ChunkState.QUEUED.value, error=error, heartbeat_at=now())
    )


def _fail_chunk(s: Session, chunk_id: int, job_id: int, error: str) -> str | None:
    at = now()
    jc = items_t.c
    s.execute(
        update(items_t)
        .where(jc.chunk_id == chunk_id, jc.state == ItemState.PENDING.value)
        .values(
            state=ItemState.FAILED.value,
            error_kind=CHUNK_FAILED_KIND,
            error=error,
            finished_at=at,
        )
    )
    s.execute(
        update(chunks_t)
        .where(chunks_t.c.id == chunk_id, chunks_t.c.state.not_in(CHUNK_ENDED))
        .values(
            state=ChunkState.FAILED.value,
            finished_at=at,
            error=error,
            **chunk_item_counts(s, chunk_id).columns(),
        )
    )
    return _finish_job_if_ended(s, job_id)


def _lock_job_of(s: Session, chunk_id: int) -> int | None:
    # The job row is locked first, so two chunks ending at once cannot both see the other
    # still running and leave the job unfinished.
    job_id = s.scalar(select(Chunk.job_id).where(Chunk.id == chunk_id))
    if job_id is not None:
        s.execute(select(Job.id).where(Job.id == job_id).with_for_update())
    return job_id


def _finish_job_if_ended(s: Session, job_id: int) -> str | None:
    by_state = chunk_states(s, job_id)
    if any(state not in CHUNK_ENDED for state in by_state):
        return None
    state = JobState.FAILED.value if by_state.get(ChunkState.FAILED.value) else JobState.DONE.value
    ended = s.execute(
        update(jobs_t)
        .where(jobs_t.c.id == job_id, jobs_t.c.state.not_in(JOB_ENDED))
        .values(state=state, finished_at=now()),
        execution_options={"preserve_rowcount": True},
    ).rowcount
    return state if ended else None

