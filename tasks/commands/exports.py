"""`trapq export JOB --format csv|jsonl|camtrapdp|megadetector|coco`."""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath
from typing import Annotated

import typer

from tasks.cli_app import app, err_console, job_store
from tasks.exports import FORMATS, ExportOptions, export


@app.command("export")
def export_(
    job: Annotated[int, typer.Argument(help="Job id.")],
    fmt: Annotated[str, typer.Option("--format", help=", ".join(FORMATS) + ".")] = "csv",
    output: Annotated[
        str | None,
        typer.Option("-o", "--output", help="File to write (camtrapdp: a folder), or an "
                     "s3://bucket/key to upload it to; default stdout."),
    ] = None,
    root: Annotated[
        str | None,
        typer.Option(help="Write image paths relative to this folder or URI prefix "
                     "(megadetector, coco, camtrapdp)."),
    ] = None,
    title: Annotated[str | None, typer.Option(help="camtrapdp: title of the package.")] = None,
    project_title: Annotated[
        str | None, typer.Option(help="camtrapdp: title of the study (required).")
    ] = None,
    sampling_design: Annotated[
        str | None,
        typer.Option(help="camtrapdp (required): simpleRandom, systematicRandom, "
                     "clusteredRandom, experimental, targeted or opportunistic."),
    ] = None,
    contributor: Annotated[
        list[str] | None,
        typer.Option(help="camtrapdp (required, repeatable): '[ROLE:]Name <email>'."),
    ] = None,
    public_media: Annotated[
        bool, typer.Option(help="camtrapdp: the image files are publicly accessible.")
    ] = False,
    min_probability: Annotated[
        float,
        typer.Option(min=0.0, max=1.0,
                     help="camtrapdp: classifier scores below this are observationType unknown."),
    ] = 0.5,
) -> None:
    """Write a job's results: trapq's flat CSV/JSONL, or Camtrap DP, MegaDetector or COCO."""
    options = ExportOptions(
        root=root,
        title=title,
        project_title=project_title,
        sampling_design=sampling_design,
        contributors=tuple(contributor or ()),
        public_media=public_media,
        min_probability=min_probability,
    )
    store = job_store()
    if output is None or not output.startswith("s3://"):
        with store.errors():
            written = export(store.sessions, job, fmt, Path(output) if output else None, options)
        where = output if output is not None else "stdout"
        err_console.print(f"job {job}: {written} written to {where} ({fmt})", highlight=False)
        return
    from tasks.s3_store import upload  # boto3 is the optional [s3] extra

    with tempfile.TemporaryDirectory(prefix="trapq-export-") as tmp:
        local = Path(tmp) / (PurePosixPath(output.rstrip("/")).name or "export")
        with store.errors():
            written = export(store.sessions, job, fmt, local, options)
        uris = upload(store.settings, local, output)
    err_console.print(
        f"job {job}: {written} uploaded to {output} ({fmt}, {len(uris)} object(s))",
        highlight=False,
    )
