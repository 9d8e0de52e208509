"""The chunk task: claim a chunk, run its pending captures through the engine, write back.

Exactly once: results are written per batch of captures in one transaction that also marks
their work items (db.results.write_results), and a redelivered or retried chunk only loads
the captures still pending. Progress goes to Celery (state PROGRESS, shown by Flower) and to
the chunk row (heartbeat, live counts).

Deadline: the default threads pool (and solo) ignore Celery's soft and hard time limits, so
the task enforces settings.chunk_soft_time_limit_s itself, from a timer (tasks.worker.chunk_watch,
which beats the heartbeat too) whatever the engine is doing: past it the run stops, what is
written stays written, and the chunk is retried for the rest. In the prefork pool Celery's
own limits apply as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import kombu.exceptions
import redis.exceptions
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.utils.log import get_task_logger
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Chunk
from db.pipelines import job_pipeline
from db.results import (
    Claim,
    ClaimLost,
    ClaimToken,
    Outcome,
    PendingItem,
    claim_chunk,
    fail_chunk,
    finish_chunk,
    heartbeat,
    mark_retrying,
    pending_items,
    write_results,
)
from db.reuse import stored_boxes
from db.states import ChunkState
from inference.device_fault import DeviceFault
from inference.model_cache import CachedPipeline
from inference.types import Detection, ItemResult, RunStats, WorkItem
from tasks.celery_app import PROCESS_CHUNK, TRACK_JOB, app
from tasks.settings import get_settings
from tasks.worker.boot import Runtime, memory_guard, runtime, stop_for_device_fault
from tasks.worker.chunk_watch import ChunkStopped, ChunkWatch, Interruptible

log = get_task_logger(__name__)

FLUSH_AFTER_S = 1.0  # longest a finished capture waits in the write buffer
ERROR_CHARS = 500


class Transient(Exception):
    """Not the chunk's own fault and worth another try: Celery retries it (ChunkTask).
    Raised as is by the chunk, or wrapping (as __cause__) what is_transient picks out."""


class ChunkRetry(Transient):
    """Every capture failed transiently (the image host is down), or the chunk ran past its
    deadline."""


def is_transient(exc: BaseException) -> bool:
    """Errors of the database, broker, network or device, not of the chunk: retry with
    backoff. The one place that says so; bad input never is (it fails its capture alone)."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc,
        (
            Transient,
            DeviceFault,  # the GPU's, not the chunk's: retried by a fresh worker process
            SoftTimeLimitExceeded,
            sa_exc.OperationalError,
            kombu.exceptions.OperationalError,
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            ConnectionError,
            TimeoutError,
        ),
    )


def describe(exc: BaseException) -> str:
    """One line for the chunk row and the log: a database error without its SQL and
    parameters (a batch's worth), anything else cut to a readable length."""
    if type(exc) is Transient and exc.__cause__ is not None:
        return describe(exc.__cause__)
    if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        detail = str(exc.orig).strip().splitlines()
        return f"{type(exc).__name__} ({type(exc.orig).__name__}): {detail[0] if detail else ''}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:ERROR_CHARS]}" if text else type(exc).__name__


def work_items(
    rt: Runtime, items: list[PendingItem], boxes_from_job_id: int | None
) -> list[WorkItem]:
    """The engine's items; a re-classification job's come with the source job's boxes (its
    captures that the source has not done carry none and are detected)."""
    if boxes_from_job_id is None:
        return [WorkItem(i.capture_id, i.uri) for i in items]
    with rt.sessions.begin() as session:
        stored = stored_boxes(session, boxes_from_job_id, [i.capture_id for i in items])
    work = []
    for i in items:
        boxes = stored.get(i.capture_id)
        given = None if boxes is None else tuple(
            Detection(b.x1, b.y1, b.x2, b.y2, b.score, b.label, source=b.source) for b in boxes
        )
        work.append(WorkItem(i.capture_id, i.uri, given))
    return work


class ChunkTask(Task):
    """Celery's own retry for Transient errors: exponential backoff with full jitter, from
    the TRAPQ_RETRY_* settings, at most TRAPQ_MAX_RETRIES times. The hooks keep the chunk row
    true: `running` with the reason while a retry waits, `failed` (its pending captures too)
    once no retry is left or for any other error, and the memory guard after every run.
    Failures re-raise, so Flower shows the task as failed; `trapq requeue --failed` resends.
    """

    _s = get_settings()
    autoretry_for = (Transient,)
    max_retries = _s.max_retries
    retry_backoff = _s.retry_backoff_s
    retry_backoff_max = _s.retry_backoff_max_s
    retry_jitter = _s.retry_jitter

    def on_retry(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        error = f"retry {self.request.retries + 1}/{self.max_retries}: {describe(exc)}"
        log.warning("chunk %s: %s", args[0], error)
        delivery = getattr(self.request, "chunk_delivery", None)
        if delivery is not None:  # None: it failed before its claim, the row is as it was
            _best_effort(args[0], error, lambda s: mark_retrying(s, args[0], error, delivery))

    def on_failure(
        self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        error = describe(exc)
        if isinstance(exc, Transient):
            error = f"gave up after {self.request.retries} retries: {error}"
        log.error("chunk %s failed: %s", args[0], error, exc_info=not isinstance(exc, Transient))
        ended: list[int] = []

        def record(s: Session) -> None:
            if fail_chunk(s, args[0], error):  # the job ended with this chunk: track it
                job_id = s.scalar(select(Chunk.job_id).where(Chunk.id == args[0]))
                ended.extend([job_id] if job_id is not None else [])

        _best_effort(args[0], error, record)
        for job_id in ended:
            send_tracking(job_id)

    def after_return(self, *_: Any, **__: Any) -> None:
        memory_guard()


@app.task(bind=True, base=ChunkTask, name=PROCESS_CHUNK)
def process_chunk(self: ChunkTask, chunk_id: int) -> dict[str, Any]:
    """Process one chunk; what is_transient picks out goes to Celery's retry as Transient."""
    try:
        return _ChunkRun(self, runtime(), chunk_id).execute()
    except Transient:
        raise
    except ClaimLost as lost:  # not a failure: the delivery that holds the chunk goes on
        log.warning("chunk %s: %s; this delivery stops", chunk_id, lost)
        return {"chunk_id": chunk_id, "state": "superseded"}
    except Exception as exc:
        if isinstance(exc, DeviceFault):
            stop_for_device_fault(describe(exc))
        if is_transient(exc):
            raise Transient(describe(exc)) from exc
        raise


def send_tracking(job_id: int) -> None:
    """Occurrences once a job has ended (tasks.tracking), done or failed. Sent once: only the
    transaction that ended the job sees it end."""
    if get_settings().track_after_job:
        app.send_task(TRACK_JOB, args=[job_id])


def _best_effort(chunk_id: int, error: str, record: Callable[[Session], object]) -> None:
    # Recording why may fail for the very reason we are here (the database is gone); the
    # chunk then stays `running` with an old heartbeat, which `trapq requeue --stuck-after`
    # finds.
    try:
        with runtime().sessions.begin() as session:
            record(session)
    except Exception as e:
        log.warning("chunk %s: could not record %r: %s", chunk_id, error, e)


@dataclass
class _ChunkRun:
    """One delivery of a chunk: execute() reads as the steps it takes; the bookkeeping of each
    step (claim, write buffer, progress, deadline, end) is a method of its own."""

    task: Task
    rt: Runtime
    chunk_id: int
    started: float = field(default_factory=time.monotonic)
    buffer: list[ItemResult] = field(default_factory=list)
    held: list[ItemResult] = field(default_factory=list)  # transient failures, all so far
    write_s: float = 0.0
    n_written: int = 0
    n_detections: int = 0
    job_id: int = 0
    token: ClaimToken | None = None  # this delivery's claim, checked by every write
    progress: dict[str, int] = field(default_factory=dict)
    flushed_at: float = 0.0  # time.monotonic() of the last write, or of the claim
    reported_at: float = 0.0  # ... of the last progress report

    def execute(self) -> dict[str, Any]:
        claim = self._claim()
        if claim.outcome is not Outcome.RUN:
            log.info("chunk %s not run: %s (state %s)", self.chunk_id, claim.outcome, claim.state)
            return {"chunk_id": self.chunk_id, "state": claim.state, "outcome": claim.outcome}
        items = self._start(claim)
        work = work_items(self.rt, items, claim.boxes_from_job_id)
        with self._pipeline(claim) as held, self.rt.engine.run(work, held.forward) as run:
            try:
                with self._watch(run, len(items)):
                    for result in run:
                        self._take(result)
                        self._flush_and_report_when_due()
            except ChunkStopped as stopped:
                return self._stopped(stopped)
            except ChunkRetry:
                self._flush()  # what came back before the deadline stays written
                raise
        self._flush()
        if self.held:
            self._give_up_on_held()
        return self._finish(claim, run.stats())

    def _claim(self) -> Claim:
        """This delivery's claim of the chunk."""
        request = self.task.request
        with self.rt.sessions.begin() as session:
            claim = claim_chunk(
                session,
                self.chunk_id,
                worker=request.hostname or "unknown",
                retries=request.retries,
                max_deliveries=self.rt.settings.max_deliveries,
                task_id=request.id,
            )
        if claim.outcome is Outcome.RUN:
            request.chunk_delivery = claim.deliveries  # for ChunkTask.on_retry
        return claim

    def _pipeline(self, claim: Claim) -> AbstractContextManager[CachedPipeline]:
        """The job's pipeline, held in this worker's model cache while the chunk runs. One
        that cannot load here raises PipelineUnavailable: the chunk fails with the reason."""
        assert claim.job_id is not None
        with self.rt.sessions.begin() as session:
            stored = job_pipeline(session, claim.job_id)
        return self.rt.pipelines.use(stored, self.task.request.hostname or "unknown")

    def _start(self, claim: Claim) -> list[PendingItem]:
        """The captures still pending, with the first progress report."""
        assert claim.job_id is not None
        self.job_id = claim.job_id
        self.token = claim.token
        with self.rt.sessions.begin() as session:
            items = pending_items(session, self.chunk_id)
        self.progress = {
            "chunk_id": self.chunk_id,
            "job_id": claim.job_id,
            "total": claim.n_items,
            "done": claim.n_done,
            "failed": claim.n_failed,
        }
        self._report()
        self.flushed_at = self.reported_at
        return items

    def _watch(self, run: Interruptible, n_items: int) -> ChunkWatch:
        """Heartbeat and deadline, kept by a timer thread whatever the engine is doing."""
        s = self.rt.settings

        def past_deadline() -> ChunkRetry:
            return ChunkRetry(
                f"past its deadline of {s.chunk_soft_time_limit_s}s "
                f"(TRAPQ_CHUNK_SOFT_TIME_LIMIT_S) with {n_items - self.n_written} "
                "captures left; the retry goes on from there"
            )

        return ChunkWatch(
            run, self._beat, every_s=s.heartbeat_s,
            deadline=self.started + s.chunk_soft_time_limit_s, expired=past_deadline,
            name=f"trapq-chunk-{self.chunk_id}",
        )

    def _flush_and_report_when_due(self) -> None:
        """Write a full buffer, or one whose results waited FLUSH_AFTER_S; report progress
        every heartbeat."""
        s = self.rt.settings
        now = time.monotonic()
        if len(self.buffer) >= s.write_batch_size or (
            self.buffer and now - self.flushed_at >= FLUSH_AFTER_S
        ):
            self._flush()
        if now - self.reported_at >= s.heartbeat_s:
            self._report()

    def _stopped(self, stopped: ChunkStopped) -> dict[str, Any]:
        """Cancelled, or a cold shutdown: what came back is written, the rest is not run."""
        self._flush()
        log.info("chunk %s stopped: %s", self.chunk_id, stopped)
        if stopped.requeue:  # unacknowledged, back on the queue at once
            raise Reject(str(stopped), requeue=True) from None
        return {"chunk_id": self.chunk_id, "state": stopped.state}

    def _finish(self, claim: Claim, measured: RunStats) -> dict[str, Any]:
        """End the chunk `done` with its figures; the job too if it was its last."""
        metrics = self._metrics(measured, claim.deliveries)
        with self.rt.sessions.begin() as session:
            job_state = finish_chunk(
                session,
                self.chunk_id,
                fetch_s=round(measured.fetch_decode_s, 4),
                gpu_s=round(measured.gpu_s, 4),
                write_s=round(self.write_s, 4),
                metrics=metrics,
                token=self.token,
            )
        self._report()
        if job_state:
            log.info("job %s ended %s with chunk %s", self.job_id, job_state, self.chunk_id)
            send_tracking(self.job_id)
        return {**self.progress, "state": ChunkState.DONE.value, "metrics": metrics}

    def _metrics(self, measured: RunStats, delivery: int) -> dict[str, Any]:
        """The run's own figures (chunks.metrics); GPU memory and the in-flight peak are the
        process's, as the device and the in-flight bound hold for all its chunks together."""
        elapsed = time.monotonic() - self.started
        engine = self.rt.engine.stats()
        return {
            "captures": self.n_written,
            "detections": self.n_detections,
            "wall_s": round(elapsed, 3),
            "images_per_s": round(self.n_written / elapsed, 2) if elapsed else None,
            "batches": measured.batches,
            "mean_batch_size": round(measured.mean_batch_size, 2),
            "gpu_busy_fraction": round(measured.gpu_busy_fraction, 4),
            "images_in_flight_peak": engine.images_in_flight_peak,
            "gpu_allocated_mb": round(engine.device_allocated_mb, 1),
            "gpu_reserved_mb": round(engine.device_reserved_mb, 1),
            "gpu_peak_allocated_mb": round(engine.device_peak_allocated_mb, 1),
            "worker": self.task.request.hostname,
            "delivery": delivery,
        }

    def _take(self, result: ItemResult) -> None:
        """Transient failures are held back while nothing else has come back: if the whole
        chunk fails that way the host is down and the chunk retries with them still pending."""
        if result.transient and self.n_written == 0 and not self.buffer:
            self.held.append(result)
            return
        if self.held:
            self.buffer.extend(self.held)
            self.held.clear()
        self.buffer.append(result)

    def _give_up_on_held(self) -> None:
        first = self.held[0]
        reason = f"every capture failed transiently, e.g. {first.uri}: {first.error}"
        if self.task.request.retries >= self.task.max_retries:
            # Last try: the captures end failed with their own reasons, then the chunk.
            self.buffer.extend(self.held)
            self.held.clear()
            self._flush()
        raise ChunkRetry(reason)

    def _beat(self) -> str | None:
        """The chunk's heartbeat (from the watch's thread); returns the chunk's state."""
        with self.rt.sessions.begin() as session:
            return heartbeat(session, self.chunk_id, self.token)

    def _flush(self) -> None:
        if not self.buffer:
            return
        self.flushed_at = time.monotonic()
        t0 = time.perf_counter()
        with self.rt.sessions.begin() as session:
            counts = write_results(session, self.job_id, self.buffer, self.token)
        self.write_s += time.perf_counter() - t0
        self.n_written += len(self.buffer)
        self.n_detections += counts.detections
        self.progress["done"] += counts.done
        self.progress["failed"] += counts.failed
        self.buffer.clear()

    def _report(self) -> None:
        """Progress in the result backend (AsyncResult, Flower's API) and as a task-progress
        event, the only thing Flower's pages see (they are built from events)."""
        self.reported_at = time.monotonic()
        try:
            self.task.update_state(state="PROGRESS", meta=dict(self.progress))
            self.task.send_event("task-progress", retry=False, **self.progress)
        except Exception as e:  # progress is for people watching; never fail a chunk for it
            log.warning("chunk %s: progress not reported: %s", self.chunk_id, e)
