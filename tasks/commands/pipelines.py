"""`trapq pipelines`: named, versioned pipelines in the job store (list, add, show, remove)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from db.pipelines import PipelineError, StoredPipeline, find_pipeline, list_pipelines
from db.pipelines import remove_pipeline as remove_from_store
from tasks.cli_app import app, console, job_store, short_fingerprint
from tasks.errors import UserError
from tasks.pipeline import add_named_pipeline

pipelines_app = typer.Typer(
    help="Named, versioned pipelines: the models and settings a job runs.",
    invoke_without_command=True,
)
app.add_typer(pipelines_app, name="pipelines")


@pipelines_app.callback()
def pipelines(ctx: typer.Context) -> None:
    """List the pipelines: name, version, fingerprint, models, jobs using them."""
    if ctx.invoked_subcommand is not None:
        return
    with job_store().read() as session:
        rows = list_pipelines(session)
    if not rows:
        console.print("no pipelines yet: `trapq pipelines add NAME`, or enqueue once "
                      "(the TRAPQ_* settings become `default`)")
        return
    table = Table(title="pipelines")
    for column in ("pipeline", "fingerprint", "models", "jobs", "not ended", "description"):
        table.add_column(column, no_wrap=column in ("pipeline", "fingerprint"))
    for r in rows:
        p = r.pipeline
        table.add_row(p.label, short_fingerprint(p.fingerprint), p.model_names() or "-",
                      str(r.jobs), str(r.active_jobs), r.description)
    console.print(table)


@pipelines_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The pipeline's name, e.g. quebec-vermont.")],
    detector: Annotated[str | None, typer.Option(help="Detector registry name.")] = None,
    detector_weights: Annotated[
        str | None, typer.Option(help="Detector weights: path, http(s):// URL or s3:// URI.")
    ] = None,
    detector_labels: Annotated[str | None, typer.Option(help="Detector label file.")] = None,
    classifier: Annotated[str | None, typer.Option(help="Classifier registry name.")] = None,
    classifier_weights: Annotated[
        str | None, typer.Option(help="Classifier weights: path, http(s):// URL or s3:// URI.")
    ] = None,
    classifier_labels: Annotated[str | None, typer.Option(help="Classifier label file.")] = None,
    classifier_input_size: Annotated[
        int | None, typer.Option(help="Classifier crop side in pixels (0: the registry's).")
    ] = None,
    filter_classifier: Annotated[
        str | None, typer.Option("--filter", help="Optional filter classifier registry name.")
    ] = None,
    filter_weights: Annotated[str | None, typer.Option(help="Filter weights.")] = None,
    filter_labels: Annotated[str | None, typer.Option(help="Filter label file.")] = None,
    filter_input_size: Annotated[int | None, typer.Option(help="Filter crop side.")] = None,
    filter_negative: Annotated[
        str | None, typer.Option(help="Filter label whose crops skip the classifier.")
    ] = None,
    box_threshold: Annotated[float | None, typer.Option(help="Detector score threshold.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Classifications kept per box.")] = None,
    taxonomy: Annotated[
        str | None,
        typer.Option(help="Taxonomy CSV of the classifier's labels (README: answers at the "
                     "rank the evidence supports)."),
    ] = None,
    species_threshold: Annotated[
        float | None, typer.Option(help="Below it an answer rolls up the taxonomy; (0, 1].")
    ] = None,
    random_weights: Annotated[
        bool | None, typer.Option(help="Seeded random weights (tests, benchmarks).")
    ] = None,
    description: Annotated[str, typer.Option(help="What it is for.")] = "",
) -> None:
    """Record a pipeline: the weights are hashed here, once. Adding NAME again with other
    contents makes its next version; the same contents find the version that has them.

    Options left out take the TRAPQ_* settings' values."""
    given: dict[str, Any] = {
        "detector": detector,
        "detector_weights": detector_weights,
        "detector_labels": detector_labels,
        "classifier": classifier,
        "classifier_weights": classifier_weights,
        "classifier_labels": classifier_labels,
        "classifier_input_size": classifier_input_size,
        "filter_classifier": filter_classifier,
        "filter_weights": filter_weights,
        "filter_labels": filter_labels,
        "filter_input_size": filter_input_size,
        "filter_negative": filter_negative,
        "box_threshold": box_threshold,
        "top_k": top_k,
        "classifier_taxonomy": taxonomy,
        "species_threshold": species_threshold,
        "random_weights": random_weights,
    }
    stored, created = add_named_pipeline(
        job_store().settings, name, {k: v for k, v in given.items() if v is not None}, description
    )
    what = "recorded" if created else "unchanged, already recorded"
    console.print(f"{stored.label} {what}: {stored.model_names()} · fingerprint "
                  f"{short_fingerprint(stored.fingerprint)}", highlight=False)


@pipelines_app.command("show")
def show(ref: Annotated[str, typer.Argument(help="NAME (its latest version) or NAME@VERSION.")]
         ) -> None:
    """One pipeline's full spec, as JSON."""
    stored = _find(ref)
    console.print_json(json.dumps({"pipeline": stored.label, "fingerprint": stored.fingerprint,
                                   **stored.spec}))


@pipelines_app.command("remove")
def remove(ref: Annotated[str, typer.Argument(help="NAME (every version) or NAME@VERSION.")]
           ) -> None:
    """Remove a pipeline; refused while a job that has not ended uses it. Ended jobs keep
    their own record of what they ran."""
    try:
        with job_store().write() as session:
            removed = remove_from_store(session, ref)
    except PipelineError as e:
        raise UserError(str(e)) from None
    console.print(f"removed {', '.join(removed)}", highlight=False)


def _find(ref: str) -> StoredPipeline:
    try:
        with job_store().read() as session:
            return find_pipeline(session, ref)
    except PipelineError as e:
        raise UserError(str(e)) from None
