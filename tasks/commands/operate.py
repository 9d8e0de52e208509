"""Running and repairing jobs: `trapq worker`, `requeue` and `cancel`."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Annotated

import typer
from kombu.exceptions import KombuError

from tasks.cli_app import app, console, job_store, settings
from tasks.errors import UserError


@app.command()
def worker(
    gpus: Annotated[
        str, typer.Option(help="all (every visible GPU, else the CPU), cpu, or indices like 0,1.")
    ] = "all",
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Chunk slots per worker; default TRAPQ_CONCURRENCY.")
    ] = None,
    pool: Annotated[
        str | None, typer.Option(help="threads, prefork or solo; default TRAPQ_POOL.")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    dispatch: Annotated[
        bool, typer.Option(help="Also run a dispatcher (`trapq dispatch`) beside the workers.")
    ] = True,
) -> None:
    """Start one Celery worker per GPU on the chunk queue, and a dispatcher; Ctrl-C stops
    them warmly."""
    from tasks.worker.supervisor import Supervisor, plan_workers

    s = settings()
    chosen_pool = pool or s.pool
    if chosen_pool not in ("threads", "prefork", "solo"):
        raise UserError(f"--pool {chosen_pool!r}: use threads, prefork or solo")
    try:
        specs = plan_workers(gpus)
    except ValueError as e:
        raise UserError(str(e)) from None
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/trapq] %(message)s")
    supervisor = Supervisor.build(
        s, specs, pool=chosen_pool, concurrency=concurrency or s.concurrency, loglevel=loglevel,
        dispatcher=dispatch,
    )
    raise typer.Exit(supervisor.run())


@app.command()
def requeue(
    job: Annotated[int, typer.Argument(help="Job id.")],
    failed: Annotated[
        bool, typer.Option("--failed", help="Also send failed chunks again.")
    ] = False,
    stuck_after: Annotated[
        float | None,
        typer.Option(min=0, help="Also send running/queued chunks without a heartbeat for "
                     "this many minutes."),
    ] = None,
    chunk: Annotated[int | None, typer.Option(help="Only this chunk (failed or not).")] = None,
) -> None:
    """Send a job's chunks again: never-sent pending ones, failed ones, stuck ones.

    Requeued chunks start over with attempts and deliveries at zero.
    """
    from db.repair import JobCancelled, plan_requeue
    from tasks.producer import send_chunks

    store = job_store()
    try:
        with store.write() as session:
            plan = plan_requeue(
                session,
                job,
                failed=failed,
                stuck_after=timedelta(minutes=stuck_after) if stuck_after is not None else None,
                chunk_id=chunk,
            )
    except JobCancelled:
        raise UserError(f"job {job} is cancelled; enqueue its deployment again instead") from None
    result = send_chunks(store.settings, store.sessions, plan.chunk_ids)
    console.print(
        f"job {job}: requeued {len(plan.failed)} failed, {len(plan.pending)} pending, "
        f"{len(plan.stuck)} stuck chunk(s); sent {result.sent}, not sent {result.failed}"
    )
    if result.failed:
        raise UserError(
            f"{result.failed} chunk(s) could not be sent ({result.error}); they stay pending, "
            "run `trapq requeue` again once the broker answers"
        )


@app.command()
def cancel(job: Annotated[int, typer.Argument(help="Job id.")]) -> None:
    """Cancel a job: revoke its outstanding chunk tasks and mark it cancelled."""
    from db.repair import cancel_job
    from tasks.producer import producer_app

    store = job_store()
    with store.write() as session:
        done = cancel_job(session, job)
    if done.previous_state in ("done", "failed", "cancelled"):
        console.print(f"job {job} had already ended ({done.previous_state}); nothing cancelled")
        return
    if done.task_ids:
        try:
            producer_app(store.settings).control.revoke(done.task_ids)
        except (KombuError, OSError) as e:
            raise UserError(
                f"job {job} is cancelled in the job store, but its tasks were not revoked ({e}); "
                "workers skip its chunks anyway"
            ) from None
    console.print(
        f"job {job} cancelled: {done.n_chunks} chunk(s) cancelled, "
        f"{len(done.task_ids)} task(s) revoked"
    )
