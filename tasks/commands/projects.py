"""`trapq projects`: who shares the GPU pool, with which weight and cap (db.projects)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from db.project_status import ProjectFigures
from db.projects import ProjectProblem, add_project, list_projects, remove_project
from db.taxa import set_species_threshold
from inference.taxonomy import TaxonomyError, check_threshold
from tasks.cli_app import app, console, job_store
from tasks.errors import UserError

projects_app = typer.Typer(
    help="List projects (no subcommand), add or change one, or remove one.",
    invoke_without_command=True,
)
app.add_typer(projects_app, name="projects")


@projects_app.callback()
def projects_(ctx: typer.Context) -> None:
    """List projects: weight, cap on chunks out, deployments and jobs."""
    if ctx.invoked_subcommand is not None:
        return
    with job_store().read() as session:
        rows = list_projects(session)
    if not rows:
        console.print("no projects yet; `trapq projects add NAME --weight W` creates one")
        return
    table = Table(title="projects")
    for name in ("project", "weight", "max in flight", "deployments", "jobs"):
        table.add_column(name, justify="left" if name == "project" else "right")
    for r in rows:
        table.add_row(r.name, f"{r.weight:g}", str(r.max_in_flight or "-"),
                      str(r.n_deployments), str(r.n_jobs))
    console.print(table)


@projects_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Project name.")],
    weight: Annotated[
        float, typer.Option(help="Share of the GPU pool against the other projects' weights.")
    ] = 1.0,
    max_in_flight: Annotated[
        int | None, typer.Option(help="Most chunks of this project out at once (none: no cap).")
    ] = None,
    species_threshold: Annotated[
        float | None,
        typer.Option(help="Below it a species answer rolls up the taxonomy, in (0, 1] "
                     "(none: TRAPQ_SPECIES_THRESHOLD); `trapq reapply JOB` for ended jobs."),
    ] = None,
) -> None:
    """Create a project, or change its weight, cap and species threshold."""
    try:
        if species_threshold is not None:
            check_threshold(species_threshold)
        with job_store().write() as session:
            created = add_project(session, name, weight, max_in_flight)
            set_species_threshold(session, name, species_threshold)
    except (ProjectProblem, TaxonomyError) as e:
        raise UserError(str(e)) from None
    cap = f", at most {max_in_flight} chunks out" if max_in_flight else ""
    answers = f", species threshold {species_threshold:g}" if species_threshold else ""
    console.print(f"{name}: {'created' if created else 'updated'}, weight {weight:g}{cap}"
                  f"{answers}", highlight=False)


@projects_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="Project name.")]) -> None:
    """Remove a project without jobs; its deployments go back to `default`."""
    try:
        with job_store().write() as session:
            remove_project(session, name)
    except ProjectProblem as e:
        raise UserError(str(e)) from None
    console.print(f"{name}: removed", highlight=False)


def print_projects(figures: list[ProjectFigures]) -> None:
    """Each project's share of the pool, and an ETA per running job (db.project_status says
    how both are computed)."""
    if not figures:
        return
    table = Table(title="projects: GPU time in the last hour against weight")
    for name in ("project", "weight", "pending", "out", "done 1h", "GPU", "due", "ETA"):
        table.add_column(name, justify="left" if name in ("project", "ETA") else "right")
    for f in figures:
        etas = ", ".join(
            f"{e.job_id}: {_duration(e.eta_s)}" if e.eta_s is not None
            else f"{e.job_id}: ? ({e.left} left)"
            for e in f.jobs
        )
        cap = f" (max {f.max_in_flight})" if f.max_in_flight else ""
        table.add_row(
            f.name, f"{f.weight:g}", str(f.captures_pending), f"{f.chunks_in_flight}{cap}",
            str(f.captures_done_last_hour), f"{f.gpu_share:.0%}", f"{f.weight_share:.0%}",
            etas or "-",
        )
    console.print(table)
    console.print("pending: captures not yet released; out: chunks on the broker or running; "
                  "GPU: share of chunk time in the last hour, due: weight share; ETA per job: "
                  "captures left / its captures per second over the last 10 minutes",
                  highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"
