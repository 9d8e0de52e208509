"""Job-store commands: db upgrade, import, enqueue, status."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import migrations
from db.project_status import project_figures
from db.states import CHUNK_ENDED, JOB_ENDED, ChunkState, ItemState
from db.status import JobRow, JobStatus, job_status, recent_jobs
from tasks.cli_app import (
    app,
    console,
    err_console,
    job_store,
    settings,
    short_fingerprint,
    timestamp,
)
from tasks.commands.projects import print_projects
from tasks.errors import UserError
from tasks.importer import BadRow, import_source
from tasks.producer import enqueue as enqueue_job
from tasks.store import database_errors, redact

db_app = typer.Typer(help="The job store's schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")

WARN_AT_MOST = 20  # bad manifest rows printed one by one; the rest are counted


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the job store's schema to the newest revision."""
    s = settings()
    with database_errors(s):
        migrations.upgrade(s.database_url)
    console.print(f"job store at {redact(s.database_url)} is up to date")


@app.command("import")
def import_(
    source: Annotated[
        str,
        typer.Argument(help="A folder of images, a CSV manifest uri[,captured_at], a URL list, "
                       "or s3://bucket/prefix."),
    ],
    deployment: Annotated[str, typer.Option("--deployment", "-d", help="Deployment name.")],
    pattern: Annotated[
        str | None,
        typer.Option(help="s3:// only: import the keys this regular expression matches."),
    ] = None,
) -> None:
    """Record a deployment's captures; importing the same ones again adds nothing."""
    shown = 0

    def warn(row: BadRow) -> None:
        nonlocal shown
        shown += 1
        if shown <= WARN_AT_MOST:
            err_console.print(
                f"[yellow]warning:[/] {source}:{row.line}: {row.reason}",
                highlight=False,
                soft_wrap=True,
            )

    report = import_source(settings(), source, deployment, on_bad_row=warn, pattern=pattern)
    console.print(
        f"{deployment}: {report.added} captures added, {report.skipped} already recorded",
        highlight=False,
    )
    if report.bad_rows:
        lines = ", ".join(str(b.line) for b in report.bad_rows[:WARN_AT_MOST])
        more = "…" if len(report.bad_rows) > WARN_AT_MOST else ""
        raise UserError(
            f"{len(report.bad_rows)} bad rows of {source} were skipped (lines {lines}{more}); "
            "fix them and import again"
        )


@app.command("enqueue")
def enqueue(
    deployment: Annotated[str, typer.Argument(help="Deployment name.")],
    since: Annotated[str | None, typer.Option(help="Captures taken from (ISO 8601).")] = None,
    until: Annotated[str | None, typer.Option(help="Captures taken before (ISO 8601).")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many captures.")] = None,
    chunk_size: Annotated[
        int | None, typer.Option(help="Captures per chunk (default TRAPQ_CHUNK_SIZE).")
    ] = None,
    only_unprocessed: Annotated[
        bool, typer.Option(help="Skip captures done by an earlier job with the same pipeline.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Count, create nothing, send nothing.")] = False,
    reuse_detections_from: Annotated[
        int | None,
        typer.Option(help="Re-classify: reuse this job's boxes, run only the classifiers."),
    ] = None,
    reuse_detections: Annotated[
        bool,
        typer.Option(help="Re-classify with the boxes of the newest done job that ran the "
                     "same detector and box threshold, if any."),
    ] = False,
    pipeline: Annotated[
        str | None,
        typer.Option(help="NAME or NAME@VERSION (`trapq pipelines`); default: the TRAPQ_* "
                     "model settings, recorded as `default`."),
    ] = None,
) -> None:
    """Create a job over a deployment's captures; the dispatcher sends its chunks in fair order.

    Prints the job id on stdout (the summary goes to stderr), so JOB=$(trapq enqueue D) works.
    """
    s = settings()
    result = enqueue_job(
        s,
        deployment,
        since=timestamp(since, "--since"),
        until=timestamp(until, "--until"),
        limit=limit,
        chunk_size=chunk_size,
        only_unprocessed=only_unprocessed,
        dry_run=dry_run,
        reuse_detections_from=reuse_detections_from,
        reuse_detections=reuse_detections,
        pipeline=pipeline,
    )
    boxes = (
        f", boxes of job {result.boxes_from_job_id}"
        if result.boxes_from_job_id is not None
        else (", no earlier job with this detector: boxes detected" if reuse_detections else "")
    )
    if result.job_id is None:
        console.print(
            f"dry run: {result.n_captures} captures of {deployment} in {result.n_chunks} "
            f"chunks, pipeline {result.pipeline}{boxes}",
            highlight=False,
        )
        return
    console.print(result.job_id, highlight=False)
    how = (
        "pending for the dispatcher" if result.dispatched
        else f"{result.sent} sent at once (no dispatcher runs: first come, first served; "
        "`trapq dispatch` shares the pool fairly)"
    )
    err_console.print(
        f"job {result.job_id}: {result.n_captures} captures of {deployment} in "
        f"{result.n_chunks} chunks of pipeline {result.pipeline}, {how} "
        f"(queue {s.queue!r}){boxes}",
        highlight=False,
        soft_wrap=True,
    )
    if result.failed:
        raise UserError(
            f"job {result.job_id}: {result.failed} of {result.n_chunks} chunks could not be sent "
            f"({result.error}); they stay pending: `trapq dispatch` sends them once the broker "
            "answers"
        )


@app.command("status")
def status(
    job: Annotated[int | None, typer.Argument(help="Job id; without it, recent jobs.")] = None,
    watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    limit: Annotated[int, typer.Option(help="How many recent jobs to list.")] = 20,
) -> None:
    """Show recent jobs, or one job's captures and chunks by state, throughput and timings."""
    store = job_store()

    def load(job_id: int) -> JobStatus:
        with store.read() as session:
            return job_status(session, job_id)

    if job is None:
        if watch:
            raise UserError("--watch needs a JOB")
        with store.read() as session:
            rows = recent_jobs(session, limit)
            projects = project_figures(session)
        print_jobs(rows)
        print_projects(projects)
        return
    current = load(job)
    if watch:
        current = follow(current, load, interval)
    print_job(current)


def follow(
    current: JobStatus, load: Callable[[int], JobStatus], interval: float
) -> JobStatus:
    """A live progress bar of ended captures until the job (or every chunk) has ended."""
    columns = (
        TextColumn("[bold]job {task.fields[job]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(
            "", total=current.job.n_captures, job=current.job.id, failed=0, rate=""
        )
        while True:
            progress.update(
                bar,
                completed=current.ended,
                failed=current.job.failed,
                rate=f"{current.throughput:.1f} img/s" if current.throughput else "",
            )
            if has_ended(current):
                return current
            time.sleep(interval)
            current = load(current.job.id)


def has_ended(st: JobStatus) -> bool:
    chunks_ended = sum(n for state, n in st.chunks.items() if state in CHUNK_ENDED)
    return st.job.state in JOB_ENDED or chunks_ended == st.job.n_chunks


def print_jobs(rows: list[JobRow]) -> None:
    if not rows:
        console.print("no jobs yet; `trapq enqueue DEPLOYMENT` creates one")
        return
    table = Table(title="recent jobs")
    for name in ("job", "deployment", "state", "captures", "done", "failed", "chunks", "created"):
        text = name in ("deployment", "state", "created")
        table.add_column(name, justify="left" if text else "right")
    for r in rows:
        table.add_row(
            str(r.id),
            r.deployment,
            r.state,
            str(r.n_captures),
            str(r.done),
            str(r.failed),
            str(r.n_chunks),
            f"{r.created_at:%Y-%m-%d %H:%M:%S}",
        )
    console.print(table)
    print_pipelines(rows)


def print_pipelines(rows: list[JobRow]) -> None:
    """The listed jobs grouped by pipeline (short fingerprint and model names), in a table of
    its own so the job table still fits 80 columns; re-classification jobs name their source."""
    jobs: dict[str, list[str]] = {}
    models: dict[str, str] = {}
    names: dict[str, str] = {}
    for r in rows:
        reuse = f" (boxes of {r.boxes_from_job_id})" if r.boxes_from_job_id is not None else ""
        jobs.setdefault(r.fingerprint, []).append(f"{r.id}{reuse}")
        models.setdefault(r.fingerprint, r.models)
        names.setdefault(r.fingerprint, r.pipeline)
    table = Table(title="pipelines of these jobs")
    table.add_column("pipeline", no_wrap=True)
    table.add_column("fingerprint", no_wrap=True)
    table.add_column("models")
    table.add_column("jobs")
    for fingerprint, ids in jobs.items():
        table.add_row(names[fingerprint] or "-", short_fingerprint(fingerprint),
                      models[fingerprint] or "-", ", ".join(ids))
    console.print(table)



def print_job(st: JobStatus) -> None:
    j = st.job
    console.print(
        f"job {j.id} · deployment {j.deployment} · {j.state} · "
        f"created {j.created_at:%Y-%m-%d %H:%M:%S} UTC",
        highlight=False,
        soft_wrap=True,
    )
    reuse = f" · boxes of job {j.boxes_from_job_id}" if j.boxes_from_job_id is not None else ""
    console.print(
        f"pipeline {j.pipeline or '-'} ({short_fingerprint(j.fingerprint)}) · "
        f"{j.models or 'models not recorded'}{reuse}",
        highlight=False,
        soft_wrap=True,
    )
    table = Table(box=None)
    table.add_column("state")
    table.add_column("captures", justify="right")
    table.add_column("chunks", justify="right")
    item_states = {state.value for state in ItemState}
    for state in ChunkState:
        items = str(st.captures.get(state.value, 0)) if state.value in item_states else ""
        table.add_row(state.value, items, str(st.chunks.get(state.value, 0)))
    table.add_row("total", str(j.n_captures), str(j.n_chunks))
    console.print(table)
    if st.failures:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(st.failures.items()))
        console.print(f"failed captures by reason: {kinds}", highlight=False, soft_wrap=True)
    if st.throughput is not None:
        console.print(f"throughput: {st.throughput:.1f} images/s", highlight=False)
    t = st.timings
    if t is not None:
        console.print(
            f"per chunk ({t.n_chunks} timed): fetch+decode {t.fetch_s:.2f} s, "
            f"GPU {t.gpu_s:.2f} s, write {t.write_s:.2f} s, wall {t.wall_s:.2f} s, "
            f"{t.images_per_s:.1f} images/s",
            highlight=False,
            soft_wrap=True,
        )
