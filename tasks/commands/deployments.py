"""`trapq deployments`: the deployments with their captures and jobs, and `deployments set`: a
deployment's location, period, capture method and camera.

One deployment from options, or many from a CSV whose columns are Camtrap DP's deployment
terms (deploymentID, latitude, longitude, deploymentStart, ...), so a deployments.csv written
for Camtrap DP can be loaded as it is; columns trapq does not keep are ignored.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from db.deployments import CAPTURE_METHODS, DeploymentMetadata, set_metadata
from db.projects import ProjectProblem, set_deployment_project
from db.status import deployments
from db.taxa import set_taxa_list
from inference.taxonomy import TaxonomyError, read_taxa_list
from tasks.cli_app import app, console, job_store, short_fingerprint, timestamp
from tasks.errors import UserError

deployments_app = typer.Typer(
    help="List deployments (no subcommand), or set their metadata.", invoke_without_command=True
)
app.add_typer(deployments_app, name="deployments")


@deployments_app.callback()
def deployments_(ctx: typer.Context) -> None:
    """List deployments with their capture counts; `deployments set` records their metadata."""
    if ctx.invoked_subcommand is not None:
        return
    with job_store().read() as session:
        rows = deployments(session)
    if not rows:
        console.print("no deployments yet; `trapq import SOURCE --deployment NAME` creates one")
        return
    table = Table(title="deployments")
    table.add_column("deployment")
    table.add_column("captures", justify="right")
    table.add_column("first capture")
    table.add_column("last capture")
    table.add_column("jobs", justify="right")
    for r in rows:
        table.add_row(
            r.name,
            str(r.n_captures),
            f"{r.first:%Y-%m-%d %H:%M}" if r.first else "",
            f"{r.last:%Y-%m-%d %H:%M}" if r.last else "",
            str(r.n_jobs),
        )
    console.print(table)
    done = Table(title="captures done per pipeline")
    done.add_column("pipeline", no_wrap=True)
    done.add_column("deployment")
    done.add_column("models")
    done.add_column("done", justify="right")
    for r in rows:
        for p in r.pipelines:
            done.add_row(short_fingerprint(p.fingerprint), r.name, p.models or "-",
                         f"{p.captures} of {r.n_captures}")
    if done.row_count:
        console.print(done)


# Camtrap DP deployment term -> (column of `deployments`, parser of the CSV cell).
CSV_TERMS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "locationID": ("location_id", str),
    "locationName": ("location_name", str),
    "latitude": ("latitude", float),
    "longitude": ("longitude", float),
    "coordinateUncertainty": ("coordinate_uncertainty_m", int),
    "deploymentStart": ("deployment_start", lambda v: timestamp(v, "deploymentStart")),
    "deploymentEnd": ("deployment_end", lambda v: timestamp(v, "deploymentEnd")),
    "captureMethod": ("capture_method", str),
    "cameraID": ("camera_id", str),
    "cameraModel": ("camera_model", str),
    "cameraHeight": ("camera_height_m", float),
    "setupBy": ("setup_by", str),
    "habitat": ("habitat", str),
    "deploymentComments": ("comments", str),
}


@deployments_app.command("set")
def set_(
    name: Annotated[str | None, typer.Argument(help="Deployment name (created if new).")] = None,
    csv_file: Annotated[
        Path | None,
        typer.Option("--csv", help="Many deployments: a CSV with Camtrap DP deployment columns."),
    ] = None,
    lat: Annotated[float | None, typer.Option(help="Latitude, decimal degrees WGS84.")] = None,
    lon: Annotated[float | None, typer.Option(help="Longitude, decimal degrees WGS84.")] = None,
    coordinate_uncertainty: Annotated[
        int | None, typer.Option(help="Radius in metres around lat/lon holding the camera.")
    ] = None,
    start: Annotated[str | None, typer.Option(help="Deployment start (ISO 8601).")] = None,
    end: Annotated[str | None, typer.Option(help="Deployment end (ISO 8601).")] = None,
    capture_method: Annotated[
        str | None, typer.Option(help=f"{' or '.join(CAPTURE_METHODS)}.")
    ] = None,
    camera_id: Annotated[str | None, typer.Option(help="Camera serial or id.")] = None,
    camera_model: Annotated[
        str | None, typer.Option(help="Camera as manufacturer-model, e.g. Reconyx-PC800.")
    ] = None,
    camera_height: Annotated[float | None, typer.Option(help="Camera height in metres.")] = None,
    location_id: Annotated[str | None, typer.Option(help="Identifier of the location.")] = None,
    location_name: Annotated[str | None, typer.Option(help="Name of the location.")] = None,
    setup_by: Annotated[str | None, typer.Option(help="Who set the camera up.")] = None,
    habitat: Annotated[str | None, typer.Option(help="Short description of the habitat.")] = None,
    comments: Annotated[str | None, typer.Option(help="Notes on the deployment.")] = None,
    taxa_list: Annotated[
        Path | None,
        typer.Option(help="The species that can occur here: a file of labels, taxon names or "
                     "GBIF keys, one a line; its jobs answer only with these (README: Taxonomy)."),
    ] = None,
    no_taxa_list: Annotated[
        bool, typer.Option("--no-taxa-list", help="Remove the taxa list: every label again.")
    ] = False,
    project: Annotated[
        str | None,
        typer.Option(help="The project it belongs to (`trapq projects`); its later jobs run "
                     "there."),
    ] = None,
) -> None:
    """Record a deployment's metadata; only the options given change."""
    if (name is None) == (csv_file is None):
        raise UserError("give a deployment NAME with options, or --csv FILE, not both")
    taxa = _taxa_entries(taxa_list, no_taxa_list)
    if csv_file is not None and taxa is not None:
        raise UserError("--taxa-list goes with one deployment NAME, not with --csv")
    if csv_file is not None:
        records = list(read_csv(csv_file))
    else:
        assert name is not None
        records = [
            (
                name,
                name,
                DeploymentMetadata(
                    location_id=location_id,
                    location_name=location_name,
                    latitude=lat,
                    longitude=lon,
                    coordinate_uncertainty_m=coordinate_uncertainty,
                    deployment_start=timestamp(start, "--start"),
                    deployment_end=timestamp(end, "--end"),
                    capture_method=capture_method,
                    camera_id=camera_id,
                    camera_model=camera_model,
                    camera_height_m=camera_height,
                    setup_by=setup_by,
                    habitat=habitat,
                    comments=comments,
                ),
            )
        ]
        if not records[0][2].given() and taxa is None and project is None:
            raise UserError(f"nothing to set for {name}: give options such as --lat and --lon")
    for where, _, metadata in records:
        problems = metadata.problems()
        if problems:
            raise UserError(f"{where}: {'; '.join(problems)}")
    if csv_file is not None and project is not None:
        raise UserError("--project goes with one deployment NAME, not with --csv")
    with job_store().write() as session:
        if project is not None:
            try:
                set_deployment_project(session, records[0][1], project)
            except ProjectProblem as e:
                raise UserError(str(e)) from None
        created = [set_metadata(session, n, m) for _, n, m in records]
        if taxa is not None:
            set_taxa_list(session, records[0][1], taxa or None)
    for (_, n, _), new in zip(records, created, strict=True):
        console.print(f"{n}: {'created' if new else 'updated'}", highlight=False)


def _taxa_entries(path: Path | None, remove: bool) -> list[str] | None:
    """The list's entries; [] to remove it; None when neither option is given. Which labels
    it keeps is checked against the job's classifier at enqueue, before any job exists."""
    if path is not None and remove:
        raise UserError("give --taxa-list FILE or --no-taxa-list, not both")
    if remove:
        return []
    if path is None:
        return None
    try:
        return read_taxa_list(path)
    except TaxonomyError as e:
        raise UserError(str(e)) from None


def read_csv(path: Path) -> Iterator[tuple[str, str, DeploymentMetadata]]:
    """(where in the file, deployment name, metadata) per row.

    A bad cell is a UserError naming its line and column.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "deploymentID" not in reader.fieldnames:
                raise UserError(f"{path}: needs a header row with a deploymentID column")
            for row in reader:
                name = (row.get("deploymentID") or "").strip()
                if not name:
                    raise UserError(f"{path}:{reader.line_num}: empty deploymentID")
                values: dict[str, Any] = {}
                for term, (column, parse) in CSV_TERMS.items():
                    cell = (row.get(term) or "").strip()
                    if not cell:
                        continue
                    try:
                        values[column] = parse(cell)
                    except (ValueError, UserError) as e:
                        raise UserError(f"{path}:{reader.line_num}: {term}: {e}") from None
                yield f"{path}:{reader.line_num}", name, DeploymentMetadata(**values)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
