"""The producer: plan a job in the job store; send one Celery message per released chunk.

`enqueue` commits the job, its work items and its chunks, all `pending`; the dispatcher
(tasks.dispatcher) releases chunks through `send_assigned`, `trapq requeue` through
`send_chunks`. A chunk whose message could not be sent is `pending` again, and the
dispatcher tries it at its next round; nothing else is needed to recover from a broker
outage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError
from sqlalchemy.orm import Session, sessionmaker

from db.dispatch import Assigned, assign_task_ids, confirm_sent, dispatcher_running, unassign
from db.errors import NoSuchDeployment
from db.imports import find_deployment
from db.jobs import ChunkPlace, chunk_places, count_captures, create_job
from db.reuse import box_source_problem, find_box_source
from db.taxa import taxa_in_force
from inference.pipeline_spec import PipelineSpec
from tasks import routing
from tasks.celery_app import PROCESS_CHUNK, make_app
from tasks.errors import UserError
from tasks.pipeline import resolve_pipeline, with_taxa
from tasks.queues import lane_queue, pipeline_queue
from tasks.settings import Settings
from tasks.store import database_errors, ready_session_factory

SEND_BATCH = 500  # messages per broker round trip, and chunks marked queued per transaction
GIVE_UP_AFTER = 3  # failed batches in a row that mean the broker is gone


@dataclass(frozen=True)
class SendResult:
    sent: int
    failed: int
    error: str = ""  # the last send error, when any send failed


@dataclass(frozen=True)
class EnqueueResult:
    job_id: int | None  # None for a dry run
    deployment: str
    n_captures: int
    n_chunks: int
    boxes_from_job_id: int | None = None  # re-classification: whose boxes it reuses
    # True: the chunks wait for the dispatcher. False: none was running, and enqueue sent
    # every chunk itself (sent, failed, error), first come first served.
    dispatched: bool = True
    sent: int = 0
    failed: int = 0
    error: str = ""
    pipeline: str = ""  # NAME@VERSION of the pipeline it runs


def producer_app(settings: Settings) -> Celery:
    """A Celery app for sending only.

    Its result backend is disabled: the producer never waits for a result, and the Redis
    backend would otherwise subscribe to every sent task's result channel.
    """
    app = make_app(settings)
    app.conf.result_backend = "disabled"
    return app


def broker_label(app: Celery) -> str:
    """The broker URL with its password masked."""
    return str(app.connection_for_write().as_uri())


def check_broker(app: Celery) -> None:
    with app.connection_for_write() as conn:
        try:
            conn.ensure_connection(max_retries=1, timeout=5)
        except (KombuError, OSError) as e:
            raise UserError(
                f"cannot reach the broker at {broker_label(app)}: {e} "
                "(check that it runs and TRAPQ_BROKER_URL)"
            ) from None


def chunk_task_name(place: ChunkPlace | None) -> str | None:
    """The name Flower shows for a chunk's task; None (the task's own name) for a chunk
    that no longer exists (the worker will skip it)."""
    if place is None:
        return None
    where = f"job {place.job_id} · chunk {place.number}/{place.of}"
    return f"{place.pipeline} · {where}" if place.pipeline else where


def send_chunks(
    settings: Settings,
    session_factory: sessionmaker[Session],
    chunk_ids: Sequence[int],
    app: Celery | None = None,
) -> SendResult:
    """Send one message per chunk (body: the chunk id), now, whatever its state.

    Each chunk gets a fresh task id, recorded before its message goes out (a `pending` one
    becomes `queued`), so the worker's claim can tell the newest message from older ones
    (db.dispatch); see send_assigned for the rest. The dispatcher sends what it releases
    the same way; `trapq requeue` sends through here at once.
    """
    with database_errors(settings), session_factory.begin() as session:
        assigned = assign_task_ids(session, chunk_ids, datetime.now(UTC))
    return send_assigned(settings, session_factory, assigned, app)


def send_assigned(
    settings: Settings,
    session_factory: sessionmaker[Session],
    assigned: Sequence[Assigned],
    app: Celery | None = None,
) -> SendResult:
    """Publish chunks whose task ids are recorded, over one producer connection.

    Messages go out in batches (Kombu's Producer.batch: one Redis pipeline per batch, other
    transports publish at once); after each batch its chunks are confirmed sent
    (`queued_at`) in one transaction. A batch that fails gets its previous task ids back and
    its chunks that were `pending` are `pending` again (a pipeline that broke half-way may
    have delivered some: their task ids are no longer the chunks', so the worker's claim
    skips them). After a few failed batches in a row the broker is taken to be gone and the
    remaining chunks are put back untried.

    Each message carries a shadow name (`quebec@2 · job 12 · chunk 3/40`, see
    chunk_task_name): Flower and the worker's log show it instead of the bare task name, so
    the jobs' tasks can be told apart. Celery's retries keep it.

    A chunk goes to its pipeline's queue when a live worker consumes it (that worker holds
    the pipeline, tasks.routing), else to the common queue settings.queue. `app`: the
    caller's producer_app, when it has one already.
    """
    app = producer_app(settings) if app is None else app
    with database_errors(settings), session_factory.begin() as session:
        places = chunk_places(session, [a.chunk_id for a in assigned])
    # Fast-lane chunks go to the lane whoever holds their pipeline: they never wait for the
    # workers' answer of who consumes what (a broadcast of a second, tasks.routing).
    lane_ids = {a.chunk_id for a in assigned if a.lane}
    queues = _affine_queues(
        settings, app, {cid: p for cid, p in places.items() if cid not in lane_ids}
    )
    lane = lane_queue(settings.queue)
    n_sent = n_failed = in_a_row = 0
    error = ""
    with app.producer_or_acquire() as producer:
        for start in range(0, len(assigned), SEND_BATCH):
            part = assigned[start : start + SEND_BATCH]
            try:
                with producer.batch(max_size=4 * SEND_BATCH):
                    for a in part:
                        app.send_task(
                            PROCESS_CHUNK,
                            args=[a.chunk_id],
                            queue=lane if a.lane else queues.get(a.chunk_id, settings.queue),
                            task_id=a.task_id,
                            producer=producer,
                            shadow=chunk_task_name(places.get(a.chunk_id)),
                        )
            except (KombuError, OSError) as e:
                n_failed += len(part)
                in_a_row += 1
                error = str(e.__cause__ or e) or type(e).__name__
                untried = assigned[start + len(part) :] if in_a_row >= GIVE_UP_AFTER else []
                n_failed += len(untried)
                with database_errors(settings), session_factory.begin() as session:
                    unassign(session, [*part, *untried])
                if untried:
                    break
                continue
            in_a_row = 0
            n_sent += len(part)
            with database_errors(settings), session_factory.begin() as session:
                confirm_sent(session, part, datetime.now(UTC))
    return SendResult(sent=n_sent, failed=n_failed, error=error)


def _affine_queues(
    settings: Settings, app: Celery, places: dict[int, ChunkPlace]
) -> dict[int, str]:
    """The pipeline queue of each chunk whose pipeline a live worker holds."""
    if not settings.affinity or not routing.routes(settings.broker_url) or not places:
        return {}
    consumed = routing.consumed_queues(app)
    wanted = {cid: pipeline_queue(settings.queue, p.fingerprint)
              for cid, p in places.items() if p.fingerprint}
    return {cid: queue for cid, queue in wanted.items() if queue in consumed}


def enqueue(
    settings: Settings,
    deployment_name: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    chunk_size: int | None = None,
    only_unprocessed: bool = False,
    dry_run: bool = False,
    reuse_detections_from: int | None = None,
    reuse_detections: bool = False,
    pipeline: str | None = None,
) -> EnqueueResult:
    """Plan a job over a deployment's captures; its chunks wait `pending` for the dispatcher
    (tasks.dispatcher), which releases them in fair order as workers have room. With no
    dispatcher running (PostgreSQL tells), it sends them all itself, as before dispatchers.

    Counting and planning share one snapshot (REPEATABLE READ on PostgreSQL), so an import
    running meanwhile cannot make the count and the chunks disagree. Nothing is created
    when no capture matches or the broker does not answer.

    `reuse_detections_from` makes a re-classification job that reuses that job's boxes
    (it must have run the same detector and box threshold); `reuse_detections` picks the
    newest done job that did, and runs a full job when there is none.

    `pipeline` names the pipeline (NAME or NAME@VERSION, tasks.pipeline.resolve_pipeline);
    None takes the TRAPQ_* model settings' `default`. A recorded pipeline needs no torch.
    """
    size = chunk_size or settings.chunk_size
    if size < 1:
        raise UserError("--chunk-size must be at least 1")
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1")
    factory = ready_session_factory(settings)
    stored = resolve_pipeline(settings, factory, pipeline)
    spec = PipelineSpec.from_dict(stored.spec)
    selection = {
        "pipeline": stored.spec,
        "fingerprint": stored.fingerprint,
        "since": since,
        "until": until,
        "limit": limit,
        "only_unprocessed": only_unprocessed,
    }
    app = None if dry_run else producer_app(settings)
    if app is not None:  # the broker is checked now, not when the dispatcher finds it gone
        check_broker(app)
    with database_errors(settings), factory.begin() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        deployment_id = find_deployment(session, deployment_name)
        if deployment_id is None:
            raise NoSuchDeployment(deployment_name)
        taxa = taxa_in_force(session, deployment_id)  # another list: another pipeline
        spec = with_taxa(spec, taxa.entries, taxa.threshold)
        selection |= {"pipeline": spec.to_dict(), "fingerprint": spec.fingerprint()}
        boxes_from = _box_source(
            session, deployment_id, stored.spec, reuse_detections_from, reuse_detections
        )
        n = count_captures(session, deployment_id, **selection)
        if n == 0:
            raise UserError(f"no captures of {deployment_name!r} match; nothing to enqueue")
        if dry_run:
            return EnqueueResult(None, deployment_name, n, -(-n // size),
                                 boxes_from_job_id=boxes_from, pipeline=stored.label)
        plan = create_job(
            session, deployment_id, chunk_size=size, boxes_from_job_id=boxes_from,
            pipeline_id=stored.id, **selection
        )
    with database_errors(settings), factory() as session:
        dispatched = dispatcher_running(session)
    result = (SendResult(0, 0) if dispatched
              else send_chunks(settings, factory, plan.chunk_ids, app))
    return EnqueueResult(
        job_id=plan.job_id,
        deployment=deployment_name,
        n_captures=plan.n_captures,
        n_chunks=len(plan.chunk_ids),
        boxes_from_job_id=boxes_from,
        pipeline=stored.label,
        dispatched=dispatched,
        sent=result.sent,
        failed=result.failed,
        error=result.error,
    )


def _box_source(
    session: Session,
    deployment_id: int,
    pipeline: dict[str, Any],
    named: int | None,
    automatic: bool,
) -> int | None:
    if named is None:
        return find_box_source(session, deployment_id, pipeline) if automatic else None
    problem = box_source_problem(session, deployment_id, pipeline, named)
    if problem:
        raise UserError(
            f"--reuse-detections-from {named}: {problem}; re-classification keeps the "
            "detector and box threshold (`trapq status` lists jobs)"
        )
    return named
