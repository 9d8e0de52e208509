"""`trapq reapply JOB`: a finished job's answers under the taxa list and threshold now in
force, without the GPU (tasks.reapply)."""

from __future__ import annotations

from typing import Annotated

import typer

from tasks.cli_app import app, console, job_store


@app.command()
def reapply(job: Annotated[int, typer.Argument(help="Job id (ended).")]) -> None:
    """Recompute a job's species answers from their stored softmax under its deployment's
    taxa list and its project's species threshold as they are now; occurrences follow."""
    from tasks.reapply import reapply as run
    from tasks.tracking import track_job

    store = job_store()
    with store.errors():
        done = run(store.sessions, job)
        if done.unchanged_policy:
            console.print(f"job {job} already answers under the list and threshold in force",
                          highlight=False)
            return
        if done.tracked:
            track_job(store.sessions, job, store.settings)
    console.print(
        f"job {job}: {done.classifications} answers recomputed, {done.changed} changed; "
        f"pipeline {done.fingerprint[:10]}" + ("; occurrences voted again" if done.tracked else ""),
        highlight=False,
    )
