"""`trapq delete` and `delete-deployment`: a job's or a deployment's rows go (db/cleanup.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from tasks.cli_app import app, console, job_store
from tasks.errors import UserError


@app.command()
def delete(
    job: Annotated[int, typer.Argument(help="Job id.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a job with its work items, chunks, detections and classifications.

    Refused while any of its chunks runs (`trapq cancel JOB` first, or wait).
    """
    from db.cleanup import StillRunning, delete_job, describe_job

    store = job_store()
    with store.read() as session:
        planned = describe_job(session, job)
    if not yes:
        typer.confirm(
            f"delete job {job}: {planned.work_items} work items, {planned.chunks} chunks, "
            f"{planned.detections} detections, {planned.classifications} classifications?",
            abort=True,
        )
    try:
        with store.write() as session:
            done = delete_job(session, job)
    except StillRunning as e:
        raise UserError(f"job {job} not deleted: {e}; `trapq cancel` it or wait") from None
    console.print(
        f"job {job} deleted: {done.work_items} work items, {done.chunks} chunks, "
        f"{done.detections} detections, {done.classifications} classifications",
        highlight=False,
    )


@app.command("delete-deployment")
def delete_deployment(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a deployment with its captures and all its jobs (as `trapq delete` does).

    Refused while any chunk of its jobs runs.
    """
    from db.cleanup import StillRunning
    from db.cleanup import delete_deployment as delete_dep

    store = job_store()
    if not yes:
        typer.confirm(f"delete deployment {name!r}, its captures and all its jobs?", abort=True)
    try:
        with store.write() as session:
            done = delete_dep(session, name)
    except StillRunning as e:
        raise UserError(
            f"deployment {name!r} not deleted: {e}; `trapq cancel` it or wait"
        ) from None
    console.print(
        f"deployment {name} deleted: {done.captures} captures, {len(done.jobs)} jobs, "
        f"{done.work_items} work items, {done.detections} detections",
        highlight=False,
    )
